"""The local dev loop on a user's own code, in a folder outside the checkout: ``gcf-pipes up`` and ``gcf-pipes dev``
serve the user's function and create what the user's resource names; an edit of the function is served at
the next trigger with no restart by hand; the pytest plugin's fixture works from a user project."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, MaterializeResult, asset, materialize

from dagster_gcf_pipes.local.local_stack import free_port
from dagster_gcf_pipes.orchestrator import PipesPubSubClient
from tests.integration.processes import Output
from tests.integration.test_local_stack import alive, descendants, process_table

GCF_PIPES = Path(sys.executable).parent / "gcf-pipes"

FUNCTION = '''
    from dagster_gcf_pipes.function import pipes_function

    VERSION = "one"
    print(f"my_function version {VERSION} is loaded")


    @pipes_function
    def main(pipes, payload):
        pipes.log.info(f"running version {VERSION}")
        pipes.report_asset_materialization(metadata={"version": VERSION, "rows": payload.get("rows", 0)})
'''

DEFINITIONS = '''
    from dagster import AssetExecutionContext, Definitions, MaterializeResult, asset

    from dagster_gcf_pipes.orchestrator import PipesPubSubClient


    @asset
    def my_table(context: AssetExecutionContext, pipes: PipesPubSubClient) -> MaterializeResult:
        return pipes.run(context=context, payload={"rows": 3}).get_materialize_result()


    defs = Definitions(
        assets=[my_table],
        resources={"pipes": PipesPubSubClient(project="my-project", trigger_topic="my-trigger",
                                              reply_topic="my-replies", bucket="my-payloads", startup_timeout=60)},
    )
'''


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "my-project"
    write(root, {"my_function/main.py": FUNCTION, "my_defs.py": DEFINITIONS})
    return root


@pytest.fixture
def gcf_pipes_command(project: Path) -> Iterator[callable]:
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Output]:
        process = subprocess.Popen([str(GCF_PIPES), *args], cwd=project, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                                   start_new_session=True)
        started.append(process)
        return process, Output(process)

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def materialize_my_table(project: Path, environment: dict[str, str]) -> tuple[list[str], dict]:
    """Materialize the user's asset from this process against the stack ``up`` started."""
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    sys.path.insert(0, str(project))
    try:
        sys.modules.pop("my_defs", None)
        import my_defs

        with DagsterInstance.ephemeral() as instance:
            result = materialize([my_defs.my_table], resources=my_defs.defs.resources, instance=instance)
            assert result.success
            logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
            [event] = result.get_asset_materialization_events()
            metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
            return logs, metadata
    finally:
        sys.path.remove(str(project))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def started_up(gcf_pipes_command) -> tuple[subprocess.Popen, Output, int, dict[str, str]]:
    """``gcf-pipes up`` on the user's function: the process, its output, the line it is up at, its exports."""
    process, output = gcf_pipes_command("up", "-f", "my_defs.py", "--function", "my_function/main.py:main")
    last = output.wait_for("Ctrl-C stops it.")
    environment = dict(line.removeprefix("export ").split("=", 1) for line in output.lines if line.startswith("export "))
    return process, output, last, environment


def test_up_serves_the_users_function_and_reloads_it_after_an_edit(project: Path, gcf_pipes_command):
    process, output, last, environment = started_up(gcf_pipes_command)
    assert environment["GOOGLE_CLOUD_PROJECT"] == "my-project"  # the project the user's resource names

    logs, metadata = materialize_my_table(project, environment)
    assert "running version one" in logs and metadata["version"] == "one"

    edited = time.monotonic()
    source = project / "my_function" / "main.py"
    source.write_text(source.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
    output.wait_for("serves the new code", start=last)
    print(f"edit -> new code serving: {time.monotonic() - edited:.2f} s")

    logs, metadata = materialize_my_table(project, environment)
    assert "running version two" in logs and metadata["version"] == "two"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


CRASHING_AT_START = """
    # a native crash at start, while the project holds the file `crash-at-start` (outside the watched folder)
    import os
    import threading
    from pathlib import Path

    if (Path(__file__).parent.parent / "crash-at-start").exists():
        threading.Timer(1, os._exit, (3,)).start()
"""


def server_pid(gcf_pipes: subprocess.Popen, command: str) -> int:
    """The server ``gcf-pipes`` started whose command line holds ``command`` (not its own children)."""
    table = process_table()
    [pid] = [pid for pid, cmdline in descendants(gcf_pipes.pid).items()
             if command in cmdline and table[pid][0] == gcf_pipes.pid]
    return pid


def test_up_restarts_a_function_server_that_died_and_says_why(project: Path, gcf_pipes_command):
    process, output, last, environment = started_up(gcf_pipes_command)
    pid = server_pid(process, "functions_framework")
    os.kill(pid, signal.SIGKILL)  # the master only, as a segfault or the OOM killer would

    said = output.wait_for(f"function-my-trigger (pid {pid}) was killed by SIGKILL", timeout=30, start=last)
    report = "\n".join(output.lines[said:said + 40])
    assert "function-my-trigger.log" in report and "my_function version one is loaded" in report, report  # the end of its log
    output.wait_for("serves its code again", start=said)

    logs, metadata = materialize_my_table(project, environment)  # a trigger published after the crash is served
    assert "running version one" in logs and metadata["version"] == "one"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_up_stops_restarting_a_crash_looping_function_until_its_folder_is_edited(project: Path, gcf_pipes_command):
    source = project / "my_function" / "main.py"
    source.write_text(textwrap.dedent(CRASHING_AT_START) + source.read_text())
    process, output, last, environment = started_up(gcf_pipes_command)
    (project / "crash-at-start").touch()
    os.kill(server_pid(process, "functions_framework"), signal.SIGKILL)

    gave_up = output.wait_for("it will be restarted after the next edit of", timeout=60, start=last)
    assert "function-my-trigger" in output.lines[gave_up], output.tail()

    (project / "crash-at-start").unlink()
    source.write_text(source.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
    output.wait_for("serves the new code", start=gave_up)
    logs, metadata = materialize_my_table(project, environment)
    assert "running version two" in logs and metadata["version"] == "two"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_up_stops_everything_and_fails_when_an_emulator_dies(project: Path, gcf_pipes_command):
    process, output, last, _ = started_up(gcf_pipes_command)
    servers = descendants(process.pid)
    pid = server_pid(process, "fake-gcs-server")
    os.kill(pid, signal.SIGKILL)

    assert process.wait(timeout=60) != 0, output.tail()
    said = output.wait_for(f"fake-gcs-server (pid {pid}) was killed by SIGKILL", timeout=10, start=last)
    assert "fake-gcs-server.log" in "\n".join(output.lines[said:]), output.tail()
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while alive(servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(servers) == {}, "left running after gcf-pipes up failed"


def test_dev_runs_dagster_on_the_users_code_location(project: Path, gcf_pipes_command, tmp_path: Path):
    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    port = free_port()
    home = tmp_path / "dagster-home"
    home.mkdir()
    process, output = gcf_pipes_command("dev", "-f", "my_defs.py", "--function", "my_function/main.py",
                                        "--port", str(port), env={"DAGSTER_HOME": str(home)})
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, output.tail()
        try:
            run_id = client.submit_job_execution("__ASSET_JOB")
            break
        except (DagsterGraphQLClientError, OSError, Exception):  # the UI or its code location is still loading
            assert time.monotonic() < deadline, output.tail()
            time.sleep(1)
    while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, output.tail()
        time.sleep(0.5)
    assert status == "SUCCESS", output.tail(60)
    with DagsterInstance.from_config(str(home)) as instance:
        logs = [e.user_message for e in instance.all_logs(run_id) if e.dagster_event is None]
    assert "running version one" in logs

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


USER_TEST = '''
    import pytest
    from dagster import materialize

    from my_defs import my_table


    @pytest.mark.gcf_pipes(function="my_function/main.py:main")
    def test_my_table(gcf_pipes):
        result = materialize([my_table], resources={"pipes": gcf_pipes.client})
        assert result.success
        [materialization] = result.asset_materializations_for_node("my_table")
        assert materialization.metadata["rows"].value == 3
'''


def test_the_pytest_fixture_serves_the_users_function(project: Path):
    write(project, {"tests/test_my_table.py": USER_TEST, "pytest.ini": "[pytest]\npythonpath = .\n"})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


@pytest.mark.gcf_pipes(function="tests/functions/main.py:main")
def test_the_projects_own_tests_use_the_same_fixture(gcf_pipes):
    @asset
    def echoed(context, pipes: PipesPubSubClient) -> MaterializeResult:
        return pipes.run(context=context, payload={"n": 42}).get_materialize_result()

    result = materialize([echoed], resources={"pipes": gcf_pipes.client})
    assert result.success
    [materialization] = result.asset_materializations_for_node("echoed")
    assert materialization.metadata["n"].value == 42
    assert os.environ["PUBSUB_EMULATOR_HOST"] == gcf_pipes.stack.environment["PUBSUB_EMULATOR_HOST"]


def test_the_local_stack_creates_every_topic_of_reply_topics(tmp_path: Path):
    from dagster_gcf_pipes.local.dev import plan_from_code_location

    definitions = tmp_path / "sharded_defs.py"
    definitions.write_text(textwrap.dedent("""
        from dagster import Definitions
        from dagster_gcf_pipes.orchestrator import PipesPubSubClient

        defs = Definitions(resources={"pipes_pubsub": PipesPubSubClient(
            trigger_topic="t", reply_topics=["replies-0", "replies-1", "replies-2"], bucket="b")})
    """))
    plan = plan_from_code_location(None, str(definitions))
    assert plan.trigger_topics == ["t"] and plan.topics == {"replies-0", "replies-1", "replies-2"}
