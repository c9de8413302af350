"""What each side installs: the library built as a wheel from this checkout, installed with one extra into a
fresh venv, its site-packages size and the import time of the side's public module.

    python -m bench.footprint [--repeat 5]

The same helpers build the user-project integration test's venvs (tests/integration/test_user_project.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: side -> (the extra it installs, the module a user imports)
SIDES = {
    "function": ("function", "dagster_gcf_pipes.function"),
    "orchestrator": ("orchestrator", "dagster_gcf_pipes.orchestrator"),
}
PIP = ("-m", "pip", "--disable-pip-version-check", "-q")


def library_wheel(out_dir: Path) -> Path:
    """Build the library's wheel from a copy of this checkout (tracked and untracked, not ignored, files), so
    the build leaves nothing in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    source = out_dir / "source"
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, *PIP, "wheel", "--no-deps", "-w", str(out_dir / "dist"), str(source)],
                   check=True, capture_output=True)
    return next((out_dir / "dist").glob("dagster_gcf_pipes-*.whl"))


def fresh_venv(path: Path, *requirements: str, compile_bytecode: bool = True, with_uv: bool = False) -> Path:
    """A new venv at ``path`` with ``requirements`` installed by pip (what a user runs, and what the footprint
    measures); returns its python. ``compile_bytecode=False``: pip does not byte-compile every module it
    installs (a test's venv imports few of them: 6 s of CPU less for Dagster's). ``with_uv``: installed by the
    dev venv's uv instead (the same packages, resolved from the same metadata, in a few seconds instead of
    20-30), for a test about what gets installed, not how."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    if with_uv:
        uv = Path(sys.executable).parent / "uv"
        if not uv.exists():
            raise FileNotFoundError(f"{uv} is missing: `make install` installs uv into the dev venv")
        compiling = ("--compile-bytecode",) if compile_bytecode else ()
        command = [str(uv), "pip", "install", "-q", "--python", str(python), *compiling, *requirements]
    else:
        compiling = () if compile_bytecode else ("--no-compile",)
        command = [str(python), *PIP, "install", *compiling, *requirements]
    subprocess.run(command, check=True, capture_output=True)
    return python


def site_packages_bytes(python: Path) -> int:
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return sum(f.stat().st_size for f in Path(purelib).rglob("*") if f.is_file() and not f.is_symlink())


def import_seconds(python: Path, module: str, repeat: int) -> float:
    """Median wall time of a fresh interpreter importing ``module``, less the bare interpreter's start."""
    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([str(python), "-c", code], check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return time.perf_counter() - started

    run(f"import {module}")  # the first run compiles bytecode; measure warm, as a function instance would
    bare = statistics.median(run("pass") for _ in range(repeat))
    return statistics.median(run(f"import {module}") for _ in range(repeat)) - bare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gcf-pipes-footprint-") as tmp:
        wheel = library_wheel(Path(tmp))
        print(f"| side | pip install | site-packages | import of the public module (median of {args.repeat}) |")
        print("|---|---|---|---|")
        for side, (extra, module) in SIDES.items():
            python = fresh_venv(Path(tmp) / side, f"{wheel}[{extra}]")
            size = site_packages_bytes(python) / 1e6
            seconds = import_seconds(python, module, args.repeat)
            print(f"| {side} | `dagster-gcf-pipes[{extra}]` | {size:.0f} MB | {seconds:.2f} s |", flush=True)
    print(f"(python {sysconfig.get_python_version()}, {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
