"""The end of a session, on the real local stack: durable until the trigger's start window has passed (a late
or duplicate delivery, pushed or pulled, neither runs nor leaves anything behind), enforced at the function's
timeout on both sides, reached at once when a run or a fan-out is interrupted, and independent of the
orchestrator's clock."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.function import session as session_module
from dagster_gcf_pipes.function.lease import take_lease
from dagster_gcf_pipes.function.session import SessionOutcome, run_session
from dagster_gcf_pipes.orchestrator.client import session_lifecycle
from dagster_gcf_pipes.orchestrator.session import end
from dagster_gcf_pipes.orchestrator.session.end import end_lease
from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.lease import ENDED, HELD, LeaseRecord, read_lease, write_lease
from dagster_gcf_pipes.shared.protocol import Attr
from tests.conftest import LAKE_BUCKET, PAYLOAD_BUCKET, SCRIPTED_TOPIC, TEST_TOPIC
from tests.faults.cancel_run import interrupt_run
from tests.faults.scripted import ScriptedFunction, opened
from tests.faults.test_process_faults import lake_object_exists, wait_for_object
from tests.functions.main import main as scenario_function
from tests.integration.function_harness import FunctionHarness
from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions


def test_an_orchestrator_clock_minutes_behind_does_not_make_triggers_late(stack, monkeypatch: pytest.MonkeyPatch):
    """Before: the trigger carried the orchestrator's wall-clock deadline, so a clock 5 minutes slow made the
    function refuse every trigger as late. Now the function counts the window from Pub/Sub's publishTime."""
    # The orchestrator's wall clock, 5 minutes slow (patched where the client reads it: gRPC's own deadlines
    # need the real clock in this process).
    skewed = SimpleNamespace(time=lambda: time.time() - 300, monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(session_lifecycle, "time", skewed)
    outcome = run_asset(make_client(startup_timeout=10.0), {"n": 7})

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 7
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def test_an_orchestrator_clock_far_off_is_warned_about_from_the_tombstone_the_function_wrote(
    stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The trigger's own deadline trusts the orchestrator's clock within 600 s. The orchestrator no longer
    writes the tombstone of a session the function closed, so it holds the function's against its own clock
    (GCS stamped it after the trigger was sent): a clock 15 minutes fast is warned about, once."""
    skewed = SimpleNamespace(time=lambda: time.time() + 900, monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(session_lifecycle, "time", skewed)
    monkeypatch.setattr(end, "time", skewed)
    monkeypatch.setattr(end, "_clock_warned", threading.Event())
    with caplog.at_level(logging.WARNING, logger=end.__name__):
        outcome = run_asset(make_client(startup_timeout=10.0), {"n": 7})

    assert outcome.result.success, outcome.failure_message
    assert tombstone(stack.project, outcome.metadata["pipes_session_id"]).reason == "the function closed the session"
    (warning,) = [r.getMessage() for r in caplog.records if "Synchronise the clock" in r.getMessage()]
    assert "ahead of Cloud Storage's" in warning, warning


# ------------------------------------------------------------------------------------------- helpers


class Queue:
    """A trigger topic nobody consumes: its triggers wait in a pull subscription until the test takes them."""

    def __init__(self, stack):
        name, project = f"queued-{uuid.uuid4().hex[:8]}", stack.project
        # a wiretap on the emulator itself: through the layer, a trigger handed to a 1 s pull near its end is
        # lost for its 600 s ack deadline (the pull race), and the test waited for it until it failed
        with stack.provisioning():
            self.publisher, self.subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        self.topic = self.publisher.create_topic(request={"name": self.publisher.topic_path(project, name)}).name
        self.subscription = self.subscriber.create_subscription(request={
            "name": self.subscriber.subscription_path(project, name), "topic": self.topic, "ack_deadline_seconds": 600,
        }).name
        self.held: list[Any] = []

    def take(self) -> int:
        """Pull what is waiting (held, never acked); return how many triggers are held."""
        try:
            response = self.subscriber.pull(request={"subscription": self.subscription, "max_messages": 10}, timeout=1)
        except gexc.DeadlineExceeded:
            return len(self.held)
        self.held.extend(r.message for r in response.received_messages)
        return len(self.held)

    def close(self) -> None:
        self.subscriber.delete_subscription(request={"subscription": self.subscription})
        self.publisher.delete_topic(request={"topic": self.topic})


@pytest.fixture
def queue(stack) -> Iterator[Queue]:
    queued = Queue(stack)
    yield queued
    queued.close()


def session_of(message: Any) -> str:
    return message.attributes[Attr.SESSION]


def deliver_by_push(stack, message: Any) -> None:
    """Publish the exact trigger again, to the topic the test function is pushed from (Eventarc's path), and
    wait until the function has dealt with it."""
    with pubsub_v1.PublisherClient() as publisher:
        publisher.publish(f"projects/{stack.project}/topics/{TEST_TOPIC}", message.data, **message.attributes).result(timeout=30)
    log = stack.function_server(TEST_TOPIC).log_path
    deadline = time.monotonic() + 30
    while not any(session_of(message) in line and "already ended" in line for line in log.read_text().splitlines()):
        assert time.monotonic() < deadline, f"the function did not refuse session {session_of(message)} within 30s"
        time.sleep(0.1)


def deliver_by_pull(message: Any) -> SessionOutcome:
    """What the pull worker does with a message it pulled."""
    return run_session(scenario_function.pipes_handler, message.data, dict(message.attributes),
                       message_id=message.message_id, publish_time=message.publish_time.timestamp())


def handler_runs(project: str, token: str) -> int:
    return len(list(storage.Client(project=project).list_blobs(LAKE_BUCKET, prefix=f"runs/{token}/")))


def tombstone(project: str, session_id: str, prefix: str = "dagster-pipes") -> LeaseRecord | None:
    blob = storage.Client(project=project).bucket(PAYLOAD_BUCKET).get_blob(lease_key(prefix, session_id))
    return None if blob is None else read_lease(blob)


def assert_only_tombstones_left(project: str, session_ids: list[str]) -> None:
    assert session_subscriptions(project) == []
    assert session_objects(project) == []  # nothing but ended leases
    for session_id in session_ids:
        lease = tombstone(project, session_id)
        assert lease is not None and lease.ended, (session_id, lease)


# ------------------------------------------------------------------------------------------- durable end


def test_a_run_terminated_while_its_trigger_is_queued_never_runs_it(stack, queue: Queue):
    """Before: teardown deleted the session folder, cancel marker included, and the queued trigger later ran the
    handler with nobody listening and left its lease behind."""
    token = uuid.uuid4().hex
    spec = {"client": {"trigger_topic": queue.topic, "startup_timeout": 60.0}, "payload": {"token": token}}
    report = interrupt_run(stack.environment, spec, ready=lambda: queue.take() >= 1)

    assert not report["success"] and "DagsterExecutionInterruptedError" in report["error"]
    assert any("run terminated before the function started session" in m for m in report["logs"]), report["logs"]
    (trigger,) = queue.held
    deliver_by_push(stack, trigger)
    outcome = deliver_by_pull(trigger)
    assert not outcome.ran
    assert handler_runs(stack.project, token) == 0
    assert_only_tombstones_left(stack.project, [session_of(trigger)])
    assert "terminated" in tombstone(stack.project, session_of(trigger)).reason


@pytest.mark.parametrize("claim_checked", [False, True])
def test_the_exact_trigger_republished_after_a_normal_finish_neither_runs_nor_leaves_anything(stack, claim_checked: bool):
    """Redelivery of an acknowledged message (a lost 2xx) is normal on Pub/Sub and Eventarc and never happens on the
    emulator: re-publish the exact trigger by hand, 0.1 s after the session ended, pushed and pulled. A
    claim-checked trigger's body went with the session: the function says the session ended (it logged an
    undecodable trigger as an error)."""
    token = uuid.uuid4().hex
    overrides, pad = ({"inline_threshold_bytes": 4096}, "x" * 5000) if claim_checked else ({}, "")
    with stack.provisioning():  # a wiretap on the emulator itself: through the layer an empty pull proves nothing
        subscriber = pubsub_v1.SubscriberClient()
    with subscriber:
        capture = subscriber.create_subscription(request={
            "name": subscriber.subscription_path(stack.project, f"capture-{token[:8]}"),
            "topic": f"projects/{stack.project}/topics/{TEST_TOPIC}",
        }).name
        try:
            outcome = run_asset(make_client(**overrides), {"token": token, "n": 3, "pad": pad})
            time.sleep(0.1)
            response = subscriber.pull(request={"subscription": capture, "max_messages": 10}, timeout=10)
        finally:
            subscriber.delete_subscription(request={"subscription": capture})
    assert outcome.result.success, outcome.failure_message
    (trigger,) = [r.message for r in response.received_messages]
    assert (trigger.attributes[Attr.BODY] == "claim") is claim_checked

    # the function ended its own lease as it closed the session, and the orchestrator left that tombstone be
    ended = tombstone(stack.project, session_of(trigger))
    assert ended is not None and ended.reason == "the function closed the session", ended
    assert ended.invocation_id == outcome.metadata["pipes_invocation_id"]

    deliver_by_push(stack, trigger)
    assert not deliver_by_pull(trigger).ran
    assert handler_runs(stack.project, token) == 1
    assert_only_tombstones_left(stack.project, [session_of(trigger)])


def test_an_interrupted_fan_out_never_starts_the_shards_still_queued(stack, queue: Queue):
    """Before: the shards' queued triggers ran in full after the step had gone."""
    tokens = [uuid.uuid4().hex for _ in range(3)]
    spec = {"client": {"trigger_topic": queue.topic, "startup_timeout": 60.0}, "payloads": [{"token": t} for t in tokens]}
    report = interrupt_run(stack.environment, spec, ready=lambda: queue.take() >= len(tokens))

    assert not report["success"]
    for trigger in queue.held:
        deliver_by_push(stack, trigger)
        assert not deliver_by_pull(trigger).ran
    assert [handler_runs(stack.project, t) for t in tokens] == [0, 0, 0]
    assert_only_tombstones_left(stack.project, [session_of(t) for t in queue.held])


def test_a_running_function_sees_the_cancellation_within_a_second_not_a_heartbeat_interval(stack):
    """Before: the function looked for the cancel marker only every heartbeat_interval (10 s here), after the
    cancel_timeout (3 s) had run out and teardown had deleted the marker: it never saw it."""
    token = uuid.uuid4().hex
    spec = {
        "client": {"heartbeat_interval": 10.0, "heartbeat_timeout": 30.0, "cancel_timeout": 3.0},
        "payload": {"scenario": "wait_for_cancel", "token": token, "sleep": 30},
    }
    report = interrupt_run(stack.environment, spec, ready=lambda: lake_object_exists(stack.project, f"started/{token}"))

    assert any("closed after cancellation" in m for m in report["logs"]), report["logs"]
    assert lake_object_exists(stack.project, f"cancel-observed/{token}")
    assert_only_tombstones_left(stack.project, [])


def test_a_cancel_timeout_is_reported_as_the_cancel_timeout(stack):
    """A handler that never checks for cancellation: the warning names cancel_timeout (it said total_timeout)."""
    token = uuid.uuid4().hex
    spec = {"client": {"cancel_timeout": 1.0}, "payload": {"token": token, "sleep": 6}}
    report = interrupt_run(stack.environment, spec, ready=lambda: lake_object_exists(stack.project, f"started/{token}"))

    (warning,) = [m for m in report["logs"] if "cancel_timeout" in m]
    assert "did not report `closed` within cancel_timeout=1s" in warning
    assert not any("total_timeout" in m for m in report["logs"]), report["logs"]


# ------------------------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("scenario", ["echo", "wait_for_cancel"])
def test_a_function_past_its_timeout_closes_the_session_itself(stack, scenario: str):
    """Cloud Functions (2nd gen) does not stop a function at its timeout. Before: the writer kept heartbeating
    and the session ran on (here it succeeded after 8 s, past function_timeout=3s). Now the function closes
    it with a timeout error and asks the handler to stop; a handler that checks (wait_for_cancel) stops.
    The function closes the session without waiting for the handler, which notices at its next check, after
    `closed` is on its way: its cancel-observed mark can land after the step has failed, so wait for it."""
    token = uuid.uuid4().hex
    client = make_client(function_timeout=3.0, heartbeat_interval=0.5, heartbeat_timeout=5.0)
    outcome = run_asset(client, {"scenario": scenario, "token": token, "sleep": 8})

    assert not outcome.result.success
    error = outcome.failure_message
    assert "CloudFunctionError" in error and "SessionTimeout" in error and "function_timeout=3s" in error, error[-2000:]
    if scenario == "wait_for_cancel":
        wait_for_object(stack.project, f"cancel-observed/{token}")
    assert_only_tombstones_left(stack.project, [])


def test_the_orchestrator_caps_a_session_at_startup_plus_function_timeout(stack):
    """A function that keeps heartbeating and never closes (an older release, a wedged process), configured
    with trigger_topic only. Before: nothing capped the session; heartbeats kept it open for as long as they came."""
    function = ScriptedFunction(stack, SCRIPTED_TOPIC)
    client = make_client(trigger_topic=SCRIPTED_TOPIC, function_timeout=2.0, startup_timeout=3.0,
                         heartbeat_interval=0.5, heartbeat_timeout=2.0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(run_asset, client, {"n": 1})
        try:
            function.take_trigger()
            function.batch("wedged", 0, [opened()])
            give_up = time.monotonic() + 40  # without a cap the run would wait for as long as heartbeats come
            while not run.done() and time.monotonic() < give_up:
                function.heartbeat("wedged")
                time.sleep(0.3)
        finally:
            outcome = run.result(timeout=60)
            function.close()

    assert not outcome.result.success
    error = outcome.failure_message
    assert "FunctionTotalTimeout" in error and "startup_timeout + function_timeout + margin" in error, error[-2000:]
    assert "function_timeout=2s" in error
    assert_only_tombstones_left(stack.project, [])


# ------------------------------------------------------------------------------------------- tombstones


def test_tombstones_are_swept_once_their_start_window_has_passed(stack):
    """Ended leases are kept for the start window only: the next teardown deletes the expired ones (judged by
    GCS's timestamps) and keeps fresh tombstones and the leases of running sessions."""
    prefix = f"sweep-{uuid.uuid4().hex[:8]}"
    bucket = storage.Client(project=stack.project).bucket(PAYLOAD_BUCKET)
    planted = {
        "expired": LeaseRecord(ENDED, reason="planted", keep_seconds=0.0),
        "fresh": LeaseRecord(ENDED, reason="planted", keep_seconds=3600.0),
        "running": LeaseRecord(HELD, invocation_id="elsewhere", expires_at=time.time() + 3600),
    }
    for name, record in planted.items():
        write_lease(bucket.blob(lease_key(prefix, name)), record, generation=0)
    try:
        outcome = run_asset(make_client(prefix=prefix), {"n": 1})
        assert outcome.result.success, outcome.failure_message
        left = {b.name.rsplit("/", 1)[-1] for b in bucket.client.list_blobs(PAYLOAD_BUCKET, prefix=f"{prefix}/")}
        assert left == {"fresh", "running", outcome.metadata["pipes_session_id"]}
    finally:
        GCSBlobStore(bucket.client, PAYLOAD_BUCKET).delete_prefix(f"{prefix}/")


def test_a_session_ended_between_the_claim_and_the_handler_never_calls_the_handler(stack, monkeypatch: pytest.MonkeyPatch):
    """The orchestrator ends the session (a terminated run) just after this delivery claimed it: the check
    before the handler sees it, the handler is never called, and `closed` says why."""
    token = uuid.uuid4().hex
    h = FunctionHarness(stack, {"token": token})

    def claim_then_end(gcs, bucket, key, invocation_id, lease_seconds):
        claimed = take_lease(gcs, bucket, key, invocation_id, lease_seconds)
        end_lease(gcs, bucket, "harness", h.session_id, start_window=60.0, reason="the Dagster run was terminated")
        return claimed

    monkeypatch.setattr(session_module, "take_lease", claim_then_end)
    try:
        outcome = scenario_function(h.cloud_event())
        closed = h.read_until_closed()[-1]
    finally:
        h.close()
    assert not outcome.ran and "the Dagster run was terminated" in str(outcome.error)
    assert handler_runs(stack.project, token) == 0
    assert "SessionCancelled" in closed["params"]["exception"]["message"]
    # the lease is not the function's to end any more (the orchestrator ended it): `closed` does not say it did
    assert "lease_ended" not in closed["params"]
