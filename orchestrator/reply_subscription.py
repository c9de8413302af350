"""Where the Pub/Sub reader's replies come from: a filtered subscription on the reply topic, read by
streaming pull, created **before** the trigger is published (so no reply can be missed) and deleted when the
session ends; it also carries an expiration policy, the backstop for an orchestrator that dies without
cleaning up.

A single session has a subscription of its own, filtered on its session id. A fan-out group shares one:
its sessions' ids share a prefix (``new_session_id(group)``), the subscription's filter selects that prefix,
and ``ReplyDemux`` hands each message to its session's reader. One stream then serves every shard, instead
of one subscription, stream and thread pool per shard.
"""

from __future__ import annotations

import logging
import threading
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

OnMessage = Callable[[pubsub_v1.subscriber.message.Message], None]


@transient_retry()
def _create_subscription(subscriber: pubsub_v1.SubscriberClient, request: Mapping[str, Any]) -> None:
    subscriber.create_subscription(request=request)


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
        self._streaming: pubsub_v1.subscriber.futures.StreamingPullFuture | None = None

    def __enter__(self) -> ReplySubscription:
        self._create()
        try:
            self._streaming = self._subscriber.subscribe(
                self.path,
                self._on_message,
                flow_control=pubsub_v1.types.FlowControl(max_messages=1000),
                await_callbacks_on_shutdown=True,
            )
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._streaming is not None:
            self._streaming.cancel()
            try:
                self._streaming.result(timeout=CLEANUP_BUDGET_SECONDS)
            except BaseException:  # noqa: BLE001 - the stream's end is not the step's outcome
                pass
        self._delete()

    def stopped(self) -> str | None:
        """Why the stream stopped, if it did while it should be running."""
        if self._streaming is None or not self._streaming.done():
            return None
        return (
            f"reading {self.path} stopped: {self._streaming.exception()!r}; check that Pub/Sub is reachable and "
            "the subscription exists"
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
