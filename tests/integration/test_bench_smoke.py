"""The benchmark's quick variant runs end to end (a smoke test: it asserts that every message arrived, the
table printed and the production-semantics layer's meter was read, never how fast anything was)."""

import json
import re
import subprocess
import sys

from pathlib import Path

from tests import REPO_ROOT


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
