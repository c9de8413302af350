"""``gcf-pipes build`` (``python -m dagster_gcf_pipes.function.build``): the folder it makes is what ``gcloud functions deploy --source`` uploads, so it
must hold everything the function imports and nothing of the Dagster side, and the Functions Framework must
serve it on its own."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dagster_gcf_pipes.local.local_stack import free_port

REPO = Path(__file__).resolve().parents[2]

# Why not simply `python -m functions_framework` with PYTHONPATH=OUT: this repo is pip-installed editable
# in the venv, and setuptools' editable finder (a sys.meta_path entry appended by a .pth file) answers for
# `dagster_gcf_pipes.*` whenever the path search does not. PYTHONPATH and the cwd come first, so the
# vendored packages would load from OUT, but a module MISSING from the build (say
# dagster_gcf_pipes/function/lease.py) would then be loaded silently from the repo, and the Dagster side
# would import too: the test would pass on a broken build. (`python -S` would drop the editable finder, but
# also every installed package.) So the child drops that finder before importing anything and blocks
# `dagster` and the library's Dagster side, which the deployed function does not have: only the built
# folder and the third-party packages of requirements.txt remain importable, as on Cloud Functions.
DEPLOYED_LIKE = """
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
class _NotDeployed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dagster" or name.startswith("dagster_gcf_pipes.orchestrator"):
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
    "modules": {n: getattr(m, "__file__", None) or list(m.__path__)[0] for n, m in sys.modules.items()
                if n.split(".")[0] in ("main", "dagster_gcf_pipes")},
    # asked of the path search itself, past the block: is the Dagster side anywhere on sys.path?
    "orchestrator_found": importlib.machinery.PathFinder.find_spec(
        "dagster_gcf_pipes.orchestrator", list(sys.modules["dagster_gcf_pipes"].__path__)) is not None,
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


EXAMPLE = REPO / "examples" / "sales" / "function"
LIBRARY = {package: REPO / package for package in ("function", "shared")}  # the folders vendored by the build


def run_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dagster_gcf_pipes.function.build", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "function-source"
    result = run_build(str(EXAMPLE), str(out))
    assert result.returncode == 0, result.stderr
    assert "gcloud functions deploy" in result.stdout and f"--source {out}" in result.stdout
    return out


def test_the_build_holds_the_function_and_the_protocol_and_nothing_of_dagster(out: Path):
    assert (out / "main.py").read_bytes() == (EXAMPLE / "main.py").read_bytes()
    for package, folder in LIBRARY.items():
        expected = {p.name for p in folder.glob("*.py")} - {"build.py"}
        assert {p.name for p in (out / "dagster_gcf_pipes" / package).glob("*.py")} == expected
    assert not (out / "dagster_gcf_pipes" / "function" / "build.py").exists()
    assert sorted(p.name for p in (out / "dagster_gcf_pipes").iterdir()) == ["function", "shared"]
    assert not list(out.rglob("__pycache__"))
    requirements = [line.split(">")[0].strip() for line in (out / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    # the example's own requirement first, then the library's function side; never dagster
    assert requirements[0] == "polars"
    assert {"dagster-pipes", "google-cloud-pubsub", "google-cloud-storage", "tenacity", "functions-framework"} <= set(requirements)
    assert "dagster" not in requirements and "google-cloud-functions" not in requirements


def test_the_built_folder_imports_on_its_own(out: Path):
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=out, env=built_env(out),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert {"main", "dagster_gcf_pipes.function", "dagster_gcf_pipes.function.entrypoint",
            "dagster_gcf_pipes.function.session", "dagster_gcf_pipes.shared.protocol"} <= set(found["modules"])
    outside = {name: path for name, path in found["modules"].items() if not Path(path).resolve().is_relative_to(out.resolve())}
    assert not outside, f"imported from outside the build: {outside}"
    assert not found["orchestrator_found"]


def test_a_module_missing_from_the_build_is_not_taken_from_the_repo(out: Path, tmp_path: Path):
    """The check above can fail: without dagster_gcf_pipes/function/lease.py the built folder does not import."""
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "dagster_gcf_pipes" / "function" / "lease.py").unlink()
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=broken, env=built_env(broken),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0
    assert "No module named 'dagster_gcf_pipes.function.lease'" in probe.stderr, probe.stderr


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
        # the function side's JSON lines name the library's own modules, which a Cloud Logging filter on
        # jsonPayload.logger:"dagster_gcf_pipes" finds
        (dropped,) = [json.loads(line) for line in log_path.read_text().splitlines()
                      if "dropping trigger message 1" in line]
        assert dropped["logger"] == "dagster_gcf_pipes.function.session", dropped
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_the_build_refuses_a_folder_that_is_not_empty(tmp_path: Path):
    (tmp_path / "left-over.txt").write_text("an earlier build")
    result = run_build(str(EXAMPLE), str(tmp_path))
    assert result.returncode != 0
    assert "not an empty folder" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["left-over.txt"]


GOOD_MAIN = "from dagster_gcf_pipes.function import pipes_function\n\n@pipes_function\ndef main(pipes, payload):\n    pass\n"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"main.py": GOOD_MAIN + "from dagster import asset\n"}, "main.py:6: imports dagster"),
        ({"main.py": GOOD_MAIN, "helpers.py": "import dagster_gcf_pipes.orchestrator\n"},
         "helpers.py:1: imports dagster_gcf_pipes.orchestrator"),
        ({"main.py": GOOD_MAIN.replace("def main", "def handler")}, "defines no 'main'"),
        ({"main.py": GOOD_MAIN.replace("@pipes_function\n", "")},
         "main.py:3: 'main' is not decorated with @pipes_function"),
        ({"main.py": "from helpers import main\n", "helpers.py": "def main(pipes, payload):\n    pass\n"},
         "helpers.py:1: 'main' is not decorated with @pipes_function"),
        ({"main.py": GOOD_MAIN + "def broken(:\n"}, "main.py:6: does not parse"),
        ({"handler.py": GOOD_MAIN}, "main.py not found"),
        ({"main.py": GOOD_MAIN, "requirements.txt": "pandas\ndagster==1.13.0\n"}, "requirements.txt:2: requires dagster"),
    ],
    ids=["imports-dagster", "imports-the-dagster-side", "no-entry-point", "not-a-pipes-function",
         "not-a-pipes-function-imported", "does-not-parse", "no-main-py", "requires-dagster"],
)
def test_the_build_refuses_what_cannot_run_on_cloud_functions(tmp_path: Path, files: dict[str, str], expected: str):
    source = tmp_path / "src"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    out = tmp_path / "out"
    result = run_build(str(source), str(out))
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert not out.exists() or not any(out.iterdir())


def build_folder(tmp_path: Path, files: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    source, out = tmp_path / "src", tmp_path / "out"
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    return run_build(str(source), str(out), *args), out


@pytest.mark.parametrize(
    ("files", "entry_point"),
    [
        ({"main.py": GOOD_MAIN.replace("import pipes_function", "import pipes_function as pf")
          .replace("@pipes_function", "@pf")}, "main"),
        ({"main.py": "import dagster_gcf_pipes.function as gcf\n\n@gcf.pipes_function\ndef main(pipes, payload):\n"
                     "    pass\n"}, "main"),
        ({"main.py": "from dagster_gcf_pipes.function import pipes_function\n\ndef handler(pipes, payload):\n"
                     "    pass\n\nmain = pipes_function(handler)\n"}, "main"),
        ({"main.py": GOOD_MAIN + "\nmain_http = main.http\n"}, "main_http"),
        ({"main.py": "from handlers import main\n", "handlers.py": GOOD_MAIN}, "main"),
        ({"main.py": "from app.handlers import main\n", "app/__init__.py": "", "app/handlers.py": GOOD_MAIN}, "main"),
    ],
    ids=["alias", "module-attribute", "call", "http-entry-point", "imported", "imported-from-a-package"],
)
def test_the_build_accepts_each_way_of_making_a_pipes_function(tmp_path: Path, files: dict[str, str], entry_point: str):
    result, _ = build_folder(tmp_path, files, "--entry-point", entry_point)
    assert result.returncode == 0, result.stderr


def test_pipes_function_marks_its_entry_points():
    """The marker lets tooling that imports the module (the local stack) tell a pipes function from a plain one."""
    from dagster_gcf_pipes.function.entrypoint import is_pipes_function, pipes_function

    def handler(pipes, payload):
        pass

    decorated = pipes_function(handler)
    assert is_pipes_function(decorated) and is_pipes_function(decorated.http)
    assert not is_pipes_function(handler) and not is_pipes_function(None)


def test_the_build_never_uploads_env_files_and_says_what_it_skipped(tmp_path: Path):
    files = {"main.py": GOOD_MAIN, ".env": "API_KEY=secret\n", ".env.production": "API_KEY=secret\n",
             "config/.env": "API_KEY=secret\n", "settings.yaml": "rows: 3\n", "tests/fixture.json": "{}\n",
             ".venv/pyvenv.cfg": "home = /usr\n"}
    result, out = build_folder(tmp_path, files)
    assert result.returncode == 0, result.stderr
    assert not (out / ".env").exists() and not (out / ".env.production").exists()
    assert not (out / "config" / ".env").exists() and not (out / ".venv").exists()
    # data the function may read is copied, tests/ included
    assert (out / "settings.yaml").is_file() and (out / "tests" / "fixture.json").is_file()
    skipped_line = next(line for line in result.stdout.splitlines() if line.startswith("skipped"))
    for name in (".env", ".env.production", "config/.env", ".venv/"):
        assert name in skipped_line.replace(",", " ").split(), result.stdout
    assert "copy it into" in result.stdout and "--set-secrets" in result.stdout


def command_flags(text: str, command: str) -> set[str]:
    """The flags of the first ``command`` in ``text``, its backslash-continued lines included."""
    joined = text.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if command in line)
    return set(re.findall(r"(?<!\S)--[a-z-]+", line))


def test_the_printed_deploy_command_is_the_one_the_deploy_guide_documents(tmp_path: Path):
    result, out = build_folder(tmp_path, {"main.py": GOOD_MAIN})
    assert result.returncode == 0, result.stderr
    guide = (REPO / "docs" / "deploy.md").read_text()
    section_5 = guide[guide.index("## 5. Build and deploy"):guide.index("## 6.")]
    documented = command_flags(section_5, "gcloud functions deploy")
    assert documented <= command_flags(result.stdout, "gcloud functions deploy"), result.stdout
    assert "--trigger-topic $TRIGGER_TOPIC" in result.stdout and "pipes-trigger" not in result.stdout
    invoker = next(line.strip() for line in section_5.splitlines() if "add-invoker-policy-binding" in line)
    assert invoker in result.stdout
    assert f"--source {out}" in result.stdout
    # the rest of the way (topics, bucket, accounts) is in the deployment guide the library installs: its title and path
    said = re.search(r"'([^']+)', installed with dagster-gcf-pipes at (\S+)$", result.stdout.strip())
    assert said, result.stdout
    title, path = said.groups()
    assert Path(path).is_file() and Path(path).read_text().startswith(f"# {title}\n"), result.stdout



def warnings_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "warning" in line]


def test_the_build_warns_about_an_import_no_requirement_provides(tmp_path: Path):
    """PyYAML is installed here (dagster needs it), so local runs pass; the deployed function would not have it."""
    files = {"main.py": GOOD_MAIN.replace("\n\n@", "\nimport stats\n\n@"), "stats.py": "import json\nimport yaml\n"}
    result, out = build_folder(tmp_path, files)
    assert result.returncode == 0, result.stderr
    (warning,) = warnings_of(result)
    assert "stats.py:2: imports yaml" in warning and "PyYAML" in warning and "requirements.txt" in warning
    assert (out / "stats.py").is_file()

    listed, _ = build_folder(tmp_path / "listed", {**files, "requirements.txt": "pyyaml>=6\n"})
    assert listed.returncode == 0 and not warnings_of(listed), listed.stderr


def test_the_build_warns_about_an_import_that_is_not_installed_anywhere(tmp_path: Path):
    files = {"main.py": GOOD_MAIN + "import not_a_module_anyone_installs\n"}
    result, _ = build_folder(tmp_path, files)
    assert result.returncode == 0, result.stderr
    (warning,) = warnings_of(result)
    assert "main.py:6: imports not_a_module_anyone_installs" in warning and "not installed" in warning


def test_the_build_does_not_warn_about_what_the_deployed_function_has(tmp_path: Path):
    files = {
        "main.py": "from __future__ import annotations\nimport os, json\nimport six\nimport google.cloud.storage\n"
                   "from dagster_pipes import PipesContext\nimport requests  # google-api-core's dependency\n"
                   "import helpers\nfrom app import util\n" + GOOD_MAIN,
        "helpers.py": "import sys\nfrom pathlib import Path\n",
        "app/__init__.py": "from . import util\nfrom .util import VALUE\n",
        "app/util.py": "VALUE = 1\ntry:\n    import ujson\nexcept ImportError:\n    ujson = None\n",
        "requirements.txt": "six\n",
        # not imported by the function: a test the user runs locally
        "tests/test_main.py": "import pytest\n",
    }
    result, _ = build_folder(tmp_path, files)
    assert result.returncode == 0, result.stderr
    assert not warnings_of(result), result.stderr
