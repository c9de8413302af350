"""The function implementations the conformance kit runs, and what each declares it cannot do.

An implementation is a folder holding a function whose entry point implements the kit's cases (see
``functions/python/main.py``): the kit serves it with ``LocalFunction`` on the local stack and runs every
scenario of ``test_kit.py`` against it. A third implementation is one more entry in ``IMPLEMENTATIONS``.

A **gap** is a feature of the protocol's reference implementation (the Python side) that an implementation
does not have, named here with what the implementation does instead. The kit never skips for a gap: the
scenario of a declared gap asserts that documented behaviour, and ``test_declared_gaps_are_really_missing``
probes each probeable feature, so a gap that is filled (or a feature that goes missing undeclared) fails.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster_gcf_pipes.local.local_stack import LocalFunction

FUNCTIONS = Path(__file__).resolve().parent / "functions"

#: the features an implementation may lack, and what having one means
FEATURES = {
    "http_entry_point": "the wrapped handler has an `.http` companion: invocation='http' (the earlier design) reaches it",
    "pull_worker": "a pull worker runs the wrapped handler from a pull subscription (docs/worker.md)",
    "gcs_reply_channel": "reply_channel='gcs' (the earlier design's GCS chunks) is served",
    "timeout_stack": "the SessionTimeout at the function's deadline carries the handler's stack",
}
#: the features ``Implementation.probe`` answers for (the others are seen in their scenario's outcome)
PROBED = ("http_entry_point", "pull_worker")


@dataclass(frozen=True)
class Implementation:
    name: str
    #: what LocalFunction serves (a module file, or a .js file in a folder with a package.json)
    source: Path
    entry_point: str
    #: which of ``PROBED`` the implementation's package has, read from the package itself
    probe: Callable[[Implementation], Mapping[str, bool]]
    #: feature (a ``FEATURES`` key) -> what the implementation does instead: the documented refusal or error
    gaps: Mapping[str, str] = field(default_factory=dict)
    #: the entry point of the handler's HTTP companion (``http_entry_point``), served by LocalFunction
    http_target: str | None = None
    #: the command line of a pull worker on a subscription (``pull_worker``), run in the source's folder
    worker_command: Callable[[str], list[str]] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.gaps) - set(FEATURES)
        if unknown:
            raise ValueError(f"{self.name}: unknown gaps {sorted(unknown)}: name one of {sorted(FEATURES)}")
        for feature, how in (("http_entry_point", self.http_target), ("pull_worker", self.worker_command)):
            if (how is None) != (feature in self.gaps):
                raise ValueError(f"{self.name}: give the way to run {feature}, or declare it a gap (not both)")

    def has(self, feature: str) -> bool:
        assert feature in FEATURES, feature
        return feature not in self.gaps

    def local_function(self, trigger_topic: str, **overrides: Any) -> LocalFunction:
        return LocalFunction(self.source, self.entry_point, trigger_topic, **overrides)

    @property
    def handler_file(self) -> Path:
        """The file whose frames a remote stack shows."""
        return self.source


def probe_python(implementation: Implementation) -> Mapping[str, bool]:
    from dagster_gcf_pipes.function import pipes_function

    wrapped = pipes_function(lambda pipes, payload: None)
    return {
        "http_entry_point": callable(getattr(wrapped, "http", None)),
        "pull_worker": importlib.util.find_spec("dagster_gcf_pipes.function.worker") is not None,
    }


#: run in the function's folder, so the package resolves as the function's own import does
NODE_PROBE = """
import {readFileSync} from 'node:fs';
import {createRequire} from 'node:module';
const pkg = await import('@dagster-gcf-pipes/function');
const manifest = JSON.parse(readFileSync(
  createRequire(process.cwd() + '/').resolve('@dagster-gcf-pipes/function/package.json'), 'utf-8'));
const wrapped = pkg.pipesFunction(async () => {});
console.log(JSON.stringify({
  http_entry_point: typeof wrapped.http === 'function' || Object.keys(pkg).some((name) => /http/i.test(name)),
  pull_worker: Object.keys(pkg).some((name) => /worker/i.test(name)) || manifest.bin !== undefined,
}));
"""


def probe_node(implementation: Implementation) -> Mapping[str, bool]:
    probed = subprocess.run(
        ["node", "--input-type=module", "-e", NODE_PROBE], cwd=implementation.source.parent,
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert probed.returncode == 0, probed.stderr
    return json.loads(probed.stdout)


PYTHON = Implementation(
    "python",
    FUNCTIONS / "python" / "main.py",
    "main",
    probe_python,
    http_target="kit_http",
    worker_command=lambda subscription: [
        sys.executable, "-m", "dagster_gcf_pipes.function.worker", "--subscription", subscription, "--target", "main:main",
        "--shutdown-grace", "5",
    ],
)

NODEJS = Implementation(
    "nodejs",
    FUNCTIONS / "node" / "index.js",
    "main",
    probe_node,
    gaps={
        "http_entry_point": "pipesFunction returns a CloudEvent function only; the package exports no HTTP entry",
        "pull_worker": "the package has no worker (no export, no bin)",
        "gcs_reply_channel": "the trigger is acknowledged and logged: reply_channel=gcs is not supported by the Node.js "
                             "function side",
        "timeout_stack": "a SessionTimeout carries no stack (JavaScript cannot read a running async function's stack)",
    },
)

IMPLEMENTATIONS = [PYTHON, NODEJS]
