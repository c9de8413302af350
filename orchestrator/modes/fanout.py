"""Fan-out: many function sessions (shards) from one step, at bounded concurrency, one aggregated result.

Each shard is a complete session run by ``PipesPubSubClient``; this module only schedules them, retries
failed shards as new sessions, and aggregates: per-shard metadata on success, and once every shard has
ended, a ``FanOutError`` listing each failed shard with its remote traceback.

A retry never races its predecessor's session: the retry starts only after the failed attempt's session was
ended durably (its lease rewritten ended), so a predecessor that is still running (a heartbeat timeout
while it lived on, a function past its timeout) is cancelled at its next lease check (within a second),
cannot reply into the step any more, and a queued or duplicate delivery of its trigger never starts. What
cooperative cancellation cannot stop is a handler that ignores ``pipes.is_cancelled`` while writing its
output: write shard outputs idempotently (a name derived from the payload, each object written whole in
one upload), so two attempts can only write the same result (docs/reliability.md).

An interrupt ends every running shard's session (the functions that had not started never will) and starts
no new shard.

What the shards report besides materializations is aggregated too (``FanOutResult``): one asset check
result per check, failed if any shard reported it failed, and every shard's custom messages.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    DagsterExecutionInterruptedError,
    DagsterInvariantViolationError,
    MaterializeResult,
    MetadataValue,
    PipesClientCompletedInvocation,
    PipesExecutionResult,
    get_dagster_logger,
)
from dagster_pipes import DagsterPipesError

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError, PipesPubSubError, RunInterrupted
from dagster_gcf_pipes.orchestrator.session.attach_claim import AttachHeld
from dagster_gcf_pipes.orchestrator.modes.fanout_progress import FanOutProgress, shard_statistics, shard_table

RunShard = Callable[[int, Mapping[str, Any]], PipesClientCompletedInvocation]

#: Errors a new session cannot fix: retrying them only repeats the failure (or, for a shard whose earlier session
#: another attempt is re-attached to, runs it a second time).
NOT_RETRIED = (PipesPubSubConfigError, RunInterrupted, AttachHeld)

#: At most this many shard indexes are listed in an aggregated check's metadata (the counts are always exact):
#: a check of a 1,000-shard fan-out stays small.
LISTED_SHARDS = 50

#: A failed aggregated check takes the worst severity of the shards that failed it.
SEVERITY_RANK = {AssetCheckSeverity.WARN: 0, AssetCheckSeverity.ERROR: 1}


@dataclass(frozen=True)
class ShardResults:
    """What a finished shard's session reported, kept in place of the session: the invocation holds its reader,
    handler and their buffers, which a 10,000-shard step would otherwise keep to its end (about 30 KB a shard,
    its RSS growing with the shards)."""

    reported: tuple[PipesExecutionResult, ...]
    with_implicit: tuple[PipesExecutionResult, ...]  # ``get_results()``'s default: an asset not reported, materialized
    metadata: Mapping[str, Any]
    custom_messages: tuple[Any, ...]

    @classmethod
    def of(cls, invocation: PipesClientCompletedInvocation) -> ShardResults:
        return cls(
            tuple(invocation.get_results(implicit_materializations=False)),
            tuple(invocation.get_results(implicit_materializations=True)),
            dict(invocation.metadata),
            tuple(invocation.get_custom_messages()),
        )

    def get_results(self, *, implicit_materializations: bool = True) -> Sequence[PipesExecutionResult]:
        return self.with_implicit if implicit_materializations else self.reported


@dataclass(frozen=True)
class ShardOutcome:
    shard: int
    payload: Mapping[str, Any]
    attempts: int
    seconds: float
    session: ShardResults | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def results(self, *, implicit_materializations: bool = True) -> Sequence[PipesExecutionResult]:
        """What the shard's session reported (materializations and check results), as ``get_results()``."""
        if self.session is None:
            return ()
        return self.session.get_results(implicit_materializations=implicit_materializations)

    @property
    def metadata(self) -> dict[str, Any]:
        """The session metadata and the function's reported materialization metadata, as plain values."""
        if self.session is None:
            return {}
        values: dict[str, Any] = dict(self.session.metadata)
        for result in self.results():
            if isinstance(result, MaterializeResult):
                values.update({key: _plain(value) for key, value in (result.metadata or {}).items()})
        return values

    def summary(self) -> dict[str, Any]:
        return {"shard": self.shard, "attempts": self.attempts, "seconds": round(self.seconds, 3), **self.metadata}


def _plain(value: Any) -> Any:
    raw = value.value if isinstance(value, MetadataValue) else value
    try:
        json.dumps(raw)
    except TypeError:
        return str(raw)
    return raw


class FanOutError(PipesPubSubError):
    """One or more shards failed; raised after every shard has ended."""

    def __init__(self, outcomes: Sequence[ShardOutcome]):
        self.outcomes = list(outcomes)
        failed = [o for o in self.outcomes if not o.ok]
        listing = "\n\n".join(
            f"--- shard {o.shard} (payload {json.dumps(o.payload, default=str)[:200]}, "
            f"{o.attempts} attempt{'s' if o.attempts > 1 else ''}): {type(o.error).__name__}: {o.error}"
            for o in failed
        )
        super().__init__(
            f"{len(failed)} of {len(self.outcomes)} shards failed: {[o.shard for o in failed]}\n\n{listing}"
        )


@dataclass(frozen=True)
class FanOutResult:
    """The shards' outcomes, in payload order (``outcomes[i].shard == i``), and what the step returns from them.

    The accessors follow ``PipesClientCompletedInvocation``'s: ``get_results()`` (everything, for a
    multi-asset or checks), ``get_materialize_result()`` (one asset), ``get_asset_check_result()`` (an
    ``@asset_check``) and ``get_custom_messages()``.
    """

    outcomes: Sequence[ShardOutcome]
    seconds: float
    log: Any = field(default=None, repr=False, compare=False)  # the step's logger; Dagster's outside a step

    def get_results(self, *, implicit_materializations: bool = True) -> Sequence[PipesExecutionResult]:
        """What the step should return: one materialization per asset the shards materialized (each as
        ``get_materialize_result(asset_key=...)`` builds it, without its checks), then one
        ``AssetCheckResult`` per check any shard reported (``aggregate_checks``).

        ``implicit_materializations`` as in ``PipesClientCompletedInvocation.get_results``: with it, every
        asset the step materializes gets a materialization even if no shard reported one.
        """
        keys = dict.fromkeys(
            result.asset_key
            for outcome in self.outcomes
            for result in outcome.results(implicit_materializations=implicit_materializations)
            if isinstance(result, MaterializeResult)
        )
        return (*(self._materialization(asset_key=key) for key in keys), *aggregate_checks(self.outcomes))

    def get_materialize_result(self, **kwargs: Any) -> MaterializeResult:
        """One materialization for the step: shard count, wall time, the shards' duration percentiles and
        retries, a per-shard table (duration, attempts, outcome), and each shard's metadata; ``kwargs`` go
        to ``MaterializeResult`` (``metadata`` is added to these).

        Like Dagster's ``get_materialize_result``, it carries the aggregated checks of its asset (all checks
        when no ``asset_key`` is given) that the step declares (``check_specs``). A check the step does not
        declare cannot be recorded (Dagster would fail the step on it), so it is left out with a warning
        that names it and says whether it failed: nothing is dropped silently.
        """
        result = self._materialization(**kwargs)
        checks = [c for c in aggregate_checks(self.outcomes) if result.asset_key in (None, c.asset_key)]
        declared = _step_check_keys()
        kept = [c for c in checks if declared is None or _check_key(c) in declared]
        dropped = [c for c in checks if declared is not None and _check_key(c) not in declared]
        if dropped:
            (self.log or get_dagster_logger()).warning(
                f"[pipes] fan-out: get_materialize_result() leaves out check results the shards reported, because "
                f"the step does not declare them: {'; '.join(_check_summary(c) for c in dropped)}. To record them, "
                "declare them on the asset (check_specs=[AssetCheckSpec(...)]) and return get_results()."
            )
        if not kept:
            return result
        return result._replace(check_results=[*(result.check_results or []), *kept])

    def get_asset_check_result(self) -> AssetCheckResult:
        """The one aggregated check of an ``@asset_check`` step whose shards report one check and no
        materialization; otherwise raises, as Dagster's does (use ``get_results()``)."""
        checks = aggregate_checks(self.outcomes)
        materialized = {r.asset_key for o in self.outcomes for r in o.results() if isinstance(r, MaterializeResult)}
        if len(checks) == 1 and not materialized:
            return checks[0]
        raise DagsterPipesError(
            f"Did not find a singular asset check across the {len(self.outcomes)} shards: got "
            f"{len(checks)} check(s) {sorted(_check_name(c) for c in checks)} and materializations of "
            f"{sorted(k.to_user_string() for k in materialized)}. Correct the reported results or use "
            "get_results() instead."
        )

    def get_custom_messages(self) -> Sequence[Sequence[Any]]:
        """Every shard's custom messages (``report_custom_message``), one list per shard in payload order:
        ``get_custom_messages()[i]`` is what shard ``i``'s session sent, in the order it sent them (of a
        retried shard, its successful attempt's)."""
        return [o.session.custom_messages if o.session else () for o in self.outcomes]

    def _materialization(self, **kwargs: Any) -> MaterializeResult:
        metadata = {
            "pipes_shard_count": len(self.outcomes),
            "pipes_fanout_seconds": round(self.seconds, 3),
            **shard_statistics(self.outcomes),
            "pipes_shard_table": MetadataValue.md(shard_table(self.outcomes)),
            "pipes_shards": MetadataValue.json([o.summary() for o in self.outcomes]),
            **kwargs.pop("metadata", {}),
        }
        return MaterializeResult(metadata=metadata, **kwargs)


def aggregate_checks(outcomes: Sequence[ShardOutcome]) -> list[AssetCheckResult]:
    """One result per (asset key, check name) any shard reported, in the order first reported.

    It passes only if every shard that reported it passed (a shard that reported it more than once counts
    as failed if any of its reports failed). A shard that did not report it counts as not evaluated: it
    neither passes nor fails the check, and the metadata counts and lists such shards. A check no shard
    reported gets no result (Dagster fails a step that declares it and returns none, so it cannot pass
    silently).
    """
    reports: dict[AssetCheckKey, dict[int, AssetCheckResult]] = {}
    for outcome in outcomes:
        for result in outcome.results():
            if isinstance(result, AssetCheckResult):
                by_shard = reports.setdefault(_check_key(result), {})
                earlier = by_shard.get(outcome.shard)
                if earlier is None or earlier.passed:  # a failed report sticks
                    by_shard[outcome.shard] = result
    shards = [o.shard for o in outcomes]
    return [_aggregated_check(key, by_shard, shards) for key, by_shard in reports.items()]


def _aggregated_check(key: AssetCheckKey, reports: Mapping[int, AssetCheckResult], shards: Sequence[int]) -> AssetCheckResult:
    """The check as the step reports it: counts, the failed (and the silent) shards' indexes up to
    ``LISTED_SHARDS``, and the first failed shard's own metadata (its session id among them)."""
    failed = sorted(shard for shard, report in reports.items() if not report.passed)
    silent = [shard for shard in shards if shard not in reports]
    judged = [reports[shard] for shard in failed] or list(reports.values())
    metadata: dict[str, Any] = {
        "pipes_shards_reported": len(reports),
        "pipes_shards_passed": len(reports) - len(failed),
        "pipes_shards_failed": len(failed),
        "pipes_shards_not_reported": len(silent),
    }
    description = f"{len(reports) - len(failed)} of {len(reports)} shards that reported it passed"
    if failed:
        metadata["pipes_failed_shards"] = MetadataValue.json(failed[:LISTED_SHARDS])
        first = reports[failed[0]]
        metadata["pipes_first_failed_shard"] = MetadataValue.json(
            {"shard": failed[0], "metadata": {k: _plain(v) for k, v in (first.metadata or {}).items()}}
        )
        description += f"; failed: shards {_listing(failed)}"
    if silent:
        metadata["pipes_not_reported_shards"] = MetadataValue.json(silent[:LISTED_SHARDS])
        description += f"; not evaluated (no report): shards {_listing(silent)}"
    return AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=not failed,
        severity=max((r.severity for r in judged), key=SEVERITY_RANK.__getitem__),
        metadata=metadata,
        description=description,
    )


def _listing(shards: Sequence[int], most: int = 10) -> str:
    return ", ".join(map(str, shards[:most])) + (f" and {len(shards) - most} more" if len(shards) > most else "")


def _check_key(result: AssetCheckResult) -> AssetCheckKey:
    assert result.asset_key is not None and result.check_name is not None  # Pipes resolves both
    return AssetCheckKey(result.asset_key, result.check_name)


def _check_name(result: AssetCheckResult) -> str:
    return f"{_check_key(result).name} on {_check_key(result).asset_key.to_user_string()}"


def _check_summary(result: AssetCheckResult) -> str:
    return f"{_check_name(result)} ({'passed' if result.passed else 'FAILED'}: {result.description})"


def _step_check_keys() -> AbstractSet[AssetCheckKey] | None:
    """The checks the running step declares and evaluates; ``None`` outside a step."""
    try:
        return AssetExecutionContext.get().selected_asset_check_keys
    except DagsterInvariantViolationError:
        return None


def run_fan_out(
    run_shard: RunShard,
    payloads: Sequence[Mapping[str, Any]],
    *,
    max_concurrency: int,
    shard_retries: int,
    log: Any,
    interrupted: threading.Event,
) -> FanOutResult:
    """Run ``run_shard(i, payload)`` for every payload on at most ``max_concurrency`` threads.

    If the step is interrupted while waiting, ``interrupted`` is set so running shards cancel their
    sessions, shards not yet started never start, and the interruption is re-raised once they are done.
    """
    started = time.monotonic()
    progress = FanOutProgress(len(payloads), log)

    def attempt_all(shard: int, payload: Mapping[str, Any]) -> ShardOutcome:
        progress.shard_started()
        shard_started = time.monotonic()
        for attempt in range(1, shard_retries + 2):
            if interrupted.is_set():
                return ShardOutcome(shard, payload, attempt - 1, time.monotonic() - shard_started,
                                    error=RunInterrupted(f"shard {shard}: the step was interrupted before it started"))
            try:
                session = ShardResults.of(run_shard(shard, payload))
                return ShardOutcome(shard, payload, attempt, time.monotonic() - shard_started, session=session)
            except Exception as exc:  # noqa: BLE001 - every shard error is reported after all shards end
                error: BaseException = exc
                if isinstance(exc, NOT_RETRIED) or attempt > shard_retries:
                    break
                log.warning(f"[shard {shard}] attempt {attempt} failed ({type(exc).__name__}); retrying as a new session")
        return ShardOutcome(shard, payload, attempt, time.monotonic() - shard_started, error=error)

    # each of ``max_concurrency`` runners takes the next payload when its shard ends: nothing waits in the
    # pool whatever the number of payloads, and each end is queued as it happens (O(1) a shard, where waiting
    # on the set of pending futures costs O(pending) each time one ends)
    waiting = iter(enumerate(payloads))
    taking = threading.Lock()
    ended: queue.SimpleQueue[ShardOutcome] = queue.SimpleQueue()

    def runner() -> None:
        while not interrupted.is_set():
            with taking:
                item = next(waiting, None)
            if item is None:
                return
            try:
                ended.put(attempt_all(*item))
            except BaseException as exc:  # noqa: BLE001 - the step waits for an outcome of every shard
                ended.put(ShardOutcome(item[0], item[1], 0, 0.0, error=exc))

    outcomes: list[ShardOutcome] = []
    with ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="pipes-shard") as pool:
        for _ in range(min(max_concurrency, len(payloads))):
            pool.submit(runner)
        try:
            while len(outcomes) < len(payloads):
                try:
                    outcome = ended.get(timeout=0.5)
                except queue.Empty:
                    progress.maybe_log()
                    continue
                outcomes.append(outcome)
                progress.shard_ended(outcome)
                progress.maybe_log()
        except (KeyboardInterrupt, DagsterExecutionInterruptedError):
            interrupted.set()
            raise
    progress.maybe_log(final=True)
    outcomes.sort(key=lambda o: o.shard)
    if any(not o.ok for o in outcomes):
        raise FanOutError(outcomes)
    return FanOutResult(outcomes, time.monotonic() - started, log)
