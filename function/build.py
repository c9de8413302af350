"""Assemble a folder that ``gcloud functions deploy --source OUT_DIR`` deploys as it is.

    gcf-pipes build SOURCE_DIR OUT_DIR [--entry-point main]
    python -m dagster_gcf_pipes.function.build SOURCE_DIR OUT_DIR [--entry-point main]

SOURCE_DIR is the user's function: ``main.py`` at its root (the module Cloud Functions' Python runtime loads)
defining the entry point, any other modules, packages and data files beside it, and optionally its own
``requirements.txt``. OUT_DIR receives:

* a copy of SOURCE_DIR (without caches, virtual environments and version-control folders);
* ``dagster_gcf_pipes/shared`` and ``dagster_gcf_pipes/function``, the function side of this library as it is
  installed here, vendored: the deployed function runs exactly the code it was tested with, and the build
  needs no package index that serves this library (Cloud Build installs requirements.txt from PyPI);
* ``requirements.txt``: the user's requirements, then the library's function-side requirements (dagster-pipes,
  the Pub/Sub and Storage clients, tenacity, functions-framework), never dagster.

It refuses what cannot run on Cloud Functions, naming the file and the fix: no ``main.py``, an entry point
that ``main.py`` does not define, an import of ``dagster`` or of the library's Dagster side or local tooling,
a requirement on dagster.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import re
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

DISTRIBUTION = "dagster-gcf-pipes"
VENDORED = ("dagster_gcf_pipes.shared", "dagster_gcf_pipes.function")
#: module prefixes a deployed function cannot import (dagster_pipes is another name, and is what it uses)
FORBIDDEN = ("dagster", "dagster_gcf_pipes.orchestrator", "dagster_gcf_pipes.local", "dagster_gcf_pipes.cli")
SKIPPED = ("__pycache__", "*.pyc", ".git", ".venv", "venv", ".pytest_cache", ".mypy_cache", ".ruff_cache")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class BuildError(SystemExit):
    """A build that cannot produce a deployable folder; its text names the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(f"build: {message}")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def forbidden_imports(path: Path, root: Path) -> list[str]:
    """``file:line: imports X`` for every import in ``path`` that a deployed function cannot have."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        return [f"{path.relative_to(root)}:{exc.lineno}: does not parse ({exc.msg})"]
    return [
        f"{path.relative_to(root)}:{line}: imports {name}"
        for line, name in _imported_modules(tree)
        if any(name == prefix or name.startswith(prefix + ".") for prefix in FORBIDDEN)
    ]


def defined_names(main: Path) -> set[str]:
    """The names ``main.py`` binds at module level: functions, classes, assignments and imports."""
    names: set[str] = set()
    for node in ast.parse(main.read_text(encoding="utf-8"), filename=str(main)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def requirement_name(line: str) -> str | None:
    """The normalized project name a requirements line names (None for comments, options and blanks)."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    match = _NAME.match(line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def library_requirements() -> list[str]:
    """The installed library's base and ``function`` extra requirements, from its package metadata."""
    lines = []
    for requirement in importlib.metadata.requires(DISTRIBUTION) or []:
        spec, _, marker = requirement.partition(";")
        if not marker.strip() or marker.strip().replace("'", '"') == 'extra == "function"':
            lines.append(spec.strip())
    return lines


def merged_requirements(user_file: Path | None) -> str:
    user_lines = user_file.read_text(encoding="utf-8").splitlines() if user_file else []
    for number, line in enumerate(user_lines, 1):
        if requirement_name(line) == "dagster":
            raise BuildError(
                f"{user_file}:{number}: requires dagster, which a deployed function must not install; "
                "require dagster-pipes instead (the library adds it)"
            )
    kept = [line for line in user_lines if requirement_name(line) != DISTRIBUTION]  # vendored instead
    ours = library_requirements()
    return "\n".join([
        *(["# the function's own requirements (from requirements.txt)", *kept] if kept else []),
        f"# {DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}: function-side requirements "
        "(the library itself is vendored in dagster_gcf_pipes/)",
        *ours,
    ]) + "\n"


def _package_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations, module
    return Path(next(iter(spec.submodule_search_locations)))


def _check_source(source: Path, entry_point: str) -> None:
    if not source.is_dir():
        raise BuildError(f"{source} is not a folder; pass the folder that holds your function's main.py")
    main = source / "main.py"
    if not main.is_file():
        raise BuildError(
            f"{main} not found: Cloud Functions' Python runtime loads main.py from the source root; "
            "name your entry module main.py (it may import your other modules)"
        )
    if entry_point not in defined_names(main):
        raise BuildError(
            f"{main} defines no {entry_point!r}: decorate your handler with @pipes_function and name it "
            f"{entry_point!r}, or pass --entry-point with the name it has"
        )
    problems = [p for path in sorted(source.rglob("*.py")) if not _skipped(path, source)
                for p in forbidden_imports(path, source)]
    if problems:
        raise BuildError(
            "a deployed function has dagster-pipes, never dagster or this library's Dagster side; move this "
            "code to your Dagster project, or use dagster_pipes / dagster_gcf_pipes.function instead:\n  "
            + "\n  ".join(problems)
        )


def _skipped(path: Path, root: Path) -> bool:
    return any(fnmatch(part, pattern) for part in path.relative_to(root).parts for pattern in SKIPPED)


def build(source: Path, out: Path, entry_point: str = "main") -> None:
    source, out = source.resolve(), out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} exists and is not an empty folder; remove it or choose another OUT_DIR")
    if out == source or source in out.parents:
        raise BuildError(f"OUT_DIR {out} is inside SOURCE_DIR {source}; build outside the function's folder")
    _check_source(source, entry_point)
    if (source / "dagster_gcf_pipes").exists():
        raise BuildError(f"{source / 'dagster_gcf_pipes'} exists; the build vendors the library there, remove it")
    user_requirements = source / "requirements.txt"
    requirements = merged_requirements(user_requirements if user_requirements.is_file() else None)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(*SKIPPED), dirs_exist_ok=True)
    for module in VENDORED:
        shutil.copytree(_package_folder(module), out / Path(*module.split(".")),
                        ignore=shutil.ignore_patterns(*SKIPPED, "build.py"))
    (out / "requirements.txt").write_text(requirements, encoding="utf-8")


def main(argv: list[str] | None = None, prog: str = "python -m dagster_gcf_pipes.function.build") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir", type=Path, help="your function's folder, with main.py at its root")
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--entry-point", default="main",
                        help="the @pipes_function in main.py that Cloud Functions calls (default: main)")
    args = parser.parse_args(argv)
    build(args.source_dir, args.out_dir, args.entry_point)
    print(f"built {args.out_dir} from {args.source_dir}; deploy it with:\n")
    print(
        f"  gcloud functions deploy FUNCTION_NAME --gen2 --runtime python311 --region $REGION \\\n"
        f"    --source {args.out_dir} --entry-point {args.entry_point} --trigger-topic pipes-trigger \\\n"
        f"    --service-account $FUNCTION_SA --timeout 540s --retry\n\n"
        "(see docs/deploy.md for the topics, the bucket and the service accounts)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
