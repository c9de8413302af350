"""``gcf-pipes build`` for a Node.js function: the folder that ``gcloud functions deploy --runtime nodejs20
--source OUT_DIR`` deploys as it is.

SOURCE_DIR is the function's folder: a package.json whose ``main`` (``index.js`` by default) is the module the
runtime loads, depending on ``@dagster-gcf-pipes/function``, installed (its node_modules, as ``npm ci`` or
the local stack leave it). OUT_DIR receives:

* a copy of SOURCE_DIR without ``node_modules/`` (the runtime's build installs the dependencies) and without
  what the Python build leaves out (``.env`` files, caches, version control, editors' folders);
* ``vendor/dagster-gcf-pipes-function/``: the function side as the function's node_modules holds it (the
  code its local runs used): its package.json without the dev dependencies and scripts, and its files
  (``dist/``). Cloud Build installs only public packages, and the deployed function runs that exact code;
* ``package.json``: the function's own, its ``@dagster-gcf-pipes/function`` dependency pointing at that copy
  (``file:vendor/dagster-gcf-pipes-function``), ``@google-cloud/functions-framework`` added if it lacked it;
* ``package-lock.json``, from ``npm install --package-lock-only`` over the function's own lock file (its
  versions kept), for the runtime's ``npm ci``. Without npm or the registry the build says so and writes
  none: run that command in OUT_DIR before deploying (without a lock file the runtime's build resolves the
  versions anew with ``npm install``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dagster_gcf_pipes.function.build import SKIPPED, Built, BuildError, check_destination, copy_source

SDK = "@dagster-gcf-pipes/function"
FRAMEWORK = "@google-cloud/functions-framework"
VENDORED = "vendor/dagster-gcf-pipes-function"
#: never copied: the Python build's list, and the installed dependencies
NODE_SKIPPED = (*SKIPPED, "node_modules")
#: what the vendored package.json drops: its build's tooling (npm would run a ``prepare`` script on install)
DEV_ONLY = ("devDependencies", "scripts")
LOCK_COMMAND = ("npm", "install", "--package-lock-only", "--no-audit", "--no-fund", "--ignore-scripts")

#: the commands of docs/deploy.md section 5 for the Node.js runtime
DEPLOY = """\
  gcloud functions deploy $FUNCTION --gen2 --runtime nodejs20 --region $REGION \\
    --source {source} --entry-point {entry_point} --trigger-topic $TRIGGER_TOPIC \\
    --service-account $FUNCTION_SA --trigger-service-account $TRIGGER_SA \\
    --timeout 540s --retry --max-instances 20 --concurrency 1
  gcloud functions add-invoker-policy-binding $FUNCTION --region $REGION --member serviceAccount:$TRIGGER_SA
"""


def is_node_function(source: Path) -> bool:
    """A folder with a package.json and no main.py (which would make it a Python function)."""
    return (source / "package.json").is_file() and not (source / "main.py").exists()


def read_package(folder: Path) -> dict[str, Any]:
    path = folder / "package.json"
    try:
        package = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path} not found: a Node.js function's folder declares its dependencies and main file "
                         "in a package.json") from None
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(package, dict):
        raise BuildError(f"{path}: not a JSON object")
    return package


def installed_sdk(source: Path) -> Path:
    """The function side the function's node_modules holds (a link to a checkout's node/ resolved)."""
    installed = source / "node_modules" / SDK
    main = installed / (read_package(installed).get("main") or "index.js") if installed.is_dir() else None
    if main is None or not main.is_file():
        raise BuildError(
            f"{SDK} is not installed in {source / 'node_modules'}, or not built: run `npm ci` (or `npm install`) in "
            f"{source} first; the build vendors the copy your function runs locally"
        )
    return installed.resolve()


def _check_source(source: Path, package: dict[str, Any]) -> None:
    if SDK not in (package.get("dependencies") or {}):
        raise BuildError(
            f"{source / 'package.json'} does not depend on {SDK}: `npm install /path/to/dagster-gcf-pipes/node` "
            "there (until the package is on npm), and wrap your handler with pipesFunction"
        )
    main = source / (package.get("main") or "index.js")
    if not main.is_file():
        raise BuildError(f"{main} not found: Cloud Functions loads package.json's main (index.js by default)")
    if (source / VENDORED).exists():
        raise BuildError(f"{source / VENDORED} exists; the build vendors the function side there, remove it")


def _vendor(sdk: Path, out: Path) -> str:
    """Copy the function side into ``out``'s vendor folder; the version range its package.json gives the
    Functions Framework."""
    package = read_package(sdk)
    target = out / VENDORED
    target.mkdir(parents=True)
    for name in package.get("files") or ["dist"]:
        copy = shutil.copytree if (sdk / name).is_dir() else shutil.copy2
        copy(sdk / name, target / name)
    kept = {key: value for key, value in package.items() if key not in DEV_ONLY}
    (target / "package.json").write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")
    return package["dependencies"][FRAMEWORK]


def _lock(out: Path) -> list[str]:
    """Write ``out``'s package-lock.json (keeping the function's own locked versions); a warning if it cannot."""
    advice = (f"run `{' '.join(LOCK_COMMAND[:3])}` in {out} before deploying (without a lock file Cloud "
              "Functions' build resolves the versions anew with npm install)")
    if shutil.which("npm") is None:
        (out / "package-lock.json").unlink(missing_ok=True)
        return [f"npm is not on PATH, so no package-lock.json was written: {advice}"]
    try:
        locked = subprocess.run(LOCK_COMMAND, cwd=out, capture_output=True, text=True, timeout=300, check=False)
        failure = None if locked.returncode == 0 else "\n".join((locked.stdout + locked.stderr).splitlines()[-8:])
    except subprocess.TimeoutExpired:
        failure = "it did not finish within 300 s"
    if failure is None:
        return []
    (out / "package-lock.json").unlink(missing_ok=True)  # the function's own lock no longer matches package.json
    return [f"`{' '.join(LOCK_COMMAND)}` failed, so no package-lock.json was written: {advice}:\n{failure}"]


def build(source: Path, out: Path) -> Built:
    source, out = source.resolve(), out.resolve()
    check_destination(source, out)
    package = read_package(source)
    _check_source(source, package)
    sdk = installed_sdk(source)
    skipped = copy_source(source, out, NODE_SKIPPED)
    framework = _vendor(sdk, out)
    dependencies = package.setdefault("dependencies", {})
    dependencies[SDK] = f"file:{VENDORED}"
    dependencies.setdefault(FRAMEWORK, framework)
    (out / "package.json").write_text(json.dumps(package, indent=2) + "\n", encoding="utf-8")
    return Built(skipped, _lock(out))
