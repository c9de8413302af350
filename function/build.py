"""Assemble a folder that ``gcloud functions deploy --source OUT_DIR`` can deploy as it is.

    python -m function.build OUT_DIR [--main PATH]

OUT_DIR/main.py        the entry-point module (``--main``, default function/main.py, the example)
OUT_DIR/function/      this package (without build.py), OUT_DIR/shared/ the wire protocol
OUT_DIR/requirements.txt   from function/requirements.txt (dagster-pipes, never dagster)

The built tree is scanned for imports of ``dagster`` or ``orchestrator``: the deployed function has neither.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
FORBIDDEN = ("dagster", "orchestrator")  # top-level names; dagster_pipes is a different name and fine


def forbidden_imports(path: Path) -> list[str]:
    """``file:line: import X`` for every import of a forbidden top-level module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path}:{node.lineno}: imports {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def build(out: Path, main: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"build: {out} exists and is not an empty folder; remove it or choose another OUT_DIR")
    if not main.is_file():
        raise SystemExit(f"build: --main {main} is not a file")
    out.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "build.py", "requirements.txt")
    shutil.copy2(main, out / "main.py")
    shutil.copytree(PACKAGE, out / "function", ignore=skip)
    shutil.copytree(REPO / "shared", out / "shared", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(PACKAGE / "requirements.txt", out / "requirements.txt")

    problems = [problem for path in sorted(out.rglob("*.py")) for problem in forbidden_imports(path)]
    if problems:
        for child in out.iterdir():  # leave OUT_DIR empty, so the next build may use it
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise SystemExit(
            "build: the function must not import dagster or orchestrator (it is deployed with dagster-pipes "
            "only):\n  " + "\n  ".join(problems)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m function.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--main", type=Path, default=PACKAGE / "main.py",
                        help="module with the @pipes_function entry point, copied to OUT_DIR/main.py "
                             "(default: the example, function/main.py)")
    args = parser.parse_args(argv)
    build(args.out_dir, args.main)
    print(f"built {args.out_dir} from {args.main}; deploy it with:\n")
    print(
        f"  gcloud functions deploy FUNCTION_NAME --gen2 --runtime python311 --region $REGION \\\n"
        f"    --source {args.out_dir} --entry-point main --trigger-topic pipes-trigger \\\n"
        f"    --service-account $FUNCTION_SA --timeout 540s --retry\n\n"
        "(--entry-point is the name of the @pipes_function in main.py; see docs/deploy.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
