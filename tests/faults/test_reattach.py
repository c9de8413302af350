"""A session survives its orchestrator: the Dagster process running the step is SIGKILLed mid-session, the run
is marked failed (as run monitoring does), and the step is re-executed from failure on the same persistent
instance. The re-execution re-attaches to the earlier session instead of triggering the function again."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from google.cloud import storage

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from tests import REPO_ROOT
from tests.conftest import LAKE_BUCKET, REPLY_SHARDS, REPLY_TOPIC
from tests.faults import reattach_job
from tests.faults.test_process_faults import own_function  # noqa: F401 - a fixture
from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 10.0, "startup_timeout": 20.0}


def lake_count(project: str, prefix: str) -> int:
    return sum(1 for _ in storage.Client(project=project).list_blobs(LAKE_BUCKET, prefix=prefix))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.05)


@dataclass
class Orchestrator:
    """The killed run: its process, its instance (persistent, in DAGSTER_HOME) and its spec."""

    process: subprocess.Popen
    instance: DagsterInstance
    spec: dict[str, Any]
    output: Path

    def running(self) -> bool:
        """Whether the orchestrator still runs; fails with the end of its output if it exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"the orchestrator exited: {self.output.read_text()[-4000:]}")
        return True

    def run(self) -> Any:
        runs = self.instance.get_runs()
        return runs[0] if runs else None

    def step_lines(self) -> list[str]:
        run = self.run()
        if run is None:
            return []
        return [e.user_message for e in self.instance.all_logs(run.run_id) if e.dagster_event is None and e.step_key]

    def kill(self) -> str:
        """SIGKILL the orchestrator and its children (Dagster's compute-log tails); mark its run failed as run
        monitoring would, unless it had ended."""
        kill_group(self.process)
        run = self.run()
        assert run is not None, "the run had not started"
        run = self.instance.get_run_by_id(run.run_id)
        if run.status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE):
            self.instance.report_run_failed(run)
        return run.run_id

    def reexecute(self, run_id: str) -> Any:
        with reattach_job.run(self.instance, self.spec, parent_run_id=run_id) as result:
            return result.run_id, result.success


@contextmanager
def orchestrator(stack: LocalStack, home: Path, spec: dict[str, Any]) -> Iterator[Orchestrator]:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **stack.environment, "PYTHONPATH": str(REPO_ROOT)}
    output = home / "orchestrator.log"
    # the instance's storage is created here before the orchestrator opens it: two processes creating a new
    # SQLite instance's tables at once fail one of them ("table alembic_version already exists")
    with DagsterInstance.from_config(str(home)) as instance:
        with output.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.reattach_job", str(home), json.dumps(spec)], cwd=REPO_ROOT,
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            yield Orchestrator(process, instance, spec, output)
        finally:
            kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def logs_of(instance: DagsterInstance, run_ids: list[str]) -> list[str]:
    return [e.user_message for run_id in run_ids for e in instance.all_logs(run_id) if e.dagster_event is None]


def materializations(instance: DagsterInstance, run_id: str) -> list[dict[str, Any]]:
    events = instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    return [
        {k: v.value for k, v in e.dagster_event.event_specific_data.materialization.metadata.items()}
        for e in events
    ]


def assert_every_line_once(instance: DagsterInstance, run_ids: list[str], lines: int) -> None:
    counts = Counter(m for m in logs_of(instance, run_ids) if m.startswith("line "))
    assert counts == {f"line {i}": 1 for i in range(lines)}, {k: n for k, n in counts.items() if n != 1} or counts


def released(instance: DagsterInstance, run_id: str) -> bool:
    """Whether the run finished with a session (its `released` record)."""
    return any(
        "[pipes] released" in (e.dagster_event.message or "")
        for e in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
    )


def assert_nothing_left(project: str) -> None:
    assert session_subscriptions(project) == []
    assert session_objects(project) == []


def test_killed_mid_session_then_reexecuted_from_failure_runs_the_function_once(stack, tmp_path):
    token = uuid.uuid4().hex
    spec = {"client": FAST, "payload": {"token": token, "log_lines": 30, "line_interval": 0.1}}
    with orchestrator(stack, tmp_path / "home", spec) as orch:
        wait_until(lambda: orch.running() and "line 5" in orch.step_lines(), "line 5 recorded")
        parent = orch.kill()
        child, success = orch.reexecute(parent)
        logs = logs_of(orch.instance, [child])

        assert success, logs
        assert lake_count(stack.project, f"runs/{token}/") == 1
        assert_every_line_once(orch.instance, [parent, child], 30)
        assert any("re-attaching to session" in m and f"of run {parent}" in m for m in logs), logs
        (materialized,) = materializations(orch.instance, child)
        assert materialized["pipes_reattached_from_run"] == parent
        assert logs_of(orch.instance, [parent, child]).count("[pipes] external process successfully opened dagster pipes.") == 1
    assert_nothing_left(stack.project)


def test_a_reattached_session_reads_the_reply_topic_it_was_recorded_with(stack, tmp_path):
    """With reply_topics, a session replies on the topic its id hashes to; the re-execution reads that topic
    (recorded with the session) even though the resource now lists other topics."""
    token = uuid.uuid4().hex
    client = {**FAST, "reply_topic": None, "reply_topics": REPLY_SHARDS}
    spec = {"client": client, "payload": {"token": token, "log_lines": 30, "line_interval": 0.1}}
    with orchestrator(stack, tmp_path / "home", spec) as orch:
        wait_until(lambda: orch.running() and "line 5" in orch.step_lines(), "line 5 recorded")
        parent = orch.kill()
        orch.spec = {**spec, "client": {**client, "reply_topics": [REPLY_TOPIC, *reversed(REPLY_SHARDS)]}}
        child, success = orch.reexecute(parent)

        assert success, logs_of(orch.instance, [child])
        assert lake_count(stack.project, f"runs/{token}/") == 1
        assert_every_line_once(orch.instance, [parent, child], 30)
        (materialized,) = materializations(orch.instance, child)
        assert materialized["pipes_reattached_from_run"] == parent
        assert materialized["pipes_reply_topic"].rsplit("/", 1)[-1] in REPLY_SHARDS
    assert_nothing_left(stack.project)


def test_a_session_that_finished_while_nobody_listened_is_collected_without_a_second_run(stack, tmp_path):
    token = uuid.uuid4().hex
    spec = {"client": FAST, "payload": {"token": token, "log_lines": 10, "line_interval": 0.2, "n": 7}}
    with orchestrator(stack, tmp_path / "home", spec) as orch:
        wait_until(lambda: orch.running() and "line 2" in orch.step_lines(), "line 2 recorded")
        parent = orch.kill()
        wait_until(lambda: lake_count(stack.project, f"finished/{token}") == 1, "the function finishing")
        time.sleep(1.0)  # its `closed` is published right after the mark
        child, success = orch.reexecute(parent)
        logs = logs_of(orch.instance, [child])

        assert success, logs
        assert lake_count(stack.project, f"runs/{token}/") == 1
        assert_every_line_once(orch.instance, [parent, child], 10)
        (materialized,) = materializations(orch.instance, child)
        assert materialized["n"] == 7
    assert_nothing_left(stack.project)


def test_a_session_whose_function_died_too_is_run_again_and_the_reason_is_logged(stack, tmp_path, own_function):  # noqa: F811
    topic, server = own_function()
    token = uuid.uuid4().hex
    client = {**FAST, "trigger_topic": topic, "heartbeat_timeout": 3.0}
    spec = {"client": client, "payload": {"token": token, "log_lines": 40, "line_interval": 0.1}}
    with orchestrator(stack, tmp_path / "home", spec) as orch:
        wait_until(lambda: orch.running() and "line 3" in orch.step_lines(), "line 3 recorded")
        parent = orch.kill()
        server.kill()
        stack.restart_function(LocalFunction("tests/functions/main.py", "main", topic))
        child, success = orch.reexecute(parent)
        logs = logs_of(orch.instance, [child])

        assert success, logs
        assert lake_count(stack.project, f"runs/{token}/") == 2
        assert any("is dead: FunctionHeartbeatTimeout" in m and "a new session starts" in m for m in logs), logs
        # the dead session's lines once each (those it sent before it died), then the new session's
        lines = [m for m in logs_of(orch.instance, [parent, child]) if m.startswith("line ")]
        restart = len(lines) - 40
        assert lines[restart:] == [f"line {i}" for i in range(40)]
        assert restart >= 4 and lines[:restart] == [f"line {i}" for i in range(restart)], lines
        assert len(materializations(orch.instance, child)) == 1
    assert_nothing_left(stack.project)


def test_a_fan_out_killed_halfway_runs_only_the_shards_that_had_not_finished(stack, tmp_path):
    token = uuid.uuid4().hex
    payloads = [{"token": f"{token}-{i}", "sleep": 1.5, "log_lines": 2} for i in range(10)]
    spec = {"client": FAST, "payloads": payloads, "max_concurrency": 3}
    with orchestrator(stack, tmp_path / "home", spec) as orch:
        wait_until(lambda: orch.running() and lake_count(stack.project, f"finished/{token}-") >= 5, "5 shards finished")
        parent = orch.kill()
        finished_before = lake_count(stack.project, f"finished/{token}-")
        child, success = orch.reexecute(parent)
        logs = logs_of(orch.instance, [child])

        assert success, logs
        for i in range(10):
            assert lake_count(stack.project, f"runs/{token}-{i}/") == 1, f"shard {i} ran again"
        reattached = [m for m in logs if "re-attaching to session" in m]
        assert len(reattached) >= finished_before >= 5, logs
        (materialized,) = materializations(orch.instance, child)
        assert materialized["pipes_shard_count"] == 10
        shard_lines = Counter(m for m in logs_of(orch.instance, [parent, child]) if "] line " in m)
        assert shard_lines == {f"[shard {i}] line {j}": 1 for i in range(10) for j in range(2)}
    assert_nothing_left(stack.project)


@pytest.mark.parametrize("kills", [pytest.param(4, id="4"), pytest.param(20, id="20", marks=pytest.mark.long)])
def test_killed_at_random_moments_every_line_and_the_result_once(stack, tmp_path, kills):
    rng = random.Random(int(os.environ.get("REATTACH_SEED", time.time())))
    outcomes: Counter[str] = Counter()
    for attempt in range(kills):
        token = uuid.uuid4().hex
        spec = {"client": FAST, "payload": {"token": token, "log_lines": 20, "line_interval": 0.1}}
        with orchestrator(stack, tmp_path / f"home-{attempt}", spec) as orch:
            wait_until(lambda: orch.running() and orch.run() is not None, "the run starting")
            time.sleep(rng.uniform(0.0, 2.8))  # the session runs from about 0.3 s to 2.5 s after the run starts
            parent = orch.kill()
            recorded = sum(1 for m in orch.step_lines() if m.startswith("line "))
            if orch.instance.all_logs(parent, of_type=DagsterEventType.STEP_SUCCESS):
                outcomes["the step had finished"] += 1  # nothing for a re-execution from failure to run
                runs = [parent]
            else:
                child, success = orch.reexecute(parent)
                assert success, logs_of(orch.instance, [child])
                gone = released(orch.instance, parent) or any("is gone" in m for m in logs_of(orch.instance, [child]))
                if gone and lake_count(stack.project, f"runs/{token}/") == 2:
                    # limit (a) in reliability.md, guarantee 11: killed in the milliseconds between the session's
                    # teardown (subscription deleted) and Dagster recording the step's end: nothing to re-attach to
                    assert recorded == 20, "only a session that had ended can have been torn down"
                    outcomes["killed after the session's teardown, before the step's end: ran again"] += 1
                    continue
                reattached = any("re-attaching to session" in m for m in logs_of(orch.instance, [child]))
                outcomes[f"killed with {'no' if not recorded else 'some' if recorded < 20 else 'all'} lines "
                         f"recorded, then {'re-attached' if reattached else 'a new session'}"] += 1
                runs = [parent, child]
            assert sum(len(materializations(orch.instance, run_id)) for run_id in runs) == 1
            assert lake_count(stack.project, f"runs/{token}/") == 1
            assert_every_line_once(orch.instance, runs, 20)
    assert_nothing_left(stack.project)
    print(f"\n{kills} random kills: {dict(outcomes)}")


def test_a_retained_subscription_rides_out_not_found_right_after_its_creation(stack):
    """Production Pub/Sub can answer NOT_FOUND from StreamingPull for a subscription created moments ago
    (googleapis/java-pubsub#81): the production-semantics layer answers so for 3 s here, and the retained
    subscription's stream is re-opened until it is visible, as an unretained one's is."""
    with stack.semantics.behaving(new_subscription_not_found_seconds=3.0, new_subscription_not_found_rate=1.0):
        stack.semantics.reset_meter()
        outcome = run_asset(make_client(), payload={"n": 3, "log_lines": 5})
        not_found = stack.semantics.meter().total.not_found

    assert outcome.result.success, outcome.failure_message
    assert not_found >= 2
    assert [m for m in outcome.log_messages if m.startswith("line ")] == [f"line {i}" for i in range(5)]
    assert_nothing_left(stack.project)


def test_two_re_executions_at_once_one_re_attaches_and_the_other_says_why(stack, tmp_path):
    """A run retry and a manual re-execution of the same failed run, in two real processes at once (issue 24,
    item 8): one re-attaches to the killed attempt's session and records it; the other takes no part in it and
    fails naming the run that holds the session; the function ran once."""
    token = uuid.uuid4().hex
    spec = {"client": FAST, "payload": {"token": token, "log_lines": 30, "line_interval": 0.2}}
    home = tmp_path / "home"
    with orchestrator(stack, home, spec) as orch:
        wait_until(lambda: orch.running() and any(m.startswith("line ") for m in orch.step_lines()), "the first line")
        parent = orch.kill()
        env = {**os.environ, **stack.environment, "PYTHONPATH": str(REPO_ROOT)}
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.faults.reattach_job", str(home), json.dumps(spec), parent,
                 str(tmp_path / "barrier"), "2"],  # both start their re-execution together, whatever the load
                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for _ in range(2)
        ]
        outputs = [child.communicate(timeout=120)[0] for child in children]
        results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
        assert sorted(r["success"] for r in results) == [False, True], outputs
        loser = next(r["run_id"] for r in results if not r["success"])
        winner = next(r["run_id"] for r in results if r["success"])
        failures = orch.instance.all_logs(loser, of_type=DagsterEventType.STEP_FAILURE)
        message = failures[0].dagster_event.event_specific_data.error.to_string()
        assert f"is being re-attached by run {winner}" in message, message
        assert len(materializations(orch.instance, winner)) == 1 and materializations(orch.instance, loser) == []
        assert_every_line_once(orch.instance, [parent, winner], 30)
    assert lake_count(stack.project, f"runs/{token}/") == 1  # the function ran once
