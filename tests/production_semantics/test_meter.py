"""Behaviour 5, the meter: what a run costs, per subscription, per topic and in total, at Pub/Sub's billable
sizes (https://cloud.google.com/pubsub/pricing: data, attributes, 20 bytes of timestamp and the message id; at
least 1,000 bytes per publish request). The bare emulator counts nothing; the stack without the layer has no
meter (``stack.semantics`` is None), which the switch tests check. Also the control client's contract."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.local.production_semantics import ENVIRONMENT_VARIABLE, Counts, SemanticsClient
from tests.production_semantics.conftest import PROJECT, PubSub


def test_the_meter_counts_a_run_per_subscription_and_topic(layer: PubSub, semantics: SemanticsClient) -> None:
    topic, subscription = layer.topic_and_subscription(retain_acked_messages=True)
    ids = [layer.publish(topic, b"x" * 100, k="v") for _ in range(2)]
    [first] = layer.pull(subscription, max_messages=1)
    layer.subscriber.modify_ack_deadline(request={"subscription": subscription, "ack_ids": [first.ack_id], "ack_deadline_seconds": 30})
    layer.subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [first.ack_id]})
    assert len(layer.stream_for(subscription, 2)) == 1
    layer.subscriber.seek(request={"subscription": subscription, "time": Timestamp(seconds=0)})

    sizes = [100 + len("k") + len("v") + 20 + len(message_id) for message_id in ids]
    meter = semantics.meter()
    published, counts = meter.topic(topic), meter.subscription(subscription)
    assert (published.publish_requests, published.messages_published) == (2, 2)
    assert published.bytes_published == sum(sizes) and published.billed_publish_bytes == 2000
    assert published.admin_ops == {"CreateTopic": 1}
    assert counts.admin_ops == {"CreateSubscription": 1, "Seek": 1} and counts.seeks == 1
    assert (counts.pull_calls, counts.streaming_pulls_opened) == (1, 1)
    assert counts.acknowledge_calls >= 2 and counts.modify_ack_deadline_calls >= 1  # the streaming client's too
    assert (counts.messages_delivered, counts.bytes_delivered) == (2, sum(sizes))
    assert counts.retained_bytes == sum(sizes)
    assert meter.total.admin_ops_total == 3 and meter.total.messages_delivered == 2

    semantics.reset_meter()
    assert semantics.meter().total == Counts() and semantics.meter().subscriptions == {}


def test_behaving_restores_the_settings_and_a_bad_setting_is_refused(semantics: SemanticsClient) -> None:
    before = semantics.settings()
    with pytest.raises(RuntimeError), semantics.behaving(duplicate_rate=0.5, delivery_latency_ms=100) as during:
        assert (during.duplicate_rate, during.delivery_latency_ms) == (0.5, 100)
        raise RuntimeError("the block fails")
    assert semantics.settings() == before
    with pytest.raises(ValueError, match="unknown setting.*duplicates.*the settings are: admin_ops_per_minute"):
        semantics.configure(duplicates=1)
    with pytest.raises(ValueError, match="empty_pull_rate=2 must be between 0 and 1"):
        semantics.configure(empty_pull_rate=2)
    assert semantics.settings() == before


def test_the_stack_without_the_layer_talks_to_the_emulator() -> None:
    with LocalStack(topics=(), buckets=(), project=PROJECT, production_semantics=False) as stack:
        assert stack.semantics is None and stack.pubsub_host == stack.emulator_host
        assert "pubsub-semantics" not in stack.servers


def test_the_environment_switches_the_layer_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    assert LocalStack().production_semantics is False
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    assert LocalStack().production_semantics is True
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    assert LocalStack().production_semantics is True


def test_the_layer_is_between_the_stack_and_its_emulator(semantic_stack: LocalStack) -> None:
    assert semantic_stack.pubsub_host != semantic_stack.emulator_host
    assert semantic_stack.environment["PUBSUB_EMULATOR_HOST"] == semantic_stack.pubsub_host
