"""Behaviour 1, filters (https://cloud.google.com/pubsub/docs/filtering): a filtered subscription receives only
the matching messages; Pub/Sub acknowledges the others itself and still bills their delivery. The emulator
stores filters and delivers everything, and accepts filters Pub/Sub refuses."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc

from dagster_gcf_pipes.local.production_semantics import SemanticsClient
from tests.production_semantics.conftest import PubSub

FILTER = 'attributes.session = "mine"'
MINE = [b"mine-0", b"mine-1", b"mine-2"]


def _publish_mixed(clients: PubSub, topic: str) -> None:
    for i in range(3):
        clients.publish(topic, b"mine-%d" % i, session="mine")
        clients.publish(topic, b"other-%d" % i, session="other")


def test_a_filtered_subscription_gets_only_matching_messages_and_the_rest_is_acked_and_billed(
    layer: PubSub, bare: PubSub, semantics: SemanticsClient
) -> None:
    pulled_topic, streamed_topic = layer.topic(), layer.topic()
    by_pull = layer.subscription(pulled_topic, filter=FILTER)
    by_stream = layer.subscription(streamed_topic, filter=FILTER)
    _publish_mixed(layer, pulled_topic)
    _publish_mixed(layer, streamed_topic)

    assert sorted(m.message.data for m in layer.pull_for(by_pull, 3)) == MINE
    assert sorted(m.data for m in layer.stream_for(by_stream, 3)) == MINE
    # the layer acknowledged the others upstream: the emulator itself has nothing left on either subscription
    assert bare.pull_for(by_pull, 1.5) == [] and bare.pull_for(by_stream, 1.5) == []
    meter = semantics.meter()
    for path in (by_pull, by_stream):
        counts = meter.subscription(path)
        assert (counts.messages_delivered, counts.messages_filtered_out) == (6, 3)  # filtered-out billed as delivered
        assert 0 < counts.bytes_filtered_out < counts.bytes_delivered


def test_the_bare_emulator_delivers_what_the_filter_rejects(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription(filter=FILTER)
    _publish_mixed(bare, topic)
    assert len(bare.pull_for(subscription, 3)) == 6


def test_an_invalid_filter_is_refused_at_creation(layer: PubSub, bare: PubSub) -> None:
    topic = layer.topic()
    with pytest.raises(gexc.InvalidArgument, match="string literal"):
        layer.subscription(topic, filter="attributes.session = mine")
    with pytest.raises(gexc.NotFound):  # nothing was created
        bare.subscriber.get_subscription(request={"subscription": topic.replace("/topics/", "/subscriptions/")})


def test_the_bare_emulator_accepts_an_invalid_filter(bare: PubSub) -> None:
    topic, subscription = bare.topic_and_subscription(filter="attributes.session = mine")
    assert bare.subscriber.get_subscription(request={"subscription": subscription}).filter == "attributes.session = mine"


def test_a_subscription_the_layer_did_not_see_created_is_filtered_too(layer: PubSub, bare: PubSub) -> None:
    """Created on the emulator (as before the layer started): its filter is read with GetSubscription."""
    topic, subscription = bare.topic_and_subscription(filter=FILTER)
    _publish_mixed(bare, topic)
    assert sorted(m.message.data for m in layer.pull_for(subscription, 3)) == MINE
