"""Behaviour 3, at-least-once delivery without order.

- Duplicates: Pub/Sub delivers a message at least once, and may deliver it again after it was acknowledged
  (https://cloud.google.com/pubsub/docs/exactly-once-delivery, "at-least-once delivery" by default).
- An ack after the ack deadline is not honoured: REST ``acknowledge``, "Acknowledging a message whose ack
  deadline has expired may succeed, but such a message may be redelivered later".
- No order across publishes without ordering keys
  (https://cloud.google.com/pubsub/docs/ordering: "messages might be delivered ... in any order").
The emulator delivers each message once, in order, and honours a late ack.
"""

from __future__ import annotations

import time
from collections import Counter

from dagster_gcf_pipes.local.production_semantics import SemanticsClient
from tests.production_semantics.conftest import PubSub


def test_every_message_can_be_delivered_twice(layer: PubSub, semantics: SemanticsClient) -> None:
    pulled_topic, streamed_topic = layer.topic(), layer.topic()
    by_pull, by_stream = layer.subscription(pulled_topic), layer.subscription(streamed_topic)
    with semantics.behaving(duplicate_rate=1.0, duplicate_delay_ms=300):
        for i in range(3):
            layer.publish(pulled_topic, b"m%d" % i)
            layer.publish(streamed_topic, b"m%d" % i)
        pulled = layer.pull_for(by_pull, 3)  # acked as they come: the copies come anyway
        streamed = layer.stream_for(by_stream, 3)
    assert sorted(Counter(m.message.message_id for m in pulled).values()) == [2, 2, 2]
    assert len({m.ack_id for m in pulled}) == 6  # each delivery has its own ack id
    assert sorted(m.data for m in streamed) == [b"m0", b"m0", b"m1", b"m1", b"m2", b"m2"]
    assert semantics.meter().total.duplicates == 6


def test_the_bare_emulator_delivers_each_message_once(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription()
    for i in range(3):
        bare.publish(topic, b"m%d" % i)
    assert sorted(m.message.data for m in bare.pull_for(subscription, 3)) == [b"m0", b"m1", b"m2"]


def _ack_late(clients: PubSub, subscription: str) -> None:
    """Pull the one message, shorten its ack deadline to 1 s, and ack it 2 s later."""
    [message] = clients.pull(subscription)
    clients.subscriber.modify_ack_deadline(
        request={"subscription": subscription, "ack_ids": [message.ack_id], "ack_deadline_seconds": 1}
    )
    time.sleep(2)
    clients.subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [message.ack_id]})  # no error


def test_an_ack_after_the_deadline_is_not_honoured(layer: PubSub, semantics: SemanticsClient) -> None:
    topic, subscription = layer.topic_and_subscription()
    layer.publish(topic, b"late")
    with semantics.behaving(refuse_late_acks=True):
        _ack_late(layer, subscription)
        assert [m.message.data for m in layer.pull_for(subscription, 3)] == [b"late"]
    assert semantics.meter().subscription(subscription).late_acks_refused == 1


def test_the_bare_emulator_honours_a_late_ack(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription()
    bare.publish(topic, b"late")
    _ack_late(bare, subscription)
    assert bare.pull_for(subscription, 3) == []


def test_messages_arrive_in_no_particular_order(layer: PubSub, semantics: SemanticsClient) -> None:
    topic, subscription = layer.topic_and_subscription()
    sent = [b"%02d" % i for i in range(20)]
    with semantics.behaving(reorder=True, hold_back_rate=0.3, hold_back_ms=300):
        for data in sent:
            layer.publish(topic, data)
        received = [m.message.data for m in layer.pull_for(subscription, 3)]
    assert sorted(received) == sent and received != sent
    assert semantics.meter().subscription(subscription).held_back > 0


def test_the_bare_emulator_delivers_in_publish_order(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription()
    sent = [b"%02d" % i for i in range(20)]
    for data in sent:
        bare.publish(topic, data)
    assert [m.message.data for m in bare.pull(subscription)] == sent
