"""One local stack for the package, with the production-semantics layer in front of its emulator. Each test
talks to the layer (``stack.pubsub_host``) or, for the paired test that shows what the layer adds, to the bare
emulator behind it (``stack.emulator_host``), with the real google-cloud-pubsub clients on a channel of its
own: nothing here depends on the environment variables.

Every test starts from ``QUIET`` (each behaviour off, a fixed seed) and turns on the one it studies."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.local.production_semantics import SemanticsClient

PROJECT = "semantics-project"
#: every behaviour off: a test turns on the one it studies
QUIET: dict[str, Any] = {
    "filters": True,
    "pull_race_window_ms": 0.0,
    "empty_pull_rate": 0.0,
    "duplicate_rate": 0.0,
    "refuse_late_acks": False,
    "reorder": False,
    "hold_back_rate": 0.0,
    "new_subscription_not_found_seconds": 0.0,
    "new_subscription_not_found_rate": 1.0,
    "new_subscription_not_found_on_pull": False,
    "lost_admin_response_rate": 0.0,
    "admin_ops_per_minute": 6000,
    "delivery_latency_ms": 0.0,
    "seed": 7,
}

_names = itertools.count()


@dataclass
class PubSub:
    """The real clients on a channel to one host (the layer's or the bare emulator's)."""

    host: str
    publisher: pubsub_v1.PublisherClient = field(init=False)
    subscriber: pubsub_v1.SubscriberClient = field(init=False)

    def __post_init__(self) -> None:
        options = [("grpc.max_receive_message_length", -1)]
        self.publisher = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.host, options=options), host=self.host),
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=1),
        )
        self.subscriber = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(self.host, options=options), host=self.host)
        )

    def topic(self, name: str = "") -> str:
        """A new topic (created) named after ``name``."""
        path = f"projects/{PROJECT}/topics/{name or 't'}-{next(_names)}-{time.monotonic_ns()}"
        self.publisher.create_topic(request={"name": path})
        return path

    def subscription(self, topic: str, **settings: Any) -> str:
        """A new subscription of ``topic`` (created, with ``settings``: filter, ack_deadline_seconds ...)."""
        path = topic.replace("/topics/", "/subscriptions/")
        self.subscriber.create_subscription(request={"name": path, "topic": topic, **settings})
        return path

    def topic_and_subscription(self, **settings: Any) -> tuple[str, str]:
        """A new topic and a subscription of it (with ``settings``)."""
        topic = self.topic()
        return topic, self.subscription(topic, **settings)

    def publish(self, topic: str, data: bytes, **attributes: str) -> str:
        return self.publisher.publish(topic, data, **attributes).result(timeout=30)

    def pull(self, subscription: str, timeout: float = 2.0, max_messages: int = 100) -> list[Any]:
        """One Pull; [] when it answers DEADLINE_EXCEEDED."""
        try:
            response = self.subscriber.pull(
                request={"subscription": subscription, "max_messages": max_messages}, timeout=timeout, retry=None
            )
        except gexc.DeadlineExceeded:
            return []
        return list(response.received_messages)

    def pull_for(self, subscription: str, seconds: float, *, ack: bool = True) -> list[Any]:
        """Every message pulled within ``seconds`` (acknowledged unless ``ack`` is false)."""
        received: list[Any] = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0.05:
            batch = self.pull(subscription, timeout=min(1.0, left))
            if batch and ack:
                self.subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [m.ack_id for m in batch]})
            received += batch
        return received

    def stream_for(self, subscription: str, seconds: float) -> list[Any]:
        """Every message a streaming pull (``subscribe``) receives within ``seconds``, each acked."""
        received: list[Any] = []

        def on_message(message: Any) -> None:
            received.append(message)
            message.ack()

        future = self.subscriber.subscribe(subscription, on_message)
        time.sleep(seconds)
        future.cancel()
        future.result(timeout=10)
        return received

    def close(self) -> None:
        self.subscriber.close()
        self.publisher.transport.close()


@pytest.fixture(scope="package")
def semantic_stack() -> Iterator[LocalStack]:
    with LocalStack(topics=(), buckets=(), project=PROJECT, production_semantics=True) as running:
        yield running


@pytest.fixture
def semantics(semantic_stack: LocalStack) -> Iterator[SemanticsClient]:
    """The layer's control client, every behaviour off (``QUIET``) and the meter zeroed; the stack's settings
    are restored after the test."""
    client = semantic_stack.semantics
    assert client is not None
    before = client.settings()
    client.configure(**QUIET)
    client.reset_meter()
    yield client
    client.configure(**before.as_dict())


@pytest.fixture
def layer(semantic_stack: LocalStack, semantics: SemanticsClient) -> Iterator[PubSub]:
    """Clients through the production-semantics layer."""
    clients = PubSub(semantic_stack.pubsub_host)
    yield clients
    clients.close()


@pytest.fixture
def bare(semantic_stack: LocalStack, semantics: SemanticsClient) -> Iterator[PubSub]:
    """Clients straight to the emulator behind the layer."""
    clients = PubSub(semantic_stack.emulator_host)
    yield clients
    clients.close()
