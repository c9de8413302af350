"""Behaviour 2, unary Pull as production serves it.

- A Pull whose client deadline passes after the service handed it messages loses them until their ack deadline
  (googleapis/google-cloud-python#8087, googleapis/google-cloud-php#710, googleapis/python-pubsub#1414): the
  layer loses what it obtains within ``pull_race_window_ms`` of the client's deadline.
- "A response with zero messages or with an error does not necessarily indicate that there are no messages
  available to receive" (https://cloud.google.com/pubsub/docs/pull): ``empty_pull_rate``.
- Pub/Sub holds a Pull until messages arrive or the deadline passes; the emulator answers an empty Pull about a
  second before its client's deadline (one with a shorter deadline at once), so it never meets the race, and a
  loop of short pulls spins on it.
"""

from __future__ import annotations

import threading
import time

import pytest
from google.api_core import exceptions as gexc

from dagster_gcf_pipes.local.production_semantics import SemanticsClient
from tests.production_semantics.conftest import PubSub

ACK_DEADLINE = 10  # Pub/Sub's minimum


def test_messages_handed_to_a_pull_whose_client_gives_up_come_back_only_after_their_ack_deadline(
    layer: PubSub, semantics: SemanticsClient
) -> None:
    topic, subscription = layer.topic_and_subscription(ack_deadline_seconds=ACK_DEADLINE)
    layer.publish(topic, b"raced")
    with semantics.behaving(pull_race_window_ms=1000):  # longer than the pull: whatever it obtains is lost
        with pytest.raises(gexc.DeadlineExceeded):
            layer.subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=0.5, retry=None)
    lost_at = time.monotonic()
    assert semantics.meter().subscription(subscription).pull_race_lost == 1
    assert layer.pull_for(subscription, 5) == []  # outstanding, although nobody has it
    back = layer.pull_for(subscription, ACK_DEADLINE + 5)
    assert [m.message.data for m in back] == [b"raced"]
    assert time.monotonic() - lost_at >= ACK_DEADLINE - 1


def test_the_bare_emulator_hands_a_short_pull_its_messages_at_once(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription(ack_deadline_seconds=ACK_DEADLINE)
    bare.publish(topic, b"raced")
    assert [m.message.data for m in bare.pull(subscription, timeout=0.5)] == [b"raced"]


def test_a_pull_can_answer_empty_while_messages_wait(layer: PubSub, semantics: SemanticsClient) -> None:
    topic, subscription = layer.topic_and_subscription()
    layer.publish(topic, b"waiting")
    with semantics.behaving(empty_pull_rate=1.0):
        started = time.monotonic()
        assert layer.pull(subscription, timeout=5) == []
        assert time.monotonic() - started < 1  # at once, not at the deadline
    assert [m.message.data for m in layer.pull(subscription)] == [b"waiting"]
    assert semantics.meter().subscription(subscription).empty_pulls == 1


def test_the_bare_emulator_answers_a_pull_with_the_waiting_message(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription()
    bare.publish(topic, b"waiting")
    assert [m.message.data for m in bare.pull(subscription, timeout=5)] == [b"waiting"]


def _publish_later(clients: PubSub, topic: str, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, clients.publish, (topic, b"later"))
    timer.start()
    return timer


def test_a_pull_waits_for_a_message(layer: PubSub) -> None:
    topic, subscription = layer.topic_and_subscription()
    publishing = _publish_later(layer, topic, 0.3)
    started = time.monotonic()
    assert [m.message.data for m in layer.pull(subscription, timeout=0.8)] == [b"later"]
    assert 0.25 < time.monotonic() - started < 0.8
    publishing.join()


def test_the_bare_emulator_answers_a_short_pull_at_once_and_empty(bare: PubSub) -> None:
    """It holds a Pull until about a second before the client's deadline: one of under a second, never."""
    topic, subscription = bare.topic_and_subscription()
    publishing = _publish_later(bare, topic, 0.3)
    started = time.monotonic()
    assert bare.pull(subscription, timeout=0.8) == []
    assert time.monotonic() - started < 0.25
    publishing.join()
