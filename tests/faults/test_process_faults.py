"""Faults of processes on the real local stack: the function killed, a push redelivered while the function
runs, Pub/Sub unreachable for a while, the Dagster run terminated, signing configured on both sides."""

from __future__ import annotations

import concurrent.futures
import signal
import time
import uuid

import pytest
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from tests.conftest import LAKE_BUCKET, TEST_TOPIC
from tests.faults.cancel_run import interrupt_run
from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions


def lake_object_exists(project: str, name: str) -> bool:
    return storage.Client(project=project).bucket(LAKE_BUCKET).blob(name).exists()


def wait_for_object(project: str, name: str, timeout: float = 20.0) -> None:
    blob = storage.Client(project=project).bucket(LAKE_BUCKET).blob(name)
    deadline = time.monotonic() + timeout
    while not blob.exists():
        assert time.monotonic() < deadline, f"gs://{LAKE_BUCKET}/{name} did not appear within {timeout}s"
        time.sleep(0.05)


def wait_until_the_step_acknowledged_a_reply(stack: LocalStack, timeout: float = 60.0) -> None:
    """Until the one session's reply subscription has an acknowledgement, as the production-semantics layer
    counts them: the step has received and handled a reply. Without the layer (no NOT_FOUND window after
    CreateSubscription) two seconds."""
    if stack.semantics is None:
        time.sleep(2.0)
        return
    deadline = time.monotonic() + timeout
    while True:
        subscriptions = session_subscriptions(stack.project)
        meter = stack.semantics.meter()
        if any(meter.subscription(s).acknowledge_calls for s in subscriptions):
            return
        assert time.monotonic() < deadline, f"the step acknowledged no reply within {timeout}s ({subscriptions})"
        time.sleep(0.05)


@pytest.fixture
def own_function(stack: LocalStack):
    """A Functions Framework process of the test's own, which it may kill; its push subscription is removed after."""
    topics: list[str] = []

    def start(**overrides) -> tuple[str, object]:
        topic = f"own-{uuid.uuid4().hex[:8]}"
        topics.append(topic)
        server = stack.add_function(LocalFunction("tests/functions/main.py", "main", topic, **overrides))
        return topic, server

    yield start
    with pubsub_v1.SubscriberClient() as subscriber:
        for topic in topics:
            stack.servers.pop(f"function-{topic}").stop()
            subscriber.delete_subscription(request={"subscription": f"projects/{stack.project}/subscriptions/{topic}-push"})


def test_function_killed_mid_run_fails_the_step_within_the_heartbeat_timeout(stack, own_function):
    topic, server = own_function()
    token = uuid.uuid4().hex
    client = make_client(trigger_topic=topic, heartbeat_interval=0.5, heartbeat_timeout=2.0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(run_asset, client, {"scenario": "echo", "token": token, "sleep": 60})
        wait_for_object(stack.project, f"started/{token}")
        time.sleep(0.6)  # let a heartbeat through: the function is known alive
        killed_at = time.monotonic()
        server.kill(signal.SIGKILL)
        outcome = run.result(timeout=30)
        seconds_to_failure = time.monotonic() - killed_at

    assert not outcome.result.success
    error = outcome.failure_message
    assert "FunctionHeartbeatTimeout" in error and "stopped sending heartbeats" in error
    assert "last heard from at" in error and "check the function's logs" in error
    assert seconds_to_failure < 2.0 + 1.5, seconds_to_failure
    print(f"\nSIGKILL -> step failure: {seconds_to_failure:.2f}s (heartbeat_timeout=2s)")
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def test_push_redelivered_while_the_function_runs_executes_the_handler_once(stack, own_function):
    topic, server = own_function(ack_deadline_seconds=10)  # Pub/Sub's minimum; the function outlives it
    outcome = run_asset(make_client(trigger_topic=topic), payload={"n": 5, "sleep": 13})

    assert outcome.result.success, outcome.failure_message
    assert len(outcome.result.get_asset_materialization_events()) == 1
    assert outcome.log_messages.count("scenario echo starts") == 1
    function_log = server.log_path.read_text()
    assert "this delivery is a duplicate and does not run" in function_log, "the emulator did not redeliver"


def test_pubsub_unreachable_for_a_few_seconds_mid_session_is_ridden_out(stack):
    emulator = stack.servers["pubsub-emulator"]
    client = make_client(heartbeat_interval=0.5, heartbeat_timeout=20.0)
    token = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(run_asset, client, {"log_lines": 200, "sleep": 4, "token": token})
        wait_for_object(stack.project, f"started/{token}", timeout=60)  # mid-session: the handler runs
        emulator.kill(signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            emulator.kill(signal.SIGCONT)
        outcome = run.result(timeout=90)

    assert outcome.result.success, outcome.failure_message
    assert [m for m in outcome.log_messages if m.startswith("line ")] == [f"line {i}" for i in range(200)]


def test_pubsub_unreachable_past_the_budget_fails_with_a_clear_error(stack):
    emulator = stack.servers["pubsub-emulator"]
    client = make_client(heartbeat_interval=0.5, heartbeat_timeout=2.0)
    token = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(run_asset, client, {"sleep": 8, "token": token})
        # once the step has acknowledged a reply (`opened`): not after a fixed wait, for under load the reply
        # stream could still be re-opening through the NOT_FOUND window after the subscription's creation, and
        # the step then failed on its startup timeout instead
        wait_for_object(stack.project, f"started/{token}", timeout=60)
        wait_until_the_step_acknowledged_a_reply(stack)
        emulator.kill(signal.SIGSTOP)
        started = time.monotonic()
        try:
            outcome = run.result(timeout=60)
            seconds_to_failure = time.monotonic() - started
        finally:
            emulator.kill(signal.SIGCONT)

    # the leftover first (whatever is asserted below): it would fail every later test's leak check
    with pubsub_v1.SubscriberClient() as subscriber:
        leftovers = session_subscriptions(stack.project)
        ttls = [subscriber.get_subscription(request={"subscription": s}).expiration_policy.ttl.total_seconds() for s in leftovers]
        for leftover in leftovers:
            subscriber.delete_subscription(request={"subscription": leftover})
    assert not outcome.result.success, outcome.log_messages[-20:]
    assert "FunctionHeartbeatTimeout" in outcome.failure_message, outcome.failure_message
    # what was observed is said: Pub/Sub did not answer, not "the process probably died" (issue 24, item 15)
    assert "Pub/Sub did not answer" in outcome.failure_message and "probably died" not in outcome.failure_message, (
        outcome.failure_message
    )
    # tearing down could not reach Pub/Sub either: bounded, and the subscription is left to its expiration policy
    assert seconds_to_failure < 2.0 + 5.0 + 25.0, seconds_to_failure  # timeout + the channel's diagnosis + teardown
    assert any("its expiration policy removes it" in m for m in outcome.log_messages)
    assert ttls == [24 * 3600] * len(leftovers)


def test_terminated_run_cancels_the_function_which_sees_it_and_stops(stack):
    token = uuid.uuid4().hex
    spec = {"payload": {"scenario": "wait_for_cancel", "token": token, "sleep": 60}}
    report = interrupt_run(stack.environment, spec, ready=lambda: lake_object_exists(stack.project, f"started/{token}"))

    wait_for_object(stack.project, f"cancel-observed/{token}", timeout=5)
    assert not report["success"]
    assert "DagsterExecutionInterruptedError" in report["error"], report["error"][-2000:]
    assert any("asked the function to cancel session" in m for m in report["logs"])
    assert any("closed after cancellation" in m for m in report["logs"])
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def test_signed_replies_round_trip_when_both_sides_hold_the_secret(stack, own_function):
    topic, _ = own_function(env={"DAGSTER_PIPES_SIGNING_SECRET": "shared-secret"})
    outcome = run_asset(make_client(trigger_topic=topic, signing_secret="shared-secret"), payload={"n": 4, "log_lines": 5})
    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 4
    assert not any("badly signed" in m for m in outcome.log_messages)


def test_signing_required_but_the_function_lacks_the_secret_is_refused_clearly(stack):
    outcome = run_asset(make_client(trigger_topic=TEST_TOPIC, signing_secret="only-here", startup_timeout=3.0), payload={})
    assert not outcome.result.success
    assert "FunctionStartupTimeout" in outcome.failure_message
    function_log = stack.function_server(TEST_TOPIC).log_path.read_text()
    assert "DAGSTER_PIPES_SIGNING_SECRET is not set on the function" in function_log
