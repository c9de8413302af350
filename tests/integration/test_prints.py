"""What a function prints reaches its Dagster step's captured stdout and stderr (its compute logs), and the
function's own log still has it.

Each run is a Dagster run in a process of its own with a persistent instance (a temporary ``DAGSTER_HOME``),
so its compute log manager captures the step's stdout and stderr as it does under ``dagster dev``; the test
reads them back through ``instance.compute_log_manager``. Run as a module, this file is that process:
``python -m tests.integration.test_prints PAYLOAD_JSON`` materializes one asset in ``$DAGSTER_HOME``."""

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, asset, materialize
from dagster._core.instance.ref import InstanceRef

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, ManagedProcess
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from tests.conftest import TEST_TOPIC
from tests.faults.test_process_faults import wait_for_object
from tests.integration.helpers import make_client


@dataclass
class StepOutput:
    success: bool
    stdout: str
    stderr: str


def start_run(
    home: Path, payload: dict[str, Any] | list[dict[str, Any]], trigger_topic: str = TEST_TOPIC
) -> subprocess.Popen[str]:
    """A Dagster run of one asset calling the test function with ``payload``, in a process of its own."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_prints", json.dumps(payload), trigger_topic],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def step_output(home: Path, process: subprocess.Popen[str]) -> StepOutput:
    """Wait for the run in ``home`` to end; its success and what its compute logs captured."""
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        (run,) = instance.get_runs()
        (captured,) = instance.all_logs(run.run_id, of_type=DagsterEventType.LOGS_CAPTURED)
        manager = instance.compute_log_manager
        log_key = manager.build_log_key_for_run(run.run_id, captured.dagster_event.event_specific_data.file_key)
        data = manager.get_log_data(log_key)
        success = run.is_success
    return StepOutput(success, (data.stdout or b"").decode(), (data.stderr or b"").decode())


def run_prints(
    home: Path, payload: dict[str, Any] | list[dict[str, Any]], trigger_topic: str = TEST_TOPIC
) -> StepOutput:
    return step_output(home, start_run(home, payload, trigger_topic))


def expected_lines(tag: str, stream: str, count: int) -> list[str]:
    return [f"{tag} {stream} {i}" for i in range(count)]


def tagged(text: str, tag: str, stream: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{tag} {stream} ")]


@pytest.fixture
def own_function(stack: LocalStack) -> Iterator[Callable[..., tuple[str, ManagedProcess]]]:
    """Serves the test function on a server of the test's own (no other test's session runs there):
    ``own_function(**env)`` gives its trigger topic and server."""
    topics: list[str] = []

    def start(**env: str) -> tuple[str, ManagedProcess]:
        topics.append(f"prints-{uuid.uuid4().hex[:8]}")
        return topics[-1], stack.add_function(LocalFunction("tests/functions/main.py", "main", topics[-1], env=env))

    yield start
    for topic in topics:
        stack.servers.pop(f"function-{topic}").stop()


def test_prints_reach_the_step_stdout_and_stderr_and_the_function_log(tmp_path: Path, own_function):
    tag = f"solo-{uuid.uuid4().hex[:8]}"
    topic, server = own_function()
    step = run_prints(tmp_path / "home", {"scenario": "print", "tag": tag, "prints": 300}, topic)

    assert step.success, step
    assert tagged(step.stdout, tag, "out") == expected_lines(tag, "out", 300)
    assert tagged(step.stderr, tag, "err") == expected_lines(tag, "err", 300)
    assert f"{tag} library warning" in step.stderr.splitlines()  # logging's last-resort handler: sys.stderr
    assert f"{tag} handler made at import" in step.stderr.splitlines()  # a handler holding the original stderr
    assert f"{tag} last line without newline" in step.stdout  # the rest, sent as the session ended
    assert f"{tag} from a thread" in step.stdout.splitlines()  # the only session running owns it
    assert f"{tag} structured line" not in step.stdout + step.stderr  # the library's JSON lines stay out

    function_log = server.log_path.read_text().splitlines()
    assert [line for line in function_log if line.startswith(f"{tag} out ")] == expected_lines(tag, "out", 300)
    assert [line for line in function_log if line.startswith(f"{tag} err ")] == expected_lines(tag, "err", 300)
    (structured,) = [json.loads(line) for line in function_log if f"{tag} structured line" in line]
    assert structured["severity"] == "INFO" and structured["message"] == f"{tag} structured line"


def test_two_concurrent_sessions_on_one_process_each_print_into_their_own_step(stack: LocalStack, tmp_path: Path):
    """Two runs at once, each in its own process with its own captured output; both sessions are served
    by the one Functions Framework process and print while both are running (they wait for each other)."""
    tags = [f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"]
    payloads = [
        {"scenario": "print", "tag": tag, "token": tag, "peer": peer, "prints": 500}
        for tag, peer in zip(tags, reversed(tags), strict=True)
    ]
    runs = [(tmp_path / tag, start_run(tmp_path / tag, payload)) for tag, payload in zip(tags, payloads, strict=True)]
    steps = [step_output(home, process) for home, process in runs]

    for step, tag, other in zip(steps, tags, reversed(tags), strict=True):
        assert step.success, step
        assert tagged(step.stdout, tag, "out") == expected_lines(tag, "out", 500)
        assert tagged(step.stderr, tag, "err") == expected_lines(tag, "err", 500)
        assert other not in step.stdout and other not in step.stderr


@pytest.mark.parametrize("execution_id_logging", [False, True], ids=["plain", "execution-id-logging"])
def test_a_session_starting_while_another_prints_loses_none_of_its_lines(
    stack: LocalStack, tmp_path: Path, own_function, execution_id_logging: bool
):
    """One session prints without a pause while a second one starts on the same process, then both print on.
    The Functions Framework's execution-id logging (LOG_EXECUTION_ID=true) swaps sys.stdout/sys.stderr for
    its JSON wrappers around each request."""
    # faulthandler: a crash of the function's process leaves its report in the log (gunicorn only starts another)
    topic, server = own_function(LOG_EXECUTION_ID="true", PYTHONFAULTHANDLER="1") if execution_id_logging else (TEST_TOPIC, None)
    first, second = f"first-{uuid.uuid4().hex[:8]}", f"second-{uuid.uuid4().hex[:8]}"
    first_run = start_run(tmp_path / first, {"scenario": "print", "tag": first, "token": first, "print_until": second,
                                             "prints": 200}, topic)
    wait_for_object(stack.project, f"started/{first}", timeout=120)  # a fresh Dagster process's start, under load too
    second_run = start_run(tmp_path / second, {"scenario": "print", "tag": second, "token": second, "prints": 200}, topic)
    steps = {first: step_output(tmp_path / first, first_run), second: step_output(tmp_path / second, second_run)}

    log = server.log_path.read_text(errors="replace") if server is not None else ""
    assert "Fatal Python error" not in log, log[log.find("Fatal Python error"):][:6000]
    for tag, other in ((first, second), (second, first)):
        step = steps[tag]
        assert step.success, step
        for stream, text in (("out", step.stdout), ("err", step.stderr)):
            lines = tagged(text, tag, stream)
            assert len(lines) >= 200 and lines == expected_lines(tag, stream, len(lines))  # none missing
        assert other not in step.stdout and other not in step.stderr


def test_a_request_ending_while_another_prints_does_not_crash_the_process(tmp_path: Path):
    """The Functions Framework's execution-id logging puts its wrapper in sys.stdout around each request, and
    puts back what it found at the end. CPython's print() holds sys.stdout by a borrowed reference while it
    writes (python/cpython#130163): if a request ends while another one is inside a print, and that swap
    drops the last reference to the proxy the print writes through, the print goes on through freed memory and
    the process dies (SIGSEGV, or a nonsensical AttributeError). The test above meets it now and then on the
    local stack; here the interleaving is exact: the framework's own wrappers and redirects, two requests on
    two threads of one process."""
    probe = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_prints", "--swap-under-print", str(tmp_path)],
        env={**os.environ, "PYTHONFAULTHANDLER": "1"}, capture_output=True, text=True, timeout=120, check=False,
    )

    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-5000:]
    assert forwarded_lines(tmp_path / "first.jsonl") == ["first before", "first held", "first after"]
    assert forwarded_lines(tmp_path / "second.jsonl") == ["second ends"]


def forwarded_lines(messages: Path) -> list[str]:
    """The stdout lines a session forwarded, from its Pipes messages file."""
    sent = [json.loads(line) for line in messages.read_text().splitlines()]
    text = "".join(m["params"]["text"] for m in sent if m["method"] == "log_external_stream" and m["params"]["stream"] == "stdout")
    return text.splitlines()


def _swap_under_print(folder: Path) -> None:
    """The probe process of the test above: two requests through the framework's ``set_execution_context``
    (one pair of redirects for every request, as the framework makes them), each a Pipes session capturing
    its prints; the second ends while the first is held inside a print, by the stream under the framework's
    wrapper."""
    import flask
    from dagster_pipes import (
        PipesContext,
        PipesDefaultContextLoader,
        PipesDefaultMessageWriter,
        PipesMappingParamsLoader,
        encode_param,
    )
    from functions_framework.execution_id import set_execution_context

    from dagster_gcf_pipes.function.stdio import capture_output

    first_capturing, second_capturing, held, second_ended = (threading.Event() for _ in range(4))

    class Console:
        """The process's stdout: a write of the held line waits until the second request has ended."""

        def write(self, text: str) -> int:
            if "first held" in text:
                held.set()
                second_ended.wait(30)
            return sys.__stdout__.write(text)

        def flush(self) -> None:
            sys.__stdout__.flush()

    def handler(tag: str) -> None:
        params = {"DAGSTER_PIPES_CONTEXT": encode_param({"data": {}}),
                  "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(folder / f"{tag}.jsonl")})}
        pipes = PipesContext(PipesMappingParamsLoader(params), PipesDefaultContextLoader(), PipesDefaultMessageWriter())
        with pipes, capture_output(pipes):
            if tag == "first":
                print("first before")
                first_capturing.set()
                second_capturing.wait(30)
                print("first held")  # through the proxy the second request put in place
                print("first after")
            else:
                second_capturing.set()
                held.wait(30)
                print("second ends")

    sys.stdout = Console()  # what the framework's wrapper wraps: it is made with the stream of that moment
    app = flask.Flask("probe")
    view = set_execution_context(flask.request, enable_id_logging=True)(handler)

    def request(tag: str) -> None:
        with app.test_request_context():
            view(tag)
        if tag == "second":
            second_ended.set()  # the framework has put back the stream it found when the request began

    first = threading.Thread(target=request, args=("first",))
    first.start()
    first_capturing.wait(30)
    second = threading.Thread(target=request, args=("second",))
    second.start()
    for thread in (first, second):
        thread.join(60)


def test_fan_out_shards_prints_carry_their_shard(stack: LocalStack, tmp_path: Path):
    tags = [f"s{shard}-{uuid.uuid4().hex[:8]}" for shard in range(2)]
    step = run_prints(tmp_path / "home", [{"scenario": "print", "tag": tag, "prints": 100} for tag in tags])

    assert step.success, step
    for shard, tag in enumerate(tags):
        prefix = f"[shard {shard}] "
        assert [line for line in step.stdout.splitlines() if f"{tag} out " in line] == [
            prefix + line for line in expected_lines(tag, "out", 100)
        ]
        assert prefix + f"{tag} err 99" in step.stderr.splitlines()


def _materialize(payload: dict[str, Any] | list[dict[str, Any]], trigger_topic: str) -> None:
    """The run process: one asset, the test function (a fan-out for a list of payloads), the instance in
    ``$DAGSTER_HOME``."""

    @asset(name="prints_asset")
    def prints_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        if isinstance(payload, list):
            return pipes_pubsub.run_many(context=context, payloads=payload).get_materialize_result()
        return pipes_pubsub.run(context=context, payload=payload).get_materialize_result()

    with DagsterInstance.get() as instance:
        materialize([prints_asset], resources={"pipes_pubsub": make_client(trigger_topic=trigger_topic)}, instance=instance, raise_on_error=False)


if __name__ == "__main__":
    if sys.argv[1] == "--swap-under-print":
        _swap_under_print(Path(sys.argv[2]))
    else:
        _materialize(json.loads(sys.argv[1]), sys.argv[2])
