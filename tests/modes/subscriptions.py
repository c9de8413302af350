"""Subscriptions the mode tests create for their sensors."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1


def wait_until_pullable(subscriber: pubsub_v1.SubscriberClient, path: str, timeout: float = 30.0) -> None:
    """Until a pull on the new subscription ``path`` stops answering NOT_FOUND, as production Pub/Sub (and the
    local stack's production-semantics layer) may for a while after CreateSubscription; what the pull got is
    handed straight back. A sensor reads a subscription created long before its first tick."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = subscriber.pull(request={"subscription": path, "max_messages": 10}, timeout=1.0, retry=None)
        except gexc.DeadlineExceeded:
            return
        except gexc.NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        ack_ids = [m.ack_id for m in response.received_messages]
        if ack_ids:
            subscriber.modify_ack_deadline(
                request={"subscription": path, "ack_ids": ack_ids, "ack_deadline_seconds": 0}
            )
        return


def wiretap(stack: Any) -> pubsub_v1.SubscriberClient:
    """A subscriber on the emulator itself, beneath the production-semantics layer: a test reading a
    subscription's state through the layer with short pulls could miss messages (an empty pull while messages
    wait; messages lost to its pull race until their ack deadline)."""
    with stack.provisioning():
        return pubsub_v1.SubscriberClient()


@contextlib.contextmanager
def whole_deliveries(stack: Any) -> Iterator[None]:
    """Every pull gets every message waiting, each once: the production-semantics layer's delivery faults off
    (empty answers, held-back messages, pull races, duplicates), for a test that checks what one tick
    decides; the tests of the sensors under those faults leave them on."""
    if stack.semantics is None:
        yield
        return
    quiet = {"empty_pull_rate": 0.0, "hold_back_rate": 0.0, "pull_race_window_ms": 0.0, "duplicate_rate": 0.0}
    with stack.semantics.behaving(**quiet):
        yield


def wait_until_published(stack: Any, topic: str, count: int, timeout: float = 30.0) -> None:
    """Until ``count`` messages were published to ``topic``, as the production-semantics layer's meter counts
    them (without the layer: two seconds)."""
    if stack.semantics is None:
        time.sleep(2.0)
        return
    deadline = time.monotonic() + timeout
    while (counts := stack.semantics.meter().topics.get(topic)) is None or counts.messages_published < count:
        assert time.monotonic() < deadline, f"{count} messages were never published to {topic}"
        time.sleep(0.1)
