"""Poison triggers on the push path, through the local stack's Eventarc-like dispatcher and the real Functions
Framework: what no retry can fix is answered 2xx (so it is acknowledged, never retried) with one log line
naming the problem, no traceback, and the handler never runs. The pull worker's side is in
tests/modes/test_worker.py."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from google.cloud import pubsub_v1

from tests.conftest import TEST_TOPIC
from tests.faults.poison import poison_triggers
from tests.faults.test_session_end import handler_runs

#: the dispatcher retries an error answer after 1 s, 2 s, 4 s...: this long after the first answer, a
#: message that was not acknowledged has been delivered at least three times
RETRIES_SEEN_WITHIN = 8.0


def lines_naming(log: Path, start: int, needle: str) -> list[str]:
    return [line for line in log.read_bytes()[start:].decode(errors="replace").splitlines() if needle in line]


def test_poison_triggers_pushed_are_acknowledged_with_one_log_line_each(stack):
    """Before: each was answered HTTP 500 with a traceback (AttributeError, NotFound, RecursionError,
    TypeError) and retried for as long as the platform retries (Eventarc: 24 h)."""
    token = uuid.uuid4().hex
    poisons = poison_triggers(stack.project, token)
    function_log = stack.function_server(TEST_TOPIC).log_path
    dispatcher_log = stack.servers[f"dispatcher-{TEST_TOPIC}"].log_path
    function_start, dispatcher_start = function_log.stat().st_size, dispatcher_log.stat().st_size
    topic = f"projects/{stack.project}/topics/{TEST_TOPIC}"
    with pubsub_v1.PublisherClient() as publisher:
        message_ids = {name: publisher.publish(topic, data, **attributes).result(timeout=30)
                       for name, (data, attributes, _) in poisons.items()}
    deadline = time.monotonic() + 30
    while not all(lines_naming(function_log, function_start, f"message {mid}") for mid in message_ids.values()):
        assert time.monotonic() < deadline, function_log.read_bytes()[function_start:].decode(errors="replace")
        time.sleep(0.1)
    time.sleep(RETRIES_SEEN_WITHIN)

    written = function_log.read_bytes()[function_start:].decode(errors="replace")
    for name, message_id in message_ids.items():
        # said in one line a delivery; Pub/Sub delivers at least once, and the layer, as production may, delivered
        # one of them twice in a fresh-clone run: each delivery is that same line, never a retry after an error
        lines = lines_naming(function_log, function_start, f"message {message_id}")
        assert lines, name
        for line in lines:
            assert f"dropping trigger message {message_id}: " in line and poisons[name][2] in line, (name, line)
        assert not lines_naming(dispatcher_log, dispatcher_start, f"message {message_id} was not accepted"), name
    assert "Traceback" not in written, written
    assert handler_runs(stack.project, token) == 0
