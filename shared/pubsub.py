"""Publishing with the shared retry policy: both sides publish through this one function."""

from __future__ import annotations

from collections.abc import Mapping

from google.cloud import pubsub_v1

from dagster_gcf_pipes.shared.retry import transient_retry


@transient_retry(max_seconds=120)
def publish(
    publisher: pubsub_v1.PublisherClient, topic: str, data: bytes, attributes: Mapping[str, str], timeout: float = 60.0
) -> str:
    """Publish one message and wait for Pub/Sub to accept it; returns the message id."""
    return publisher.publish(topic, data, **attributes).result(timeout=timeout)
