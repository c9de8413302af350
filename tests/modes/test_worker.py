"""The pull worker on the local stack: a session longer than the subscription's ack deadline runs once,
and SIGTERM lets the running session finish."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1, storage

from tests import REPO_ROOT
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, run_asset

ACK_DEADLINE = 10


class RunningWorker:
    def __init__(self, process: subprocess.Popen, log: Path, topic: str, subscription: str):
        self.process, self.log, self.topic, self.subscription = process, log, topic, subscription

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def worker(stack: Any, tmp_path: Path) -> Iterator[RunningWorker]:
    name = f"worker-{uuid.uuid4().hex[:8]}"
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(stack.project, name)}).name
        subscription = subscriber.create_subscription(request={
            "name": subscriber.subscription_path(stack.project, name), "topic": topic,
            "ack_deadline_seconds": ACK_DEADLINE,
        }).name
    log = tmp_path / "worker.log"
    env = {**os.environ, **stack.environment, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster_gcf_pipes.function.worker", "--subscription", name, "--target", "tests.functions.main:main",
             "--shutdown-grace", "30"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    running = RunningWorker(process, log, name, subscription)
    deadline = time.monotonic() + 30
    while not any("pulling" in line for line in running.lines()):
        assert process.poll() is None and time.monotonic() < deadline, running.log.read_text()
        time.sleep(0.1)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def pull_leftovers(subscription: str) -> int:
    with pubsub_v1.SubscriberClient() as subscriber:
        try:
            response = subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=5)
        except Exception:  # noqa: BLE001 - DeadlineExceeded: nothing there
            return 0
        return len(response.received_messages)


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
    assert worker.process.wait(timeout=30) == 0, worker.log.read_text()
    assert pull_leftovers(worker.subscription) == 0  # acked: nothing left to redeliver


def test_sigterm_lets_the_running_session_finish(worker: RunningWorker) -> None:
    token = uuid.uuid4().hex
    started = storage.Client().bucket(LAKE_BUCKET).blob(f"started/{token}")

    def terminate_once_started() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker.process.send_signal(signal.SIGTERM)

    terminator = threading.Thread(target=terminate_once_started)
    terminator.start()
    client = make_client(trigger_topic=worker.topic, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    outcome = run_asset(client, payload={"sleep": 4, "token": token})
    terminator.join()

    assert outcome.result.success, outcome.failure_message
    assert worker.process.wait(timeout=30) == 0, worker.log.read_text()
    text = worker.log.read_text()
    assert "stopping: no new sessions" in text and "stopped after 1 session(s)" in text
    assert text.index("stopping: no new sessions") < text.index("ran=True")  # the signal came mid-session
