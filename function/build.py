"""Assemble a folder that ``gcloud functions deploy --source OUT_DIR`` deploys as it is.

    gcf-pipes build SOURCE_DIR OUT_DIR [--entry-point main]
    python -m dagster_gcf_pipes.function.build SOURCE_DIR OUT_DIR [--entry-point main]

SOURCE_DIR is the user's function: ``main.py`` at its root (the module Cloud Functions' Python runtime loads)
defining the entry point, any other modules, packages and data files beside it, and optionally its own
``requirements.txt``. OUT_DIR receives:

* a copy of SOURCE_DIR, except what matches ``SKIPPED`` at any depth: environment files (``.env``,
  ``.env.*``: settings and secrets, which belong in ``--set-env-vars`` / ``--set-secrets``), caches, virtual
  environments, version-control and editor folders. Everything else is copied, ``tests/`` and data files
  included, since the function may read them. The build prints what it skipped; to ship one of those on
  purpose, copy it into OUT_DIR after the build;
* ``dagster_gcf_pipes/shared`` and ``dagster_gcf_pipes/function``, the function side of this library as it is
  installed here, vendored: the deployed function runs exactly the code it was tested with, and the build
  needs no package index that serves this library (Cloud Build installs requirements.txt from PyPI);
* ``requirements.txt``: the user's requirements, then the library's function-side requirements (dagster-pipes,
  the Pub/Sub and Storage clients, tenacity, functions-framework), never dagster.

It refuses what cannot run on Cloud Functions, naming the file and the fix: no ``main.py``, an entry point
that ``main.py`` does not define or that is not a ``@pipes_function`` (read from the source, nothing is
imported), an import of ``dagster`` or of the library's Dagster side or local tooling, a requirement on
dagster. It warns, and still builds, when a module the function imports (``main.py`` and the local modules it
reaches) imports at its top level a package that neither the standard library, the folder, the vendored
library, nor ``requirements.txt`` (a listed requirement or anything it depends on, as installed here)
provides: the deployed function would fail at import with ``ModuleNotFoundError``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

DISTRIBUTION = "dagster-gcf-pipes"
VENDORED = ("dagster_gcf_pipes.shared", "dagster_gcf_pipes.function")
#: module prefixes a deployed function cannot import (dagster_pipes is another name, and is what it uses)
FORBIDDEN = ("dagster", "dagster_gcf_pipes.orchestrator", "dagster_gcf_pipes.local", "dagster_gcf_pipes.cli")
#: never copied, at any depth: settings and secrets, caches, virtual environments, version control, editors
SKIPPED = (".env", ".env.*", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".tox", ".nox",
           ".coverage", ".coverage.*", "htmlcov", ".ipynb_checkpoints", ".venv", "venv", ".git", ".hg", ".svn",
           ".idea", ".vscode", ".DS_Store")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class BuildError(SystemExit):
    """A build that cannot produce a deployable folder; its text names the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(f"build: {message}")


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _absolute_imports(nodes: Iterable[ast.AST]) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for each absolute import among ``nodes``."""
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def forbidden_imports(path: Path, root: Path) -> list[str]:
    """``file:line: imports X`` for every import in ``path`` that a deployed function cannot have."""
    try:
        tree = _parse(path)
    except SyntaxError as exc:
        return [f"{path.relative_to(root)}:{exc.lineno}: does not parse ({exc.msg})"]
    return [
        f"{path.relative_to(root)}:{line}: imports {name}"
        for line, name in _absolute_imports(ast.walk(tree))
        if any(name == prefix or name.startswith(prefix + ".") for prefix in FORBIDDEN)
    ]


def _bound_names(node: ast.stmt) -> set[str]:
    """The names a module-level statement binds (``*`` for a star import)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {t.id for t in targets if isinstance(t, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return set()


def defined_names(main: Path) -> set[str]:
    """The names ``main.py`` binds at module level: functions, classes, assignments and imports (raises
    SyntaxError if it does not parse). ``entry_point_problem`` also checks that the name is a pipes function."""
    return set().union(*map(_bound_names, _parse(main).body))


def _names_pipes_function(node: ast.expr, aliases: set[str]) -> bool:
    """``pipes_function`` under a name it was imported or assigned as, or as an attribute (``gcf.pipes_function``)."""
    return (isinstance(node, ast.Name) and node.id in aliases) or (
        isinstance(node, ast.Attribute) and node.attr == "pipes_function")


def _pipes_function_aliases(tree: ast.Module) -> set[str]:
    aliases = {"pipes_function"}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            aliases |= {alias.asname or alias.name for alias in node.names if alias.name == "pipes_function"}
        elif isinstance(node, ast.Assign) and _names_pipes_function(node.value, aliases):
            aliases |= _bound_names(node)
    return aliases


def _is_made_by_pipes_function(node: ast.stmt, aliases: set[str]) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return any(_names_pipes_function(decorator, aliases) for decorator in node.decorator_list)
    value = getattr(node, "value", None)
    return isinstance(value, ast.Call) and _names_pipes_function(value.func, aliases)


def _import_base(root: Path, path: Path, level: int) -> Path | None:
    """The folder a ``from`` import of ``level`` dots in ``path`` starts from (None above ``root``)."""
    if level == 0:
        return root
    base = path.parents[level - 1] if level <= len(path.parents) else None
    return base if base is not None and base.is_relative_to(root) else None


def _local_module(root: Path, base: Path | None, dotted: str) -> Path | None:
    """The file of module ``dotted`` (relative to ``base``) if the function's folder holds it."""
    if base is None:
        return None
    target = base.joinpath(*dotted.split(".")) if dotted else base
    candidates = [target.with_name(f"{target.name}.py")] if dotted else []
    return next((c for c in [*candidates, target / "__init__.py"] if c.is_file() and c.is_relative_to(root)), None)


def _entry_point_problem(path: Path, root: Path, name: str, seen: set[tuple[Path, str]]) -> str | None:
    if (path, name) in seen:
        return None
    seen.add((path, name))
    try:
        tree = _parse(path)
    except SyntaxError as exc:
        return f"{path}:{exc.lineno}: does not parse ({exc.msg}); fix it, then try again"
    bindings = [node for node in tree.body if name in _bound_names(node)]
    aliases = _pipes_function_aliases(tree)
    if not bindings:
        if any("*" in _bound_names(node) for node in tree.body):
            return None  # a star import may bind it: cannot tell without importing
        found = sorted(n for node in tree.body if _is_made_by_pipes_function(node, aliases) for n in _bound_names(node))
        return (
            f"{path} defines no {name!r}: decorate your handler with @pipes_function and name it {name!r}, "
            "or name the entry point it has (gcf-pipes build --entry-point NAME; locally --function FILE:NAME)"
            + (f"; its pipes functions: {', '.join(map(repr, found))}" if found else "")
        )
    node = bindings[-1]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if node.decorator_list:
            return None  # @pipes_function, or a decorator of the user's own that may apply it
        keyword = "class" if isinstance(node, ast.ClassDef) else "def"
        imported = any(isinstance(n, ast.ImportFrom) and "pipes_function" in _bound_names(n) for n in tree.body)
        return (
            f"{path}:{node.lineno}: {name!r} is not decorated with @pipes_function, so the Functions Framework "
            "would call it with the raw CloudEvent instead of (pipes, payload) and every delivery would fail; "
            + ("" if imported else "add `from dagster_gcf_pipes.function import pipes_function` and ")
            + f"put @pipes_function on the line above `{keyword} {name}`"
        )
    if isinstance(node, ast.ImportFrom):
        alias = next(a for a in node.names if (a.asname or a.name) == name)
        module = _local_module(root, _import_base(root, path, node.level), node.module or "")
        return _entry_point_problem(module, root, alias.name, seen) if module else None
    value = getattr(node, "value", None)
    if isinstance(value, ast.Attribute) and value.attr == "http":  # main_http = main.http
        value = value.value
    if isinstance(value, ast.Name):  # main = handler
        return _entry_point_problem(path, root, value.id, seen)
    return None  # pipes_function(handler), or anything else that only running the code would tell


def entry_point_problem(module_file: Path, entry_point: str) -> str | None:
    """Why ``entry_point`` in ``module_file`` cannot be served as a pipes function, or None if it can (or if
    reading the source cannot tell). Nothing is imported: the source is read, and an entry point imported
    from a module in the same folder is followed there. The text names the file, the entry point and the fix."""
    module_file = module_file.resolve()
    if not module_file.is_file():
        return f"{module_file} is not a file; name the module that defines {entry_point!r}"
    return _entry_point_problem(module_file, module_file.parent, entry_point, set())


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    """The normalized project name a requirements line names (None for comments, options and blanks)."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    match = _NAME.match(line)
    return _normalized(match.group(1)) if match else None


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
    problem = entry_point_problem(main, entry_point)
    if problem:
        raise BuildError(problem)
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


#: requirement lines whose project the build cannot name (nested files, editable or local installs, URLs)
_OPAQUE = re.compile(r"^\s*(-r|--requirement|-e|--editable|\.|/|[a-z+]+://)")


def _provided_distributions(requirements: str) -> set[str] | None:
    """The normalized names of the listed requirements and, as installed here, of everything they depend on;
    None when a line names no project (``-r other.txt``, a path, a URL), so nothing can be concluded."""
    lines = requirements.splitlines()
    if any(_OPAQUE.match(line) for line in lines):
        return None
    todo = [name for name in map(requirement_name, lines) if name]
    provided: set[str] = set()
    while todo:
        name = todo.pop()
        if name in provided:
            continue
        provided.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [dep for r in requires if "extra" not in r.partition(";")[2] and (dep := requirement_name(r))]
    return provided


def _reachable_modules(main: Path, root: Path) -> list[Path]:
    """``main`` and the folder's modules it imports, directly or not (imports anywhere in a module count)."""
    found, todo = [main], [main]
    while todo:
        path = todo.pop()
        try:
            tree = _parse(path)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                wanted = [(root, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base, module = _import_base(root, path, node.level), node.module or ""
                wanted = [(base, module), *((base, f"{module}.{a.name}".lstrip(".")) for a in node.names)]
            else:
                continue
            for base, dotted in wanted:
                parts = dotted.split(".")
                for depth in range(1, len(parts) + 1):  # import a.b runs a/__init__.py too
                    module_file = _local_module(root, base, ".".join(parts[:depth]))
                    if module_file and module_file not in found and not _skipped(module_file, root):
                        found.append(module_file)
                        todo.append(module_file)
    return found


def _local_top_names(root: Path) -> set[str]:
    return {entry.stem if entry.suffix == ".py" else entry.name for entry in root.iterdir()
            if not _skipped(entry, root) and (entry.is_dir() or entry.suffix == ".py")}


def missing_requirement_warnings(source: Path, requirements: str) -> list[str]:
    """``file:line: imports X ...`` for each package a module of the function imports at its top level that
    nothing the deployed function has provides. Conservative: an import inside a function or a ``try`` (an
    optional dependency) is not looked at, nor is a module the function does not import (tests, scripts)."""
    provided = _provided_distributions(requirements)
    if provided is None:
        return []
    known = set(sys.stdlib_module_names) | _local_top_names(source) | {"dagster_gcf_pipes", "dagster"}
    installed = importlib.metadata.packages_distributions()
    warnings: dict[str, str] = {}
    for path in _reachable_modules(source / "main.py", source):
        for line, module in _absolute_imports(_parse(path).body):
            top = module.split(".")[0]
            if top in known or top in warnings:
                continue
            where = f"{path.relative_to(source)}:{line}: imports {top}"
            distributions = installed.get(top)
            if distributions and not {_normalized(d) for d in distributions} & provided:
                names = " or ".join(sorted(set(distributions)))
                warnings[top] = (
                    f"{where}, which comes from {names}; requirements.txt neither lists it nor gets it through a "
                    "listed requirement, so the deployed function would fail with ModuleNotFoundError: add "
                    f"{names} to {source / 'requirements.txt'}"
                )
            elif not distributions and _normalized(top) not in provided:
                warnings[top] = (
                    f"{where}, which is not installed here and which no requirement is named after: if it comes "
                    f"from a package, add that package to {source / 'requirements.txt'}"
                )
    return list(warnings.values())


def copy_source(source: Path, out: Path, skipped: tuple[str, ...] = SKIPPED) -> list[str]:
    """Copy ``source`` to ``out`` without what ``skipped`` matches; the paths left out (a folder's with a /)."""
    left_out: list[str] = []

    def ignore(folder: str, names: list[str]) -> set[str]:
        matched = {name for name in names if any(fnmatch(name, pattern) for pattern in skipped)}
        for name in matched:
            path = Path(folder, name)
            left_out.append(path.relative_to(source).as_posix() + ("/" if path.is_dir() else ""))
        return matched

    shutil.copytree(source, out, ignore=ignore, dirs_exist_ok=True)
    return sorted(left_out)


@dataclass(frozen=True)
class Built:
    skipped: list[str]  #: paths of SOURCE_DIR not copied (a folder's ends in /)
    warnings: list[str]  #: imports that no requirement provides


def check_destination(source: Path, out: Path) -> None:
    """Refuse an OUT_DIR that holds anything, or that is inside SOURCE_DIR (both resolved)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} exists and is not an empty folder; remove it or choose another OUT_DIR")
    if out == source or source in out.parents:
        raise BuildError(f"OUT_DIR {out} is inside SOURCE_DIR {source}; build outside the function's folder")


def build(source: Path, out: Path, entry_point: str = "main") -> Built:
    source, out = source.resolve(), out.resolve()
    check_destination(source, out)
    _check_source(source, entry_point)
    if (source / "dagster_gcf_pipes").exists():
        raise BuildError(f"{source / 'dagster_gcf_pipes'} exists; the build vendors the library there, remove it")
    user_requirements = source / "requirements.txt"
    requirements = merged_requirements(user_requirements if user_requirements.is_file() else None)
    skipped = copy_source(source, out)
    for module in VENDORED:
        shutil.copytree(_package_folder(module), out / Path(*module.split(".")),
                        ignore=shutil.ignore_patterns(*SKIPPED, "build.py"))
    (out / "requirements.txt").write_text(requirements, encoding="utf-8")
    return Built(skipped, missing_requirement_warnings(source, requirements))


#: the commands of docs/deploy.md section 5, with the variables of its section 0 (TRIGGER_TOPIC: the topic
#: the Dagster resource's trigger_topic names)
DEPLOY = """\
  gcloud functions deploy $FUNCTION --gen2 --runtime python311 --region $REGION \\
    --source {source} --entry-point {entry_point} --trigger-topic $TRIGGER_TOPIC \\
    --service-account $FUNCTION_SA --trigger-service-account $TRIGGER_SA \\
    --timeout 540s --retry --max-instances 20 --concurrency 1 \\
    --set-env-vars THREADED_TIMEOUT_ENABLED=true
  gcloud functions add-invoker-policy-binding $FUNCTION --region $REGION --member serviceAccount:$TRIGGER_SA
"""


def deploy_guide() -> Path:
    """docs/deploy.md as installed with the library: the wheel ships the docs as ``dagster_gcf_pipes/docs/``, beside
    ``dagster_gcf_pipes/function/``, as the checkout has ``docs/`` beside ``function/``."""
    return Path(__file__).resolve().parent.parent / "docs" / "deploy.md"


def report(built: Built, source: Path, out: Path, entry_point: str, deploy: str = DEPLOY) -> None:
    """What was built and skipped, the ``deploy`` commands for it, where the deployment guide is, the warnings."""
    print(f"built {out} from {source}")
    if built.skipped:
        print(f"skipped (not uploaded): {', '.join(built.skipped)}\n"
              f"  to upload one of these on purpose, copy it into {out} after the build; settings and secrets "
              "belong in the deploy command's --set-env-vars / --set-secrets instead")
    print(
        "\ndeploy it with, after setting FUNCTION, REGION, TRIGGER_TOPIC (the topic your Dagster resource's "
        "trigger_topic names), FUNCTION_SA and TRIGGER_SA:\n\n"
        + deploy.format(source=out, entry_point=entry_point)
        + "\nThe topics, the bucket, the service accounts and their roles: sections 0 to 5 of the deployment guide, "
        f"'Deploying to a Google Cloud project', installed with {DISTRIBUTION} at {deploy_guide()}"
    )
    for warning in built.warnings:
        print(f"build: warning: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "python -m dagster_gcf_pipes.function.build") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir", type=Path, help="your function's folder, with main.py at its root")
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--entry-point", default="main",
                        help="the @pipes_function in main.py that Cloud Functions calls (default: main)")
    args = parser.parse_args(argv)
    built = build(args.source_dir, args.out_dir, args.entry_point)
    report(built, args.source_dir, args.out_dir, args.entry_point)
    return 0


if __name__ == "__main__":
    sys.exit(main())
