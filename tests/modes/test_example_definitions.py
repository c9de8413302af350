"""The example code location's fan-out and detached modes, run as a user would on the local stack."""

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context, materialize
from dagster._core.storage.tags import RUN_KEY_TAG
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.session.pull import ack, pull

from examples.sales.definitions import (
    cloud_function_pipes_asset,
    detached_completions,
    detached_sales,
    detached_sales_job,
    landed_objects,
    pipes_pubsub_from_env,
    sharded_sales,
)
from tests.conftest import LAKE_BUCKET
from tests.modes.daemon import TickStatus, sensor_daemon


def test_sharded_sales_writes_every_part_and_aggregates_metadata(stack: Any) -> None:
    with DagsterInstance.ephemeral() as instance:
        result = materialize([sharded_sales], resources={"pipes_pubsub": pipes_pubsub_from_env()}, instance=instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    assert metadata["pipes_shard_count"] == 4
    locations = [s["table_location"] for s in metadata["pipes_shards"]]
    assert locations == [f"gs://{LAKE_BUCKET}/sales/sharded_sales/part-{i}.parquet" for i in range(4)]
    assert [s["row_count"] for s in metadata["pipes_shards"]] == [250] * 4
    written = {b.name for b in storage.Client().list_blobs(LAKE_BUCKET, prefix="sales/sharded_sales/")}
    assert written == {f"sales/sharded_sales/part-{i}.parquet" for i in range(4)}


def test_detached_job_then_completion_sensor_records_the_materialization(stack: Any) -> None:
    client = pipes_pubsub_from_env()
    with DagsterInstance.ephemeral() as instance:
        run = detached_sales_job.execute_in_process(resources={"pipes_pubsub": client}, instance=instance)
        assert run.success
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = detached_completions(build_sensor_context(instance=instance, resources={"pipes_pubsub": client}))
            if isinstance(result, SensorResult) and result.asset_events:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the completion sensor never recorded detached_sales")
        (event,) = result.asset_events
        assert event.asset_key == detached_sales.key
        assert event.metadata["table_location"].value == f"gs://{LAKE_BUCKET}/sales/detached_sales/part-0.parquet"
        assert event.metadata["row_count"].value == 1000
        assert "generating 1000 rows" in event.metadata["pipes_log_tail"].value
        # the ack phase, with the cursor the daemon kept
        detached_completions(build_sensor_context(instance=instance, cursor=result.cursor, resources={"pipes_pubsub": client}))


@pytest.fixture
def landing(stack: Any) -> Iterator[tuple[pubsub_v1.PublisherClient, str]]:
    """The topic and subscription ``landed_objects`` reads (``landing-objects``), empty; the publisher and topic.
    Emptied on the emulator itself, before and after (a wiretap: through the production-semantics layer a short
    pull can come back empty while messages wait, or lose them to its race until their ack deadline, and one
    test's notification was left for the next test on the same worker)."""
    with stack.provisioning():
        tap = pubsub_v1.SubscriberClient()
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber, tap:
        topic = publisher.topic_path(stack.project, "landing-objects")
        path = subscriber.subscription_path(stack.project, "landing-objects")
        with contextlib.suppress(gexc.AlreadyExists):
            publisher.create_topic(request={"name": topic})
        with contextlib.suppress(gexc.AlreadyExists):
            subscriber.create_subscription(request={"name": path, "topic": topic})
        drain(tap, path)
        yield publisher, topic
        drain(tap, path)


def drain(subscriber: pubsub_v1.SubscriberClient, path: str) -> None:
    while received := pull(subscriber, path, max_messages=1000, timeout=2.0):
        ack(subscriber, path, [m.ack_id for m in received])


def notify(publisher: pubsub_v1.PublisherClient, topic: str, name: str, generation: int) -> None:
    """A Cloud Storage OBJECT_FINALIZE notification, as the service publishes it."""
    attributes = {"bucketId": "raw-drops", "eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}
    publisher.publish(topic, b"{}", **attributes, objectId=name, objectGeneration=str(generation)).result()


def test_landed_object_notification_materializes_the_asset_with_its_path(
    landing: tuple[pubsub_v1.PublisherClient, str],
) -> None:
    publisher, topic = landing
    notify(publisher, topic, "landing/orders-1.csv", 7)
    notify(publisher, topic, "elsewhere/x.csv", 8)

    with DagsterInstance.ephemeral() as instance:
        tick = landed_objects(build_sensor_context(instance=instance))
        (request,) = tick.run_requests
        assert request.tags["gcs/object"] == "landing/orders-1.csv"
        assert request.run_key == "raw-drops/landing/orders-1.csv#7"
        result = materialize(
            [cloud_function_pipes_asset],
            resources={"pipes_pubsub": pipes_pubsub_from_env()},
            instance=instance,
            run_config=request.run_config,
        )
        assert result.success
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    assert "triggered by gs://raw-drops/landing/orders-1.csv" in logs


@pytest.mark.parametrize("objects", [pytest.param(30, id="30"), pytest.param(100, id="100", marks=pytest.mark.long)])
def test_duplicate_notifications_of_one_object_write_launch_one_run(
    landing: tuple[pubsub_v1.PublisherClient, str], objects: int
) -> None:
    """Objects land, 10 of their notifications arrive twice (two messages each): through Dagster's sensor daemon
    on a persistent instance, one run per object write. (Creating a queued run takes Dagster about 0.2 s here:
    the default run lands 30 objects, the long one 100.)"""
    publisher, topic = landing
    for i in range(objects):
        notify(publisher, topic, f"landing/part-{i}.csv", 1000 + i)
    for i in range(10):
        notify(publisher, topic, f"landing/part-{i}.csv", 1000 + i)

    with sensor_daemon("example", module_name="examples.sales.definitions", attribute="defs") as daemon:
        daemon.start("landed_objects")
        # until every object has its run and a tick finds nothing waiting: through the production-semantics layer
        # a tick's pull may lose messages to the pull race, and they come back only after their ack deadline
        # (10 s), so one empty tick before then is not the end (a fresh-clone run saw 95 of 100 runs, then an empty tick)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tick = daemon.tick()
            launched = {run.tags[RUN_KEY_TAG] for run in daemon.instance.get_runs()}
            if tick.status == TickStatus.SKIPPED and "no messages waiting" in (tick.skip_reason or ""):
                if len(launched) >= objects:
                    break
                time.sleep(1)
        runs = daemon.instance.get_runs()

    keys = sorted(run.tags[RUN_KEY_TAG] for run in runs)
    assert keys == sorted(f"raw-drops/landing/part-{i}.csv#{1000 + i}" for i in range(objects))
