"""Where the orchestrator's CPU goes in a fan-out: py-spy samples this process while one step runs, and each
sample is put down to a component.

    python -m bench.fanout --shards 1000 --profile bench/results/fan_out_profile.txt

py-spy (``--gil``: only the thread holding the GIL, so each sample is Python CPU, not a thread waiting) writes
the raw stacks; ``breakdown`` reads them. A sample belongs to the first component, from the innermost frame
outwards, whose code it is in: the libraries' work is counted where it is done (an HTTP request to GCS is GCS,
whoever asked), and what is left is put down to the module of ours that ran it.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: (component, substrings of a frame's file that make it that component's), tried in this order on each frame
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("Dagster's event writes", ("dagster/_core/events", "dagster/_core/instance", "dagster/_core/storage",
                                "dagster/_core/log_manager", "dagster/_loggers", "sqlalchemy", "dagster_shared/serdes")),
    ("Dagster's Pipes handler and context", ("dagster/_core/pipes", "dagster_pipes")),
    ("GCS (HTTP)", ("google/cloud/storage", "requests/", "urllib3/", "http/client", "google/auth/", "google/resumable_media")),
    ("publish (trigger)", ("pubsub_v1/publisher",)),
    ("reply stream (subscriber library)", ("pubsub_v1/subscriber",)),
    ("gRPC and API core", ("grpc/", "google/api_core", "proto/", "google/protobuf")),
    ("JSON", ("json/",)),
    ("logging", ("logging/",)),
    ("threads, futures, locks", ("threading.py", "concurrent/futures", "queue.py")),
    ("Dagster (other)", ("dagster/", "dagster_shared/", "pydantic")),
]
_OURS = re.compile(r"\((orchestrator|shared)/([^:]+)")


def component_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, markers in COMPONENTS:
            if any(marker in frame for marker in markers):
                return name
        ours = _OURS.search(frame)
        if ours:
            return f"ours: {ours.group(1)}/{ours.group(2)}"
    return "interpreter and C extensions (no Python frame)"


def breakdown(raw: Path) -> dict[str, float]:
    """Share of the samples (0-1) per component, largest first."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[component_of(stack)] += int(count)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in counts.most_common()}


@contextmanager
def sampled(output: Path, rate: int = 100) -> Iterator[None]:
    """py-spy samples this process (the GIL holder, ``rate`` times a second) while the block runs."""
    output.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()), "--gil", "--nonblocking",
         "--rate", str(rate), "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        _, errors = spy.communicate(timeout=60)
        if not output.exists():
            raise RuntimeError(f"py-spy wrote no profile ({errors.strip()[-500:]}); it needs ptrace rights on this process")


def table(shares: dict[str, float], cpu_ms_per_shard: float) -> str:
    lines = ["| component | share of the step's CPU | ms a shard |", "|---|---:|---:|"]
    lines += [f"| {name} | {share:.1%} | {share * cpu_ms_per_shard:.2f} |" for name, share in shares.items()]
    return "\n".join(lines)
