"""Pub/Sub clients and publishing, the same on both sides of the wire.

**Channels.** The client library opens production channels without message-size limits
(``grpc.max_receive_message_length=-1``), but in emulator mode (``PUBSUB_EMULATOR_HOST``) it opens a plain
``grpc.insecure_channel`` that keeps gRPC's default 4 MiB receive limit. A larger message can then never be
received: the streaming pull fails with RESOURCE_EXHAUSTED, reopens, is sent the same message again, and
never acks it, forever and without a log line. ``subscriber_client`` and ``publisher_client`` open the
emulator channel with the production options, so the local stack accepts what Pub/Sub accepts (10 MB).

**Stream watch.** The library retries a failing streaming pull silently. ``WatchedSubscriberClient`` notes
every stream that ends with an error, per subscription (``stream_trouble``), so a reader can tell "the
function went silent" from "the stream cannot deliver", and logs loudly, once, a message that can never be
delivered (larger than the channel's receive limit), with what to do about it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from dagster_gcf_pipes.shared.retry import transient_retry
from dagster_gcf_pipes.shared.tracing import publisher_options

#: what the client library sets on production channels (google/pubsub_v1/services/*/transports/grpc.py)
PRODUCTION_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_metadata_size", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30000),
)

_log = logging.getLogger(__name__)


def _emulator_channel() -> tuple[str, grpc.Channel] | None:
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    return (host, grpc.insecure_channel(host, options=PRODUCTION_CHANNEL_OPTIONS)) if host else None


def publisher_client(**kwargs: Any) -> pubsub_v1.PublisherClient:
    """A ``PublisherClient`` (``kwargs`` as its own) whose emulator channel has no size limits."""
    kwargs.setdefault("publisher_options", publisher_options())
    emulator = _emulator_channel()
    if emulator is not None:
        host, channel = emulator
        kwargs["transport"] = PublisherGrpcTransport(channel=channel, host=host)
    return pubsub_v1.PublisherClient(**kwargs)


def subscriber_client() -> WatchedSubscriberClient:
    """A ``SubscriberClient`` whose emulator channel has no size limits and whose streams are watched."""
    emulator = _emulator_channel()
    if emulator is None:
        return WatchedSubscriberClient()
    host, channel = emulator
    return WatchedSubscriberClient(transport=SubscriberGrpcTransport(channel=channel, host=host))


@transient_retry(max_seconds=120)
def publish(
    publisher: pubsub_v1.PublisherClient, topic: str, data: bytes, attributes: Mapping[str, str], timeout: float = 60.0
) -> str:
    """Publish one message and wait for Pub/Sub to accept it; returns the message id."""
    return publisher.publish(topic, data, **attributes).result(timeout=timeout)


# ---------------------------------------------------------------------------------------------- stream watch


@dataclass
class StreamTrouble:
    """Streams of one subscription that ended with an error since it was last healthy."""

    subscription: str
    error: str
    first_at: float  # wall clock
    last_at: float
    failures: int = 1
    #: a message larger than the channel accepts: it is redelivered forever and never arrives
    undeliverable: bool = False

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.gmtime(self.first_at))
        return f"the streaming pull of {self.subscription} failed {self.failures} time(s) since {since} UTC (last: {self.error})"


_troubles: dict[str, StreamTrouble] = {}
_troubles_lock = threading.Lock()


def stream_trouble(subscription: str) -> StreamTrouble | None:
    """What went wrong with the streams of ``subscription`` read by a ``WatchedSubscriberClient``, if anything."""
    with _troubles_lock:
        return _troubles.get(subscription)


def forget_stream(subscription: str) -> None:
    """Drop what was noted about ``subscription`` (call it when the subscription is deleted)."""
    with _troubles_lock:
        _troubles.pop(subscription, None)


def undeliverable_hint(subscription: str, error: str) -> str:
    return (
        f"a message on {subscription} can never be delivered: {error}. Pub/Sub redelivers it forever without an "
        "ack, and every reader of the subscription stalls behind it. Open subscribers with "
        "dagster_gcf_pipes.shared.pubsub.subscriber_client() (no receive limit, as production channels), keep "
        "inline_threshold_bytes at its default, and drop the message with `gcloud pubsub subscriptions seek "
        f"{subscription.rsplit('/', 1)[-1]} --time=$(date -u +%Y-%m-%dT%H:%M:%SZ)` if it is still there"
    )


def _note_stream_end(subscription: str, call: grpc.Call) -> None:
    code = call.code()
    if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        return  # a stream closed by its owner
    details = call.details() or ""
    error = f"{code.name}: {details}"
    undeliverable = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    now = time.time()
    with _troubles_lock:
        trouble = _troubles.get(subscription)
        first = trouble is None or (undeliverable and not trouble.undeliverable)
        if trouble is None:
            trouble = _troubles[subscription] = StreamTrouble(subscription, error, now, now, 0)
        trouble.error, trouble.last_at, trouble.failures = error, now, trouble.failures + 1
        trouble.undeliverable = trouble.undeliverable or undeliverable
    if first and undeliverable:
        _log.error("%s", undeliverable_hint(subscription, error))
    elif first:
        _log.warning("streaming pull of %s failed (%s); reconnecting", subscription, error)


class WatchedSubscriberClient(pubsub_v1.SubscriberClient):
    """A ``SubscriberClient`` that notes how each of its streaming pulls ended (``stream_trouble``)."""

    def streaming_pull(self, requests: Iterator[Any] | None = None, **kwargs: Any) -> Any:
        assert requests is not None, "streaming_pull needs its request stream"
        first = next(requests)  # the initial request names the subscription
        call = super().streaming_pull(itertools.chain([first], requests), **kwargs)
        subscription = first.subscription
        grpc_call = getattr(call, "_wrapped", call)  # api_core's iterator wraps the gRPC call
        grpc_call.add_done_callback(lambda done: _note_stream_end(subscription, done))
        return call
