"""Detached mode on the local stack: the step only triggers; a completion sensor records the results."""

import time
import uuid
from typing import Any

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    OpExecutionContext,
    Output,
    SensorResult,
    SkipReason,
    build_sensor_context,
    job,
    op,
)
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.detached import pipes_completion_sensor
from dagster_gcf_pipes.shared.layout import session_prefix
from tests.conftest import PAYLOAD_BUCKET
from tests.integration.helpers import make_client

ASSET = AssetKey("detached_asset")


@pytest.fixture
def detached(stack: Any) -> tuple[PipesPubSubClient, str]:
    """A detached reply topic with its durable subscription; the client configured for it."""
    name = f"detached-{uuid.uuid4().hex[:8]}"
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(stack.project, name)}).name
        subscriber.create_subscription(request={"name": subscriber.subscription_path(stack.project, name), "topic": topic})
    # a small threshold so the context and the trigger travel as claim-checks the sensor must clean up
    return make_client(detached_reply_topic=name, inline_threshold_bytes=4096), name


def trigger(client: PipesPubSubClient, payload: dict[str, Any], instance: DagsterInstance) -> dict[str, Any]:
    @op
    def trigger_detached(context: OpExecutionContext, pipes_pubsub: PipesPubSubClient):
        session = pipes_pubsub.run_detached(context=context, payload=payload, asset_key=ASSET, extras={"pad": "x" * 5000})
        return Output(None, metadata=session.metadata)

    @job
    def detached_job():
        trigger_detached()

    result = detached_job.execute_in_process(resources={"pipes_pubsub": client}, instance=instance)
    assert result.success
    (output,) = [e for e in result.all_events if e.is_successful_output]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


def tick(sensor: Any, client: PipesPubSubClient, instance: DagsterInstance, cursor: str | None) -> SensorResult | SkipReason:
    return sensor(build_sensor_context(instance=instance, cursor=cursor, resources={"pipes_pubsub": client}))


def first_recording_tick(sensor: Any, client: PipesPubSubClient, instance: DagsterInstance, timeout: float = 60) -> SensorResult:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = tick(sensor, client, instance, None)
        if isinstance(result, SensorResult):
            return result
        time.sleep(0.5)
    raise AssertionError("the detached session was not recorded in time")


def session_objects(client: PipesPubSubClient, session_id: str) -> list[str]:
    return [b.name for b in storage.Client().list_blobs(PAYLOAD_BUCKET, prefix=session_prefix(client.prefix, session_id))]


def test_detached_session_is_recorded_exactly_once(detached: tuple[PipesPubSubClient, str]) -> None:
    client, subscription = detached
    sensor = pipes_completion_sensor(subscription=subscription)
    with DagsterInstance.ephemeral() as instance:
        step_metadata = trigger(client, {"n": 5, "log_lines": 3}, instance)
        session_id = step_metadata["pipes_session_id"]
        assert step_metadata["pipes_trigger_message_id"]
        assert instance.get_latest_materialization_event(ASSET) is None  # the step itself recorded nothing

        lost = first_recording_tick(sensor, client, instance)  # a tick whose result the daemon never kept
        again = tick(sensor, client, instance, None)  # ... so the same messages are evaluated again
        assert isinstance(again, SensorResult)
        assert [e.asset_key.to_user_string() for e in lost.asset_events] == [ASSET.to_user_string()]
        assert [e.metadata for e in again.asset_events] == [e.metadata for e in lost.asset_events]

        for event in again.asset_events:  # this tick's result is kept, as the daemon would
            instance.report_runless_asset_event(event)
        assert session_objects(client, session_id), "claim-check objects stay until the ack phase"
        acked = tick(sensor, client, instance, again.cursor)
        assert isinstance(acked, SkipReason) or not acked.asset_events
        assert isinstance(tick(sensor, client, instance, again.cursor), SkipReason)  # nothing left to pull

        (record,) = instance.fetch_materializations(ASSET, limit=10).records
        metadata = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        assert metadata["n"] == 5
        assert metadata["pipes_session_id"] == session_id
        assert metadata["pipes_log_lines"] == 4  # "scenario echo starts" and three lines
        assert metadata["pipes_log_tail"].endswith("line 2")
        assert session_objects(client, session_id) == []


def test_failed_detached_session_records_nothing_and_logs_the_traceback(
    detached: tuple[PipesPubSubClient, str], capfd: pytest.CaptureFixture[str]
) -> None:
    client, subscription = detached
    sensor = pipes_completion_sensor(subscription=subscription)
    with DagsterInstance.ephemeral() as instance:
        session_id = trigger(client, {"scenario": "raise"}, instance)["pipes_session_id"]
        result = first_recording_tick(sensor, client, instance)
        assert result.asset_events == []
        assert session_id in result.cursor
        tick(sensor, client, instance, result.cursor)  # the ack phase: a failed session is cleaned up too
        assert session_objects(client, session_id) == []
    logged = capfd.readouterr().err
    assert f"detached session {session_id} failed; nothing recorded" in logged
    assert "boom from the function" in logged and "ValueError: invalid literal" in logged


def test_run_detached_without_topic_names_the_setting(stack: Any) -> None:
    with DagsterInstance.ephemeral() as instance, pytest.raises(Exception, match="detached_reply_topic is not set"):
        trigger(make_client(), {}, instance)
