"""Fan-out on the local stack: many sessions from one step, bounded concurrency, one aggregated result."""

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    asset,
    materialize,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.modes.fanout import FanOutError, FanOutResult
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, session_subscriptions

FAN_OUT_ASSET = AssetKey("fan_out_asset")


@dataclass
class FanOutRun:
    """What one materialization of the fan-out asset left: Dagster's result, the step's log lines, the shards'
    outcomes, the ``FanOutResult`` (if ``run_many`` returned), and the checks recorded in the instance."""

    result: Any
    logs: list[str]
    outcomes: list[Any]
    fan_out: FanOutResult | None = None
    checks: dict[str, tuple[AssetCheckExecutionRecordStatus, AssetCheckEvaluation]] = field(default_factory=dict)


def fan_out_asset_run(
    client: PipesPubSubClient,
    payloads: list[dict[str, Any]],
    *,
    check_specs: Sequence[AssetCheckSpec] = (),
    returns: Callable[[FanOutResult], Any] = FanOutResult.get_materialize_result,
    **options: Any,
) -> FanOutRun:
    """Materialize one asset (declaring ``check_specs``) whose step fans out ``payloads`` and returns
    ``returns(fan_out_result)``."""
    outcomes: list[Any] = []
    fan_outs: list[FanOutResult] = []

    @asset(name=FAN_OUT_ASSET.path[0], check_specs=check_specs)
    def fan_out_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        try:
            result: FanOutResult = pipes_pubsub.run_many(context=context, payloads=payloads, **options)
        except FanOutError as exc:
            outcomes.extend(exc.outcomes)
            raise
        outcomes.extend(result.outcomes)
        fan_outs.append(result)
        return returns(result)

    with DagsterInstance.ephemeral() as instance:
        result = materialize([fan_out_asset], resources={"pipes_pubsub": client}, instance=instance, raise_on_error=False)
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
        keys = [AssetCheckKey(FAN_OUT_ASSET, spec.name) for spec in check_specs]
        records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys) if keys else {}
        checks = {
            key.name: (record.status, record.event.dagster_event.event_specific_data)
            for key, record in records.items()
            if record.event is not None and record.event.dagster_event is not None
        }
    return FanOutRun(result, logs, outcomes, fan_outs[0] if fan_outs else None, checks)


def run_fan_out_asset(client: PipesPubSubClient, payloads: list[dict[str, Any]], **options: Any) -> tuple[Any, list[str], list[Any]]:
    """Materialize one asset whose step fans out ``payloads``; return (result, log lines, outcomes)."""
    run = fan_out_asset_run(client, payloads, **options)
    return run.result, run.logs, run.outcomes


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
    # no line per shard for what the progress lines count (issue 26: each is a Dagster event a shard)
    assert not [line for line in logs if "trigger sent" in line or "successfully opened dagster pipes" in line]
    bucket = storage.Client().bucket(LAKE_BUCKET)
    intervals = [json.loads(b.download_as_bytes()) for b in bucket.list_blobs(prefix=f"intervals/{run}-")]
    assert len(intervals) == 19  # the raising shard fails before recording its interval
    peak = max_overlap(intervals)
    assert 2 <= peak <= 5, f"{peak} shards ran at once"


def test_aggregate_materialization_and_retry_as_new_session(stack: Any) -> None:
    token = uuid.uuid4().hex
    payloads = [{"n": 1}, {"n": 2, "scenario": "fail_once", "token": token}, {"n": 3}]
    result, logs, _ = run_fan_out_asset(make_client(), payloads, max_concurrency=3, shard_retries=1)

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


def check_metadata(evaluation: AssetCheckEvaluation) -> dict[str, Any]:
    return {key: value.value for key, value in evaluation.metadata.items()}


def test_a_check_every_shard_passes_is_recorded_once_passed(stack: Any) -> None:
    payloads = [{"n": i, "checks": [{"name": "rows_valid", "passed": True, "severity": "WARN"}]} for i in range(3)]
    run = fan_out_asset_run(make_client(), payloads, max_concurrency=3,
                            check_specs=[AssetCheckSpec("rows_valid", asset=FAN_OUT_ASSET)], returns=FanOutResult.get_results)

    assert run.result.success
    assert len(run.result.get_asset_check_evaluations()) == 1  # one result for the three shards' reports
    status, recorded = run.checks["rows_valid"]
    assert status == AssetCheckExecutionRecordStatus.SUCCEEDED and recorded.passed
    assert recorded.severity == AssetCheckSeverity.WARN
    metadata = check_metadata(recorded)
    assert (metadata["pipes_shards_passed"], metadata["pipes_shards_failed"], metadata["pipes_shards_not_reported"]) == (3, 0, 0)
    assert "pipes_failed_shards" not in metadata
    (event,) = run.result.get_asset_materialization_events()  # the aggregated materialization is unchanged
    shards = event.event_specific_data.materialization.metadata["pipes_shards"].value
    assert [s["n"] for s in shards] == [0, 1, 2]  # a shard's check metadata does not mix into its summary


def test_one_failing_shard_fails_the_check_and_is_named(stack: Any) -> None:
    def reports(i: int) -> list[dict[str, Any]]:
        if i == 3:
            return []  # this shard does not evaluate the check
        if i == 2:
            return [{"name": "rows_valid", "passed": False, "severity": "ERROR", "metadata": {"bad_rows": 7}}]
        return [{"name": "rows_valid", "passed": True, "severity": "WARN", "metadata": {"bad_rows": 0}}]

    payloads = [{"n": i, "checks": reports(i), "custom_messages": [{"shard": i}, f"done {i}"]} for i in range(5)]
    run = fan_out_asset_run(make_client(), payloads, max_concurrency=5,
                            check_specs=[AssetCheckSpec("rows_valid", asset=FAN_OUT_ASSET)], returns=FanOutResult.get_results)

    assert run.result.success  # the check is not blocking: the materialization stands, the check fails
    status, recorded = run.checks["rows_valid"]
    assert status == AssetCheckExecutionRecordStatus.FAILED and not recorded.passed
    assert recorded.severity == AssetCheckSeverity.ERROR  # the failed shard's, not the passing shards' WARN
    metadata = check_metadata(recorded)
    assert metadata["pipes_shards_reported"] == 4
    assert (metadata["pipes_shards_passed"], metadata["pipes_shards_failed"]) == (3, 1)
    assert metadata["pipes_failed_shards"] == [2]
    assert metadata["pipes_shards_not_reported"] == 1 and metadata["pipes_not_reported_shards"] == [3]
    first_failed = metadata["pipes_first_failed_shard"]
    assert first_failed["shard"] == 2 and first_failed["metadata"]["bad_rows"] == 7
    assert first_failed["metadata"]["pipes_session_id"] == run.outcomes[2].metadata["pipes_session_id"]
    assert "failed: shards 2" in recorded.description and "not evaluated (no report): shards 3" in recorded.description
    # every shard's custom messages, one list per shard in payload order
    assert run.fan_out is not None
    assert [list(m) for m in run.fan_out.get_custom_messages()] == [[{"shard": i}, f"done {i}"] for i in range(5)]


def test_get_materialize_result_carries_declared_checks_and_warns_of_the_others(stack: Any) -> None:
    payloads = [
        {"n": i, "checks": [{"name": "declared", "passed": i != 1}, {"name": "undeclared", "passed": i != 0}]}
        for i in range(2)
    ]
    run = fan_out_asset_run(make_client(), payloads, max_concurrency=2,
                            check_specs=[AssetCheckSpec("declared", asset=FAN_OUT_ASSET)])

    assert run.result.success
    status, recorded = run.checks["declared"]  # as Dagster's get_materialize_result: the check rides along
    assert status == AssetCheckExecutionRecordStatus.FAILED
    assert check_metadata(recorded)["pipes_failed_shards"] == [1]
    (warning,) = [line for line in run.logs if "leaves out check results" in line]
    assert "undeclared on fan_out_asset (FAILED: 1 of 2 shards that reported it passed; failed: shards 0)" in warning
    assert warning.count(" on fan_out_asset (") == 1  # the declared check is not left out
    assert "get_results()" in warning


def test_get_asset_check_result_needs_a_single_check_and_no_materialization(stack: Any) -> None:
    payloads = [{"n": i, "checks": [{"name": "rows_valid", "passed": True}]} for i in range(2)]
    run = fan_out_asset_run(make_client(), payloads, max_concurrency=2, returns=FanOutResult.get_asset_check_result)

    assert not run.result.success
    assert "Did not find a singular asset check across the 2 shards: got 1 check(s) " \
           "['rows_valid on fan_out_asset'] and materializations of ['fan_out_asset']" in step_failure(run.result)
