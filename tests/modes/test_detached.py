"""Detached mode on the local stack: the step only triggers; a completion sensor ends every session visibly
(recorded, failed or expired), exactly once, also through Dagster's own sensor daemon dying mid-tick."""

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    OpExecutionContext,
    Output,
    RunRequest,
    SensorResult,
    SkipReason,
    StaticPartitionsDefinition,
    build_sensor_context,
    instance_for_test,
    job,
    op,
)
from dagster._core.remote_representation.code_location import InProcessCodeLocation
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.definitions.completion_sensor import (
    OUTCOME_TAG,
    SESSION_TAG,
    pipes_completion_sensor,
    unrecorded_events,
)
from dagster_gcf_pipes.orchestrator.modes.detached_registry import owner_key, registry_prefix
from dagster_gcf_pipes.orchestrator.session.pull import nack, pull
from dagster_gcf_pipes.shared.layout import session_prefix
from dagster_gcf_pipes.shared.protocol import Reply
from tests.conftest import PAYLOAD_BUCKET, TEST_TOPIC
from tests.integration.helpers import make_client
from tests.modes.daemon import DaemonDied, SensorDaemon, sensor_daemon
from tests.modes.subscriptions import wait_until_pullable, whole_deliveries, wiretap

ASSET = AssetKey("detached_asset")

# ------------------------------------------------------------ the code location the daemon test loads (this file)

DAEMON_TOPIC = "detached-daemon-test"  # its reply topic and durable subscription, created by the test
daemon_defs = Definitions(
    sensors=[
        pipes_completion_sensor(
            subscription=DAEMON_TOPIC,
            name="daemon_completions",
            default_status=DefaultSensorStatus.RUNNING,
            # not 0.5 s: the production-semantics layer polls the emulator every 0.5 s during a pull and loses
            # (until its ack deadline) what reaches the poll at the pull's very end, every time for a 0.5 s pull
            pull_timeout_seconds=1.5,
        )
    ],
    resources={"pipes_pubsub": make_client(detached_reply_topic=DAEMON_TOPIC)},
)

# --------------------------------------------------------------------------------------------- helpers


def create_reply_topic(project: str, name: str) -> None:
    """A detached reply topic and its durable subscription, both called ``name``."""
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(project, name)}).name
        path = subscriber.create_subscription(
            request={"name": subscriber.subscription_path(project, name), "topic": topic}
        ).name
        wait_until_pullable(subscriber, path)


def delete_reply_topic(project: str, name: str) -> None:
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        subscriber.delete_subscription(request={"subscription": subscriber.subscription_path(project, name)})
        publisher.delete_topic(request={"topic": publisher.topic_path(project, name)})


@pytest.fixture
def detached(stack: Any) -> Iterator[tuple[PipesPubSubClient, str]]:
    """A detached reply topic with its durable subscription; the client configured for it."""
    name = f"detached-{uuid.uuid4().hex[:8]}"
    create_reply_topic(stack.project, name)
    # a small threshold so the context and the trigger travel as claim-checks the sensor must clean up
    yield make_client(detached_reply_topic=name, inline_threshold_bytes=4096), name
    delete_reply_topic(stack.project, name)


def trigger(client: PipesPubSubClient, payloads: list[dict[str, Any]], instance: DagsterInstance) -> list[str]:
    """Run a job whose step starts one detached session per payload; their session ids."""

    @op
    def trigger_detached(context: OpExecutionContext, pipes_pubsub: PipesPubSubClient):
        sessions = [
            pipes_pubsub.run_detached(context=context, payload=payload, asset_key=ASSET, extras={"pad": "x" * 5000})
            for payload in payloads
        ]
        assert all(s.trigger_message_id for s in sessions)
        return Output(None, metadata={"pipes_session_ids": json.dumps([s.session_id for s in sessions])})

    @job
    def detached_job():
        trigger_detached()

    result = detached_job.execute_in_process(resources={"pipes_pubsub": client}, instance=instance)
    assert result.success
    (output,) = [e for e in result.all_events if e.is_successful_output]
    return json.loads(output.event_specific_data.metadata["pipes_session_ids"].value)


def tick(sensor: Any, client: PipesPubSubClient, instance: DagsterInstance, cursor: str | None) -> SensorResult | SkipReason:
    return sensor(build_sensor_context(instance=instance, cursor=cursor, resources={"pipes_pubsub": client}))


def first_ending_tick(
    sensor: Any, client: PipesPubSubClient, instance: DagsterInstance, timeout: float = 60
) -> SensorResult:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = tick(sensor, client, instance, None)
        if isinstance(result, SensorResult):
            return result
        time.sleep(0.5)
    raise AssertionError("no detached session ended in time")


def session_objects(client: PipesPubSubClient, session_id: str) -> list[str]:
    return [b.name for b in storage.Client().list_blobs(PAYLOAD_BUCKET, prefix=session_prefix(client.prefix, session_id))]


def pending_entries(client: PipesPubSubClient) -> list[str]:
    prefix = registry_prefix(client.prefix, client.detached_reply_topic or "")
    return [b.name.rsplit("/", 1)[-1] for b in storage.Client().list_blobs(PAYLOAD_BUCKET, prefix=prefix)]


def recorded_sessions(instance: DagsterInstance) -> list[str]:
    """The session id of every materialization of ASSET the instance holds."""
    records = instance.fetch_materializations(ASSET, limit=1000).records
    return [r.asset_materialization.metadata["pipes_session_id"].value for r in records]


def wait_until_closed(stack: Any, subscription: str, session_ids: list[str], timeout: float = 60) -> None:
    """Until the subscription holds every session's ``closed`` (what it pulls, it hands straight back)."""
    path = f"projects/{stack.project}/subscriptions/{subscription}"
    closed: set[str] = set()
    deadline = time.monotonic() + timeout
    with wiretap(stack) as subscriber:
        while set(session_ids) - closed:
            assert time.monotonic() < deadline, f"sessions {set(session_ids) - closed} never closed"
            received = pull(subscriber, path, max_messages=1000, timeout=1)
            for message in received:
                reply = Reply.decode(message.message.data, dict(message.message.attributes))
                if any(m["method"] == "closed" for m in reply.messages):
                    closed.add(reply.session_id)
            nack(subscriber, path, [m.ack_id for m in received])


def waiting_messages(stack: Any, subscription: str) -> int:
    path = f"projects/{stack.project}/subscriptions/{subscription}"
    with wiretap(stack) as subscriber:
        received = pull(subscriber, path, max_messages=1000, timeout=1)
        nack(subscriber, path, [m.ack_id for m in received])
    return len(received)


def failure_message(request: RunRequest) -> str:
    (config,) = [op["config"] for op in request.run_config["ops"].values()]
    return config["message"]


# --------------------------------------------------------------------------------------------- tests


def test_detached_session_is_recorded_exactly_once(detached: tuple[PipesPubSubClient, str]) -> None:
    client, subscription = detached
    sensor = pipes_completion_sensor(subscription=subscription)
    with DagsterInstance.ephemeral() as instance:
        (session_id,) = trigger(client, [{"n": 5, "log_lines": 3}], instance)
        assert instance.get_latest_materialization_event(ASSET) is None  # the step itself recorded nothing
        assert pending_entries(client) == [session_id]

        lost = first_ending_tick(sensor, client, instance)  # a tick whose result the daemon never kept
        again = tick(sensor, client, instance, None)  # ... so the same messages are evaluated again
        assert isinstance(again, SensorResult)
        assert [e.asset_key.to_user_string() for e in lost.asset_events] == [ASSET.to_user_string()]
        assert [e.metadata for e in again.asset_events] == [e.metadata for e in lost.asset_events]

        for event in again.asset_events:  # the daemon writes this tick's events, then dies before the cursor
            instance.report_runless_asset_event(event)
        rerun = tick(sensor, client, instance, None)  # evaluated again with the old cursor: nothing twice
        assert isinstance(rerun, SensorResult) and rerun.asset_events == [] and rerun.cursor == again.cursor

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
        assert pending_entries(client) == []


def test_a_partitioned_run_detached_is_recorded_on_its_partition(detached: tuple[PipesPubSubClient, str]) -> None:
    """Before, the sensor recorded the materialization with partition None: the partition was lost."""
    client, subscription = detached

    @op
    def trigger_partition(context: OpExecutionContext, pipes_pubsub: PipesPubSubClient) -> Output[None]:
        session = pipes_pubsub.run_detached(context=context, payload={"n": 2}, asset_key=ASSET)
        return Output(None, metadata=session.metadata)

    @job(partitions_def=StaticPartitionsDefinition(["p1", "p2", "p3"]))
    def partitioned_detached_job() -> None:
        trigger_partition()

    sensor = pipes_completion_sensor(subscription=subscription)
    with DagsterInstance.ephemeral() as instance:
        run = partitioned_detached_job.execute_in_process(
            partition_key="p2", resources={"pipes_pubsub": client}, instance=instance
        )
        assert run.success
        recorded = first_ending_tick(sensor, client, instance)
        (event,) = recorded.asset_events
        assert event.partition == "p2"
        instance.report_runless_asset_event(event)  # as the daemon writes it
        assert instance.get_materialized_partitions(ASSET) == {"p2"}
        tick(sensor, client, instance, recorded.cursor)  # the ack phase
        assert pending_entries(client) == []


def test_a_failed_session_is_a_failed_run_request_with_the_traceback(detached: tuple[PipesPubSubClient, str]) -> None:
    client, subscription = detached
    sensor = pipes_completion_sensor(subscription=subscription, name="completions")
    with DagsterInstance.ephemeral() as instance:
        (session_id,) = trigger(client, [{"scenario": "raise"}], instance)
        result = first_ending_tick(sensor, client, instance)
        assert result.asset_events == []
        (request,) = result.run_requests
        assert request.run_key == session_id  # a re-evaluated tick requests it again; Dagster launches it once
        assert request.tags[SESSION_TAG] == session_id and request.tags[OUTCOME_TAG] == "failed"
        message = failure_message(request)
        assert f"detached session {session_id}" in message and "failed in the function" in message
        assert "boom from the function" in message and "ValueError: invalid literal" in message
        assert sensor.job_name == "completions_failed_sessions"
        tick(sensor, client, instance, result.cursor)  # the ack phase: a failed session is cleaned up too
        assert session_objects(client, session_id) == []
        assert pending_entries(client) == []


def test_a_session_whose_function_never_starts_expires_visibly_and_leaves_nothing(stack: Any) -> None:
    """Nobody consumes the trigger topic: after the detached start window and the function's timeout the
    sensor reports the session as expired (a failed run request) and removes its claim-checked trigger."""
    nobody = f"detached-nobody-{uuid.uuid4().hex[:8]}"
    with pubsub_v1.PublisherClient() as publisher:
        publisher.create_topic(request={"name": publisher.topic_path(stack.project, nobody)})
    replies = f"detached-{uuid.uuid4().hex[:8]}"
    create_reply_topic(stack.project, replies)
    client = make_client(
        trigger_topic=nobody, detached_reply_topic=replies, inline_threshold_bytes=4096,
        detached_start_timeout=1.0, function_timeout=1.0,
    )
    sensor = pipes_completion_sensor(subscription=replies, expiry_margin_seconds=0)
    try:
        with DagsterInstance.ephemeral() as instance:
            (session_id,) = trigger(client, [{"big": "y" * 5000}], instance)
            assert "trigger.json" in " ".join(session_objects(client, session_id))
            result = first_ending_tick(sensor, client, instance)
            (request,) = result.run_requests
            assert request.run_key == session_id and request.tags[OUTCOME_TAG] == "expired"
            message = failure_message(request)
            assert "never started" in message and nobody in message and "detached_start_timeout=1s" in message
            tick(sensor, client, instance, result.cursor)  # the ack phase
        assert session_objects(client, session_id) == []
        assert pending_entries(client) == []
    finally:
        delete_reply_topic(stack.project, replies)


def test_a_trigger_delivered_after_startup_timeout_still_runs_detached(stack: Any) -> None:
    """The function was down for longer than startup_timeout; Eventarc delivers the trigger late (its
    publishTime unchanged). A detached session has its own start window: it runs and is recorded."""
    parked = f"detached-parked-{uuid.uuid4().hex[:8]}"
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(stack.project, parked)}).name
        held = subscriber.create_subscription(
            request={"name": subscriber.subscription_path(stack.project, parked), "topic": topic}
        ).name
    replies = f"detached-{uuid.uuid4().hex[:8]}"
    create_reply_topic(stack.project, replies)
    client = make_client(trigger_topic=parked, detached_reply_topic=replies, startup_timeout=1.0)
    sensor = pipes_completion_sensor(subscription=replies)
    try:
        with DagsterInstance.ephemeral() as instance:
            (session_id,) = trigger(client, [{"n": 7}], instance)
            time.sleep(3)  # the outage outlasts startup_timeout
            with pubsub_v1.SubscriberClient() as subscriber:
                (message,) = pull(subscriber, held, max_messages=10, timeout=5)
                deliver_as_eventarc(stack, message.message)
                subscriber.acknowledge(request={"subscription": held, "ack_ids": [message.ack_id]})
            result = first_ending_tick(sensor, client, instance)
            (event,) = result.asset_events
            assert event.metadata["pipes_session_id"].value == session_id and event.metadata["n"].value == 7
            tick(sensor, client, instance, result.cursor)
        assert pending_entries(client) == []
    finally:
        delete_reply_topic(stack.project, replies)


def deliver_as_eventarc(stack: Any, message: Any) -> None:
    """POST the trigger to the test function as Eventarc's push does: the original messageId and publishTime."""
    body = {
        "message": {
            "data": base64.b64encode(message.data).decode(),
            "attributes": dict(message.attributes),
            "messageId": message.message_id,
            "publishTime": message.publish_time.isoformat().replace("+00:00", "Z"),
        },
        "subscription": f"projects/{stack.project}/subscriptions/eventarc",
    }
    url = stack.function_urls[TEST_TOPIC] + f"projects/{stack.project}/topics/{TEST_TOPIC}"
    response = requests.post(url, json=body, timeout=60)
    assert response.ok, response.text


def test_the_events_the_instance_already_holds_for_a_session_are_left_out() -> None:
    """What a daemon that died part-way through a tick wrote, materializations and check evaluations alike,
    counted per asset and check in the order the function reported them."""
    def session_event(session_id: str, check: str = "", part: int = 0) -> Any:
        metadata = {"pipes_session_id": session_id, "part": part}
        if check:
            return AssetCheckEvaluation(asset_key=ASSET, check_name=check, passed=True, metadata=metadata)
        return AssetMaterialization(ASSET, metadata=metadata)

    events = [session_event("s1", part=1), session_event("s1", check="rows"), session_event("s1", part=2)]
    with instance_for_test() as instance:
        since = time.time() - 60
        assert unrecorded_events(instance, "s1", events, since) == events
        instance.report_runless_asset_event(events[0])
        assert unrecorded_events(instance, "s1", events, since) == events[1:]
        instance.report_runless_asset_event(events[1])
        assert unrecorded_events(instance, "s1", events, since) == events[2:]
        instance.report_runless_asset_event(events[2])
        assert unrecorded_events(instance, "s1", events, since) == []
        other = [session_event("s2", part=1), session_event("s2", check="rows")]  # another session's: not held
        assert unrecorded_events(instance, "s2", other, since) == other


def test_run_detached_without_topic_names_the_setting(stack: Any) -> None:
    with DagsterInstance.ephemeral() as instance, pytest.raises(Exception, match="detached_reply_topic is not set"):
        trigger(make_client(), [{}], instance)


# ------------------------------------------------------------------------ the daemon dying at every write


class DiesAtWrite:
    """Makes the daemon die at its ``k``-th write after the sensor's evaluation returned: the asset events
    (written one at a time), the failure run, then the tick's cursor. With ``k=None`` it only counts."""

    def __init__(self, daemon: SensorDaemon, monkeypatch: pytest.MonkeyPatch, k: int | None):
        self.k, self.writes, self.armed = k, 0, False
        instance = daemon.instance
        for name in ("report_runless_asset_event", "create_run", "update_instigator_state"):
            monkeypatch.setattr(instance, name, self._counted(getattr(instance, name)))
        evaluate = InProcessCodeLocation.get_sensor_execution_data

        def evaluated(location: Any, *args: Any, **kwargs: Any) -> Any:
            result = evaluate(location, *args, **kwargs)
            self.armed = True
            return result

        monkeypatch.setattr(InProcessCodeLocation, "get_sensor_execution_data", evaluated)

    def _counted(self, write: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                if self.writes == self.k:
                    self.armed = False
                    raise DaemonDied(f"the daemon died at write {self.k}")
                self.writes += 1
            return write(*args, **kwargs)

        return counted


#: a tick's writes after its evaluation: three events, the failure run, the cursor
TICK_WRITES = 5


@pytest.mark.parametrize(
    "deaths", [(None, 0), (1, 2), (3, 4)], ids=lambda ks: "write " + "+".join("none" if k is None else str(k) for k in ks)
)
def test_the_daemon_dying_at_any_write_of_a_tick_records_each_session_exactly_once(
    stack: Any, monkeypatch: pytest.MonkeyPatch, deaths: tuple[int | None, ...]
) -> None:
    """Dagster's sensor daemon on a persistent instance. Each round starts three sessions that succeed and one
    that fails, waits until their replies are all in, and lets the daemon die at the round's write k (k = 0
    .. the number of writes of a tick: the parameters cover them all, a few to a test); the ticks after it
    must end every session exactly once: one materialization per successful session, one failed run for the
    failed one, nothing left behind. One round in which the daemon does not die counts a tick's writes: the
    parameters must cover each of them."""
    create_reply_topic(stack.project, DAEMON_TOPIC)
    client = make_client(detached_reply_topic=DAEMON_TOPIC)
    try:
        with sensor_daemon(
            "detached_daemon_test", python_file=__file__, attribute="daemon_defs", synchronous=True
        ) as daemon:
            for k in deaths:
                writes = run_round(stack, daemon, client, monkeypatch, k=k)
                if k is None:
                    assert writes == TICK_WRITES, f"a tick writes {writes} times: the parameters cover 0..{TICK_WRITES - 1}"
    finally:
        delete_reply_topic(stack.project, DAEMON_TOPIC)
        # the next of these tests has a daemon of its own on this topic: this one's claim on it would make its
        # sensor refuse (one completion sensor per reply topic) until this one had been silent 600 s
        topic = f"projects/{stack.project}/topics/{DAEMON_TOPIC}"
        storage.Client().bucket(PAYLOAD_BUCKET).blob(owner_key(client.prefix, topic)).delete()


def run_round(
    stack: Any, daemon: SensorDaemon, client: PipesPubSubClient, monkeypatch: pytest.MonkeyPatch, k: int | None
) -> int:
    """One round; returns how many writes the round's first tick made after its evaluation. That tick pulls
    with the production-semantics layer's delivery faults off, so that it sees all four sessions end and
    its k-th write is the same write in every round (the faults are on for the ticks after it)."""
    project = stack.project
    sessions = trigger(client, [{"n": i} for i in range(3)] + [{"scenario": "raise"}], daemon.instance)
    ok, failed = sessions[:3], sessions[3]
    wait_until_closed(stack, DAEMON_TOPIC, sessions)
    with monkeypatch.context() as patch, whole_deliveries(stack):
        faults = DiesAtWrite(daemon, patch, k)
        if k is None:
            daemon.tick()
        else:
            daemon.crash_tick()
    for _ in range(3):  # the recovery (or the ack phase), then nothing left to do
        daemon.tick()

    recorded = recorded_sessions(daemon.instance)
    assert [recorded.count(s) for s in ok] == [1, 1, 1], f"died at write {k}: {recorded}"
    assert failed not in recorded
    (run,) = daemon.runs_with_key(failed)
    assert run.status == DagsterRunStatus.FAILURE and run.tags[OUTCOME_TAG] == "failed"
    assert [s for s in ok if daemon.runs_with_key(s)] == []
    assert pending_entries(client) == []
    assert [session_objects(client, s) for s in sessions] == [[]] * 4
    assert waiting_messages(stack, DAEMON_TOPIC) == 0
    return faults.writes
