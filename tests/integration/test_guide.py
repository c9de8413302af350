"""docs/guide.md, executed: every fenced block carries a directive in the HTML comment on the line before it,

* ``<!-- file: PATH -->``: the block is written to PATH in a fresh project folder;
* ``<!-- run -->``: the shell command runs there and must succeed;
* ``<!-- run-until: TEXT -->``: the long-running command runs until it prints TEXT, then gets SIGTERM and
  must exit cleanly;
* ``<!-- start: TEXT -->``: the long-running command starts, as in a terminal of its own, and keeps running
  once it printed TEXT, until the end of the guide (then SIGTERM, and it must exit cleanly); the ``export``
  lines it printed are set for the blocks after it, as the reader exports them;
* ``<!-- shown: REASON -->``: not run, for the reason given (an install line, a command that needs GCP).

A block without a directive fails the test, so none can go stale unnoticed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests import REPO_ROOT
from tests.integration.processes import Output

GUIDE = REPO_ROOT / "docs" / "guide.md"
BLOCK = re.compile(r"(?:<!-- (?P<directive>[a-z-]+)(?::\s*(?P<argument>.*?))? -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```",
                   re.DOTALL)


@dataclass(frozen=True)
class Block:
    directive: str | None
    argument: str
    body: str
    line: int


def guide_blocks() -> list[Block]:
    text = GUIDE.read_text()
    return [Block(m["directive"], (m["argument"] or "").strip(), m["body"], text.count("\n", 0, m.start()) + 1)
            for m in BLOCK.finditer(text)]


def test_every_block_of_the_guide_says_how_it_is_checked():
    unmarked = [f"docs/guide.md:{b.line}" for b in guide_blocks()
                if b.directive not in ("file", "run", "run-until", "start", "shown") or not b.argument and b.directive != "run"]
    assert not unmarked, f"blocks without a directive (see this module's docstring): {unmarked}"


@dataclass(frozen=True)
class Started:
    """A long-running command of the guide, in its own process group (its terminal)."""

    command: str
    process: subprocess.Popen
    output: Output

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C in its terminal; it must exit within 60 s."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"{self.command!r} did not stop within 60 s of SIGTERM:\n{self.output.tail()}") from None


def start(command: str, text: str, cwd: Path, env: dict[str, str]) -> Started:
    """``command`` started, once it printed ``text``."""
    process = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = Started(command, process, Output(process))
    try:
        started.output.wait_for(text, timeout=180)
    except BaseException:
        started.stop()
        raise
    return started


#: the guide runs as three tests, each on the files the sections before it wrote (one test took about 70 s, over
#: the suite's minute a test on a loaded machine): sections 1-4 in Python from a blank folder, then the
#: Node.js function with section 5's tests (which run it too), then section 6
PARTS = ["### A Node.js function", "## 6. Build and deploy"]


def part_lines() -> list[int]:
    """The guide's line where each of ``PARTS`` starts."""
    text = GUIDE.read_text()
    missing = [heading for heading in PARTS if heading not in text]
    assert not missing, f"docs/guide.md has no heading {missing}: update test_guide.PARTS"
    return [text[: text.index(heading)].count("\n") + 1 for heading in PARTS]


def blocks_of_part(part: int) -> list[Block]:
    """The file blocks of the parts before ``part`` (written, not run), then every block of ``part``."""
    bounds = [0, *part_lines(), float("inf")]
    start_line, end_line = bounds[part], bounds[part + 1]
    blocks = guide_blocks()
    return [b for b in blocks if b.line < start_line and b.directive == "file"] + \
        [b for b in blocks if start_line <= b.line < end_line]


def run_blocks(blocks: list[Block], project: Path) -> int:
    """Write or run each block in ``project``, as the reader does; returns how many commands ran."""
    # the venv running the tests has the library installed: its scripts come first on PATH, as in the
    # reader's activated venv; the Node.js section installs the function side from this checkout's node/
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DAGSTER_GCF_PIPES_CHECKOUT": str(REPO_ROOT)}
    ran, running = 0, []
    try:
        for block in blocks:
            if block.directive == "file":
                path = project / block.argument
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.body)
            elif block.directive == "run":
                result = subprocess.run(block.body, shell=True, cwd=project, env=env, capture_output=True, text=True,
                                        timeout=300)
                assert result.returncode == 0, f"docs/guide.md:{block.line}: {block.body}\n{result.stdout}{result.stderr}"
                ran += 1
            elif block.directive == "run-until":
                start(block.body, block.argument, project, env).stop()
                ran += 1
            elif block.directive == "start":
                running.append(started := start(block.body, block.argument, project, env))
                env.update(line.removeprefix("export ").split("=", 1) for line in started.output.lines
                           if line.startswith("export "))
                ran += 1
    finally:
        for started in reversed(running):
            started.stop()
    return ran


def test_the_guide_runs_from_a_blank_folder(tmp_path: Path):
    """Sections 1-4 with the Python function: install, the function, the assets, running them locally."""
    project = tmp_path / "my-project"
    project.mkdir()
    assert run_blocks(blocks_of_part(0), project) >= 4


def test_the_guides_node_function_and_tests_run_on_what_the_sections_before_it_wrote(tmp_path: Path):
    """The Node.js function (its install, build and test) and section 5's tests."""
    project = tmp_path / "my-project"
    project.mkdir()
    assert run_blocks(blocks_of_part(1), project) >= 3
    node_built = project / "build" / "my_node_function"
    assert {"index.js", "package.json", "package-lock.json", "vendor"} == {p.name for p in node_built.iterdir()}
    assert json.loads((node_built / "package.json").read_text())["dependencies"]["@dagster-gcf-pipes/function"] \
        == "file:vendor/dagster-gcf-pipes-function"
    assert (node_built / "vendor" / "dagster-gcf-pipes-function" / "dist" / "index.js").is_file()


def test_the_guides_build_and_deploy_section_runs_on_what_the_sections_before_it_wrote(tmp_path: Path):
    """Section 6: the build, its clean venv, the built folder served to Dagster."""
    project = tmp_path / "my-project"
    project.mkdir()
    assert run_blocks(blocks_of_part(2), project) >= 4
    built = project / "build" / "my_function"
    assert {"main.py", "tables.py", "sizes.json", "requirements.txt"} <= {p.name for p in built.iterdir()}
    assert (built / "dagster_gcf_pipes" / "function" / "entrypoint.py").is_file()
