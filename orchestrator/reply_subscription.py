"""Where the Pub/Sub reader's replies come from: a filtered subscription on the reply topic, read by
streaming pull, created **before** the trigger is published (so no reply can be missed) and deleted when the
session ends; it also carries an expiration policy, the backstop for an orchestrator that dies without
cleaning up.

A single session has a subscription of its own, filtered on its session id. A fan-out group shares one:
its sessions' ids share a prefix (``new_session_id(group)``), the subscription's filter selects that prefix,
and ``ReplyDemux`` hands each message to its session's reader. One stream then serves every shard, instead
of one subscription, stream and thread pool per shard.

Two things production Pub/Sub does that the emulator never shows are handled here:

- a retried ``CreateSubscription`` whose first attempt landed answers ``ALREADY_EXISTS``: the name carries 128
  random bits (or 64 for a fan-out group), so nobody else can hold it and that answer means success;
- ``StreamingPull`` on a subscription created moments ago can answer ``NOT_FOUND`` for a short while
  (googleapis/java-pubsub#81, googleapis/google-cloud-go#9723), and google-cloud-pubsub ends the stream for
  good on ``NotFound``: the stream is re-opened, with backoff, for ``NEW_SUBSCRIPTION_GRACE_SECONDS`` after
  creation. The subscription already exists then, so replies published meanwhile wait in it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from dagster_gcf_pipes.orchestrator.errors import PipesPubSubConfigError
from dagster_gcf_pipes.shared.protocol import Attr
from dagster_gcf_pipes.shared.retry import transient_retry

#: How long tearing a session down may wait on an unreachable Pub/Sub before leaving the subscription to
#: its expiration policy: cleanup must not hold up (or mask) the step's real outcome.
CLEANUP_BUDGET_SECONDS = 10.0

#: Pub/Sub's minimum expiration TTL: an idle per-session subscription disappears a day after its last use.
SUBSCRIPTION_TTL_SECONDS = 24 * 3600

#: How long after creating a subscription a NOT_FOUND from StreamingPull is taken for the service not having
#: caught up yet (and the stream re-opened) rather than for a subscription that is gone.
NEW_SUBSCRIPTION_GRACE_SECONDS = 60.0
REOPEN_FIRST_DELAY_SECONDS = 0.2
REOPEN_MAX_DELAY_SECONDS = 5.0

#: One CreateSubscription attempt; tenacity is the only retry layer (the generated client's own default
#: retries Aborted/ServiceUnavailable/Unknown for up to 60 s, which under tenacity would multiply the budget).
CREATE_TIMEOUT_SECONDS = 30.0

OnMessage = Callable[[pubsub_v1.subscriber.message.Message], None]
StreamingPull = pubsub_v1.subscriber.futures.StreamingPullFuture


@transient_retry()
def _create_subscription(subscriber: pubsub_v1.SubscriberClient, request: Mapping[str, Any]) -> None:
    try:
        subscriber.create_subscription(request=request, retry=None, timeout=CREATE_TIMEOUT_SECONDS)
    except gexc.AlreadyExists:
        pass  # an earlier attempt of this call created it: the name is ours alone (see the module docstring)


@transient_retry(max_seconds=CLEANUP_BUDGET_SECONDS)
def _delete_subscription(subscriber: pubsub_v1.SubscriberClient, path: str) -> None:
    try:
        subscriber.delete_subscription(request={"subscription": path}, retry=None, timeout=5)
    except gexc.NotFound:
        pass


class ReplySubscription:
    """A context manager: the subscription exists and is streamed into ``on_message`` inside the block."""

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        *,
        topic: str,
        name: str,
        filter: str,
        on_message: OnMessage,
        log: logging.Logger | Any,
        ack_deadline_seconds: int = 60,
    ):
        self._subscriber = subscriber
        self._topic = topic
        self.path = subscriber.subscription_path(topic.split("/")[1], name)
        self._filter = filter
        self._on_message = on_message
        self._log = log
        self._ack_deadline_seconds = ack_deadline_seconds
        self._lock = threading.Lock()
        self._streaming: StreamingPull | None = None
        self._created_at = 0.0
        self._reopens = 0
        self._reopen: threading.Timer | None = None
        self._closing = False

    def __enter__(self) -> ReplySubscription:
        self._create()
        self._created_at = time.monotonic()
        try:
            self._open_stream()
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closing = True
            if self._reopen is not None:
                self._reopen.cancel()
            streaming = self._streaming
        if streaming is not None:
            streaming.cancel()
            try:
                streaming.result(timeout=CLEANUP_BUDGET_SECONDS)
            except BaseException:  # noqa: BLE001 - the stream's end is not the step's outcome
                pass
        self._delete()

    def stopped(self) -> str | None:
        """Why the stream stopped, if it did while it should be running (and is not about to be re-opened)."""
        with self._lock:
            streaming, reopening = self._streaming, self._reopen is not None
        if self._closing or streaming is None or not streaming.done() or reopening:
            return None
        error = streaming.exception()
        if isinstance(error, gexc.NotFound):
            if not self._past_grace():
                return None  # its done-callback is scheduling the re-open
            return (
                f"reading {self.path} stopped: StreamingPull still answered NOT_FOUND "
                f"{time.monotonic() - self._created_at:.0f}s after the subscription was created "
                f"({self._reopens} re-opens; {error.message}): it was deleted while the session ran (by another "
                "process, or a cleanup job matching dagster-pipes-*); check the project's audit log for "
                "DeleteSubscription"
            )
        return (
            f"reading {self.path} stopped: {error!r}; check that Pub/Sub is reachable and the subscription exists"
        )

    def _past_grace(self) -> bool:
        return time.monotonic() - self._created_at >= NEW_SUBSCRIPTION_GRACE_SECONDS

    def _open_stream(self) -> None:
        with self._lock:
            self._reopen = None
            if self._closing:
                return
            self._streaming = self._subscriber.subscribe(
                self.path,
                self._on_message,
                flow_control=pubsub_v1.types.FlowControl(max_messages=1000),
                await_callbacks_on_shutdown=True,
            )
            streaming = self._streaming
        streaming.add_done_callback(self._on_stream_end)

    def _on_stream_end(self, streaming: StreamingPull) -> None:
        """A stream ended: re-open it (with jittered exponential backoff) if it ended on NOT_FOUND within the
        grace period after creation; anything else is left for ``stopped()`` to report."""
        if not isinstance(streaming.exception(), gexc.NotFound) or self._past_grace():
            return
        with self._lock:
            if self._closing or streaming is not self._streaming:
                return
            self._reopens += 1
            delay = min(REOPEN_MAX_DELAY_SECONDS, REOPEN_FIRST_DELAY_SECONDS * 2 ** (self._reopens - 1))
            self._reopen = threading.Timer(delay * random.uniform(0.5, 1.0), self._open_stream)
            self._reopen.daemon = True
            self._reopen.start()
        self._log.info(
            f"[pipes] StreamingPull answered NOT_FOUND for {self.path}, created "
            f"{time.monotonic() - self._created_at:.1f}s ago; re-opening the stream (attempt {self._reopens})"
        )

    def _create(self) -> None:
        request = {
            "name": self.path,
            "topic": self._topic,
            "filter": self._filter,
            "ack_deadline_seconds": self._ack_deadline_seconds,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_SECONDS}},
            "message_retention_duration": {"seconds": 600},
        }
        try:
            _create_subscription(self._subscriber, request)
        except gexc.NotFound as exc:
            raise PipesPubSubConfigError(
                f"reply topic {self._topic} does not exist: create it "
                f"(gcloud pubsub topics create {self._topic.rsplit('/', 1)[-1]}) or fix reply_topic"
            ) from exc
        except gexc.PermissionDenied as exc:
            raise PipesPubSubConfigError(
                f"not allowed to create subscription {self.path} on {self._topic}: "
                "grant the orchestrator's service account roles/pubsub.subscriber and roles/pubsub.editor "
                f"(or a custom role with pubsub.subscriptions.create/delete) ({exc.message})"
            ) from exc

    def _delete(self) -> None:
        try:
            _delete_subscription(self._subscriber, self.path)
        except gexc.GoogleAPIError as exc:
            self._log.warning(
                f"[pipes] could not delete {self.path} ({exc}); its expiration policy removes it "
                f"after {SUBSCRIPTION_TTL_SECONDS // 3600} h unused"
            )


class ReplyDemux:
    """One subscription for a fan-out group: each reply goes to the reader of its session; replies of no
    running session (a late duplicate of a finished shard) are acked and dropped."""

    def __init__(self, subscriber: pubsub_v1.SubscriberClient, *, topic: str, group: str, log: logging.Logger | Any):
        self.group = group
        self._routes: dict[str, OnMessage] = {}
        self._lock = threading.Lock()
        self._subscription = ReplySubscription(
            subscriber,
            topic=topic,
            name=f"dagster-pipes-group-{group}",
            filter=f'hasPrefix(attributes.{Attr.SESSION}, "{group}")',
            on_message=self._dispatch,
            log=log,
        )

    @property
    def subscription_path(self) -> str:
        return self._subscription.path

    def __enter__(self) -> ReplyDemux:
        self._subscription.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._subscription.__exit__(*exc)

    @contextmanager
    def route(self, session_id: str, on_message: OnMessage) -> Iterator[ReplySubscription]:
        with self._lock:
            self._routes[session_id] = on_message
        try:
            yield self._subscription
        finally:
            with self._lock:
                del self._routes[session_id]

    def _dispatch(self, message: pubsub_v1.subscriber.message.Message) -> None:
        with self._lock:
            on_message = self._routes.get(message.attributes.get(Attr.SESSION, ""))
        if on_message is None:
            message.ack()
        else:
            on_message(message)
