"""The pull worker on the local stack: a session longer than the subscription's ack deadline runs once,
SIGTERM lets a running session finish, a session still running after the grace is abandoned (the worker
exits, the message goes back to Pub/Sub unacked), and two workers on one subscription share the triggers."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.function.worker import EXIT_ABANDONED, EXIT_OK
from tests import REPO_ROOT
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, run_asset
from tests.modes.test_fanout import run_fan_out_asset

ACK_DEADLINE = 10
WORKER_FLAG = "--max-sessions"


class RunningWorker:
    def __init__(self, process: subprocess.Popen, log: Path, topic: str, subscription: str):
        self.process, self.log, self.topic, self.subscription = process, log, topic, subscription

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def sessions_run(self) -> set[str]:
        """Ids of the sessions this worker acked after running them."""
        return {m.group(1) for line in self.lines() if (m := re.search(r"acked \(session (\w+), ran=True\)", line))}


StartWorker = Callable[..., RunningWorker]


def create_subscription(project: str, name: str) -> tuple[str, str]:
    """A new trigger topic and one pull subscription on it, both called ``name``."""
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(project, name)}).name
        subscription = subscriber.create_subscription(request={
            "name": subscriber.subscription_path(project, name), "topic": topic,
            "ack_deadline_seconds": ACK_DEADLINE,
        }).name
    return topic, subscription


@pytest.fixture
def start_worker(stack: Any, tmp_path: Path) -> Iterator[StartWorker]:
    """Start worker processes on one new subscription; each is killed at the end if it is still running."""
    name = f"worker-{uuid.uuid4().hex[:8]}"
    _, subscription = create_subscription(stack.project, name)
    started: list[subprocess.Popen] = []

    def start(*options: str) -> RunningWorker:
        log = tmp_path / f"worker-{len(started)}.log"
        env = {**os.environ, **stack.environment, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "dagster_gcf_pipes.function.worker", "--subscription", name,
                 "--target", "tests.functions.main:main", *options],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        started.append(process)
        running = RunningWorker(process, log, name, subscription)
        deadline = time.monotonic() + 30
        while not any("pulling" in line for line in running.lines()):
            assert process.poll() is None and time.monotonic() < deadline, running.log.read_text()
            time.sleep(0.1)
        return running

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def worker(start_worker: StartWorker) -> RunningWorker:
    return start_worker("--shutdown-grace", "30")


def pull_leftovers(subscription: str) -> int:
    with pubsub_v1.SubscriberClient() as subscriber:
        try:
            response = subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=5)
        except Exception:  # noqa: BLE001 - DeadlineExceeded: nothing there
            return 0
        return len(response.received_messages)


def terminate_once_started(worker: RunningWorker, token: str) -> threading.Thread:
    """A thread that sends SIGTERM to the worker once the test function has marked ``token`` started."""
    started = storage.Client().bucket(LAKE_BUCKET).blob(f"started/{token}")

    def terminate() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker.process.send_signal(signal.SIGTERM)

    terminator = threading.Thread(target=terminate)
    terminator.start()
    return terminator


def test_a_session_longer_than_the_ack_deadline_runs_once(worker: RunningWorker) -> None:
    token = uuid.uuid4().hex
    sleep = ACK_DEADLINE + 8
    client = make_client(trigger_topic=worker.topic, heartbeat_interval=2.0, heartbeat_timeout=20.0)
    outcome = run_asset(client, payload={"sleep": sleep, "token": token, "n": 7})

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 7  # one materialization (run_asset's unpacking asserts exactly one)
    time.sleep(ACK_DEADLINE / 2)  # a redelivery would show up by now
    starts = [line for line in worker.lines() if "starts (trigger message" in line]
    assert len(starts) == 1, worker.lines()
    assert sum("ran=True" in line for line in worker.lines()) == 1
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=30) == EXIT_OK, worker.log.read_text()
    assert pull_leftovers(worker.subscription) == 0  # acked: nothing left to redeliver


def test_sigterm_lets_the_running_session_finish(worker: RunningWorker) -> None:
    token = uuid.uuid4().hex
    terminator = terminate_once_started(worker, token)
    client = make_client(trigger_topic=worker.topic, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    outcome = run_asset(client, payload={"sleep": 4, "token": token})
    terminator.join()

    assert outcome.result.success, outcome.failure_message
    assert worker.process.wait(timeout=30) == EXIT_OK, worker.log.read_text()
    text = worker.log.read_text()
    assert "stopping: no new sessions" in text and "stopped after 1 session(s)" in text
    assert text.index("stopping: no new sessions") < text.index("ran=True")  # the signal came mid-session


def test_a_session_still_running_after_the_grace_is_abandoned_unacked(start_worker: StartWorker) -> None:
    """The handler sleeps far longer than the test: the worker must still exit once the grace is over, say
    so in its exit code, never log the message as acked, and leave it on the subscription for redelivery."""
    worker = start_worker("--shutdown-grace", "2")
    token = uuid.uuid4().hex
    terminator = terminate_once_started(worker, token)
    client = make_client(trigger_topic=worker.topic, heartbeat_interval=1.0, heartbeat_timeout=8.0)
    outcome = run_asset(client, payload={"sleep": 600, "token": token})
    terminator.join()

    assert worker.process.wait(timeout=30) == EXIT_ABANDONED, worker.log.read_text()
    assert "FunctionHeartbeatTimeout" in outcome.failure_message  # nobody ran it to the end: Dagster says so
    text = worker.log.read_text()
    assert "abandoned" in text and "acked (session" not in text, text  # never claimed to be acked
    assert pull_leftovers(worker.subscription) == 1  # handed back unacked: Pub/Sub redelivers it


def test_two_workers_share_the_triggers_of_one_subscription(start_worker: StartWorker) -> None:
    """Each worker runs one session at a time: the busy one must not hold triggers the idle one could run."""
    workers = [start_worker(WORKER_FLAG, "1", "--shutdown-grace", "30") for _ in range(2)]
    client = make_client(trigger_topic=workers[0].topic, startup_timeout=60.0, heartbeat_interval=1.0,
                         heartbeat_timeout=10.0)
    payloads = [{"n": i, "sleep": 2} for i in range(6)]
    result, _, outcomes = run_fan_out_asset(client, payloads, max_concurrency=6)

    assert result.success, [o.summary for o in outcomes]
    ran = [w.sessions_run() for w in workers]
    assert len(ran[0] | ran[1]) == 6 and not ran[0] & ran[1], [w.lines() for w in workers]
    assert all(len(sessions) >= 2 for sessions in ran), [len(sessions) for sessions in ran]
    for w in workers:
        w.process.send_signal(signal.SIGTERM)
    assert [w.process.wait(timeout=30) for w in workers] == [EXIT_OK, EXIT_OK]
    assert pull_leftovers(workers[0].subscription) == 0
