"""Fan-out on the local stack: many sessions from one step, bounded concurrency, one aggregated result."""

import json
import uuid
from typing import Any

from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, asset, materialize
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.fanout import FanOutError, FanOutResult
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, session_subscriptions


def run_fan_out_asset(client: PipesPubSubClient, payloads: list[dict[str, Any]], **options: Any) -> tuple[Any, list[str], list[Any]]:
    """Materialize one asset whose step fans out ``payloads``; return (result, log lines, outcomes)."""
    outcomes: list[Any] = []

    @asset(name="fan_out_asset")
    def fan_out_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        try:
            result: FanOutResult = pipes_pubsub.run_many(context=context, payloads=payloads, **options)
        except FanOutError as exc:
            outcomes.extend(exc.outcomes)
            raise
        outcomes.extend(result.outcomes)
        return result.get_materialize_result()

    with DagsterInstance.ephemeral() as instance:
        result = materialize([fan_out_asset], resources={"pipes_pubsub": client}, instance=instance, raise_on_error=False)
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    return result, logs, outcomes


def step_failure(result: Any) -> str:
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    return failure.event_specific_data.error.to_string()


def max_overlap(intervals: list[dict[str, float]]) -> int:
    edges = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_twenty_shards_at_concurrency_five_with_one_raising(stack: Any) -> None:
    run = uuid.uuid4().hex
    payloads = [
        {"n": i, "sleep": 0.8, "interval_token": f"{run}-{i}", **({"scenario": "raise"} if i == 7 else {})}
        for i in range(20)
    ]
    result, logs, outcomes = run_fan_out_asset(make_client(), payloads, max_concurrency=5)

    assert not result.success
    failure = step_failure(result)
    assert "1 of 20 shards failed: [7]" in failure
    assert "--- shard 7" in failure and "boom from the function" in failure
    assert "ValueError: invalid literal for int()" in failure  # the remote cause's traceback is listed
    by_shard = {o.shard: o for o in outcomes}
    assert sorted(by_shard) == list(range(20))
    assert [s for s, o in by_shard.items() if not o.ok] == [7]
    for shard, outcome in by_shard.items():
        if shard != 7:
            assert outcome.metadata["n"] == shard
            assert outcome.metadata["pipes_session_id"]
    session_ids = {o.metadata.get("pipes_session_id") for o in outcomes if o.ok}
    assert len(session_ids) == 19
    # one group: the sessions share a prefix, and one subscription carried every shard's replies
    (group,) = {session_id[:16] for session_id in session_ids}
    assert f"[pipes] fan-out: every shard's replies arrive through projects/{stack.project}/subscriptions/dagster-pipes-group-{group}" in logs
    assert session_subscriptions(stack.project) == []

    for shard in (0, 7, 19):
        assert f"[shard {shard}] scenario echo starts" in logs or f"[shard {shard}] scenario raise starts" in logs
    bucket = storage.Client().bucket(LAKE_BUCKET)
    intervals = [json.loads(b.download_as_bytes()) for b in bucket.list_blobs(prefix=f"intervals/{run}-")]
    assert len(intervals) == 19  # the raising shard fails before recording its interval
    peak = max_overlap(intervals)
    assert 2 <= peak <= 5, f"{peak} shards ran at once"


def test_aggregate_materialization_and_retry_as_new_session(stack: Any) -> None:
    token = uuid.uuid4().hex
    payloads = [{"n": 1}, {"n": 2, "scenario": "fail_once", "token": token}, {"n": 3}]
    result, logs, outcomes = run_fan_out_asset(make_client(), payloads, max_concurrency=3, shard_retries=1)

    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    assert metadata["pipes_shard_count"] == 3
    shards = metadata["pipes_shards"]
    assert [s["n"] for s in shards] == [1, 2, 3]
    assert [s["attempts"] for s in shards] == [1, 2, 1]
    assert len({s["pipes_session_id"] for s in shards}) == 3
    assert any("[shard 1] attempt 1 failed (CloudFunctionError); retrying as a new session" in line for line in logs)
    # the per-shard table and statistics, and the last progress line
    assert metadata["pipes_shard_retries"] == 1
    assert metadata["pipes_shard_seconds_max"] >= metadata["pipes_shard_seconds_p50"] > 0
    assert metadata["pipes_shard_table"].splitlines()[2:] == [
        f"| {s['shard']} | {s['seconds']:.3f} | {s['attempts']} | ok |" for s in shards]
    assert any(line.startswith("[fan-out] 3/3 done (0 failed)") for line in logs)


def test_bad_shard_payload_fails_before_anything_is_published(stack: Any) -> None:
    result, _, outcomes = run_fan_out_asset(make_client(), [{"n": 1}, {"bad": object()}], max_concurrency=0)
    failure = step_failure(result)
    assert "max_concurrency=0 must be at least 1" in failure
    assert "shard 1:" in failure and "JSON" in failure
    assert outcomes == []
