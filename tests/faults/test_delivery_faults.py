"""Faults in what Pub/Sub delivers to the reader, injected by a scripted function on the real emulator:
duplicates, reordering, a second invocation, poison and foreign messages, unsigned replies, silence, and
messages larger than a default gRPC channel receives."""

from __future__ import annotations

import os
import time
import uuid

import grpc
import pytest
from google.cloud import pubsub_v1, storage
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.orchestrator.diagnostics.errors import ReplyStreamError
from dagster_gcf_pipes.orchestrator.session.message_reader import PipesPubSubMessageReader
from dagster_gcf_pipes.shared.claim_check import MAX_INLINE_THRESHOLD, ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.protocol import Attr, Reply, ReplyChannelParams, dumps, new_session_id
from dagster_gcf_pipes.shared.pubsub import WatchedSubscriberClient, publisher_client
from tests.conftest import PAYLOAD_BUCKET, SCRIPTED_TOPIC
from tests.faults.scripted import closed, finished, log, materialization, opened, scripted  # noqa: F401 (a fixture)
from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions


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
    # the second invocation's replies must reach the reader before the first's `closed` ends the session
    with stack.semantics.behaving(reorder=False, hold_back_rate=0.0):
        _second_invocation_fenced_off(scripted)


def _second_invocation_fenced_off(scripted):
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
    # each poison must reach the reader before `closed` ends the session: no reordering or hold-back for this
    # test (the reader's order handling has tests of its own)
    with stack.semantics.behaving(reorder=False, hold_back_rate=0.0, duplicate_rate=0.0):
        _poison_and_foreign_messages(stack, scripted)


def _poison_and_foreign_messages(stack, scripted):
    f, run = scripted()
    sid = f.params.session_id
    f.batch("inv", 0, [opened()])
    # a seq the session never takes: a poison reusing a taken (invocation, seq) is dropped as a duplicate
    # before its body is read, silently
    good = Reply(sid, "inv", 7).attributes()
    poison = {
        f.raw(b"{not json", good): "is not UTF-8 JSON",
        f.raw(b"[]", {**good, Attr.VERSION: "99"}): "unsupported protocol version '99'",
        f.raw(b"[]", {**good, Attr.SEQ: "one"}): "non-numeric 'dagster_pipes_seq'",
        f.raw(b"[]", {**good, Attr.SEQ: "\u00b2"}): "non-numeric 'dagster_pipes_seq'",  # "²".isdigit() is True
        f.raw(f"gs://{PAYLOAD_BUCKET}/dagster-pipes/{sid}/missing.json".encode(), {**good, Attr.BODY: "claim"}):
            "does not exist",
        f.raw(b'[{"no": "method"}]', good): "must be a JSON list of Pipes messages",
    }
    # no session attribute: the subscription's filter keeps it out, as Pub/Sub's does (the reader's own check,
    # for a subscription without one, has a unit test)
    unfiltered = f.raw(b"[]", {Attr.VERSION: "1", Attr.SEQ: "1"})
    foreign = f.raw(b'[{"method": "log", "params": {"message": "foreign", "level": "INFO"}}]',
                    Reply(new_session_id(), "other", 0).attributes())
    f.batch("inv", 1, [log("after the poison"), materialization(f.asset_key, ok=True), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    logs = outcome.log_messages
    for message_id, problem in poison.items():
        mentions = [m for m in logs if f"dropped reply message {message_id}:" in m]
        assert len(mentions) == 1 and problem in mentions[0], (message_id, problem, mentions)
    assert not any(f"dropped reply message {unfiltered}:" in m for m in logs)
    assert "foreign" not in logs  # another session's reply: ignored, not handed to Dagster
    assert not any(f"dropped reply message {foreign}:" in m for m in logs)  # and not treated as poison
    assert "after the poison" in logs
    assert len(outcome.result.get_asset_materialization_events()) == 1
    assert_nothing_left(stack)


def test_unsigned_and_badly_signed_replies_are_dropped_when_signing_is_on(stack, scripted):
    # each bad reply must reach the reader before `closed` ends the session
    with stack.semantics.behaving(reorder=False, hold_back_rate=0.0, duplicate_rate=0.0):
        _unsigned_and_badly_signed(scripted)


def _unsigned_and_badly_signed(scripted):
    secret = "s3cret"
    f, run = scripted(signing_secret=secret)
    assert f.params.signed
    f.batch("inv", 0, [opened()], secret=secret)
    # seqs never taken: a bad reply reusing a taken (invocation, seq) is dropped as a duplicate, unread
    f.batch("inv", 5, [log("unsigned")])                         # no signature: dropped
    f.batch("inv", 6, [log("forged")], secret="not the secret")  # wrong key: dropped
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


# ----------------------------------------------------------------------------------- messages over 4 MiB


def test_a_reply_over_4_mib_reaches_dagster_instead_of_stalling_the_reader(stack, scripted):
    """gRPC's default 4 MiB receive limit made such a message undeliverable on the emulator: redelivered forever,
    never acked, and the session failed on its heartbeat timeout. The reader's channel now has no limit."""
    f, run = scripted(heartbeat_interval=1.0, heartbeat_timeout=15.0)
    f.batch("inv", 0, [opened()])
    line = "y" * 5_000_000
    body = dumps([log(line)], "batch")
    f.raw(body, Reply(f.params.session_id, "inv", 1).attributes())  # inline, as a writer with a 9 MB threshold did
    f.batch("inv", 2, [materialization(f.asset_key, big=True), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    assert line in outcome.log_messages
    assert_nothing_left(stack)


def test_an_inline_threshold_above_what_every_reader_accepts_is_a_configuration_error(stack):
    outcome = run_asset(make_client(trigger_topic=SCRIPTED_TOPIC, inline_threshold_bytes=9_000_000, startup_timeout=2.0), {})
    assert not outcome.result.success
    error = outcome.failure_message
    assert "PipesPubSubConfigError" in error and f"inline_threshold_bytes=9000000 is outside 0..{MAX_INLINE_THRESHOLD}" in error
    assert "default gRPC channel" in error
    assert_nothing_left(stack)


class _Recorder:
    """Dagster's side of a reader, reduced to what the reader calls."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def handle_message(self, message: dict) -> None:
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin: str, exc_info: object) -> None:
        raise AssertionError(origin)


def test_a_message_the_reader_cannot_receive_ends_the_session_with_an_error_that_says_so(stack, caplog):
    """A subscriber on a channel with gRPC's default limit (as the client library opens in emulator mode) can
    never receive a 5 MB message: the reader must say so at once instead of waiting for a timeout that blames
    the function."""
    topic = f"projects/{stack.project}/topics/big-{uuid.uuid4().hex[:8]}"
    host = os.environ["PUBSUB_EMULATOR_HOST"]
    limited = WatchedSubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(host), host=host))
    with publisher_client() as publisher:
        publisher.create_topic(request={"name": topic})
        session_id = new_session_id()
        params = ReplyChannelParams(topic=topic, session_id=session_id, bucket=PAYLOAD_BUCKET, prefix="dagster-pipes")
        reader = PipesPubSubMessageReader(
            subscriber=limited, claim_check=ClaimCheck(GCSBlobStore(storage.Client(project=stack.project), PAYLOAD_BUCKET)),
            gcs=storage.Client(project=stack.project),
            channel_params=params,
        )
        try:
            with reader.read_messages(_Recorder()):  # type: ignore[arg-type]
                body = dumps([opened(), log("z" * 5_000_000)], "batch")
                publisher.publish(topic, body, **Reply(session_id, "inv", 0).attributes()).result(timeout=30)
                with pytest.raises(ReplyStreamError) as raised:
                    reader.wait_for_close(
                        triggered_at=time.monotonic(), sent_to=topic, startup_hint="-", startup_timeout=20.0,
                        heartbeat_timeout=20.0,
                    )
        finally:
            limited.close()
            publisher.delete_topic(request={"topic": topic})
    error = str(raised.value)
    assert "can never be delivered" in error and "larger than max" in error and "subscriber_client()" in error
    assert any("can never be delivered" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
