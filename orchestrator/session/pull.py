"""Synchronous pull for sensors: a sensor tick takes what is waiting on a subscription, up to a cap, and
decides per message whether to ack it (done) or hand it back (nack: redelivered on a later tick)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.shared.retry import transient_retry

#: Pub/Sub's per-request maximum for pull and for acknowledge / modifyAckDeadline.
MAX_PER_REQUEST = 1000


def subscription_path(project: str, subscription: str) -> str:
    return subscription if subscription.startswith("projects/") else f"projects/{project}/subscriptions/{subscription}"


@transient_retry()
def _pull_once(subscriber: pubsub_v1.SubscriberClient, path: str, max_messages: int, timeout: float) -> list[Any]:
    try:
        response = subscriber.pull(request={"subscription": path, "max_messages": max_messages}, timeout=timeout, retry=None)
    except gexc.DeadlineExceeded:
        return []  # nothing arrived within the timeout
    except gexc.NotFound as exc:
        project, name = path.split("/")[1], path.rsplit("/", 1)[-1]
        raise PipesPubSubConfigError(
            f"subscription {path} does not exist: create it (gcloud pubsub subscriptions create {name} --topic TOPIC "
            f"--project {project} --ack-deadline 60 --expiration-period never) or fix the sensor's subscription. "
            "If it existed before, it was deleted or expired: without --expiration-period never, Pub/Sub deletes a "
            "subscription after 31 days without subscriber activity"
        ) from exc
    return list(response.received_messages)


def pull(
    subscriber: pubsub_v1.SubscriberClient,
    path: str,
    *,
    max_messages: int,
    timeout: float = 5.0,
    follow_up_timeout: float = 1.0,
) -> list[Any]:
    """Up to ``max_messages`` received messages: pulls until the subscription answers empty or the cap is met.

    A pull may return fewer messages than are waiting, so pulling goes on after a non-empty answer; those
    follow-up pulls wait at most ``follow_up_timeout``, since an empty subscription answers only at the deadline."""
    received: list[Any] = []
    while len(received) < max_messages:
        batch = _pull_once(
            subscriber, path, min(MAX_PER_REQUEST, max_messages - len(received)), follow_up_timeout if received else timeout
        )
        if not batch:
            break
        received.extend(batch)
    return received


@transient_retry()
def _ack_chunk(subscriber: pubsub_v1.SubscriberClient, path: str, ack_ids: list[str]) -> None:
    subscriber.acknowledge(request={"subscription": path, "ack_ids": ack_ids}, retry=None, timeout=30)


@transient_retry()
def _nack_chunk(subscriber: pubsub_v1.SubscriberClient, path: str, ack_ids: list[str]) -> None:
    subscriber.modify_ack_deadline(
        request={"subscription": path, "ack_ids": ack_ids, "ack_deadline_seconds": 0}, retry=None, timeout=30
    )


def _chunked(ack_ids: Iterable[str]) -> Iterable[list[str]]:
    ids = list(ack_ids)
    for start in range(0, len(ids), MAX_PER_REQUEST):
        yield ids[start : start + MAX_PER_REQUEST]


def ack(subscriber: pubsub_v1.SubscriberClient, path: str, ack_ids: Iterable[str]) -> None:
    for chunk in _chunked(ack_ids):
        _ack_chunk(subscriber, path, chunk)


def nack(subscriber: pubsub_v1.SubscriberClient, path: str, ack_ids: Iterable[str]) -> None:
    """Hand messages back at once (ack deadline 0), for a later tick."""
    for chunk in _chunked(ack_ids):
        _nack_chunk(subscriber, path, chunk)
