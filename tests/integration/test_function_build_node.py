"""``gcf-pipes build`` of a Node.js function (examples/node_function): the folder ``gcloud functions deploy
--runtime nodejs20 --source`` uploads holds the user's files, the function side vendored with a package.json
pointing at it, and a lock file; installed as Cloud Functions' build installs it (``npm ci``, in a folder of its
own, with no path back to the checkout) and served in the Node.js Functions Framework, Dagster materializes it.

Needs node/ built and the example installed (``make test`` does both)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.cloud import storage

from dagster_gcf_pipes.cli.build import main as cli_build
from dagster_gcf_pipes.function.build import BuildError
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from tests import REPO_ROOT
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, run_asset
from tests.integration.test_function_build import command_flags

GCF_PIPES = Path(sys.executable).parent / "gcf-pipes"
EXAMPLE = REPO_ROOT / "examples" / "node_function"
NODE = REPO_ROOT / "node"
VENDORED = Path("vendor") / "dagster-gcf-pipes-function"
TOPIC = "node-built-trigger"


def gcf_pipes_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GCF_PIPES), "build", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The example built (the build vendors the copy its node_modules links: the checkout's node/)."""
    if not (EXAMPLE / "node_modules" / "@dagster-gcf-pipes" / "function" / "dist" / "index.js").is_file():
        pytest.fail("the Node.js example is not installed with node/ built: run `make -C node build` and "
                    "`npm ci` in examples/node_function (make test does both)")
    out = tmp_path_factory.mktemp("node-build") / "node_function"
    result = gcf_pipes_build(str(EXAMPLE), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "build: warning" not in result.stderr, result.stderr  # the lock file was written
    return out, result.stdout


def test_the_build_holds_the_users_files_the_vendored_sdk_and_a_lock(built: tuple[Path, str]):
    out, _ = built
    assert (out / "index.js").read_bytes() == (EXAMPLE / "index.js").read_bytes()
    assert not list(out.rglob("node_modules"))
    vendored = out / VENDORED
    assert sorted(p.relative_to(vendored / "dist") for p in (vendored / "dist").rglob("*")) == \
        sorted(p.relative_to(NODE / "dist") for p in (NODE / "dist").rglob("*"))
    assert (vendored / "dist" / "index.js").read_bytes() == (NODE / "dist" / "index.js").read_bytes()
    sdk = json.loads((vendored / "package.json").read_text())
    source_sdk = json.loads((NODE / "package.json").read_text())
    assert sdk["name"] == "@dagster-gcf-pipes/function" and sdk["dependencies"] == source_sdk["dependencies"]
    assert "devDependencies" not in sdk and "scripts" not in sdk  # no tsc, no prepare script at install

    package = json.loads((out / "package.json").read_text())
    example = json.loads((EXAMPLE / "package.json").read_text())
    assert package["dependencies"] == {**example["dependencies"],
                                       "@dagster-gcf-pipes/function": f"file:{VENDORED.as_posix()}"}
    assert {k: v for k, v in package.items() if k != "dependencies"} == \
        {k: v for k, v in example.items() if k != "dependencies"}

    locked = json.loads((out / "package-lock.json").read_text())["packages"]
    assert locked["node_modules/@dagster-gcf-pipes/function"] == {"resolved": VENDORED.as_posix(), "link": True}
    assert locked[VENDORED.as_posix()]["dependencies"] == source_sdk["dependencies"]
    assert not [name for name in locked if name.startswith("..")]  # nothing outside the folder
    # the function's own lock file is kept: its Functions Framework stays at the version it ran with locally
    ran_with = json.loads((EXAMPLE / "package-lock.json").read_text())["packages"]
    framework = "node_modules/@google-cloud/functions-framework"
    assert locked[framework]["version"] == ran_with[framework]["version"]


def test_the_built_folder_installs_on_its_own_and_dagster_materializes_it(
        built: tuple[Path, str], stack: LocalStack, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    out, _ = built
    deployed = tmp_path / "deployed"  # as Cloud Build has it: the uploaded folder alone
    shutil.copytree(out, deployed)
    installed = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=deployed,
                               capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    resolved = subprocess.run(
        ["node", "--input-type=module", "-e", "console.log(import.meta.resolve('@dagster-gcf-pipes/function'))"],
        cwd=deployed, capture_output=True, text=True, timeout=30)
    assert resolved.stdout.strip() == (deployed / VENDORED / "dist" / "index.js").as_uri(), resolved

    function = LocalFunction(deployed, "main", TOPIC)
    server = stack.add_function(function)
    try:
        outcome = run_asset(make_client(trigger_topic=TOPIC), {"dl_bucket": f"gs://{LAKE_BUCKET}", "rows": 5})
    finally:
        stack.servers.pop(server.name, None)
        server.stop()
    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["row_count"] == 5 and outcome.metadata["runtime"].startswith("node ")
    assert "generating 5 rows of fake sales data" in outcome.log_messages, outcome.log_messages
    [custom] = outcome.custom_messages
    assert custom["rows"] == 5
    csv = storage.Client().bucket(LAKE_BUCKET).blob("sales/pipes_test_asset/part-0.csv").download_as_text()
    assert len(csv.splitlines()) == 1 + 5
    printed = capfd.readouterr().out
    assert "printed by the handler: 5 rows" in printed, printed[-3000:]


def test_deploy_md_builds_and_deploys_node_as_the_build_says(built: tuple[Path, str]):
    out, printed = built
    guide = (REPO_ROOT / "docs" / "deploy.md").read_text()
    section_5 = guide[guide.index("## 5. Build and deploy"):guide.index("## 6.")]
    node_block = next(block for block in re.findall(r"```bash\n(.*?)```", section_5, re.DOTALL)
                      if "--runtime nodejs20" in block)
    build_args = next(line for line in node_block.splitlines() if line.startswith("gcf-pipes build")).split()[2:]
    assert Path(build_args[0]) == EXAMPLE.relative_to(REPO_ROOT), node_block
    assert command_flags(node_block, "gcloud functions deploy") == command_flags(printed, "gcloud functions deploy")
    assert f"--source {build_args[1]} " in node_block.replace("\\\n", " "), node_block  # what the build made
    assert f"--source {out} " in printed and "--runtime nodejs20 " in printed
    invoker = next(line.strip() for line in section_5.splitlines() if "add-invoker-policy-binding" in line)
    assert invoker in printed


@pytest.mark.parametrize(("package", "expected"), [
    ({"main": "index.js", "dependencies": {"@google-cloud/functions-framework": "^5.0.5"}},
     "does not depend on @dagster-gcf-pipes/function"),
    ({"main": "index.js", "dependencies": {"@dagster-gcf-pipes/function": "^0.1.0"}},
     "@dagster-gcf-pipes/function is not installed"),
    ({"main": "server.js", "dependencies": {"@dagster-gcf-pipes/function": "^0.1.0"}}, "server.js not found"),
], ids=["no-sdk-dependency", "not-installed", "no-main-file"])
def test_the_build_refuses_a_node_folder_it_cannot_deploy(tmp_path: Path, package: dict, expected: str):
    source = tmp_path / "src"
    source.mkdir()
    (source / "package.json").write_text(json.dumps(package))
    (source / "index.js").write_text("export const main = () => {};\n")
    with pytest.raises(BuildError, match=re.escape(expected)):
        cli_build(["--runtime", "nodejs", str(source), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_without_npm_the_build_writes_no_lock_file_and_says_what_to_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    source, out = tmp_path / "src", tmp_path / "out"
    sdk = source / "node_modules" / "@dagster-gcf-pipes" / "function"
    (sdk / "dist").mkdir(parents=True)
    (sdk / "dist" / "index.js").write_text("exports.pipesFunction = (handler) => handler;\n")
    (sdk / "package.json").write_text(json.dumps({
        "name": "@dagster-gcf-pipes/function", "main": "dist/index.js", "files": ["dist"],
        "dependencies": {"@google-cloud/functions-framework": "^5.0.5"}}))
    (source / "package.json").write_text(json.dumps({"dependencies": {"@dagster-gcf-pipes/function": "^0.1.0"}}))
    (source / "package-lock.json").write_text("{}\n")  # the user's: it no longer matches the built package.json
    (source / "index.js").write_text("export const main = () => {};\n")
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))

    assert cli_build([str(source), str(out)]) == 0
    said = capsys.readouterr()
    assert "npm is not on PATH, so no package-lock.json was written" in said.err, said.err
    assert f"run `npm install --package-lock-only` in {out}" in said.err, said.err
    assert "--runtime nodejs20" in said.out
    assert sorted(p.name for p in out.iterdir()) == ["index.js", "package.json", "vendor"]
    assert json.loads((out / "package.json").read_text())["dependencies"] == {
        "@dagster-gcf-pipes/function": f"file:{VENDORED.as_posix()}", "@google-cloud/functions-framework": "^5.0.5"}
