"""The local dev loop on a Node.js function (the TypeScript function side, node/), in a user's project outside the
checkout: ``gcf-pipes dev`` serves it (named by its folder, with a package.json) in Google's Node.js Functions
Framework, Dagster materializes it, an edit of its ``.js`` is served at the next trigger while npm's writes
(``node_modules/``, ``dist/``) restart nothing; and the pytest plugin's fixture serves one named by its ``.js``.

Needs node/ built (``make test`` builds it); the project's ``npm install`` links it and takes the Functions
Framework from npm's cache."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, MaterializeResult, asset, materialize
from watchfiles import Change

from dagster_gcf_pipes.local.dev import edit_filter, stop_process_group
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, free_port
from dagster_gcf_pipes.orchestrator import PipesPubSubClient
from tests import REPO_ROOT
from tests.integration.processes import Output
from tests.integration.test_dev_loop import DEFINITIONS, GCF_PIPES, materialize_my_table, write

EXAMPLE = REPO_ROOT / "examples" / "node_function"

NODE_FUNCTION = """
    import {cloudEvent} from '@google-cloud/functions-framework';
    import {pipesFunction} from '@dagster-gcf-pipes/function';

    const VERSION = 'one';

    export const main = pipesFunction(async (pipes, payload) => {
      pipes.log.info(`running version ${VERSION}`);
      pipes.reportAssetMaterialization({metadata: {version: VERSION, rows: payload.rows ?? 0}});
    });
    cloudEvent('main', main);
"""


def node_package(name: str) -> str:
    """A package.json linking node/ (as a checkout's user installs it) and the example's Functions Framework."""
    framework = json.loads((EXAMPLE / "package.json").read_text())["dependencies"]["@google-cloud/functions-framework"]
    return json.dumps({
        "name": name, "version": "0.1.0", "private": True, "type": "module", "main": "index.js",
        "dependencies": {"@dagster-gcf-pipes/function": f"file:{REPO_ROOT / 'node'}",
                         "@google-cloud/functions-framework": framework},
    }, indent=2)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (REPO_ROOT / "node" / "dist" / "index.js").exists():
        pytest.fail("the Node.js function side is not built: run `make -C node build` (make test does)")
    root = tmp_path_factory.mktemp("node-dev") / "my-project"
    write(root, {"my_node_function/index.js": NODE_FUNCTION, "my_defs.py": DEFINITIONS})
    (root / "my_node_function" / "package.json").write_text(node_package("my-node-function"))
    installed = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefer-offline"],
                               cwd=root / "my_node_function", capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return root


@dataclass
class Dev:
    """``gcf-pipes dev`` running on the project: its process, output, exports, and Dagster's port and home."""

    process: subprocess.Popen
    output: Output
    environment: dict[str, str]
    port: int
    home: Path


@pytest.fixture(scope="module")
def dev(project: Path) -> Iterator[Dev]:
    """One ``gcf-pipes dev`` for the module (a stack and dagster dev each take seconds to start): the edit test
    uses its stack while dagster dev starts, the Dagster test (last in the module) waits for its webserver."""
    port, home = free_port(), project.parent / "dagster-home"
    home.mkdir()
    # runs launch when submitted, not at the queue daemon's next pass (seconds saved; the launcher is the default)
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n")
    process = subprocess.Popen(
        [str(GCF_PIPES), "dev", "-f", "my_defs.py", "--function", "my_node_function:main", "--port", str(port)],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    output = Output(process)
    try:
        output.wait_for("export GOOGLE_CLOUD_PROJECT=", timeout=120)
        environment = dict(line.removeprefix("export ").split("=", 1) for line in output.lines
                           if line.startswith("export "))
        yield Dev(process, output, environment, port, home)
    finally:
        stop_process_group(process)


def test_an_edit_of_the_js_is_served_and_npms_writes_restart_nothing(project: Path, dev: Dev):
    logs, metadata = materialize_my_table(project, dev.environment)
    assert "running version one" in logs and metadata["version"] == "one"

    folder = project / "my_node_function"
    mark = len(dev.output.lines)
    # what npm and a build write in the folder: a cache under node_modules/, a bundle in dist/ (the entry is
    # index.js), a TypeScript source (its compiled output is the edit)
    for written in ("node_modules/.cache/some-tool/state.json", "dist/bundle.js", "helpers.ts"):
        (folder / written).parent.mkdir(parents=True, exist_ok=True)
        (folder / written).write_text("{}\n")
    source = folder / "index.js"
    source.write_text(source.read_text().replace("const VERSION = 'one'", "const VERSION = 'two'"))
    dev.output.wait_for("serves the new code", timeout=60, start=mark)
    restarts = [line for line in dev.output.lines[mark:] if "restarting the function" in line]
    assert len(restarts) == 1 and "(index.js)" in restarts[0], dev.output.tail()

    logs, metadata = materialize_my_table(project, dev.environment)
    assert "running version two" in logs and metadata["version"] == "two"


def test_what_is_an_edit_of_a_node_function_follows_its_entry(tmp_path: Path):
    """``dist/`` is build output unless the function's entry is there (tsc's outDir): then its files are the code
    served. TypeScript sources and node_modules/ are never edits; package.json always is."""
    stack = LocalStack(workdir=tmp_path / "logs")
    for main, dist_is_served in (("index.js", False), ("dist/index.js", True)):
        folder = tmp_path / main.replace("/", "-")
        folder.mkdir()
        (folder / "package.json").write_text(json.dumps({"main": main}))
        is_edit = edit_filter(stack, LocalFunction(folder, "main", "t"))
        assert is_edit(Change.modified, str(folder / "package.json"))
        assert is_edit(Change.modified, str(folder / main))
        assert is_edit(Change.added, str(folder / "dist" / "lib.js")) is dist_is_served
        assert not is_edit(Change.modified, str(folder / "src" / "index.ts"))
        assert not is_edit(Change.modified, str(folder / "dist" / "index.d.ts"))
        assert not is_edit(Change.added, str(folder / "node_modules" / "left-pad" / "index.js"))
    python = tmp_path / "python"
    python.mkdir()
    is_edit = edit_filter(stack, LocalFunction(python / "main.py", "main", "t"))
    assert is_edit(Change.modified, str(python / "dist" / "data.ts"))  # a Python function's folder: any file


@asset
def node_sales(context, pipes: PipesPubSubClient) -> MaterializeResult:
    return pipes.run(context=context, payload={"dl_bucket": "gs://node-lake", "rows": 4}).get_materialize_result()


@pytest.mark.gcf_pipes(function="examples/node_function/index.js:main")
def test_the_pytest_fixture_serves_a_node_function(gcf_pipes, capfd: pytest.CaptureFixture[str]):
    """The marker names the ``.js`` file (relative to the rootdir); the dev tests name a folder."""
    assert gcf_pipes.function.language == "nodejs"
    gcf_pipes.stack.create_buckets(["node-lake"])
    result = materialize([node_sales], resources={"pipes": gcf_pipes.client})
    [materialization] = result.asset_materializations_for_node("node_sales")
    assert materialization.metadata["row_count"].value == 4
    assert materialization.metadata["runtime"].value.startswith("node ")
    assert "printed by the handler: 4 rows" in capfd.readouterr().out


def test_dev_materializes_the_node_function_from_dagster(dev: Dev):
    from dagster_graphql import DagsterGraphQLClient

    dev.output.wait_for("Serving dagster-webserver", timeout=120)
    client = DagsterGraphQLClient("127.0.0.1", port_number=dev.port)
    deadline = time.monotonic() + 90
    while True:  # the webserver answers before its code location is loaded
        assert dev.process.poll() is None, dev.output.tail()
        try:
            run_id = client.submit_job_execution("__ASSET_JOB")
            break
        except Exception:
            assert time.monotonic() < deadline, dev.output.tail()
            time.sleep(0.25)
    while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, dev.output.tail()
        time.sleep(0.25)
    assert status == "SUCCESS", dev.output.tail(60)
    with DagsterInstance.from_config(str(dev.home)) as instance:
        logs = [e.user_message for e in instance.all_logs(run_id) if e.dagster_event is None]
        event = instance.get_latest_materialization_event(AssetKey("my_table"))
    assert any(line.startswith("running version ") for line in logs), logs
    assert event is not None and event.run_id == run_id
    assert event.asset_materialization.metadata["rows"].value == 3  # the asset's payload, read by the JS handler
