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
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from dagster import DagsterExecutionInterruptedError, MaterializeResult, MetadataValue, PipesClientCompletedInvocation

from dagster_gcf_pipes.orchestrator.errors import PipesPubSubConfigError, PipesPubSubError, RunInterrupted
from dagster_gcf_pipes.orchestrator.fanout_progress import FanOutProgress, shard_statistics, shard_table

RunShard = Callable[[int, Mapping[str, Any]], PipesClientCompletedInvocation]

#: Errors a new session cannot fix: retrying them only repeats the failure.
NOT_RETRIED = (PipesPubSubConfigError, RunInterrupted)


@dataclass(frozen=True)
class ShardOutcome:
    shard: int
    payload: Mapping[str, Any]
    attempts: int
    seconds: float
    invocation: PipesClientCompletedInvocation | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def metadata(self) -> dict[str, Any]:
        """The session metadata and the function's reported materialization metadata, as plain values."""
        if self.invocation is None:
            return {}
        values: dict[str, Any] = dict(self.invocation.metadata)
        for result in self.invocation.get_results():
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
    outcomes: Sequence[ShardOutcome]
    seconds: float

    def get_materialize_result(self, **kwargs: Any) -> MaterializeResult:
        """One materialization for the step: shard count, wall time, the shards' duration percentiles and
        retries, a per-shard table (duration, attempts, outcome), and each shard's metadata."""
        metadata = {
            "pipes_shard_count": len(self.outcomes),
            "pipes_fanout_seconds": round(self.seconds, 3),
            **shard_statistics(self.outcomes),
            "pipes_shard_table": MetadataValue.md(shard_table(self.outcomes)),
            "pipes_shards": MetadataValue.json([o.summary() for o in self.outcomes]),
            **kwargs.pop("metadata", {}),
        }
        return MaterializeResult(metadata=metadata, **kwargs)


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
                invocation = run_shard(shard, payload)
                return ShardOutcome(shard, payload, attempt, time.monotonic() - shard_started, invocation=invocation)
            except Exception as exc:  # noqa: BLE001 - every shard error is reported after all shards end
                error: BaseException = exc
                if isinstance(exc, NOT_RETRIED) or attempt > shard_retries:
                    break
                log.warning(f"[shard {shard}] attempt {attempt} failed ({type(exc).__name__}); retrying as a new session")
        return ShardOutcome(shard, payload, attempt, time.monotonic() - shard_started, error=error)

    with ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="pipes-shard") as pool:
        futures: list[Future[ShardOutcome]] = [pool.submit(attempt_all, i, p) for i, p in enumerate(payloads)]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    progress.shard_ended(future.result())
                progress.maybe_log()
        except (KeyboardInterrupt, DagsterExecutionInterruptedError):
            interrupted.set()
            raise
    progress.maybe_log(final=True)
    outcomes = [f.result() for f in futures]
    if any(not o.ok for o in outcomes):
        raise FanOutError(outcomes)
    return FanOutResult(outcomes, time.monotonic() - started)
