"""The round trip on the real local stack: Dagster -> Pub/Sub -> Functions Framework -> Pub/Sub -> Dagster."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import warnings

import polars as pl
import pytest
from google.cloud import storage

from dagster_gcf_pipes.local.local_stack import LocalStack
from examples.sales.definitions import cloud_function_pipes_asset
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_example_asset_materializes_table_with_metadata_and_logs(stack: LocalStack):
    from dagster import DagsterInstance, materialize

    instance = DagsterInstance.ephemeral()
    client = make_client(trigger_topic="pipes-trigger")
    result = materialize([cloud_function_pipes_asset], resources={"pipes_pubsub": client}, instance=instance)

    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    location = f"gs://{LAKE_BUCKET}/sales/cloud_function_pipes_asset/part-0.parquet"
    assert metadata["table_location"] == location
    assert metadata["row_count"] == 1000
    assert metadata["schema"] == {"order_id": "Int64", "order_date": "Date", "region": "String", "amount": "Float64"}
    assert len(metadata["pipes_session_id"]) == 32

    logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    assert "generating 1000 rows of fake sales data" in logs
    assert f"writing 1000 rows to {location}" in logs
    assert logs.index("generating 1000 rows of fake sales data") < logs.index("done")

    parquet = storage.Client(project=stack.project).bucket(LAKE_BUCKET).blob("sales/cloud_function_pipes_asset/part-0.parquet")
    table = pl.read_parquet(io.BytesIO(parquet.download_as_bytes()))
    assert table.height == 1000
    assert round(float(table["amount"].sum()), 2) == metadata["total_amount"]

    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def test_log_lines_arrive_once_and_in_order(stack: LocalStack):
    outcome = run_asset(make_client(), payload={"log_lines": 3000})
    assert outcome.result.success
    lines = [m for m in outcome.log_messages if m.startswith("line ")]
    assert lines == [f"line {i}" for i in range(3000)]


def test_function_exception_fails_the_step_with_the_remote_traceback(stack: LocalStack):
    outcome = run_asset(make_client(), payload={"scenario": "raise"})

    assert not outcome.result.success
    error = outcome.failure_message
    assert "CloudFunctionError" in error
    assert "RuntimeError" in error and "boom from the function" in error
    assert "ValueError: invalid literal for int()" in error  # the cause, root first
    assert "tests/functions/main.py" in error  # the remote stack frames
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []


def test_payload_context_and_reply_larger_than_pubsub_limit_travel_through_gcs(stack: LocalStack):
    # Each is over Pub/Sub's 10 MB message limit, so none of them can have travelled inline.
    payload = {"blob": "p" * 10_500_000, "reply_bytes": 10_500_000}
    extras = {"blob": "e" * 10_500_000}
    outcome = run_asset(make_client(), payload=payload, extras=extras)

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["payload_sha256"] == sha256_json(payload)
    assert outcome.metadata["extras_sha256"] == sha256_json(extras)
    assert outcome.custom_messages == ["r" * 10_500_000]
    assert session_objects(stack.project) == []


def test_a_small_threshold_sends_ordinary_messages_through_gcs_intact(stack: LocalStack):
    payload = {"n": 7, "log_lines": 50, "reply_bytes": 5000}
    outcome = run_asset(make_client(inline_threshold_bytes=100), payload=payload, extras={"k": "v" * 500})

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["payload_sha256"] == sha256_json(payload)
    assert outcome.custom_messages == ["r" * 5000]
    assert [m for m in outcome.log_messages if m.startswith("line ")] == [f"line {i}" for i in range(50)]


def test_concurrent_sessions_on_one_warm_instance_stay_apart(stack: LocalStack):
    """Eight sessions at once on one Functions Framework process (threads), then one more on the warm
    instance: each gets its own result. The emulator does not apply subscription filters, so every reader
    also sees the others' replies; its own session check is what keeps them apart."""
    client = make_client()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda n: run_asset(client, payload={"n": n, "log_lines": 20, "sleep": 0.5}), range(8)))
    outcomes.append(run_asset(client, payload={"n": 8}))

    for n, outcome in enumerate(outcomes):
        assert outcome.result.success, outcome.failure_message
        assert outcome.metadata["n"] == n
    session_ids = {o.metadata["pipes_session_id"] for o in outcomes}
    assert len(session_ids) == 9
    assert session_subscriptions(stack.project) == []


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"when": object()}, "payload is not JSON-serialisable"),
        ({"x": float("nan")}, "payload is not JSON-serialisable"),
        ({"DAGSTER_PIPES_CONTEXT": "mine"}, "reserved for the Pipes bootstrap params"),
        ({"rows": 2, 5: "x"}, "payload has the key 5 (int): JSON object keys are strings"),  # was a raw TypeError
        ({"rows": [{None: 1}]}, "payload has the key None (NoneType)"),  # was silently sent as "null"
    ],
)
def test_bad_payload_fails_before_anything_is_published(stack: LocalStack, payload, expected):
    outcome = run_asset(make_client(), payload=payload)
    assert not outcome.result.success
    assert expected in outcome.failure_message
    assert session_subscriptions(stack.project) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"trigger_topic": "no-such-topic"}, "trigger_topic: topic projects/local-project/topics/no-such-topic does not exist"),
        ({"reply_topic": "no-such-replies"}, "reply_topic: topic projects/local-project/topics/no-such-replies does not exist"),
        # the reply subscription is created first (topics are not checked beforehand: no admin operation)
        ({"project": "wrong-project"}, "topic projects/wrong-project/topics/pipes-replies does not exist"),
        ({"bucket": "no-such-bucket"}, "gs://no-such-bucket does not exist"),
        ({"bucket": "gs://pipes-payloads"}, "must be a bare bucket name"),
        ({"inline_threshold_bytes": 11_000_000}, "inline_threshold_bytes=11000000 is outside"),
        ({"heartbeat_timeout": 3.0, "heartbeat_interval": 2.0}, "at least twice heartbeat_interval"),
    ],
)
def test_bad_configuration_names_the_setting_and_the_fix(stack: LocalStack, overrides, expected):
    outcome = run_asset(make_client(**overrides), payload={})
    assert not outcome.result.success
    assert "PipesPubSubConfigError" in outcome.failure_message
    assert expected in outcome.failure_message


def test_unreachable_pubsub_is_a_clear_error_not_a_hang(stack: LocalStack, monkeypatch):
    from dagster_gcf_pipes.local.local_stack import free_port

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    outcome = run_asset(make_client(preflight_timeout=3.0), payload={})
    assert not outcome.result.success
    assert "GCPUnreachableError" in outcome.failure_message
    assert "Pub/Sub did not answer within preflight_timeout=3s" in outcome.failure_message
    assert "PUBSUB_EMULATOR_HOST=127.0.0.1:" in outcome.failure_message


def test_a_session_warns_nothing(stack: LocalStack):
    """Dagster marks PipesMessageReader.expected_writer_count as preview and warned about it on every session
    our readers ran; they say it themselves (one writer per session)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run_asset(make_client(), payload={"n": 1})
    assert outcome.result.success, outcome.failure_message
    assert [str(w.message) for w in caught if "expected_writer_count" in str(w.message)] == []
