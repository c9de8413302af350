"""The library as a team adopts it: installed from a wheel into fresh venvs, next to a user's own project in a
folder outside the checkout, whose own modules are named ``function.py``, ``shared/`` and ``orchestrator.py``.

* the function side's extra installs no dagster, and its ``gcf-pipes build`` console script builds the user's
  function (two modules, a data file, its own requirements);
* the Dagster side's venv materializes the user's asset against the user's function on the local stack.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from bench.footprint import fresh_venv, library_wheel

USER_FILES = {
    # the user's own modules, with the names the library used to take
    "function.py": "ROWS = 7  # the user's own module called function\n",
    "shared/__init__.py": "REGIONS_FILE = 'regions.json'  # the user's own package called shared\n",
    "orchestrator.py": '''
        """The user's Dagster code, in their own module called orchestrator."""
        import os

        import function  # the user's function.py, not the library's
        import shared    # the user's shared/, not the library's
        from dagster import AssetExecutionContext, MaterializeResult, asset

        from dagster_gcf_pipes.orchestrator import PipesPubSubClient


        @asset
        def regional_sales(context: AssetExecutionContext, pipes: PipesPubSubClient) -> MaterializeResult:
            payload = {"rows": function.ROWS, "regions_file": shared.REGIONS_FILE}
            return pipes.run(context=context, payload=payload).get_materialize_result()


        def resource() -> PipesPubSubClient:
            return PipesPubSubClient(project=os.environ["GOOGLE_CLOUD_PROJECT"], trigger_topic="user-trigger",
                                     reply_topic="user-replies", bucket="user-payloads", startup_timeout=60)
    ''',
    # the user's Cloud Function: main.py, a second module, a data file and its own requirements
    "my_function/main.py": '''
        from dagster_gcf_pipes.function import pipes_function

        from helpers import summarize


        @pipes_function
        def main(pipes, payload):
            summary = summarize(int(payload["rows"]), payload["regions_file"])
            pipes.log.info(f"summarized {summary['rows']} rows")
            pipes.report_asset_materialization(metadata={"summary": {"raw_value": summary, "type": "json"}})
    ''',
    "my_function/helpers.py": '''
        import json
        from pathlib import Path

        import six  # the function's own requirement


        def summarize(rows, regions_file):
            regions = json.loads((Path(__file__).parent / "data" / regions_file).read_text())
            return {"rows": rows, "regions": regions, "six": six.__name__}
    ''',
    "my_function/data/regions.json": '["emea", "apac"]\n',
    "my_function/requirements.txt": "six>=1.16\n",
}

RUN_ON_LOCAL_STACK = '''
    import json
    from dagster import DagsterInstance, materialize
    from dagster_gcf_pipes.local import LocalFunction, LocalStack

    function = LocalFunction("my_function/main.py", "main", "user-trigger")
    with LocalStack(functions=[function], topics=["user-replies"], buckets=["user-payloads"]) as stack:
        with stack.activated(), DagsterInstance.ephemeral() as instance:
            import orchestrator
            result = materialize([orchestrator.regional_sales], resources={"pipes": orchestrator.resource()},
                                 instance=instance)
            logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
            [event] = result.get_asset_materialization_events()
            metadata = event.event_specific_data.materialization.metadata
            print(json.dumps({"success": result.success, "logs": logs, "summary": metadata["summary"].value}))
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return library_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "user-project"
    for name, text in USER_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())
    return root


def test_the_function_side_installs_without_dagster_and_builds_the_users_function(wheel: Path, project: Path):
    python = fresh_venv(project.parent / "function-venv", f"{wheel}[function]", compile_bytecode=False, with_uv=True)
    probe = subprocess.run([str(python), "-c", "import dagster"], capture_output=True, text=True)
    assert "No module named 'dagster'" in probe.stderr
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                               check=True)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert {"dagster-gcf-pipes", "dagster-pipes", "functions-framework"} <= names and "dagster" not in names

    build = subprocess.run([str(python.parent / "gcf-pipes"), "build", "my_function", "build/out"], cwd=project,
                           capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, build.stderr
    # someone with only the wheel has the deployment guide the build's closing hint names: it is installed
    guide = Path(build.stdout.strip().rsplit(" installed with dagster-gcf-pipes at ", 1)[1])
    assert guide.is_relative_to(python.parent.parent) and guide.name == "deploy.md", build.stdout
    assert "## 5. Build and deploy" in guide.read_text(), build.stdout
    out = project / "build" / "out"
    assert (out / "main.py").read_text() == (project / "my_function" / "main.py").read_text()
    assert (out / "helpers.py").is_file() and (out / "data" / "regions.json").is_file()
    assert (out / "dagster_gcf_pipes" / "function" / "entrypoint.py").is_file()
    assert (out / "dagster_gcf_pipes" / "shared" / "protocol.py").is_file()
    assert not (out / "dagster_gcf_pipes" / "orchestrator").exists()
    requirements = [line for line in (out / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements[0] == "six>=1.16"
    assert any(r.startswith("dagster-pipes") for r in requirements)
    assert any(r.startswith("functions-framework") for r in requirements)
    assert not any(r.split(">")[0].split("=")[0] == "dagster" for r in requirements)


def test_the_dagster_side_materializes_the_users_asset_on_the_local_stack(wheel: Path, project: Path):
    python = fresh_venv(
        project.parent / "dagster-venv", f"{wheel}[local]", "six>=1.16", compile_bytecode=False, with_uv=True
    )
    (project / "run_locally.py").write_text(textwrap.dedent(RUN_ON_LOCAL_STACK))
    run = subprocess.run([str(python), "run_locally.py"], cwd=project, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["success"]
    assert "summarized 7 rows" in result["logs"]
    assert result["summary"] == {"rows": 7, "regions": ["emea", "apac"], "six": "six"}
