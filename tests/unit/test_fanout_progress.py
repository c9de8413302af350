"""Fan-out progress: a line per shard for small fan-outs, a bounded rate of summary lines for large ones,
failures always named (up to a cap), and the per-shard statistics of the final materialization."""

from __future__ import annotations

from dataclasses import dataclass

from dagster_gcf_pipes.orchestrator.modes.fanout_progress import FanOutProgress, shard_statistics, shard_table


@dataclass
class Outcome:
    shard: int
    attempts: int = 1
    seconds: float = 1.0
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, line: str) -> None:
        self.lines.append(line)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(total: int, failing: set[int], seconds_per_shard: float, **kwargs) -> list[str]:
    log, clock = Log(), Clock()
    progress = FanOutProgress(total, log, clock=clock, **kwargs)
    for shard in range(total):
        progress.shard_started()
        clock.now += seconds_per_shard
        progress.shard_ended(Outcome(shard, error=RuntimeError("boom") if shard in failing else None))
    progress.maybe_log(final=True)
    return log.lines


def test_a_small_fan_out_logs_each_shard_and_a_last_summary():
    lines = run(5, failing={3}, seconds_per_shard=1.0)
    assert len(lines) == 6
    assert "[shard 3] failed: RuntimeError" in lines[3]
    assert lines[-1].startswith("[fan-out] 5/5 done (1 failed), 0 running, 0 waiting") and "all ended" in lines[-1]


def test_a_large_fan_out_logs_at_a_bounded_rate_and_names_the_first_failures():
    lines = run(1000, failing=set(range(0, 1000, 50)), seconds_per_shard=0.1, interval=10.0, named_failures=10)
    summaries = [line for line in lines if line.startswith("[fan-out]")]
    named = [line for line in lines if line.startswith("[shard")]
    # 100 s of shards at one line per 10 s, and the last one
    assert 9 <= len(summaries) <= 11, summaries
    assert len(named) == 10 and all("failed" in line for line in named)
    assert "1000/1000 done (20 failed)" in summaries[-1]
    assert "ETA" in summaries[0] and "shards/s" in summaries[0]


def test_statistics_and_table_of_the_shards():
    outcomes = [Outcome(i, attempts=1 + (i == 7), seconds=float(i)) for i in range(100)]
    stats = shard_statistics(outcomes)
    assert stats["pipes_shard_seconds_max"] == 99.0
    assert stats["pipes_shard_seconds_p95"] == 95.0
    assert stats["pipes_shard_retries"] == 1
    table = shard_table(outcomes)
    assert table.count("\n") == 101 and "| 7 | 7.000 | 2 | ok |" in table
