"""Faults in what Pub/Sub delivers to the reader, injected by a scripted function on the real emulator:
duplicates, reordering, a second invocation, poison and foreign messages, unsigned replies, and silence."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator

import pytest
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.shared.protocol import Attr, Reply, new_session_id
from tests.conftest import PAYLOAD_BUCKET, SCRIPTED_TOPIC
from tests.faults.scripted import ScriptedFunction, closed, log, materialization, opened
from tests.integration.helpers import Outcome, make_client, run_asset, session_objects, session_subscriptions


@pytest.fixture
def scripted(stack: LocalStack) -> Iterator[Callable[..., tuple[ScriptedFunction, concurrent.futures.Future]]]:
    """Start a run against the scripted topic in the background; return the scripted function and the run."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    functions: list[ScriptedFunction] = []

    def start(**client_overrides) -> tuple[ScriptedFunction, concurrent.futures.Future]:
        function = ScriptedFunction(stack.project, SCRIPTED_TOPIC)
        functions.append(function)
        future = pool.submit(run_asset, make_client(trigger_topic=SCRIPTED_TOPIC, **client_overrides), {"n": 1})
        function.take_trigger()
        return function, future

    yield start
    pool.shutdown(wait=True)
    for function in functions:
        function.close()


def finished(future: concurrent.futures.Future) -> Outcome:
    return future.result(timeout=60)


def assert_nothing_left(stack: LocalStack) -> None:
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def test_duplicated_and_reordered_batches_reach_dagster_once_in_order(stack, scripted):
    f, run = scripted()
    inv = "invocation-a"
    f.batch(inv, 0, [opened(), log("a")])
    f.batch(inv, 2, [log("c")])            # ahead of seq 1: waits
    f.batch(inv, 1, [log("b")])
    f.batch(inv, 1, [log("b")])            # duplicate
    f.batch(inv, 0, [opened(), log("a")])  # duplicate of the first
    f.batch(inv, 4, [materialization(f.asset_key, rows=3), closed()])
    f.batch(inv, 3, [log("d")])
    f.batch(inv, 4, [materialization(f.asset_key, rows=3), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    assert [m for m in outcome.log_messages if m in "abcd"] == ["a", "b", "c", "d"]
    assert len(outcome.result.get_asset_materialization_events()) == 1
    assert outcome.metadata["rows"] == 3
    assert_nothing_left(stack)


def test_a_second_invocation_is_fenced_off_with_a_warning_naming_both(stack, scripted):
    f, run = scripted()
    f.batch("first", 0, [opened()])
    f.batch("second", 0, [opened(), log("from the second")])
    f.batch("second", 1, [materialization(f.asset_key, who="second"), closed()])
    f.batch("first", 1, [log("from the first"), materialization(f.asset_key, who="first"), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    assert "from the first" in outcome.log_messages
    assert "from the second" not in outcome.log_messages
    assert outcome.metadata["who"] == "first"
    fenced = [m for m in outcome.log_messages if "dropping replies of invocation second" in m]
    assert len(fenced) == 1 and "belongs to invocation first" in fenced[0]


def test_poison_and_foreign_messages_are_logged_once_by_id_and_never_reach_dagster(stack, scripted):
    f, run = scripted()
    sid = f.params.session_id
    f.batch("inv", 0, [opened()])
    good = Reply(sid, "inv", 1).attributes()
    poison = {
        f.raw(b"{not json", good): "is not UTF-8 JSON",
        f.raw(b"[]", {**good, Attr.VERSION: "99"}): "unsupported protocol version '99'",
        f.raw(b"[]", {Attr.VERSION: "1", Attr.SEQ: "1"}): "missing attribute 'dagster_pipes_session'",
        f.raw(b"[]", {**good, Attr.SEQ: "one"}): "non-numeric 'dagster_pipes_seq'",
        f.raw(f"gs://{PAYLOAD_BUCKET}/dagster-pipes/{sid}/missing.json".encode(), {**good, Attr.BODY: "claim"}):
            "does not exist",
        f.raw(b'[{"no": "method"}]', good): "must be a JSON list of Pipes messages",
    }
    foreign = f.raw(b'[{"method": "log", "params": {"message": "foreign", "level": "INFO"}}]',
                    Reply(new_session_id(), "other", 0).attributes())
    f.batch("inv", 1, [log("after the poison"), materialization(f.asset_key, ok=True), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    logs = outcome.log_messages
    for message_id, problem in poison.items():
        mentions = [m for m in logs if f"dropped reply message {message_id}:" in m]
        assert len(mentions) == 1 and problem in mentions[0], (message_id, problem, mentions)
    assert "foreign" not in logs  # another session's reply: ignored, not handed to Dagster
    assert not any(f"dropped reply message {foreign}:" in m for m in logs)  # and not treated as poison
    assert "after the poison" in logs
    assert len(outcome.result.get_asset_materialization_events()) == 1
    assert_nothing_left(stack)


def test_unsigned_and_badly_signed_replies_are_dropped_when_signing_is_on(stack, scripted):
    secret = "s3cret"
    f, run = scripted(signing_secret=secret)
    assert f.params.signed
    f.batch("inv", 0, [opened()], secret=secret)
    f.batch("inv", 1, [log("unsigned")])                         # no signature: dropped
    f.batch("inv", 1, [log("forged")], secret="not the secret")  # wrong key: dropped
    f.batch("inv", 1, [log("signed")], secret=secret)
    f.batch("inv", 2, [materialization(f.asset_key), closed()], secret=secret)

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    assert "signed" in outcome.log_messages
    assert "unsigned" not in outcome.log_messages and "forged" not in outcome.log_messages
    assert len([m for m in outcome.log_messages if "unsigned or badly signed reply" in m]) == 2


def test_per_session_subscription_has_a_filter_and_an_expiration_backstop(stack, scripted):
    f, run = scripted()
    with pubsub_v1.SubscriberClient() as subscriber:
        subscription = subscriber.get_subscription(
            request={"subscription": f"projects/{stack.project}/subscriptions/dagster-pipes-{f.params.session_id}"}
        )
    f.batch("inv", 0, [opened(), materialization(f.asset_key), closed()])
    assert finished(run).result.success

    assert subscription.expiration_policy.ttl.total_seconds() == 24 * 3600
    assert subscription.filter == f'attributes.dagster_pipes_session = "{f.params.session_id}"'
    assert_nothing_left(stack)


def test_a_function_that_never_starts_fails_within_the_startup_timeout(stack):
    started = time.monotonic()
    outcome = run_asset(make_client(trigger_topic=SCRIPTED_TOPIC, startup_timeout=2.0), payload={})
    elapsed = time.monotonic() - started

    assert not outcome.result.success
    error = outcome.failure_message
    assert "FunctionStartupTimeout" in error
    assert f"projects/{stack.project}/topics/{SCRIPTED_TOPIC}" in error and "--trigger-topic" in error
    assert elapsed < 10
    assert_nothing_left(stack)


def test_a_function_that_goes_silent_after_opened_fails_on_heartbeat(stack, scripted):
    f, run = scripted(heartbeat_interval=0.5, heartbeat_timeout=2.0)
    f.batch("quiet", 0, [opened(), log("started")])
    f.heartbeat("quiet")

    outcome = finished(run)
    assert not outcome.result.success
    error = outcome.failure_message
    assert "FunctionHeartbeatTimeout" in error and "stopped sending heartbeats" in error
    assert "invocation quiet" in error and "last heard from at" in error
    assert_nothing_left(stack)


def test_heartbeats_keep_a_quiet_session_alive_past_the_heartbeat_timeout(stack, scripted):
    f, run = scripted(heartbeat_interval=0.5, heartbeat_timeout=1.5)
    f.batch("busy", 0, [opened()])
    for _ in range(8):  # 4 s of silence but for heartbeats
        time.sleep(0.5)
        f.heartbeat("busy")
    f.batch("busy", 1, [materialization(f.asset_key), closed()])
    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message


def test_leftover_objects_of_a_session_are_removed_even_when_it_fails(stack, scripted):
    f, run = scripted(inline_threshold_bytes=10)
    big = "x" * 100
    f.batch("inv", 0, [opened()])
    # the function wrote a claim-check object under the session prefix, then died
    gcs = storage.Client(project=stack.project)
    gcs.bucket(PAYLOAD_BUCKET).blob(f"dagster-pipes/{f.params.session_id}/replies/inv/1.json").upload_from_string(big)
    f.batch("inv", 1, [pipes_exception_closed()])

    outcome = finished(run)
    assert not outcome.result.success
    assert "CloudFunctionError" in outcome.failure_message
    assert_nothing_left(stack)


def pipes_exception_closed() -> dict:
    from tests.faults.scripted import pipes_message

    return pipes_message("closed", {"exception": {
        "name": "MemoryError", "message": "MemoryError: out of memory\n", "stack": ["  File \"main.py\", line 1\n"],
        "cause": None, "context": None,
    }})
