"""The conformance kit: every scenario runs against every implementation in ``implementations.py`` (a folder
and an entry point), served on the local stack through its production-semantics layer and driven by
``PipesPubSubClient`` in a real Dagster run. What a scenario asserts is what Dagster, Cloud Storage and
Pub/Sub saw, never what the function says it did. A declared gap's scenario asserts its documented
refusal; nothing is skipped."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import re
import subprocess
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetCheckSeverity
from dagster._core.pipes import utils as dagster_pipes_utils
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.lease import read_lease
from dagster_gcf_pipes.shared.protocol import Attr
from tests.conformance.conftest import Kit, KitOutcome
from tests.conformance.implementations import PROBED, Implementation
from tests.conftest import PAYLOAD_BUCKET, REPLY_TOPIC
from tests.faults.cancel_run import interrupt_run
from tests.integration.helpers import session_objects, session_subscriptions
from tests.integration.test_protocol_conformance_python import Spy, check_lease, check_replies, complete, of_session
from tests.unit.test_protocol_schemas import decode_param, strict_json

PREFIX = "dagster-pipes"
#: the reason of the tombstone a function writes as it closes its session (docs/protocol.md 9.4)
CLOSED_BY_THE_FUNCTION = "the function closed the session"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


def assert_nothing_left(stack: LocalStack) -> None:
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def tombstone_reason(stack: LocalStack, session_id: str) -> str:
    blob = storage.Client(project=stack.project).bucket(PAYLOAD_BUCKET).get_blob(lease_key(PREFIX, session_id))
    assert blob is not None, f"no lease for session {session_id}"
    lease = read_lease(blob)
    assert lease.ended, lease
    return lease.reason


def materializations(outcome: Any) -> dict[str, Any]:
    """Asset key (its name in ``Kit.run``'s ``assets``) -> the materialization the run recorded."""
    return {event.event_specific_data.materialization.asset_key.path[-1].split("_", 2)[-1]:
            event.event_specific_data.materialization for event in outcome.result.get_asset_materialization_events()}


# ---------------------------------------------------------------------------------------------- reports

MESSAGES = [{"a": [1, 2.5, None, True], "nested": {"é": "ü"}}, "done", 7, None, [{"deep": {"deeper": []}}]]
CHECKS = [
    {"name": "rows_valid", "passed": True, "severity": "ERROR", "metadata": {"bad_rows": 0}},
    {"name": "fresh", "passed": False, "severity": "WARN", "metadata": {"lag": {"raw_value": 1.5, "type": "float"}}},
]
EXTRAS = {"region": "eu", "limits": {"rows": 10, "ratio": 0.5}, "tags": ["a", "b"]}
REPORTS = "logs+checks+custom+extras"


@pytest.fixture(scope="module")
def reports(kit: Kit) -> KitOutcome:
    """One run of a two-asset, partitioned step with two checks that logs, checks, reports custom messages and
    echoes its extras: the scenarios below each read their part of it (one run instead of five)."""
    payload = kit.payload(REPORTS, tag="kit-logs", checks=CHECKS, messages=MESSAGES)
    outcome = kit.run(payload, assets=("left", "right"), partition="2026-11-02", checks=("rows_valid", "fresh"),
                      extras=EXTRAS)
    assert_nothing_left(kit.stack)
    return outcome


def test_logs_at_every_level_reach_the_step_at_their_level(reports: KitOutcome) -> None:
    assert reports.result.success, reports.failure_message
    ordered = [m for m in reports.log_messages if m.startswith("kit-logs ")]
    assert ordered == [f"kit-logs {name}" for name in LEVELS]
    assert {m: reports.log_levels[m] for m in ordered} == {f"kit-logs {name}": level for name, level in LEVELS.items()}


def test_a_multi_asset_partition_is_materialized_key_by_key(reports: KitOutcome) -> None:
    assert reports.result.success, reports.failure_message
    found = materializations(reports)
    assert set(found) == {"left", "right"}
    for materialization in found.values():
        metadata = {k: v.value for k, v in materialization.metadata.items() if not k.startswith("pipes_")}
        assert materialization.partition == "2026-11-02"
        assert metadata == {"case": REPORTS, "partition": "2026-11-02", "rows": 3, "ratio": 2.0}
        assert isinstance(metadata["ratio"], float) and isinstance(metadata["rows"], int)
        assert materialization.tags["dagster/data_version"] == f"{REPORTS}-{materialization.asset_key.path[-1]}"


def test_asset_checks_are_recorded_with_severity_and_metadata(reports: KitOutcome) -> None:
    assert reports.result.success, reports.failure_message
    evaluations = {e.check_name: e for e in reports.result.get_asset_check_evaluations()}
    assert set(evaluations) == {"rows_valid", "fresh"}
    assert evaluations["rows_valid"].passed and evaluations["rows_valid"].severity == AssetCheckSeverity.ERROR
    assert not evaluations["fresh"].passed and evaluations["fresh"].severity == AssetCheckSeverity.WARN
    assert evaluations["rows_valid"].metadata["bad_rows"].value == 0
    assert evaluations["fresh"].metadata["lag"].value == 1.5


def test_custom_messages_reach_the_step_in_order_and_intact(reports: KitOutcome) -> None:
    assert reports.result.success, reports.failure_message
    assert reports.custom_messages[:-1] == MESSAGES  # the last is the extras case's


def test_extras_reach_the_handler(reports: KitOutcome) -> None:
    assert reports.result.success, reports.failure_message
    assert reports.custom_messages[-1] == {"extras": EXTRAS, "region": "eu"}


def test_prints_reach_the_step_stdout_and_stderr(kit: Kit, capfd: pytest.CaptureFixture[str]) -> None:
    tag = f"kit-prints-{kit.implementation.name}"
    outcome = kit.run(kit.payload("prints", tag=tag))

    assert outcome.result.success, outcome.failure_message
    captured = capfd.readouterr()
    assert f"{tag} stdout" in captured.out.splitlines()
    assert f"{tag} stderr" in captured.err.splitlines()
    assert_nothing_left(kit.stack)


# ---------------------------------------------------------------------------------------------- failures


def test_an_error_fails_the_step_with_its_remote_stack(kit: Kit) -> None:
    payload = kit.payload("error")
    outcome = kit.run(payload)

    assert not outcome.result.success
    error = outcome.failure_message
    assert "CloudFunctionError" in error, error
    assert f"kit failure {payload['token']}" in error, error
    assert str(kit.implementation.handler_file) in error and "fail_deep" in error, error  # a frame in its own file
    assert "not json" in error or "JSON" in error, error  # the cause it was raised from
    assert_nothing_left(kit.stack)


# ---------------------------------------------------------------------------------------------- claim-check


def test_claim_check_carries_a_large_payload_in_and_a_large_reply_out(kit: Kit) -> None:
    triggers, replies = Spy(kit.stack, kit.topic), Spy(kit.stack, REPLY_TOPIC)
    try:
        pad = "p" * 20_000
        outcome = kit.run(kit.payload("claim_check", pad=pad, reply_chars=30_000),
                          client=kit.client(inline_threshold_bytes=8192))
        assert outcome.result.success, outcome.failure_message
        (trigger,) = triggers.pull_until(lambda m: len(m) >= 1)
        session_id = trigger.attributes[Attr.SESSION]
        claimed = replies.pull_until(lambda m: any(r.attributes.get(Attr.SESSION) == session_id
                                                   and r.attributes.get(Attr.BODY) == "claim" for r in m))
    finally:
        triggers.close()
        replies.close()
    assert trigger.attributes[Attr.BODY] == "claim"  # in: the trigger's body went through GCS
    (reply,) = [r for r in claimed if r.attributes.get(Attr.SESSION) == session_id and r.attributes.get(Attr.BODY) == "claim"]
    assert reply.data.decode().startswith(f"gs://{PAYLOAD_BUCKET}/dagster-pipes/{session_id}/replies/")  # out
    assert outcome.custom_messages == [
        {"pad_sha256": hashlib.sha256(pad.encode()).hexdigest(), "pad_length": len(pad)}, "r" * 30_000]
    assert_nothing_left(kit.stack)


# ---------------------------------------------------------------------------------------------- exactly once


def test_a_trigger_delivered_twice_runs_the_handler_once_and_never_after_the_end(kit: Kit) -> None:
    """The exact trigger published again while its session runs (a redelivery) and after it ended (a lost
    ack): neither delivery runs the handler, and the step sees the one session."""
    spy = Spy(kit.stack, kit.topic)
    payload = kit.payload("wait", seconds=15)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, pubsub_v1.PublisherClient() as publisher:
            run = pool.submit(kit.run, payload)
            kit.wait_for_mark("started", payload["token"])
            (trigger,) = spy.pull_until(lambda m: len(m) >= 1)
            session_id = trigger.attributes[Attr.SESSION]

            def again() -> None:
                topic = f"projects/{kit.stack.project}/topics/{kit.topic}"
                publisher.publish(topic, trigger.data, **trigger.attributes).result(timeout=30)

            again()
            kit.wait_for_function_log(session_id, "this delivery is a duplicate and does not run")
            kit.mark("go", payload["token"])
            outcome = run.result(timeout=30)
            again()
            kit.wait_for_function_log(session_id, "already ended", "this delivery is late and does not run")
    finally:
        spy.close()

    assert outcome.result.success, outcome.failure_message
    assert kit.handler_runs(payload["token"]) == 1
    assert len(outcome.result.get_asset_materialization_events()) == 1
    lease = read_lease(storage.Client(project=kit.stack.project).bucket(PAYLOAD_BUCKET).get_blob(
        lease_key(PREFIX, session_id)))
    assert lease.ended  # the tombstone that refused the late delivery
    assert_nothing_left(kit.stack)


# ---------------------------------------------------------------------------------------------- the end of a session


@dataclass(frozen=True)
class Captured:
    """One session as the wire and the bucket saw it."""

    #: the trigger's DAGSTER_PIPES_MESSAGES, decoded
    channel_params: dict[str, Any]
    #: the function's Pipes messages, in order (every reply checked against the schemas)
    messages: list[dict[str, Any]]
    #: the lease's record after the run (checked against the schemas)
    lease: dict[str, Any]


@pytest.fixture(scope="module")
def captured(kit: Kit) -> Captured:
    """One session of the ``logs`` case captured on the trigger and reply topics, and its lease read after the
    run: what the scenarios on the session's owner and its end read."""
    triggers, replies = Spy(kit.stack, kit.topic), Spy(kit.stack, REPLY_TOPIC)
    try:
        outcome = kit.run(kit.payload("logs", tag="kit-end"))
        (trigger,) = triggers.pull_until(lambda m: len(m) >= 1)
        session_id = trigger.attributes[Attr.SESSION]
        sent = replies.pull_until(lambda m: complete(of_session(m, session_id), None))
    finally:
        triggers.close()
        replies.close()
    assert outcome.result.success, outcome.failure_message
    assert trigger.attributes[Attr.BODY] == "inline"
    return Captured(
        decode_param(strict_json(trigger.data)["DAGSTER_PIPES_MESSAGES"]),
        check_replies(of_session(sent, session_id), None, session_id=session_id, prefix=PREFIX, secret=None),
        check_lease(storage.Client(project=kit.stack.project), PREFIX, session_id, "ended"),
    )


def test_opened_echoes_the_triggers_owner_token(captured: Captured) -> None:
    """The orchestrator then accepts the invocation as the session's owner without reading the lease."""
    token = captured.channel_params["owner_token"]
    assert re.fullmatch(r"[0-9a-f]{32}", token), token
    opened = captured.messages[0]
    assert opened["params"]["extras"].get("owner_token") == token, opened


def test_the_function_ends_its_own_lease_as_it_closes_and_closed_says_so(captured: Captured) -> None:
    """The tombstone is the function's (its invocation, its reason), written over the generation it claimed,
    and ``closed`` says so: the orchestrator leaves it be."""
    opened, closed = captured.messages[0], captured.messages[-1]
    assert closed["params"].get("lease_ended") is True, closed
    assert captured.lease["reason"] == CLOSED_BY_THE_FUNCTION, captured.lease
    assert captured.lease["invocation_id"] == opened["params"]["extras"]["invocation_id"]
    assert captured.lease["keep_seconds"] == pytest.approx(captured.channel_params["start_window"] + 1260)



def test_a_terminated_run_cancels_the_function_which_sees_it(kit: Kit) -> None:
    payload = kit.payload("until_cancelled", seconds=30)
    spec = {"client": {"trigger_topic": kit.topic}, "payload": payload}
    report = interrupt_run(kit.stack.environment, spec, ready=lambda: kit.marked("started", payload["token"]))

    assert not report["success"] and "DagsterExecutionInterruptedError" in report["error"], report["error"][-2000:]
    kit.wait_for_mark("cancel-observed", payload["token"], timeout=5)
    assert any("asked the function to cancel session" in m for m in report["logs"]), report["logs"]
    assert any("closed after cancellation" in m for m in report["logs"]), report["logs"]
    assert kit.handler_runs(payload["token"]) == 1
    # the orchestrator ended the lease to cancel the session: the function's own end, over the generation it
    # claimed, was refused (412), and the orchestrator's reason stands
    (asked,) = [m for m in report["logs"] if "asked the function to cancel session" in m]
    assert tombstone_reason(kit.stack, asked.rsplit(" ", 1)[-1]) != CLOSED_BY_THE_FUNCTION
    assert_nothing_left(kit.stack)


def test_the_function_timeout_closes_the_session_and_nothing_after_reaches_the_step(kit: Kit) -> None:
    payload = kit.payload("until_cancelled", seconds=10, tag="kit-timeout")
    client = kit.client(function_timeout=2.0, heartbeat_interval=0.5, heartbeat_timeout=5.0)
    started = time.monotonic()
    outcome = kit.run(payload, client=client)
    elapsed = time.monotonic() - started

    assert not outcome.result.success
    error = outcome.failure_message
    assert "CloudFunctionError" in error and "SessionTimeout" in error and "function_timeout=2s" in error, error[-2000:]
    assert elapsed < 8, elapsed  # closed at the deadline, not when the handler would have ended (10 s)
    kit.wait_for_mark("cancel-observed", payload["token"])  # the handler was asked to stop, and saw it
    if kit.implementation.has("timeout_stack"):
        assert str(kit.implementation.handler_file) in error, error  # the handler's stack at the deadline
    else:
        assert str(kit.implementation.handler_file) not in error, error  # the declared gap: no stack
    assert "kit-timeout after the end" not in outcome.log_messages  # written after `closed`: dropped
    assert len(outcome.result.get_asset_materialization_events()) == 0
    # closed at the deadline, the session's lease was ended by the function as at any close
    session_id = re.search(r"session ([0-9a-f]{32}): the handler was still running", error).group(1)  # type: ignore[union-attr]
    assert tombstone_reason(kit.stack, session_id) == CLOSED_BY_THE_FUNCTION
    assert_nothing_left(kit.stack)


def test_a_killed_function_stops_heartbeating_and_the_step_fails_naming_it(own_kit: Kit) -> None:
    """The function process killed mid-session: its heartbeats stop (the lease is never renewed in v1: it
    stays held by the dead invocation), and the step fails on the heartbeat timeout naming that invocation."""
    payload = own_kit.payload("wait", seconds=60)
    client = own_kit.client(heartbeat_interval=0.5, heartbeat_timeout=2.0)
    bucket = storage.Client(project=own_kit.stack.project).bucket(PAYLOAD_BUCKET)
    spy = Spy(own_kit.stack, own_kit.topic)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            run = pool.submit(own_kit.run, payload, client=client)
            own_kit.wait_for_mark("started", payload["token"])
            (trigger,) = spy.pull_until(lambda m: len(m) >= 1)
            lease = lease_key(PREFIX, trigger.attributes[Attr.SESSION])
            time.sleep(0.6)  # a heartbeat through: the function is known alive
            held = read_lease(bucket.get_blob(lease))
            killed_at = time.monotonic()
            own_kit.server.kill(signal.SIGKILL)
            outcome = run.result(timeout=30)
            seconds_to_failure = time.monotonic() - killed_at
    finally:
        spy.close()

    assert not outcome.result.success
    error = outcome.failure_message
    assert "FunctionHeartbeatTimeout" in error and "stopped sending heartbeats" in error, error[-2000:]
    assert f"invocation {held.invocation_id}" in error, error[-2000:]  # the invocation that held the lease
    # the heartbeat timeout, the waiter's 0.5 s checks and the step's end: 3.7 s was seen on a loaded 4-worker run
    assert seconds_to_failure < 2.0 + 3.0, seconds_to_failure
    ended = read_lease(bucket.get_blob(lease))
    assert not held.ended and ended.ended and ended.invocation_id == held.invocation_id  # ended by the orchestrator
    assert_nothing_left(own_kit.stack)


# ---------------------------------------------------------------------------------------------- gaps


def test_declared_gaps_are_really_missing(implementation: Implementation) -> None:
    """Each probed feature is present exactly when it is not a declared gap: a gap filled, or a feature lost
    without being declared, fails here."""
    probed = implementation.probe(implementation)
    assert set(probed) == set(PROBED)
    assert {feature: probed[feature] for feature in PROBED} == {feature: implementation.has(feature) for feature in PROBED}


def test_the_gcs_reply_channel_is_served_or_refused_by_name(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    # dagster's blob-store reader waits 10 s for late chunks after a session that never sent `closed`
    monkeypatch.setattr(dagster_pipes_utils, "WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL", 0)
    payload = kit.payload("logs", tag="kit-gcs")
    if kit.implementation.has("gcs_reply_channel"):
        outcome = kit.run(payload, client=kit.client(reply_channel="gcs", chunk_interval=0.2))
        assert outcome.result.success, outcome.failure_message
        assert [m for m in outcome.log_messages if m.startswith("kit-gcs ")] == [f"kit-gcs {name}" for name in LEVELS]
    else:  # refused by name (acknowledged, logged), so the step waits out its startup_timeout
        outcome = kit.run(payload, client=kit.client(reply_channel="gcs", chunk_interval=0.2, startup_timeout=2.0))
        assert not outcome.result.success
        error = outcome.failure_message
        assert "FunctionStartupTimeout" in error, error[-2000:]
        session_id = re.search(r"did not start session ([0-9a-f]{32})", error).group(1)  # type: ignore[union-attr]
        kit.wait_for_function_log(session_id, "gcs", "is not supported by the Node.js function side")
        assert kit.handler_runs(payload["token"]) == 0
    assert_nothing_left(kit.stack)


def test_the_http_entry_point_serves_the_earlier_design_or_is_absent(kit: Kit) -> None:
    implementation = kit.implementation
    if not implementation.has("http_entry_point"):  # the declared gap: the package has no HTTP entry
        assert implementation.probe(implementation)["http_entry_point"] is False
        return
    assert implementation.http_target is not None
    server = kit.stack.add_function(LocalFunction(implementation.source, implementation.http_target))
    try:
        url = kit.stack.function_urls[implementation.http_target]
        outcome = kit.run(kit.payload("logs", tag="kit-http"),
                          client=kit.client(invocation="http", function_url=url, http_auth="none"))
    finally:
        kit.stack.servers.pop(f"function-{implementation.http_target}")
        server.stop()
    assert outcome.result.success, outcome.failure_message
    assert [m for m in outcome.log_messages if m.startswith("kit-http ")] == [f"kit-http {name}" for name in LEVELS]
    assert_nothing_left(kit.stack)


def test_a_pull_worker_runs_the_handler_or_is_absent(kit: Kit, tmp_path: Path) -> None:
    implementation = kit.implementation
    if implementation.worker_command is None:  # the declared gap: the package has no worker
        assert implementation.probe(implementation)["pull_worker"] is False
        return
    name = f"kit-worker-{uuid.uuid4().hex[:8]}"
    topic, subscription = f"projects/{kit.stack.project}/topics/{name}", f"projects/{kit.stack.project}/subscriptions/{name}"
    log = tmp_path / "worker.log"
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        publisher.create_topic(request={"name": topic})
        subscriber.create_subscription(request={"name": subscription, "topic": topic, "ack_deadline_seconds": 60})
        with log.open("w") as out:
            worker = subprocess.Popen(
                implementation.worker_command(subscription), cwd=implementation.source.parent, stdout=out,
                stderr=subprocess.STDOUT, env={**os.environ, **kit.stack.environment, "PYTHONUNBUFFERED": "1"},
            )
        try:
            outcome = kit.run(kit.payload("logs", tag="kit-worker"), client=kit.client(trigger_topic=topic))
        finally:
            worker.terminate()
            worker.wait(timeout=15)
            subscriber.delete_subscription(request={"subscription": subscription})
            publisher.delete_topic(request={"topic": topic})
    assert outcome.result.success, f"{outcome.failure_message}\n{log.read_text()[-3000:]}"
    assert [m for m in outcome.log_messages if m.startswith("kit-worker ")] == [f"kit-worker {name}" for name in LEVELS]
    assert worker.returncode == 0, log.read_text()[-3000:]
    assert_nothing_left(kit.stack)
