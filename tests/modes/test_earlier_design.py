"""The earlier design as a mode: HTTP invocation and the GCS-chunk reply channel, each combined with ours.

Every combination runs the same test function end to end on the local stack; the GCS channel's chunks are
dagster-pipes' own (``{key_prefix}/{n}.json``) and are deleted with the session's other objects."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from dagster_gcf_pipes.local.local_stack import free_port
from tests.conftest import HTTP_TARGET
from tests.integration.function_harness import FunctionHarness
from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions

COMBINATIONS = {
    "http+pubsub": {"invocation": "http"},
    "http+gcs": {"invocation": "http", "reply_channel": "gcs"},
    "pubsub+gcs": {"reply_channel": "gcs"},
}


def mode(stack, name: str, **overrides) -> dict:
    settings = {**COMBINATIONS[name], "http_auth": "none", "chunk_interval": 1.0}
    if settings.get("invocation") == "http":
        settings["function_url"] = stack.function_urls[HTTP_TARGET]
    return {**settings, **overrides}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_each_combination_round_trips_logs_materialization_and_custom_messages(stack, name):
    outcome = run_asset(make_client(**mode(stack, name)), payload={"n": 3, "log_lines": 4, "reply_bytes": 10})

    assert outcome.result.success, outcome.failure_message
    assert [m for m in outcome.log_messages if m.startswith("line ")] == [f"line {i}" for i in range(4)]
    assert outcome.custom_messages == ["r" * 10]
    metadata = outcome.metadata
    assert metadata["n"] == 3 and len(metadata["pipes_invocation_id"]) == 32
    if "invocation" in COMBINATIONS[name]:
        assert metadata["pipes_function_url"] == stack.function_urls[HTTP_TARGET]
        # the POST carried a traceparent naming the session: the function ran under that trace and said so
        assert metadata["pipes_trace_id"] == metadata["pipes_session_id"]
    else:
        assert metadata["pipes_trigger_message_id"]
    # chunks, context and lease are deleted with the session; no subscription is left
    assert session_objects(stack.project, prefix=f"dagster-pipes/{metadata['pipes_session_id']}/") == []
    assert session_subscriptions(stack.project) == []


def test_the_earlier_design_reports_the_remote_traceback(stack):
    outcome = run_asset(make_client(**mode(stack, "http+gcs")), payload={"scenario": "raise"})

    assert not outcome.result.success
    assert "boom from the function" in outcome.failure_message
    assert "ValueError: invalid literal for int()" in outcome.failure_message


def test_a_refused_http_trigger_fails_the_step_at_once_with_the_functions_answer(stack):
    # the function lacks the signing secret, so it refuses the session: HTTP 400 with the reason
    outcome = run_asset(make_client(**mode(stack, "http+pubsub"), signing_secret="only-here", startup_timeout=60.0), payload={})

    assert not outcome.result.success
    assert "answered HTTP 400" in outcome.failure_message and "DAGSTER_PIPES_SIGNING_SECRET" in outcome.failure_message


def test_an_unreachable_function_url_fails_naming_it(stack):
    url = f"http://127.0.0.1:{free_port()}/"
    client = make_client(invocation="http", function_url=url, http_auth="none", preflight_timeout=1.0)
    outcome = run_asset(client, payload={})

    assert not outcome.result.success
    assert f"the Cloud Function at {url} did not answer" in outcome.failure_message
    assert "check function_url" in outcome.failure_message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"invocation": "http"}, "invocation='http' needs the function's URL"),
        ({"invocation": "http", "function_url": "https://f.run.app", "http_timeout": 60.0}, "http_timeout=60 is shorter"),
        ({"reply_channel": "gcs", "signing_secret": "s"}, "GCS chunks are guarded by the bucket's IAM"),
        ({"reply_channel": "gcs", "chunk_interval": 0.0}, "chunk_interval=0 must be positive"),
        ({"trigger_topic": None}, "trigger_topic is not set"),
        ({"reply_topic": None}, "reply_topic is not set"),
    ],
)
def test_an_inconsistent_mode_is_refused_before_anything_is_sent(stack, overrides, expected):
    outcome = run_asset(make_client(**overrides), payload={})

    assert not outcome.result.success
    assert expected in outcome.failure_message


def test_the_http_entry_point_runs_a_trigger_once_and_answers_each_delivery(stack, request):
    harness = FunctionHarness(stack, {"n": 1})
    request.addfinalizer(harness.close)
    url = stack.function_urls[HTTP_TARGET]
    body = {"message": {"data": base64.b64encode(harness.data).decode(), "attributes": harness.attributes, "messageId": "1"}}

    first = requests.post(url, json=body, timeout=30)
    duplicate = requests.post(url, json=body, timeout=30)
    malformed = requests.post(url, json={"not": "a push body"}, timeout=30)

    assert first.status_code == 200 and json.loads(first.text)["ran"] is True
    assert duplicate.status_code == 409 and json.loads(duplicate.text)["ran"] is False  # the lease is held
    assert malformed.status_code == 400 and "carries no Pub/Sub message" in malformed.json()["error"]
    messages = harness.read_until_closed()
    assert [m["method"] for m in messages][0] == "opened" and messages[-1]["method"] == "closed"
    assert len(harness.invocations) == 1
