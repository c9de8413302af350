"""Behaviour 7, delivery latency: production delivers "on the order of 100 ms" after publication
(https://cloud.google.com/pubsub/docs/overview); ``delivery_latency_ms`` hands a message out no earlier than
that long after its publish time, so the bench can show production-like latency next to the emulator's."""

from __future__ import annotations

import time
from typing import Any

from dagster_gcf_pipes.local.production_semantics import SemanticsClient
from tests.production_semantics.conftest import PubSub

LATENCY = 0.4


def _age(publish_time: Any) -> float:
    """Seconds since a received message's publish time (a datetime, as the clients give it)."""
    return time.time() - publish_time.timestamp()


def test_a_message_is_handed_out_no_earlier_than_the_latency(layer: PubSub, semantics: SemanticsClient) -> None:
    pulled_topic, streamed_topic = layer.topic(), layer.topic()
    by_pull, by_stream = layer.subscription(pulled_topic), layer.subscription(streamed_topic)
    ages = []

    def on_message(message: Any) -> None:
        ages.append(_age(message.publish_time))
        message.ack()

    with semantics.behaving(delivery_latency_ms=LATENCY * 1000):
        stream = layer.subscriber.subscribe(by_stream, on_message)
        time.sleep(1)
        layer.publish(streamed_topic, b"streamed")
        layer.publish(pulled_topic, b"pulled")
        [message] = layer.pull(by_pull, timeout=5)
        ages.append(_age(message.message.publish_time))
        time.sleep(1)
        stream.cancel()
        stream.result(timeout=10)
    assert len(ages) == 2 and all(LATENCY <= age < LATENCY + 0.5 for age in ages), ages


def test_the_bare_emulator_delivers_sooner(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription()
    bare.publish(topic, b"pulled")
    [message] = bare.pull(subscription, timeout=5)
    assert _age(message.message.publish_time) < LATENCY
