"""The function side in-process against the real emulators: CloudEvent decoding, a fresh Pipes context per
invocation (no process-wide singleton left behind), exactly one run per trigger, bad events acknowledged."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import uuid
import zlib

import pytest
from dagster import DagsterEventType
from dagster_pipes import PipesContext, encode_param
from google.cloud import storage

from dagster_gcf_pipes.function.context import SessionCancelled
from dagster_gcf_pipes.function.entrypoint import pipes_function
from dagster_gcf_pipes.function.logs import LOGGER_NAME, CloudLoggingFormatter, trace_id_from
from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.orchestrator.diagnostics.errors import CloudFunctionError
from dagster_gcf_pipes.orchestrator.session.end import end_lease
from tests.conftest import PAYLOAD_BUCKET
from tests.functions.main import main as scenario_function
from tests.functions.main import wait_for_mark
from tests.integration.function_harness import FunctionHarness
from tests.integration.helpers import make_client, run_asset


@pytest.fixture
def harness(stack: LocalStack):
    created: list[FunctionHarness] = []

    def make(payload=None, **channel) -> FunctionHarness:
        created.append(FunctionHarness(stack, payload, **channel))
        return created[-1]

    yield make
    for h in created:
        h.close()


def test_one_invocation_reports_opened_logs_materialization_closed_in_order(harness):
    h = harness({"n": 3, "log_lines": 2})
    outcome = scenario_function(h.cloud_event())

    assert outcome.ran and outcome.error is None
    methods = [m["method"] for m in h.read_until_closed()]
    assert methods == ["opened", "log", "log", "log", "report_asset_materialization", "closed"]
    assert not PipesContext.is_initialized(), "the process-wide Pipes singleton must stay untouched"


def test_the_next_invocation_on_a_warm_instance_works(harness):
    for n in range(3):
        h = harness({"n": n})
        assert scenario_function(h.cloud_event()).ran
        materialization = [m for m in h.read_until_closed() if m["method"] == "report_asset_materialization"]
        assert materialization[0]["params"]["metadata"]["n"]["raw_value"] == n


def test_a_redelivered_trigger_does_not_run_twice(harness):
    h = harness({"n": 1})
    first = scenario_function(h.cloud_event(message_id="7"))
    second = scenario_function(h.cloud_event(message_id="7"))

    assert first.ran and not second.ran
    assert [m["method"] for m in h.read_until_closed()].count("report_asset_materialization") == 1
    assert h.invocations == {first.invocation_id}


def test_concurrent_deliveries_of_one_trigger_run_it_once(harness):
    h = harness({"n": 1, "sleep": 0.3})
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda _: scenario_function(h.cloud_event()), range(4)))

    assert sum(o.ran for o in outcomes) == 1
    h.read_until_closed()
    assert h.invocations == {next(o.invocation_id for o in outcomes if o.ran)}


def test_handler_exception_is_reported_through_closed_and_acknowledged(harness):
    h = harness({"scenario": "raise"})
    outcome = scenario_function(h.cloud_event())  # returns: the platform must not redeliver

    assert outcome.ran and isinstance(outcome.error, RuntimeError)
    closed = h.read_until_closed()[-1]
    assert closed["method"] == "closed"
    exception = closed["params"]["exception"]
    assert exception["name"] == "RuntimeError" and exception["message"].strip() == "RuntimeError: boom from the function"
    assert exception["cause"]["name"] == "ValueError"
    assert not PipesContext.is_initialized()


@pipes_function
def chaining(pipes, payload):
    """Raises a ValueError while handling a KeyError, chained as ``payload["chain"]`` says."""
    try:
        {}["missing"]
    except KeyError as exc:
        if payload["chain"] == "from_none":
            raise ValueError("the key is not there") from None
        if payload["chain"] == "from_exc":
            raise ValueError("the key is not there") from exc
        raise ValueError("the key is not there")


@pytest.mark.parametrize(
    ("chain", "joined_by"),
    [
        ("from_none", None),  # before: the suppressed KeyError was shown as the "direct cause"
        ("implicit", "During handling of the above exception, another exception occurred"),
        ("from_exc", "The above exception was the direct cause of the following exception"),
    ],
)
def test_the_remote_traceback_chains_exceptions_as_python_prints_them(harness, chain, joined_by):
    h = harness({"chain": chain})
    assert chaining(h.cloud_event()).ran
    closed = h.read_until_closed()[-1]
    remote = str(CloudFunctionError(h.session_id, closed["params"]["exception"])).partition("Remote traceback:\n")[2]
    assert remote.rstrip().endswith("ValueError: the key is not there")
    if joined_by is None:
        assert "KeyError" not in remote and "direct cause" not in remote and "During handling" not in remote
    else:
        assert remote.index("KeyError: 'missing'") < remote.index(joined_by) < remote.index("ValueError: the key")
        assert remote.count("The above exception") + remote.count("During handling") == 1


def test_a_cancelled_session_is_logged_as_a_cancellation_not_as_an_error(stack, harness, caplog):
    """Before: the handler's SessionCancelled was logged at ERROR with its traceback, which trips error-based
    alerts in Cloud Logging for every terminated run. Dagster still gets it through `closed`."""
    token = uuid.uuid4().hex
    h = harness({"scenario": "wait_for_cancel", "token": token, "sleep": 30})
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        running = pool.submit(scenario_function, h.cloud_event())
        wait_for_mark("started", token)
        end_lease(storage.Client(project=stack.project), PAYLOAD_BUCKET, "harness", h.session_id, start_window=60.0,
                  reason="the Dagster run was terminated")
        outcome = running.result(timeout=30)
    assert outcome.ran and isinstance(outcome.error, SessionCancelled)
    assert "SessionCancelled" in h.read_until_closed()[-1]["params"]["exception"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    stopped = [r for r in caplog.records if f"session {h.session_id}: the handler stopped" in r.getMessage()]
    assert len(stopped) == 1 and stopped[0].levelno == logging.INFO
    assert "the Dagster run was terminated" in stopped[0].getMessage()


def zlib_bomb() -> str:
    """A bootstrap param of 100 kB that inflates to 100 MB."""
    return base64.b64encode(zlib.compress(b"[" + b" " * 100_000_000 + b"]", 9)).decode()


@pytest.mark.parametrize(
    ("data", "attributes", "channel", "expected"),
    [
        (b"not json", None, {}, "the trigger is not UTF-8 JSON"),
        (b"{}", None, {}, "lacks the Pipes bootstrap params"),
        (None, {"dagster_pipes_version": "1"}, {}, "missing attribute 'dagster_pipes_session'"),
        (None, {"dagster_pipes_session": "0" * 32, "dagster_pipes_version": "99"}, {}, "unsupported protocol version '99'"),
        # every field the function reads is checked for its type before anything acts on it
        (b"[" * 100_000 + b"]" * 100_000, None, {}, "nested too deeply"),
        (None, None, {"start_window": "x"}, "field 'start_window' = 'x': must be a number"),
        (None, None, {"heartbeat_interval": 0}, "field 'heartbeat_interval' = 0: must be a finite number above zero"),
        (None, None, {"max_batch_messages": 1.5}, "field 'max_batch_messages' = 1.5: must be a whole number"),
        (None, None, {"signed": "yes"}, "field 'signed' = 'yes': must be true or false"),
        (None, None, {"issued_at": float("nan")}, "field 'issued_at' = nan: must be a finite number"),
        (None, {"dagster_pipes_session": "f" * 32, "dagster_pipes_version": "1"}, {}, f"the message's attributes '{'f' * 32}'"),
        (None, None, {"inline_threshold": 9_000_000}, "inline_threshold_bytes=9000000 is outside"),
        ("bootstrap", {"DAGSTER_PIPES_MESSAGES": encode_param([1, 2])}, {}, "must decode to a JSON object, got a JSON list"),
        ("bootstrap", {"DAGSTER_PIPES_CONTEXT": encode_param({"path": "/etc/passwd"})}, {}, "DAGSTER_PIPES_CONTEXT must be"),
        ("bootstrap", {"DAGSTER_PIPES_MESSAGES": "not base64!"}, {}, "is not a Pipes param"),
        ("bootstrap", {"DAGSTER_PIPES_MESSAGES": zlib_bomb()}, {}, "DAGSTER_PIPES_MESSAGES inflates to more than"),
    ],
)
def test_malformed_triggers_are_logged_and_acknowledged(harness, caplog, data, attributes, channel, expected):
    h = harness(**channel)
    if data == "bootstrap":  # the harness's trigger with one bootstrap param replaced
        trigger = json.loads(h.data)
        data, attributes = json.dumps({**trigger, **attributes}).encode(), None
    with caplog.at_level(logging.ERROR, logger="dagster_gcf_pipes.function"):
        outcome = scenario_function(h.cloud_event(message_id="m-1", data=data, attributes=attributes))
    assert not outcome.ran
    assert expected in str(outcome.error)
    (line,) = [r for r in caplog.records if "m-1" in r.getMessage()]  # one line, naming the problem, no traceback
    assert expected in line.getMessage() and line.exc_info is None


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"data": 12}, "data must be a base64 string, got a JSON int"),
        ({"data": "", "attributes": ["dagster_pipes_session"]}, "attributes must be an object of strings"),
        ({"data": "", "attributes": {"dagster_pipes_seq": 1}}, "attributes must be an object of strings"),
    ],
)
def test_a_push_body_of_the_wrong_shape_is_refused_clearly(message, expected):
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//pubsub"}, {"message": message})
    outcome = scenario_function(event)
    assert not outcome.ran and expected in str(outcome.error)


def test_an_event_without_a_pubsub_message_is_refused_clearly():
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": "google.cloud.storage.object.v1.finalized", "source": "//storage"}, {"bucket": "b"})
    outcome = scenario_function(event)
    assert not outcome.ran
    assert "--trigger-topic" in str(outcome.error)


def test_writer_batches_by_count_and_numbers_the_batches(harness):
    h = harness({"log_lines": 450}, max_batch_messages=100, flush_interval=5.0)
    assert scenario_function(h.cloud_event()).ran
    messages = h.read_until_closed()

    assert [m["params"]["message"] for m in messages if m["method"] == "log"][1:] == [f"line {i}" for i in range(450)]
    # opened + 451 logs + materialization + closed = 454 messages in batches of at most 100: seq 0..4
    assert h.reassembler.next_seq == 5


def test_writer_batches_by_bytes(harness):
    h = harness({"log_lines": 200}, max_batch_bytes=2_000, flush_interval=5.0)
    assert scenario_function(h.cloud_event()).ran
    h.read_until_closed()
    assert h.reassembler.next_seq >= 10  # ~60-byte messages, at most ~2 kB per batch


def test_idle_writer_heartbeats_keep_a_quiet_function_alive(stack):
    outcome = run_asset(make_client(heartbeat_interval=0.3, heartbeat_timeout=1.0), payload={"sleep": 3})
    assert outcome.result.success, outcome.failure_message


def test_a_log_line_reaches_dagster_while_the_function_still_works(stack):
    # a quiet function: one line, then 8 s of work; the line must not wait for a heartbeat (30 s) or for
    # `closed`. It may wait for the reply stream: through the production-semantics layer a new subscription can
    # answer NOT_FOUND for a second and the stream re-opens (with 3 s of work the line once arrived 1.3 s before
    # the end, in a fresh-clone run on 4 workers)
    outcome = run_asset(make_client(heartbeat_interval=30.0, heartbeat_timeout=60.0), payload={"sleep": 8})
    assert outcome.result.success, outcome.failure_message
    step_end = outcome.step_events_at[DagsterEventType.STEP_SUCCESS]
    assert step_end - outcome.logged_at["scenario echo starts"] > 4.0, "the line arrived only as the function finished"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, "4bf92f3577b34da6a3ce929d0e0e4736"),
        ({"X-Cloud-Trace-Context": "4BF92F3577B34DA6A3CE929D0E0E4736/1;o=1"}, "4bf92f3577b34da6a3ce929d0e0e4736"),
        ({"traceparent": "garbage"}, None),
        ({}, None),
    ],
)
def test_trace_ids_are_read_from_w3c_and_google_headers(headers, expected):
    assert trace_id_from(headers) == expected


def test_the_sessions_log_lines_carry_the_requests_trace(stack):
    lines: list[dict] = []

    class Collect(logging.Handler):  # formats as the function's stdout handler does, at emit time
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(CloudLoggingFormatter().format(record)))

    collect = Collect()
    logging.getLogger(LOGGER_NAME).addHandler(collect)
    h = FunctionHarness(stack, {"n": 1})
    try:
        event = h.cloud_event()
        event["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert scenario_function(event).ran
        opened = h.read_until_closed()[0]
    finally:
        h.close()
        logging.getLogger(LOGGER_NAME).removeHandler(collect)
    assert opened["params"]["extras"]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    starts = [line for line in lines if f"session {h.session_id}: invocation" in line["message"]]
    assert starts and starts[0]["logging.googleapis.com/trace"] == (
        f"projects/{stack.project}/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    )
