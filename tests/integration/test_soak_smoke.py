"""The chaos soak's quick variant runs end to end on its own local stack (``python -m bench.soak --quick``: 30
sessions at 10 concurrent, a few of them fan-outs, while every kind of fault fires). It asserts the counts,
never the times: nothing hung, lost, duplicated, run twice or leaked, and every failure is a clear error."""

import json
import subprocess
import sys
from pathlib import Path

from bench.soak import DUPLICATES, KILL, LATE, PAUSE, REDELIVERY
from tests import REPO_ROOT


def test_quick_soak_loses_duplicates_hangs_and_leaks_nothing(tmp_path: Path) -> None:
    results = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--quick", "--results", str(results)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = json.loads(results.read_text())["counts"]
    report = run.stdout[run.stdout.find("chaos soak:"):]

    assert counts["hung"] == 0, report
    assert counts["failed_unclear"] == 0, report
    assert counts["succeeded"] + counts["failed_clear"] == counts["sessions"] == 30, report
    assert counts["failed_without_fault"] == 0, report
    assert counts["lost"] == counts["duplicated"] == counts["reordered"] == 0, report
    assert counts["handler_ran_twice"] == 0, report
    assert counts["leaked_subscriptions"] == counts["leaked_objects"] == 0, report
    assert counts["injector_errors"] == [], report
    assert counts["fan_outs"] > 0, report
    assert all(counts["faults_fired"].get(kind, 0) > 0 for kind in (REDELIVERY, LATE, DUPLICATES, KILL, PAUSE)), report
