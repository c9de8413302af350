"""The example code location's fan-out and detached modes, run as a user would on the local stack."""

import time
from typing import Any

from dagster import DagsterInstance, SensorResult, build_sensor_context, materialize
from google.cloud import pubsub_v1, storage

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


def test_landed_object_notification_materializes_the_asset_with_its_path(stack: Any) -> None:
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(stack.project, "landing-objects")}).name
        subscriber.create_subscription(
            request={"name": subscriber.subscription_path(stack.project, "landing-objects"), "topic": topic}
        )
        notification = {"bucketId": "raw-drops", "eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}
        publisher.publish(topic, b"{}", **notification, objectId="landing/orders-1.csv", objectGeneration="7").result()
        publisher.publish(topic, b"{}", **notification, objectId="elsewhere/x.csv", objectGeneration="8").result()

    with DagsterInstance.ephemeral() as instance:
        tick = landed_objects(build_sensor_context(instance=instance))
        (request,) = tick.run_requests
        assert request.tags["gcs/object"] == "landing/orders-1.csv"
        result = materialize(
            [cloud_function_pipes_asset],
            resources={"pipes_pubsub": pipes_pubsub_from_env()},
            instance=instance,
            run_config=request.run_config,
        )
        assert result.success
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    assert "triggered by gs://raw-drops/landing/orders-1.csv" in logs
