"""The benchmark's quick variant runs end to end (a smoke test: it asserts that every message arrived and
the table printed, never how fast anything was)."""

import re
import subprocess
import sys

from tests import REPO_ROOT


def test_quick_bench_prints_its_table_and_loses_nothing() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    paths = ("ours (Pub/Sub)", "earlier design (HTTP + GCS chunks, 10 s)", "earlier design (HTTP + GCS chunks, 1 s)", "floor (subprocess)")
    for path in paths:
        received, sent = re.search(r"\((\d+)/(\d+)\)", rows[path]).groups()
        assert received == sent, rows[path]
    assert "raw emulator round trip" in rows
    assert "ours first log / raw round trip" in rows
