"""The rooms and the orchestrator's packages import one way only, read from the source (every ``import``,
including those inside functions), so a cycle or a wrong-way import fails here before it fails a user."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "dagster_gcf_pipes"

# the orchestrator's packages, bottom to top: each may import only those before it (and itself)
ORCHESTRATOR_LAYERS = ["diagnostics", "session", "earlier_design", "modes", "client", "definitions"]

# the rooms: what each may import of the library (shared imports no room; nothing imports local or cli)
ROOM_MAY_IMPORT = {
    "shared": {"shared"},
    "function": {"shared", "function"},
    "orchestrator": {"shared", "orchestrator"},
    "local": {"shared", "function", "orchestrator", "local"},
    "cli": {"shared", "function", "orchestrator", "local", "cli"},
}
# third-party packages a room must never import
ROOM_NEVER_IMPORTS = {"shared": {"dagster", "dagster_pipes"}, "function": {"dagster"}}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the library imports by absolute name")
    return names


def modules_of(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def test_every_orchestrator_package_is_a_known_layer():
    packages = {p.name for p in (ROOT / "orchestrator").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ORCHESTRATOR_LAYERS)
    assert not [p.name for p in (ROOT / "orchestrator").glob("*.py") if p.name != "__init__.py"], (
        "a module directly in orchestrator/ belongs in one of its packages"
    )


@pytest.mark.parametrize("layer", ORCHESTRATOR_LAYERS)
def test_orchestrator_packages_import_only_the_layers_below(layer: str):
    allowed = set(ORCHESTRATOR_LAYERS[: ORCHESTRATOR_LAYERS.index(layer) + 1])
    wrong = []
    for path in sorted((ROOT / "orchestrator" / layer).glob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[:2] == [PACKAGE, "orchestrator"]:
                target = parts[2] if len(parts) > 2 else "(the public API)"
                if target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, f"{layer} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("room", sorted(ROOM_MAY_IMPORT))
def test_rooms_import_one_way(room: str):
    wrong = []
    for path in modules_of(room):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and parts[1] not in ROOM_MAY_IMPORT[room]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if parts[0] in ROOM_NEVER_IMPORTS.get(room, set()):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_way_import(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from dagster_gcf_pipes.orchestrator.client.client import X\n")
    assert "dagster_gcf_pipes.orchestrator.client.client" in imported_modules(module)
