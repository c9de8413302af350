"""The local stack itself: clear errors when a piece is missing, nothing left running after it stops or after
its process is killed, a dead server reported at the next use, logs kept where the user can find them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.cloud import pubsub_v1

from dagster_gcf_pipes.local import local_stack
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, LocalStackError
from tests import REPO_ROOT

EXAMPLE_FUNCTION = "examples/sales/function/main.py"
LOUD_FUNCTION = """
print("the loud function is loaded", flush=True)

def main(event):
    pass
"""


@pytest.fixture
def loud_function(tmp_path: Path) -> Path:
    """A function that says when it is loaded, so that its server's log is not empty."""
    source = tmp_path / "loud" / "main.py"
    source.parent.mkdir()
    source.write_text(LOUD_FUNCTION)
    return source


def test_missing_pubsub_emulator_says_what_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(local_stack, "PUBSUB_EMULATOR", tmp_path / "no-emulator-here")
    with pytest.raises(LocalStackError, match="apt-get install google-cloud-cli-pubsub-emulator openjdk-17-jre-headless"):
        LocalStack(workdir=tmp_path).__enter__()


def test_stack_stops_every_process_it_started_and_keeps_its_logs_in_a_new_workdir(tmp_path: Path, caplog, loud_function):
    workdir = tmp_path / "not" / "there" / "yet"
    caplog.set_level(logging.INFO, logger="dagster_gcf_pipes.local")
    functions = [LocalFunction(loud_function, "main", "stack-test-trigger")]
    with LocalStack(functions=functions, topics=["stack-test-replies"], buckets=["stack-test-bucket"], workdir=workdir) as stack:
        pids = [server.process.pid for server in stack.servers.values()]
        assert sorted(stack.servers) == [
            "dispatcher-stack-test-trigger", "fake-gcs-server", "function-stack-test-trigger", "pubsub-emulator",
            "pubsub-semantics",  # the production-semantics layer, on by default
        ]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # each server ran in its own process group: none of its processes is left
    assert f"the servers' logs are in {workdir}" in caplog.text
    assert "the loud function is loaded" in (workdir / "function-stack-test-trigger.log").read_text()  # kept
    assert "delivering" in (workdir / "dispatcher-stack-test-trigger.log").read_text()


# ---------------------------------------------------------------------------------- the stack's process killed

STACK_IN_A_CHILD = f"""
import sys, threading, time
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
stack = LocalStack(functions=[LocalFunction({EXAMPLE_FUNCTION!r}, "main", "orphan-trigger")], topics=[], buckets=[])
if sys.argv[1] == "thread":  # started by a thread that has ended by the time the process is killed
    starter = threading.Thread(target=stack.__enter__)
    starter.start()
    starter.join()
else:
    stack.__enter__()
stack.check()
print(stack.workdir, flush=True)
time.sleep(600)
"""


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
    return table


def descendants(root: int) -> dict[int, str]:
    """Every living process below ``root``: pid -> command line."""
    table = process_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, cmdline) in table.items():
            if ppid == parent and state != "Z" and pid not in found:
                found[pid] = cmdline
                frontier.append(pid)
    return found


def alive(pids: dict[int, str]) -> dict[int, str]:
    table = process_table()
    return {pid: cmd for pid, cmd in pids.items() if pid in table and table[pid][1] != "Z" and table[pid][2] == cmd}


@pytest.mark.parametrize("started_by", ["main", "thread"])
def test_sigkill_of_the_stacks_process_leaves_nothing_running(started_by: str):
    parent = subprocess.Popen(
        [sys.executable, "-c", STACK_IN_A_CHILD, started_by], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    children: dict[int, str] = {}
    try:
        printed = parent.stdout.readline().strip()  # the stack is up
        assert printed, parent.stderr.read()
        workdir = Path(printed)
        children = descendants(parent.pid)
        commands = list(children.values())
        # what the stack starts, grandchildren included: java (the emulator's launcher execs it), the
        # Functions Framework's gunicorn master and its worker, the dispatcher, fake-gcs-server, the watchdog
        assert any("java" in c and "pubsub-emulator" in c for c in commands), commands
        assert sum("functions_framework" in c for c in commands) == 2, commands
        assert any("dagster_gcf_pipes.local.dispatcher" in c for c in commands), commands
        assert any("fake-gcs-server" in c for c in commands), commands

        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(children) == {}, f"left running after SIGKILL of their parent: {alive(children)}"
        assert (workdir / "function-orphan-trigger.log").exists()  # the default workdir is kept for the user
    finally:
        parent.kill()
        for pid in alive(children):  # before the fix: do not leave them to the next test
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------- a server dies


def test_a_dead_function_server_fails_the_next_use_at_once_with_the_end_of_its_log(tmp_path: Path, loud_function):
    with LocalStack(functions=[LocalFunction(loud_function, "main", "dying-trigger")], topics=[], buckets=[], workdir=tmp_path) as stack:
        server = stack.servers["function-dying-trigger"]
        group_before = descendants(server.process.pid)  # the gunicorn worker
        stack.check()  # all alive: no error

        os.kill(server.process.pid, signal.SIGKILL)  # the master only, as a crash or the OOM killer would
        server.process.wait(timeout=10)

        for use in (stack.check, lambda: stack.activated().__enter__(), lambda: stack.function_server("dying-trigger")):
            with pytest.raises(LocalStackError) as failure:
                use()
            message = str(failure.value)
            assert f"function-dying-trigger (pid {server.process.pid}) was killed by SIGKILL" in message
            assert str(server.log_path) in message and "the loud function is loaded" in message  # its log's end
        # its worker did not outlive it (SIGKILL is delivered asynchronously: give a loaded machine a moment)
        deadline = time.monotonic() + 10
        while alive(group_before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_before and alive(group_before) == {}


# ---------------------------------------------------------------------------------- a function that cannot start


def test_a_function_named_wrong_is_refused_in_one_line_before_anything_starts(tmp_path: Path, loud_function: Path):
    not_parsing = loud_function.parent / "not_parsing.py"
    not_parsing.write_text(LOUD_FUNCTION + "\ndef broken(:\n")
    expected = {  # the build's check (function/build.py): the fix in one line
        "loud/main.py:count_rows": "defines no 'count_rows': decorate your handler with @pipes_function",
        "loud/main.py:main": "'main' is not decorated with @pipes_function",
        "loud/not_parsing.py:main": "not_parsing.py:7: does not parse",
    }
    for spec, problem in expected.items():
        with pytest.raises(LocalStackError) as refused:
            local_stack.parse_function_spec(spec, tmp_path)
        assert problem in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_a_function_server_that_does_not_start_leaves_the_stack_usable(stack: LocalStack, tmp_path: Path):
    failing_at_import = tmp_path / "failing.py"
    failing_at_import.write_text("raise RuntimeError('the database is not there')\n\ndef main(event):\n    pass\n")
    try:
        with pytest.raises(LocalStackError, match="the database is not there"):  # the end of its log
            stack.add_function(LocalFunction(failing_at_import, "main", "unserved-trigger"))
        stack.check()  # the server that never started is not taken for a dead one
    finally:
        stack.servers.pop("function-unserved-trigger", None)


CRASHING_FUNCTION = """
import ctypes

def main(event):
    ctypes.string_at(0)  # a native library's crash: SIGSEGV in the worker
"""


def test_a_worker_crash_is_said_in_the_functions_log(tmp_path: Path):
    """The Functions Framework's gunicorn logs a worker killed by a signal only at warning level, below its default
    (error), and Python prints no stack on SIGSEGV without faulthandler: before, the log showed nothing at all."""
    source = tmp_path / "crashing" / "main.py"
    source.parent.mkdir()
    source.write_text(CRASHING_FUNCTION)
    with LocalStack(functions=[LocalFunction(source, "main", "crash-trigger")], topics=[], buckets=[], workdir=tmp_path) as stack:
        with stack.activated(), pubsub_v1.PublisherClient() as publisher:
            publisher.publish(publisher.topic_path(stack.project, "crash-trigger"), b"{}").result(timeout=30)
        log = stack.servers["function-crash-trigger"].log_path
        deadline = time.monotonic() + 60
        while "was sent SIGSEGV" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "was sent SIGSEGV" in text, text[-3000:]
