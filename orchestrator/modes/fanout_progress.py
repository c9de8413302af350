"""What a running fan-out tells the step: progress at a bounded rate, and a per-shard summary at the end.

A fan-out of hundreds of shards must not write one log line per shard event, yet an operator watching the
run wants to know how far it is and when it will end. ``FanOutProgress`` counts shards as they start and end
and logs one line (done, failed, running, waiting, throughput, ETA) at most every ``interval`` seconds, and a
last one when all have ended. Small fan-outs (``per_shard_lines`` or fewer shards) keep a line per shard;
failures are always named, the first ``named_failures`` of them one line each.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class _Outcome(Protocol):
    shard: int
    attempts: int
    seconds: float

    @property
    def ok(self) -> bool: ...

    @property
    def error(self) -> BaseException | None: ...


class FanOutProgress:
    def __init__(self, total: int, log: Any, *, interval: float = 10.0, per_shard_lines: int = 20,
                 named_failures: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.log, self.interval = total, log, interval
        self.per_shard = total <= per_shard_lines
        self.named_failures = named_failures
        self._clock = clock
        self._lock = threading.Lock()
        self._started_at = clock()
        self._last_line = self._started_at
        self.running = self.done = self.failed = 0

    def shard_started(self) -> None:
        with self._lock:
            self.running += 1

    def shard_ended(self, outcome: _Outcome) -> None:
        with self._lock:
            self.running -= 1
            self.done += 1
            self.failed += 0 if outcome.ok else 1
            name_it = self.per_shard or (not outcome.ok and self.failed <= self.named_failures)
        if name_it:
            status = "succeeded" if outcome.ok else f"failed: {type(outcome.error).__name__}"
            self.log.info(f"[shard {outcome.shard}] {status} after {outcome.seconds:.1f}s "
                          f"({self.done}/{self.total} done)")
        self.maybe_log()

    def maybe_log(self, *, final: bool = False) -> None:
        """Log the progress line if ``interval`` has passed since the last one (always when ``final``)."""
        if self.per_shard and not final:
            return
        with self._lock:
            now = self._clock()
            if not final and now - self._last_line < self.interval:
                return
            self._last_line = now
            line = self.line(now)
        self.log.info(line)

    def line(self, now: float) -> str:
        elapsed = max(now - self._started_at, 1e-9)
        rate = self.done / elapsed
        waiting = self.total - self.done - self.running
        eta = f"ETA {(self.total - self.done) / rate:.0f}s" if rate > 0 and self.done < self.total else (
            "all ended" if self.done == self.total else "ETA unknown")
        return (f"[fan-out] {self.done}/{self.total} done ({self.failed} failed), {self.running} running, "
                f"{waiting} waiting; {rate:.2f} shards/s over {elapsed:.0f}s; {eta}")


def shard_statistics(outcomes: Sequence[_Outcome]) -> dict[str, Any]:
    """Percentiles of the shards' durations and their attempts, for the fan-out's materialization."""
    seconds = sorted(o.seconds for o in outcomes)
    if not seconds:
        return {}

    def percentile(p: float) -> float:
        return round(seconds[min(len(seconds) - 1, int(p / 100 * len(seconds)))], 3)

    return {
        "pipes_shard_seconds_p50": round(statistics.median(seconds), 3),
        "pipes_shard_seconds_p95": percentile(95),
        "pipes_shard_seconds_p99": percentile(99),
        "pipes_shard_seconds_max": round(seconds[-1], 3),
        "pipes_shard_retries": sum(o.attempts - 1 for o in outcomes),
    }


def shard_table(outcomes: Sequence[_Outcome]) -> str:
    """A Markdown table, one row per shard: its duration, attempts and outcome."""
    rows = [f"| {o.shard} | {o.seconds:.3f} | {o.attempts} | {'ok' if o.ok else type(o.error).__name__} |"
            for o in sorted(outcomes, key=lambda o: o.shard)]
    return "\n".join(["| shard | seconds | attempts | outcome |", "|---:|---:|---:|---|", *rows])
