"""``python -m function.build``: the folder it makes is what ``gcloud functions deploy --source`` uploads, so it
must hold everything the function imports and nothing of the Dagster side, and the Functions Framework must
serve it on its own."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.local_stack import free_port

REPO = Path(__file__).resolve().parents[2]

# Why not simply `python -m functions_framework` with PYTHONPATH=OUT: this repo is pip-installed editable
# in the venv, and setuptools' editable finder (a sys.meta_path entry appended by a .pth file) answers for
# `function`, `shared` and `orchestrator` whenever the path search does not. PYTHONPATH and the cwd come
# first, so `function` itself would load from OUT, but a module MISSING from the build (say
# function/lease.py) would then be loaded silently from the repo, and `import orchestrator` would work
# too: the test would pass on a broken build. (`python -S` would drop the editable finder, but also every
# installed package.) So the child drops that finder before importing anything and blocks `dagster` and
# `orchestrator`, which the deployed function does not have: only the built folder and the third-party
# packages of requirements.txt remain importable, as on Cloud Functions.
DEPLOYED_LIKE = """
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
class _NotDeployed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dagster", "orchestrator"):
            raise ModuleNotFoundError(f"{name} is not installed in the deployed function", name=name)
sys.meta_path.insert(0, _NotDeployed())
"""

SERVE = DEPLOYED_LIKE + """
import runpy
sys.argv[0] = "functions_framework"
runpy.run_module("functions_framework", run_name="__main__", alter_sys=True)
"""

PROBE = DEPLOYED_LIKE + """
import importlib.machinery, json
import main  # the built entry point and, through it, everything the function imports
print(json.dumps({
    "modules": {n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] in ("main", "function", "shared")},
    # asked of the path search itself, past the block: is there an orchestrator/ anywhere on sys.path?
    "orchestrator_found": importlib.machinery.PathFinder.find_spec("orchestrator") is not None,
}))
"""


def built_env(out: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "PUBSUB_EMULATOR_HOST")}
    # The function creates its storage client before it reads the trigger; in the cloud its credentials come
    # from the metadata server. Here an emulator address that is never contacted (the malformed trigger is
    # inline, so no object is read) makes the client anonymous, so nothing looks for credentials.
    return {**env, "PYTHONPATH": str(out), "PYTHONUNBUFFERED": "1",
            "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "GOOGLE_CLOUD_PROJECT": "p"}


def run_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "function.build", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "function-source"
    result = run_build(str(out))
    assert result.returncode == 0, result.stderr
    assert "gcloud functions deploy" in result.stdout and f"--source {out}" in result.stdout
    return out


def test_the_build_holds_the_function_and_the_protocol_and_nothing_of_dagster(out: Path):
    assert (out / "main.py").read_bytes() == (REPO / "function" / "main.py").read_bytes()
    for package in ("function", "shared"):
        expected = {p.name for p in (REPO / package).glob("*.py")} - {"build.py"}
        assert {p.name for p in (out / package).glob("*.py")} == expected
    assert "dagster-pipes" in (out / "requirements.txt").read_text()
    assert not (out / "function" / "build.py").exists()
    assert not (out / "orchestrator").exists()
    assert not list(out.rglob("__pycache__"))
    requirements = [line.split(">")[0].strip() for line in (out / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert "dagster" not in requirements


def test_the_built_folder_imports_on_its_own(out: Path):
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=out, env=built_env(out),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert {"main", "function", "function.entrypoint", "function.session", "shared", "shared.protocol"} <= set(found["modules"])
    outside = {name: path for name, path in found["modules"].items() if not Path(path).resolve().is_relative_to(out.resolve())}
    assert not outside, f"imported from outside the build: {outside}"
    assert not found["orchestrator_found"]


def test_a_module_missing_from_the_build_is_not_taken_from_the_repo(out: Path, tmp_path: Path):
    """The check above can fail: without function/lease.py the built folder does not import."""
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "function" / "lease.py").unlink()
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=broken, env=built_env(broken),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0
    assert "No module named 'function.lease'" in probe.stderr, probe.stderr


def post_malformed_trigger(port: int) -> int:
    body = {"message": {"data": base64.b64encode(b"not a trigger").decode(), "attributes": {}, "messageId": "1"},
            "subscription": "s"}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(), method="POST",
        headers={
            "ce-specversion": "1.0",
            "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
            "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
            "ce-id": "1",
            "content-type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_functions_framework_serves_the_built_folder(out: Path, tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "functions-framework.log"
    argv = [sys.executable, "-c", SERVE, "--target", "main", "--signature-type", "cloudevent",
            "--source", str(out / "main.py"), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv, cwd=out, env=built_env(out), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:  # bounded wait for the port: any HTTP answer means the server is up
            assert server.poll() is None, f"the Functions Framework exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"not serving on port {port} after 20 s:\n{log_path.read_text()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)

        # The entry point logs a malformed trigger and returns: a 2xx acks it, so Eventarc does not
        # redeliver a message that could never run.
        assert post_malformed_trigger(port) == 200, log_path.read_text()
        deadline = time.monotonic() + 5
        while "dropping trigger message 1" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "dropping trigger message 1" in log_path.read_text(), log_path.read_text()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_the_build_refuses_a_folder_that_is_not_empty(tmp_path: Path):
    (tmp_path / "left-over.txt").write_text("an earlier build")
    result = run_build(str(tmp_path))
    assert result.returncode != 0
    assert "not an empty folder" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["left-over.txt"]


def test_the_build_refuses_an_entry_point_that_imports_dagster(tmp_path: Path):
    bad_main = tmp_path / "bad_main.py"
    bad_main.write_text("from dagster_pipes import PipesContext\nfrom dagster import asset\n")
    out = tmp_path / "out"
    result = run_build(str(out), "--main", str(bad_main))
    assert result.returncode != 0
    assert f"{out / 'main.py'}:2: imports dagster" in result.stderr
