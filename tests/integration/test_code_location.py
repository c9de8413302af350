"""The example code location loads the way `dagster dev` and a deployment load it."""

import os
import subprocess
import sys
from pathlib import Path

from tests import REPO_ROOT


def test_dagster_definitions_validate_passes_on_the_example_code_location(tmp_path: Path) -> None:
    dagster = Path(sys.executable).with_name("dagster")
    run = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "examples.sales.definitions"],
        cwd=REPO_ROOT, env={**os.environ, "DAGSTER_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "All code locations passed validation." in run.stdout + run.stderr
