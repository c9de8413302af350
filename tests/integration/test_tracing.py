"""End-to-end tracing on the real local stack: the Dagster step (this process), the dispatcher and the Functions
Framework (processes of their own) make one trace, collected from each side's ``file`` exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1
from opentelemetry import trace

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.diagnostics.tracing import CLOUD_TRACE_URL_TEMPLATE
from dagster_gcf_pipes.shared.signing import SECRET_ENV_VAR
from tests.conftest import REPLY_TOPIC
from tests.integration.helpers import make_client, run_asset
from tests.modes.test_fanout import run_fan_out_asset

#: replies are signed too: the trace context the client library adds to a reply is not covered by the signature
SECRET = "tracing-test-secret"


def tracing_env(path: Path, service: str) -> dict[str, str]:
    return {
        "DAGSTER_GCF_PIPES_TRACING": "1",
        "OTEL_TRACES_EXPORTER": "file",
        "DAGSTER_GCF_PIPES_TRACE_FILE": str(path),
        "OTEL_SERVICE_NAME": service,
    }


@pytest.fixture
def traced_function(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    """tests/functions/traced.py served with tracing on, its spans written to a file of its own."""
    spans = tmp_path_factory.mktemp("function-spans") / "spans.jsonl"
    topic = f"traced-{uuid.uuid4().hex[:8]}"
    env = {**tracing_env(spans, "traced-function"), SECRET_ENV_VAR: SECRET}
    server = stack.add_function(LocalFunction("tests/functions/traced.py", "main", topic, env=env))
    yield topic, server, spans
    stack.servers.pop(f"function-{topic}").stop()
    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.delete_subscription(request={"subscription": stack.trigger_subscription(topic)})


@pytest.fixture(scope="module")
def orchestrator_spans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # this process's tracer provider is configured once, on first use: one file for the module
    return tmp_path_factory.mktemp("orchestrator-spans") / "spans.jsonl"


def read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_trace(path: Path, trace_id: str, invocations: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The function's spans of a trace, once it has ``invocations`` invocation spans: a function exports its
    spans before it answers the delivery, which may be after the step ended."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in read_spans(path) if s["trace_id"] == trace_id]
        if sum(s["name"] == "pipes invocation" for s in spans) >= invocations:
            return spans
        assert time.monotonic() < deadline, f"{invocations} invocation(s) of trace {trace_id} not in {path} within {timeout:g}s"
        time.sleep(0.1)


def only(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"expected one {name!r} span, found {len(found)}: {[s['name'] for s in spans]}"
    return found[0]


def test_one_trace_covers_step_publish_invocation_handler_replies_and_hand_off(
    stack: LocalStack, traced_function, orchestrator_spans: Path, monkeypatch: pytest.MonkeyPatch
):
    topic, server, function_spans = traced_function
    for key, value in tracing_env(orchestrator_spans, "dagster").items():
        monkeypatch.setenv(key, value)

    client = make_client(trigger_topic=topic, trace_url_template=CLOUD_TRACE_URL_TEMPLATE, signing_secret=SECRET)
    outcome = run_asset(client, payload={"rows": 3})
    assert outcome.result.success, outcome.failure_message
    trace.get_tracer_provider().force_flush()

    session_id = outcome.metadata["pipes_session_id"]
    ours = [s for s in read_spans(orchestrator_spans) if s["attributes"].get("dagster.run_id") == outcome.result.run_id]
    step = only(ours, "dagster step pipes_test_asset")
    trace_id = step["trace_id"]
    assert outcome.metadata["pipes_trace_id"] == trace_id
    assert outcome.metadata["pipes_trace_url"] == CLOUD_TRACE_URL_TEMPLATE.format(trace_id=trace_id, project=stack.project)
    assert f"[pipes] trace {trace_id}" in "\n".join(outcome.log_messages)

    orchestrator = [s for s in read_spans(orchestrator_spans) if s["trace_id"] == trace_id]
    function = wait_for_trace(function_spans, trace_id)
    by_id = {s["span_id"]: s for s in orchestrator + function}

    def parent(span: dict[str, Any]) -> str:
        assert span["parent_span_id"] in by_id, f"{span['name']}: its parent is not in the trace"
        return by_id[span["parent_span_id"]]["name"]

    # step -> trigger publish (the client library's create span) -> invocation -> handler -> the user's spans
    publish = only(orchestrator, f"{topic} create")
    assert parent(publish) == step["name"] and publish["kind"] == "PRODUCER"
    invocation = only(function, "pipes invocation")
    assert parent(invocation) == publish["name"] and invocation["service"] == "traced-function"
    assert invocation["attributes"]["dagster_pipes.session_id"] == session_id
    handler = only(function, "pipes handler")
    assert parent(handler) == "pipes invocation"
    user = only(function, "load rows")
    assert parent(user) == "pipes handler" and user["attributes"]["rows"] == 3
    assert parent(only(function, "plain otel work")) == "load rows"

    # every reply publish under the handler; the reader's hand-off of each under the step, linked to it
    replies = [s for s in function if s["name"] == f"{REPLY_TOPIC} create"]
    assert len(replies) >= 2 and all(parent(r) == "pipes handler" for r in replies)  # `opened` ... `closed`
    hand_offs = [s for s in orchestrator if s["name"] == "pipes hand-off"]
    assert all(parent(h) == step["name"] for h in hand_offs)
    batches = [h for h in hand_offs if h["attributes"]["dagster_pipes.kind"] == "batch"]
    assert len(batches) >= 2
    linked = {link["span_id"] for h in hand_offs for link in h["links"]}
    reply_ids = {r["span_id"] for r in replies}
    assert {link["span_id"] for h in batches for link in h["links"]} <= reply_ids
    assert linked & reply_ids == linked

    # the function's JSON log lines carry the same trace, as Cloud Logging expects
    log_trace = f'"logging.googleapis.com/trace": "projects/{stack.project}/traces/{trace_id}"'
    starts = [line for line in server.log_path.read_text().splitlines() if f"session {session_id}: invocation" in line]
    assert starts and all(log_trace in line for line in starts), starts


def test_a_fan_out_is_one_trace_with_a_session_span_per_shard(
    stack: LocalStack, traced_function, orchestrator_spans: Path, monkeypatch: pytest.MonkeyPatch
):
    topic, _, function_spans = traced_function
    for key, value in tracing_env(orchestrator_spans, "dagster").items():
        monkeypatch.setenv(key, value)

    client = make_client(trigger_topic=topic, signing_secret=SECRET)
    result, logs, _ = run_fan_out_asset(client, [{"rows": 1}, {"rows": 2}], max_concurrency=2)
    assert result.success
    trace.get_tracer_provider().force_flush()

    ours = [s for s in read_spans(orchestrator_spans) if s["attributes"].get("dagster.run_id") == result.run_id]
    fan_out = only(ours, "dagster step fan_out_asset fan-out")
    shards = sorted((s for s in ours if s["name"] != fan_out["name"]), key=lambda s: s["name"])
    assert [s["name"] for s in shards] == [f"dagster step fan_out_asset [shard {i}]" for i in (0, 1)]
    assert {s["trace_id"] for s in shards} == {fan_out["trace_id"]}
    assert all(s["parent_span_id"] == fan_out["span_id"] for s in shards)
    assert [line for line in logs if "[pipes] trace" in line] == [f"[pipes] trace {fan_out['trace_id']}"]  # once a step

    # each shard's trigger publish under its session's span, and its invocation under that publish
    spans = {s["span_id"]: s for s in read_spans(orchestrator_spans) + wait_for_trace(function_spans, fan_out["trace_id"], 2)}
    users = [s for s in spans.values() if s["name"] == "load rows" and s["trace_id"] == fan_out["trace_id"]]
    chains = []
    for user in users:
        chain = [user]
        while chain[-1]["parent_span_id"] in spans:
            chain.append(spans[chain[-1]["parent_span_id"]])
        chains.append((user["attributes"]["rows"], [s["name"] for s in chain]))
    assert sorted(chains) == [
        (rows, ["load rows", "pipes handler", "pipes invocation", f"{topic} create", f"dagster step fan_out_asset [shard {rows - 1}]",
                "dagster step fan_out_asset fan-out"])
        for rows in (1, 2)
    ]


OFF_PROBE = """
import sys
from dagster_gcf_pipes.function import tracing as function_tracing
from dagster_gcf_pipes.orchestrator.client import client
from dagster_gcf_pipes.orchestrator.diagnostics import tracing as orchestrator_tracing
from dagster_gcf_pipes.shared import tracing
from dagster_gcf_pipes.shared.pubsub import publisher_client

with function_tracing.invocation_span({"googclient_traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, "m") as trace_id:
    assert trace_id is None
    with function_tracing.handler_span("s"), function_tracing.user_span("work") as span:
        assert span is None
assert tracing.carried(print) is print and tracing.current_context() is None
assert orchestrator_tracing.hand_off(None, {}, "m").__enter__() is None
assert not publisher_client().open_telemetry_enabled
sdk = sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk") or m.endswith("tracing_sdk"))
assert not sdk, sdk
"""


def test_tracing_off_creates_no_span_and_loads_no_sdk(tmp_path: Path):
    """Off (the default), the hooks do nothing and the OpenTelemetry SDK is never imported."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_GCF_PIPES_TRACING"}
    subprocess.run([sys.executable, "-c", OFF_PROBE], env=env, check=True, cwd=Path.cwd(), timeout=120)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (CLOUD_TRACE_URL_TEMPLATE, None),
        ("https://trace.example/{trace_id}", None),
        ("https://console.cloud.google.com/traces/list?project={project}", "must name {trace_id}"),
        ("https://trace.example/{trace}", "not trace"),
        ("https://trace.example/{trace_id", "not a format string"),
    ],
)
def test_trace_url_template_is_checked_before_anything_is_published(template: str, problem: str | None):
    problems = make_client(trace_url_template=template).config_problems()
    if problem is None:
        assert problems == []
    else:
        (found,) = problems
        assert "trace_url_template" in found and problem in found, found


MISCONFIGURED_PROBE = """
import logging
logging.basicConfig()
from dagster_gcf_pipes.function import tracing as function_tracing

with function_tracing.invocation_span({}, "m") as trace_id, function_tracing.handler_span("s"):
    assert trace_id is not None  # traced, though nothing is exported
"""


def test_an_exporter_that_cannot_be_made_is_logged_and_the_session_still_runs(tmp_path: Path):
    env = {**os.environ, "DAGSTER_GCF_PIPES_TRACING": "1", "OTEL_TRACES_EXPORTER": "bogus,file"}
    env.pop("DAGSTER_GCF_PIPES_TRACE_FILE", None)
    done = subprocess.run(
        [sys.executable, "-c", MISCONFIGURED_PROBE], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "no span exporter 'bogus' is installed" in done.stderr
    assert "set DAGSTER_GCF_PIPES_TRACE_FILE" in done.stderr
