"""A re-published trigger never runs its session a second time, even once the session's tombstone was swept.

A dead-letter re-drive or a replay tool publishes the exact bytes again: the message gets a fresh
``publishTime``, so the start window (counted from it) does not stop it, and once the tombstone is gone no
lease stops it either. The trigger's own deadline does: ``issued_at`` + start window, stamped by the
orchestrator, checked against the function's clock with ``CLOCK_SKEW_ALLOWANCE_SECONDS`` of slack, and the
tombstone outlives it (start window + twice the allowance + a minute)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.client import session_lifecycle
from dagster_gcf_pipes.orchestrator.session import end
from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.lease import TOMBSTONE_MARGIN_SECONDS
from dagster_gcf_pipes.shared.protocol import CLOCK_SKEW_ALLOWANCE_SECONDS, Attr
from tests.conftest import PAYLOAD_BUCKET, TEST_TOPIC
from tests.faults.test_session_end import deliver_by_pull, handler_runs, tombstone
from tests.integration.helpers import make_client, run_asset

WINDOW = 10.0
#: how long after the trigger was built its deadline (with the allowance) passes, in this test
DUE_AFTER = 15.0


def republish_by_push(stack: Any, message: Any, expected: str) -> None:
    """Publish the exact trigger again to the topic the test function is pushed from, and wait until the
    function has logged ``expected`` about its session."""
    function_log = stack.function_server(TEST_TOPIC).log_path
    start = function_log.stat().st_size
    with pubsub_v1.PublisherClient() as publisher:
        topic = f"projects/{stack.project}/topics/{TEST_TOPIC}"
        publisher.publish(topic, message.data, **message.attributes).result(timeout=30)
    session_id = message.attributes[Attr.SESSION]
    deadline = time.monotonic() + 30
    while not any(session_id in line and expected in line
                  for line in function_log.read_bytes()[start:].decode(errors="replace").splitlines()):
        assert time.monotonic() < deadline, function_log.read_bytes()[start:].decode(errors="replace")
        time.sleep(0.1)


def test_the_exact_trigger_republished_after_its_tombstone_was_swept_does_not_run(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time is what makes a tombstone sweepable, and no test waits 20 minutes: the orchestrator's clock is set
    back so that its trigger, built now, is due DUE_AFTER seconds from now (as a trigger built that long ago
    is), the session runs at once, its tombstone is swept as the next teardown past its time sweeps it, and
    the exact bytes come back after the deadline, pushed and pulled. Before: the handler ran again each time
    and left a held lease behind."""
    behind = WINDOW + CLOCK_SKEW_ALLOWANCE_SECONDS - DUE_AFTER
    monkeypatch.setattr(session_lifecycle, "time", SimpleNamespace(
        time=lambda: time.time() - behind, monotonic=time.monotonic, sleep=time.sleep,
    ))
    token = uuid.uuid4().hex
    prefix = f"republish-{token[:8]}"
    gcs = storage.Client(project=stack.project)
    with stack.provisioning():  # a wiretap on the emulator itself: through the layer an empty pull proves nothing
        subscriber = pubsub_v1.SubscriberClient()
    capture = subscriber.create_subscription(request={  # sees every trigger of the topic, as published
        "name": subscriber.subscription_path(stack.project, f"capture-{token[:8]}"),
        "topic": f"projects/{stack.project}/topics/{TEST_TOPIC}",
    }).name
    try:
        outcome = run_asset(make_client(prefix=prefix, startup_timeout=WINDOW), {"token": token, "n": 1})
        ran_by = time.time()
        assert outcome.result.success, outcome.failure_message
        (trigger,) = captured(subscriber, capture)
        session_id = trigger.attributes[Attr.SESSION]
        ended = gcs.bucket(PAYLOAD_BUCKET).get_blob(f"{prefix}/leases/{session_id}")
        assert ended is not None and tombstone(stack.project, session_id, prefix).ended

        monkeypatch.setattr(end, "_last_sweep", {})  # this process swept the prefix at the run's teardown
        past_its_time = ended.updated + timedelta(seconds=WINDOW + TOMBSTONE_MARGIN_SECONDS + 1)
        assert end.sweep_tombstones(gcs, PAYLOAD_BUCKET, prefix, server_now=past_its_time) == 1
        assert tombstone(stack.project, session_id, prefix) is None

        time.sleep(max(0.0, ran_by + DUE_AFTER + 1 - time.time()))
        republish_by_push(stack, trigger, "past the trigger's own deadline")
        (republished,) = captured(subscriber, capture)
        assert republished.data == trigger.data and republished.publish_time > trigger.publish_time
        pulled = deliver_by_pull(republished)  # as the pull worker takes it: its publishTime is fresh
        assert not pulled.ran and "past the trigger's own deadline" in str(pulled.error)
        assert handler_runs(stack.project, token) == 1
        assert tombstone(stack.project, session_id, prefix) is None  # refused before the claim: nothing written
    finally:
        subscriber.delete_subscription(request={"subscription": capture})
        subscriber.close()
        GCSBlobStore(gcs, PAYLOAD_BUCKET).delete_prefix(f"{prefix}/")


def captured(subscriber: pubsub_v1.SubscriberClient, subscription: str) -> list[Any]:
    """The triggers waiting on ``subscription``, acknowledged."""
    response = subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=10)
    if response.received_messages:
        subscriber.acknowledge(request={"subscription": subscription,
                                        "ack_ids": [r.ack_id for r in response.received_messages]})
    return [r.message for r in response.received_messages]
