"""The pull worker on the local stack: a session longer than the subscription's ack deadline runs once,
SIGTERM lets a running session finish, a session still running after the grace is abandoned (the worker
exits, the message goes back to Pub/Sub unacked), two workers on one subscription share the triggers, a
poison trigger is acked once with one log line, and one whose session cannot be set up comes back only after
a backoff."""

import http.server
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

import grpc
import pytest
from google.cloud import pubsub_v1, storage
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from dagster_gcf_pipes.function.worker import EXIT_ABANDONED, EXIT_OK, RETRY_BACKOFF_MIN
from tests import REPO_ROOT
from tests.conftest import LAKE_BUCKET
from tests.faults.poison import poison_triggers
from tests.faults.poison import trigger as build_trigger
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
    _EMULATOR[0] = stack.emulator_host
    started: list[subprocess.Popen] = []

    def start(*options: str, env: dict[str, str] | None = None) -> RunningWorker:
        log = tmp_path / f"worker-{len(started)}.log"
        env = {**os.environ, **stack.environment, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
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


def leftovers(subscription: str) -> list[str]:
    """Ids of the messages waiting on ``subscription``, pulled and left unacked. What the emulator itself answers,
    beneath the production-semantics layer (through which an empty pull proves nothing, as on Pub/Sub: a test
    reads the emulator's state like a wiretap); it answers an empty subscription about a second before the
    pull's deadline (so 8 s, not 60: this wait was most of two tests' minute), and a pull that gets no answer
    raises, never reads as "none"."""
    transport = SubscriberGrpcTransport(channel=grpc.insecure_channel(_EMULATOR[0]), host=_EMULATOR[0])
    with pubsub_v1.SubscriberClient(transport=transport) as subscriber:
        response = subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=8)
    return [received.message.message_id for received in response.received_messages]


#: the bare emulator's address, set by ``start_worker``
_EMULATOR: list[str] = [""]


def abandoned_message_ids(text: str) -> list[str]:
    """The trigger messages the worker's log says it handed back, abandoned, at the end of the grace."""
    found = re.finditer(r"abandoned trigger message\(s\) ([\w, ]+); handed back", text)
    return [message_id for match in found for message_id in match[1].split(", ")]


class Terminator:
    """Sends SIGTERM to the worker once the test function has marked ``token`` started; if it never starts,
    once the run is over (``finish``), so that the worker ends either way. ``saw_start`` says which. No
    deadline of its own: one shorter than the run's own wait for the start (Dagster's start, then
    startup_timeout) could stop the worker before it pulled the trigger, and fail the test as a wrong exit code."""

    def __init__(self, worker: RunningWorker, token: str):
        self._worker = worker
        self._start_mark = storage.Client().bucket(LAKE_BUCKET).blob(f"started/{token}")
        self._run_over = threading.Event()
        self.saw_start = False
        self._thread = threading.Thread(target=self._terminate, name="terminator")
        self._thread.start()

    def _terminate(self) -> None:
        while not (started := self._start_mark.exists()) and not self._run_over.wait(0.1):
            pass
        self.saw_start = started
        self._worker.process.send_signal(signal.SIGTERM)

    def finish(self) -> None:
        """The run is over: stop waiting for the start, and return once the signal is sent."""
        self._run_over.set()
        self._thread.join()


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
    assert leftovers(worker.subscription) == []  # acked: nothing left to redeliver


def test_sigterm_lets_the_running_session_finish(worker: RunningWorker) -> None:
    token = uuid.uuid4().hex
    terminator = Terminator(worker, token)
    client = make_client(trigger_topic=worker.topic, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    outcome = run_asset(client, payload={"sleep": 4, "token": token})
    terminator.finish()

    assert terminator.saw_start, outcome.failure_message
    assert outcome.result.success, outcome.failure_message
    assert worker.process.wait(timeout=30) == EXIT_OK, worker.log.read_text()
    text = worker.log.read_text()
    assert "stopping: no new sessions" in text and "stopped after 1 session(s)" in text
    assert text.index("stopping: no new sessions") < text.index("ran=True")  # the signal came mid-session


def test_a_sigterm_delivered_to_any_thread_stops_the_worker(worker: RunningWorker) -> None:
    """The kernel delivers a process-directed signal to any thread of the process that does not block it (it
    prefers the main thread, but not always: under load, 2 of about 115 SIGTERMs left a worker running). Python
    runs the handler in the main thread, once that runs Python code again: a main thread in an untimed wait
    never did, and the worker never stopped. kill() with a thread's id delivers the signal to that thread."""
    pid = worker.process.pid
    other_threads = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    os.kill(other_threads[0], signal.SIGTERM)

    assert worker.process.wait(timeout=30) == EXIT_OK, worker.log.read_text()
    assert "stopping: no new sessions" in worker.log.read_text()


def test_a_session_still_running_after_the_grace_is_abandoned_unacked(start_worker: StartWorker) -> None:
    """The handler sleeps far longer than the test: the worker must still exit once the grace is over, say
    so in its exit code, never log the message as acked, and leave it on the subscription for redelivery."""
    worker = start_worker("--shutdown-grace", "2")
    token = uuid.uuid4().hex
    terminator = Terminator(worker, token)
    client = make_client(trigger_topic=worker.topic, heartbeat_interval=1.0, heartbeat_timeout=8.0)
    outcome = run_asset(client, payload={"sleep": 600, "token": token})
    terminator.finish()

    assert terminator.saw_start, outcome.failure_message
    assert worker.process.wait(timeout=30) == EXIT_ABANDONED, worker.log.read_text()
    assert "FunctionHeartbeatTimeout" in outcome.failure_message  # nobody ran it to the end: Dagster says so
    text = worker.log.read_text()
    assert "acked (session" not in text, text  # never claimed to be acked
    abandoned = abandoned_message_ids(text)
    assert len(abandoned) == 1 and f"starts (trigger message {abandoned[0]})" in text, text  # nacked: handed back
    assert abandoned[0] in leftovers(worker.subscription)  # still unacked: Pub/Sub redelivers it


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
    assert leftovers(workers[0].subscription) == []


def test_poison_triggers_are_acked_once_with_one_log_line_each(stack: Any, worker: RunningWorker) -> None:
    """Before: each was nacked with no backoff and pulled straight back, about 67 deliveries a second, never
    acked (the list params' AttributeError, the missing bucket's NotFound, a RecursionError, a TypeError)."""
    token = uuid.uuid4().hex
    poisons = poison_triggers(stack.project, token)
    topic = f"projects/{stack.project}/topics/{worker.topic}"
    with pubsub_v1.PublisherClient() as publisher:
        message_ids = {name: publisher.publish(topic, data, **attributes).result(timeout=30)
                       for name, (data, attributes, _) in poisons.items()}
    deadline = time.monotonic() + 30
    while not all(f"trigger message {mid} acked" in worker.log.read_text() for mid in message_ids.values()):
        assert time.monotonic() < deadline, worker.log.read_text()
        time.sleep(0.1)
    time.sleep(3)  # a message handed back would have come again by now (it did, at once, about 67 times a second)

    for name, message_id in message_ids.items():
        (line,) = [line for line in worker.lines() if f"message {message_id}:" in line]
        assert poisons[name][2] in line, (name, line)
    assert "Traceback" not in worker.log.read_text(), worker.log.read_text()
    assert not storage.Client().bucket(LAKE_BUCKET).blob(f"started/{token}").exists()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=30) == EXIT_OK, worker.log.read_text()


class ForbiddenStorage(http.server.BaseHTTPRequestHandler):
    """Cloud Storage as a function without the bucket's roles sees it: every request answered 403 at once (no
    IAM runs in the local stack). A redelivery may succeed once the role is granted."""

    def _forbid(self) -> None:
        body = b'{"error": {"code": 403, "message": "caller does not have storage.objects.create access"}}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forbid

    def log_message(self, *args: Any) -> None:
        pass


def test_a_trigger_whose_session_cannot_be_set_up_comes_back_after_a_backoff(
    stack: Any, start_worker: StartWorker
) -> None:
    """Before: handed back at once (its ack deadline set to 0), so a worker that could not reach Cloud Storage
    pulled it straight back. Now it comes back after retry_backoff(1): at least RETRY_BACKOFF_MIN / 2 seconds."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ForbiddenStorage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        worker = start_worker(env={"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}"})
        data, attributes = build_trigger(stack.project)
        with pubsub_v1.PublisherClient() as publisher:
            topic = f"projects/{stack.project}/topics/{worker.topic}"
            message_id = publisher.publish(topic, data, **attributes).result(timeout=30)
        deadline = time.monotonic() + 60
        while not (failed := re.search(rf"trigger message {message_id}: the session could not be set up \(attempt 1\): "
                                       r"Forbidden.*to come again in (\d+)s", worker.log.read_text())):
            assert time.monotonic() < deadline, worker.log.read_text()
            time.sleep(0.05)
        failed_at, delay = time.monotonic(), int(failed[1])
        worker.process.send_signal(signal.SIGTERM)  # nothing held: it stops at once, and pulls no more
        assert worker.process.wait(timeout=30) == EXIT_OK, worker.log.read_text()
    finally:
        server.shutdown()

    assert RETRY_BACKOFF_MIN // 2 <= delay <= RETRY_BACKOFF_MIN
    while not (back := leftovers(worker.subscription)):
        assert time.monotonic() < failed_at + delay + 15, "the trigger never came back"
    came_back_after = time.monotonic() - failed_at
    assert back == [message_id] and came_back_after > delay - 1, (back, came_back_after, delay)
    assert "Traceback" not in worker.log.read_text()  # a foreseen failure: one line, no stack


def test_a_subscription_whose_ack_deadline_outlasts_the_start_window_is_warned_about(
    stack: Any, start_worker: StartWorker
) -> None:
    """A trigger assigned to a pull the worker gave up on comes back only after the subscription's ack deadline
    (googleapis/google-cloud-python#8087): above 60 s it misses the orchestrator's start window (issue 23,
    item 4). The worker extends what it runs itself, so the subscription's own deadline should be short."""
    short = start_worker()  # the fixture's subscription: ACK_DEADLINE (10 s)
    name = f"worker-long-{uuid.uuid4().hex[:8]}"
    with pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
        topic = publisher.create_topic(request={"name": publisher.topic_path(stack.project, name)}).name
        subscriber.create_subscription(request={
            "name": subscriber.subscription_path(stack.project, name), "topic": topic, "ack_deadline_seconds": 600,
        })
    log = Path(short.log.parent) / "worker-long.log"
    env = {**os.environ, **stack.environment, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster_gcf_pipes.function.worker", "--subscription", name,
             "--target", "tests.functions.main:main"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "pulling" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    assert "has an ack deadline of 600 s" in log.read_text() and "--ack-deadline 60" in log.read_text()
    assert "ack deadline of" not in short.log.read_text()
