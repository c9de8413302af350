"""The local stack's Eventarc-like delivery (local/dispatcher.py): as many functions at once as the function's
capacity (the emulator's push runs 2), Eventarc's CloudEvent, retries until a 2xx, a dead server reported.
Eventarc's capacity limit and retry schedule, against the bare dispatcher's, are in test_eventarc.py."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1

from dagster_gcf_pipes.local.dispatcher import EVENT_TYPE, FUNCTION_FAILED, SERVER_DOWN
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, LocalStackError, ManagedProcess
from tests.modes.test_fanout import max_overlap

#: records every delivery it accepts as RECORDS/<token>-<n>.json; attributes steer it
RECORDING_FUNCTION = """
import json, os, pathlib, time, uuid

def main(event):
    started = time.time()
    attributes = event.data["message"]["attributes"]
    records = pathlib.Path(os.environ["RECORDS"])
    failed_once = records / ("failed-" + attributes["token"])
    if attributes.get("fail_first") and not failed_once.exists():
        failed_once.write_text("")
        raise RuntimeError("failing the first delivery on purpose")
    time.sleep(float(attributes.get("sleep", 0)))
    record = {"event": dict(event.get_attributes()), "data": event.data, "start": started, "end": time.time()}
    # written whole, then renamed: the test globs *.json while deliveries are still writing theirs
    path = records / (attributes["token"] + "-" + uuid.uuid4().hex + ".json")
    path.with_suffix(".part").write_text(json.dumps(record, default=str))
    path.with_suffix(".part").replace(path)
"""

Started = tuple[str, Any]


@dataclass(frozen=True)
class Served:
    """A function of the test's own on the stack: its trigger topic, server, ``LocalFunction`` and source."""

    topic: str
    server: ManagedProcess
    function: LocalFunction
    source: Path


@pytest.fixture(autouse=True)
def one_delivery_per_attempt(request: pytest.FixtureRequest) -> Iterator[None]:
    """These tests (and test_eventarc.py's) count and time each request of a message: the production-semantics
    layer's duplicate deliveries (Pub/Sub's at-least-once, which Eventarc's push shares) would add requests of
    their own."""
    semantics = request.getfixturevalue("stack").semantics if "stack" in request.fixturenames else None
    if semantics is None:
        yield
        return
    with semantics.behaving(duplicate_rate=0.0):
        yield


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """Where the recording functions write what they were delivered (their environment's RECORDS)."""
    path = tmp_path / "records"
    path.mkdir()
    return path


@pytest.fixture
def own_function(stack: LocalStack, tmp_path: Path, records: Path) -> Iterator[Callable[..., Served]]:
    """``own_function(CODE, **LocalFunction overrides)`` serves CODE as ``main.py:main`` of a folder of its own
    on the stack, with RECORDS in its environment; it is removed after, with its dispatcher and subscription."""
    topics: list[str] = []

    def start(code: str, **overrides: Any) -> Served:
        topic = f"dispatch-{uuid.uuid4().hex[:8]}"
        source = tmp_path / topic / "main.py"
        source.parent.mkdir()
        source.write_text(code)
        function = LocalFunction(source, "main", topic, env={"RECORDS": str(records)}, **overrides)
        topics.append(topic)
        return Served(topic, stack.add_function(function), function, source)

    yield start
    with pubsub_v1.SubscriberClient() as subscriber:
        for topic in topics:
            server = stack.servers.pop(f"function-{topic}", None)
            if server is None:  # it never started: no dispatcher, no subscription
                continue
            server.stop()  # its dispatcher with it
            stack.servers.pop(f"dispatcher-{topic}", None)
            subscriber.delete_subscription(request={"subscription": stack.trigger_subscription(topic)})


@pytest.fixture
def recording_function(own_function: Callable[..., Served]) -> Callable[..., Started]:
    """Serve the recording function (``LocalFunction`` overrides as keywords): (its topic, its server)."""

    def start(**overrides: Any) -> Started:
        served = own_function(RECORDING_FUNCTION, **overrides)
        return served.topic, served.server

    return start


def publish(project: str, topic: str, count: int = 1, **attributes: str) -> tuple[str, list[str]]:
    token = uuid.uuid4().hex
    publisher = pubsub_v1.PublisherClient()
    ids = [
        publisher.publish(f"projects/{project}/topics/{topic}", f"payload {i}".encode(), token=token, **attributes).result()
        for i in range(count)
    ]
    return token, ids


def wait_for_records(records: Path, token: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(found := sorted(records.glob(f"{token}-*.json"))) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} deliveries recorded within {timeout}s"
        time.sleep(0.1)
    return [json.loads(path.read_text()) for path in found]


@pytest.mark.parametrize("capacity", [{"concurrency": 4}, {"max_instances": 2, "instance_concurrency": 2}])
def test_as_many_deliveries_run_at_once_as_the_functions_capacity(stack, recording_function, records, capacity):
    topic, _ = recording_function(**capacity)
    token, _ = publish(stack.project, topic, count=8, sleep="2")
    records = wait_for_records(records, token, 8)
    assert max_overlap(records) == 4  # the emulator's push subscription runs 2 at a time


def test_a_delivery_is_the_cloudevent_eventarc_sends(stack, recording_function, records):
    topic, _ = recording_function()
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    token, (message_id,) = publish(stack.project, topic, googclient_traceparent=traceparent)
    (record,) = wait_for_records(records, token, 1)

    event, data = record["event"], record["data"]
    assert event["id"] == message_id
    assert event["source"] == f"//pubsub.googleapis.com/projects/{stack.project}/topics/{topic}"
    assert event["type"] == EVENT_TYPE and event["specversion"] == "1.0"
    assert event["traceparent"] == traceparent  # Eventarc propagates the trace context
    assert data["subscription"] == stack.trigger_subscription(topic)
    message = data["message"]
    assert base64.b64decode(message["data"]) == b"payload 0"
    assert message["attributes"]["token"] == token
    assert message["messageId"] == message["message_id"] == message_id
    assert message["publishTime"] == message["publish_time"] and event["time"].startswith(message["publishTime"][:19])


def test_a_delivery_that_is_not_accepted_is_retried_until_it_is(stack, recording_function, records):
    topic, _ = recording_function(eventarc=False)  # retried after 1 s (Eventarc's 10 s: test_eventarc.py)
    token, _ = publish(stack.project, topic, fail_first="yes")
    wait_for_records(records, token, 1)
    time.sleep(3)  # longer than the retry backoff: an unacked delivery would have come again by now
    assert len(wait_for_records(records, token, 1)) == 1  # acked once accepted
    dispatcher_log = stack.servers[f"dispatcher-{topic}"].log_path.read_text()
    assert "was not accepted (attempt 1: HTTP 500); retrying in 1s" in dispatcher_log


def test_the_first_error_answer_is_reported_loudly_with_the_end_of_the_functions_log(stack, recording_function, records):
    topic, server = recording_function(eventarc=False)
    token, (message_id,) = publish(stack.project, topic, fail_first="yes")
    wait_for_records(records, token, 1)  # retried, then accepted
    dispatcher_log = stack.servers[f"dispatcher-{topic}"].log_path.read_text()
    report = dispatcher_log[dispatcher_log.index(f"{FUNCTION_FAILED} message {message_id} of projects/{stack.project}/topics/{topic} with HTTP 500"):]
    assert f"The end of the function's log ({server.log_path})" in report, report
    assert "RuntimeError: failing the first delivery on purpose" in report, report  # the function's traceback
    assert dispatcher_log.count(FUNCTION_FAILED) == 1, dispatcher_log


def test_a_dead_function_server_is_reported_loudly_and_fails_the_next_use_of_the_stack(stack, recording_function):
    topic, server = recording_function()
    server.kill()  # SIGKILL to its whole process group
    server.process.wait(timeout=10)
    publish(stack.project, topic)
    dispatcher_log = stack.servers[f"dispatcher-{topic}"].log_path
    deadline = time.monotonic() + 30
    while SERVER_DOWN not in dispatcher_log.read_text():
        assert time.monotonic() < deadline, dispatcher_log.read_text()
        time.sleep(0.1)
    assert f"check the server's log ({server.log_path})" in dispatcher_log.read_text()
    with pytest.raises(LocalStackError, match=f"function-{topic} .* was killed by SIGKILL"):
        stack.check()
