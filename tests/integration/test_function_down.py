"""A local function that is down fails the step within seconds, with its error (issue 25, item 1).

With ``LocalFunction(fail_fast=True)`` (what ``gcf-pipes dev``/``up`` and the pytest plugin serve), the dispatcher
answers a trigger in the function's place when the function server keeps refusing connections, or when the
function answers with an error (it failed outside its Pipes session): the step then fails with a
``CloudFunctionError`` naming the function and quoting its log, instead of waiting out its startup_timeout
and blaming deployment. Without the flag (production, the tests of Eventarc's retries) nothing answers for
the function."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dagster import materialize

from dagster_gcf_pipes.local.dispatcher import read_meter
from dagster_gcf_pipes.local.local_stack import LocalStackError
from dagster_gcf_pipes.orchestrator import CloudFunctionError
from tests.integration.helpers import make_client, run_asset
from tests.integration.test_dev_loop import (  # noqa: F401 - fixtures
    MISWRAPPED,
    environ,
    gcf_pipes_command,
    project,
    started_up,
    write,
)
from tests.integration.test_dispatcher import own_function, records  # noqa: F401 - fixtures

PIPES_FUNCTION = """
from dagster_gcf_pipes.function import pipes_function


@pipes_function
def main(pipes, payload):
    pipes.report_asset_materialization(metadata={"ok": True})
"""
#: a user's decorator over the pipes function: each delivery fails with a TypeError, outside the session
MISWRAPPED_FUNCTION = PIPES_FUNCTION.replace("\n@pipes_function\ndef main(", textwrap.dedent(MISWRAPPED))
#: each fails-fast test must end well within this, although its startup_timeout is 120 s
FAST = 15.0


def failing_run(topic: str) -> tuple[str, float]:
    """Run an asset on ``topic`` with startup_timeout=120 s: (why the step failed, how long it took)."""
    started = time.monotonic()
    outcome = run_asset(make_client(trigger_topic=topic, startup_timeout=120))
    assert not outcome.result.success
    return outcome.failure_message, time.monotonic() - started


def test_a_local_function_that_is_down_fails_the_step_within_seconds_naming_it_and_its_error(stack, own_function):
    served = own_function(PIPES_FUNCTION, fail_fast=True)
    served.source.write_text('raise RuntimeError("the settings file is missing")\n' + PIPES_FUNCTION)
    with pytest.raises(LocalStackError, match="the settings file is missing"):
        stack.restart_function(served.function)  # its server does not come back: connections are refused

    error, seconds = failing_run(served.topic)
    assert seconds < FAST, (seconds, error)
    assert "CloudFunctionError" in error and "LocalFunctionDown" in error, error
    assert f"the local function {served.source}:main (trigger topic " in error and "is down" in error, error
    assert "RuntimeError: the settings file is missing" in error, error  # the end of its log: why it is down
    assert "FunctionStartupTimeout" not in error, error
    assert read_meter(stack.servers[f"dispatcher-{served.topic}"].log_path)["stood_in"] >= 1  # a duplicate too


def test_a_function_that_fails_outside_its_session_fails_the_step_within_seconds_with_its_error(stack, own_function):
    served = own_function(MISWRAPPED_FUNCTION, fail_fast=True)
    error, seconds = failing_run(served.topic)
    assert seconds < FAST, (seconds, error)
    assert "CloudFunctionError" in error and "answered its trigger with HTTP 500" in error, error
    assert "TypeError: main() missing 1 required positional argument: 'payload'" in error, error


def test_without_fail_fast_nothing_answers_for_the_function(stack, own_function):
    served = own_function(MISWRAPPED_FUNCTION)  # as deployed: only its startup_timeout ends the wait
    outcome = run_asset(make_client(trigger_topic=served.topic, startup_timeout=8))
    assert "FunctionStartupTimeout" in outcome.failure_message, outcome.failure_message
    assert read_meter(stack.servers[f"dispatcher-{served.topic}"].log_path)["stood_in"] == 0


def test_a_function_server_that_comes_back_within_the_grace_runs_the_trigger_itself(stack, own_function):
    served = own_function(PIPES_FUNCTION, fail_fast=True)
    served.server.kill()  # a restart under way (an edit, a crash the dev loop revives)
    served.server.process.wait(timeout=10)
    with ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(run_asset, make_client(trigger_topic=served.topic, startup_timeout=120))
        time.sleep(1.5)
        stack.restart_function(served.function)
        outcome = run.result(timeout=60)
    assert outcome.result.success, outcome.failure_message
    counts = read_meter(stack.servers[f"dispatcher-{served.topic}"].log_path)
    assert counts["refused"] >= 1 and counts["stood_in"] == 0, counts


# ----------------------------------------------------------------------- the dev loop and the pytest plugin


def test_up_fails_a_run_within_seconds_when_a_saved_function_does_not_import(project: Path, gcf_pipes_command):
    """The pilot's repro: `this is not python` saved into main.py (it parses; it fails at import)."""
    defs = project / "my_defs.py"
    defs.write_text(defs.read_text().replace("startup_timeout=60", "startup_timeout=120"))
    process, output, last, environment = started_up(gcf_pipes_command)
    source = project / "my_function" / "main.py"
    source.write_text(source.read_text() + "\nthis is not python\n")
    output.wait_for("it will be restarted after the next edit of", timeout=60, start=last)

    sys.path.insert(0, str(project))
    try:
        sys.modules.pop("my_defs", None)
        import my_defs

        started = time.monotonic()
        with environ(environment), pytest.raises(CloudFunctionError) as failure:
            materialize([my_defs.my_table], resources=my_defs.defs.resources)
        seconds = time.monotonic() - started
    finally:
        sys.path.remove(str(project))
    assert seconds < FAST, (seconds, str(failure.value))
    said = str(failure.value)
    assert f"the local function {source}:main (trigger topic " in said and "is down" in said, said
    assert "NameError: name 'this' is not defined" in said, said
    process.terminate()
    assert process.wait(timeout=30) == 0


USER_TEST_OF_A_MISWRAPPED_FUNCTION = f'''
    import time

    import pytest
    from dagster import materialize

    from dagster_gcf_pipes.orchestrator import CloudFunctionError
    from my_defs import my_table


    @pytest.mark.gcf_pipes(function="miswrapped/main.py:main", startup_timeout=120)
    def test_miswrapped(gcf_pipes):
        started = time.monotonic()
        with pytest.raises(CloudFunctionError, match="missing 1 required positional argument: 'payload'"):
            materialize([my_table], resources={{"pipes": gcf_pipes.client}})
        assert time.monotonic() - started < {FAST}
'''


def test_the_pytest_plugin_fails_a_test_of_a_function_that_fails_each_delivery_within_seconds(project: Path):
    miswrapped = (project / "my_function" / "main.py").read_text().replace("\n@pipes_function\ndef main(",
                                                                       textwrap.dedent(MISWRAPPED))
    write(project, {"tests/test_miswrapped.py": USER_TEST_OF_A_MISWRAPPED_FUNCTION, "miswrapped/main.py": miswrapped,
                    "pytest.ini": "[pytest]\npythonpath = .\n"})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                         check=False, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
