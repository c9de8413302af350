"""The benchmark's quick variant runs end to end (a smoke test: it asserts that every message arrived, the
table printed and the production-semantics layer's meter was read, never how fast anything was)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT


@pytest.mark.long  # two minutes: make bench runs it in full; the default run has the fan-out bench below
def test_quick_bench_prints_its_table_and_loses_nothing(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results", str(results)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=420,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    paths = ("ours (Pub/Sub)", "ours, 100 ms per hop", "ours, bare emulator", "earlier design (HTTP + GCS chunks, 10 s)", "earlier design (HTTP + GCS chunks, 1 s)", "floor (subprocess)")
    for path in paths:
        received, sent = re.search(r"\((\d+)/(\d+)\)", rows[path]).groups()
        assert received == sent, rows[path]
    assert "raw emulator round trip" in rows
    assert "ours first log / raw round trip" in rows

    # the meter, read around each measured run through the layer: a session's admin operations and its reply
    # subscription's deliveries are counted; the bare emulator has no meter
    meter = json.loads(results.read_text())["meter"]
    for path in ("ours (Pub/Sub)", "ours, 100 ms per hop"):
        per_session = meter[path]["trivial"]
        assert per_session["admin_ops"].get("CreateSubscription", 0) >= 1, per_session
        assert per_session["replies"]["messages_delivered"] >= 1, per_session
        assert per_session["reply_topic"]["messages_published"] >= 1, per_session
    assert meter["ours, bare emulator"]["trivial"] is None
    assert "ours (Pub/Sub), trivial" in rows and "1 shards" in rows
    assert "subscription per fan-out group of 100" in run.stdout  # the cost model, from this run's results


def test_the_fan_out_bench_profiles_its_largest_step(tmp_path: Path) -> None:
    """``bench.fanout --profile``: the table of the fan-out runs, py-spy's samples of the largest step and the
    table of where its CPU went, every share a component's (issue 26)."""
    profile = tmp_path / "profile.txt"
    run = subprocess.run(
        [sys.executable, "-m", "bench.fanout", "--shards", "1", "4", "--concurrency", "4", "--profile", str(profile)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| ")]
    assert [row[1].strip() for row in rows[1:3]] == ["1", "4"], run.stdout
    assert profile.read_text().strip(), "py-spy wrote no samples"
    shares = {row[1].strip(): float(row[2].strip().rstrip("%")) for row in rows if row[2].strip().endswith("%")}
    assert 99.0 <= sum(shares.values()) <= 101.0 and shares, run.stdout
    # where the rest of the 2 cores went: each of the local stack's processes, per step
    stack_table = run.stdout.split("by process", 1)[1]
    assert "| fake-gcs-server |" in stack_table and "| pubsub-emulator |" in stack_table, run.stdout
