"""Where the Pub/Sub reader's replies come from: a filtered subscription on the reply topic, read by
streaming pull, created **before** the trigger is published (so no reply can be missed) and deleted when the
session ends; it also carries an expiration policy, the backstop for an orchestrator that dies without
cleaning up.

A single session has a subscription of its own, filtered on its session id. A fan-out group shares one:
its sessions' ids share a prefix (``new_session_id(group)``), the subscription's filter selects that prefix,
and ``ReplyDemux`` hands each message to its session's reader. One stream then serves every shard, instead
of one subscription, stream and thread pool per shard.

With re-attach on (``retain``), the subscription keeps acknowledged messages for ``RETAINED_SECONDS``, so a
later attempt of the step can receive every reply of its sessions again (``orchestrator/session/reattach.py``): that attempt creates a subscription of its own (for what is
published from then on) and seeks the earlier attempts' subscriptions (``replay_from``) back to their start
(everything published before); together they hold every reply, and the reader drops what comes twice. A
retained subscription is read by **synchronous pull**, never by streaming pull: the Pub/Sub emulator goes on
assigning a subscription's messages to the streaming pull of a process that was killed, so after the kill
neither a new stream nor a pull on that subscription receives them (measured: nothing in 80 s, seek or not;
a seek followed 1.5 s later by a pull: nothing). A killed synchronous pull holds at most the messages of its
one request, which the seek hands back. A re-attaching fan-out group holds the replies of the shards it
``expect``s until their readers are routed, instead of dropping them as strays.

Two things production Pub/Sub does that the emulator never shows are handled here:

- a retried ``CreateSubscription`` whose first attempt landed answers ``ALREADY_EXISTS``: the name carries 128
  random bits (or 64 for a fan-out group), so nobody else can hold it and that answer means success;
- ``StreamingPull`` on a subscription created moments ago can answer ``NOT_FOUND`` for a short while
  (googleapis/java-pubsub#81, googleapis/google-cloud-go#9723), and google-cloud-pubsub ends the stream for
  good on ``NotFound``: the stream is re-opened (a synchronous pull retried), with backoff, for
  ``NEW_SUBSCRIPTION_GRACE_SECONDS`` after creation. The subscription already exists then, so replies published meanwhile wait in it.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.protobuf.timestamp_pb2 import Timestamp

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.session.pull import MAX_PER_REQUEST, ack
from dagster_gcf_pipes.shared.protocol import Attr
from dagster_gcf_pipes.shared.retry import transient_retry

#: How long tearing a session down may wait on an unreachable Pub/Sub before leaving the subscription to
#: its expiration policy: cleanup must not hold up (or mask) the step's real outcome.
CLEANUP_BUDGET_SECONDS = 10.0

#: Pub/Sub's minimum expiration TTL: an idle per-session subscription disappears a day after its last use.
SUBSCRIPTION_TTL_SECONDS = 24 * 3600

#: With re-attach on: how long a subscription keeps its replies, acknowledged or not, from their publication
#: (a step whose orchestrator died is re-attached if re-executed within this). Pub/Sub wants it shorter than
#: the expiration TTL, which stays at its minimum, SUBSCRIPTION_TTL_SECONDS.
RETAINED_SECONDS = 20 * 3600

#: With re-attach on, a synchronous pull waits this long for replies before the next one; the subscription's
#: ack deadline is Pub/Sub's minimum (every message is acknowledged as soon as it was handed on)
PULL_WAIT_SECONDS = 0.5
PULLED_ACK_DEADLINE_SECONDS = 10

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


@transient_retry()
def _seek_to_start(subscriber: pubsub_v1.SubscriberClient, path: str) -> None:
    """Mark every retained message of the subscription unacknowledged: it is all delivered again. A time
    before the retention window is allowed: only what is retained comes back."""
    subscriber.seek(request={"subscription": path, "time": Timestamp(seconds=0)}, retry=None, timeout=CREATE_TIMEOUT_SECONDS)


def delete_subscription(subscriber: pubsub_v1.SubscriberClient, path: str, log: logging.Logger | Any) -> None:
    """Delete a reply subscription, within ``CLEANUP_BUDGET_SECONDS``; if Pub/Sub cannot be reached, leave it to
    its expiration policy with a warning."""
    try:
        _delete_subscription(subscriber, path)
    except gexc.GoogleAPIError as exc:
        log.warning(
            f"[pipes] could not delete {path} ({exc}); its expiration policy removes it after "
            f"{SUBSCRIPTION_TTL_SECONDS // 3600} h unused"
        )


def subscription_name(owner: str, *, reattaching: bool) -> str:
    """``dagster-pipes-OWNER`` (a session id, or ``group-GROUP``); a re-attaching attempt's own one is
    suffixed, since the earlier attempt's still exists."""
    return f"dagster-pipes-{owner}" + (f"-{secrets.token_hex(4)}" if reattaching else "")


class _PulledMessage:
    """A synchronously pulled message, shaped as the streaming pull hands them over; the pull loop acks it."""

    def __init__(self, received: Any):
        self.message_id = received.message.message_id
        self.data = received.message.data
        self.attributes = received.message.attributes

    def ack(self) -> None:
        """Acknowledged with its batch, once handed on."""


class SubscriptionGone(Exception):
    """The subscription to re-open no longer exists (deleted, or expired)."""


@transient_retry(max_seconds=CLEANUP_BUDGET_SECONDS)
def _delete_subscription(subscriber: pubsub_v1.SubscriberClient, path: str) -> None:
    try:
        subscriber.delete_subscription(request={"subscription": path}, retry=None, timeout=5)
    except gexc.NotFound:
        pass


@transient_retry()
def _pull_once(subscriber: pubsub_v1.SubscriberClient, path: str) -> list[Any]:
    try:
        response = subscriber.pull(
            request={"subscription": path, "max_messages": MAX_PER_REQUEST}, timeout=PULL_WAIT_SECONDS, retry=None
        )
    except gexc.DeadlineExceeded:
        return []  # nothing arrived meanwhile
    return list(response.received_messages)


class ReplySubscription:
    """A context manager: the subscription exists and is streamed into ``on_message`` inside the block, and
    is deleted when the block ends.

    ``retain``: it keeps acknowledged replies (re-attach). ``replay_from``: the subscriptions of the earlier
    attempts of the step, sought back to their start and pulled into ``on_message`` too, then deleted with it
    (``SubscriptionGone`` if one is not there any more)."""

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
        retain: bool = False,
        replay_from: Sequence[str] = (),
    ):
        self._subscriber = subscriber
        self._topic = topic
        self.path = subscriber.subscription_path(topic.split("/")[1], name)
        self._retain = retain
        self._replay_from = list(replay_from)
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
        self._puller: threading.Thread | None = None
        self._pull_error: BaseException | None = None

    def __enter__(self) -> ReplySubscription:
        self._create()
        self._created_at = time.monotonic()
        try:
            for path in self._replay_from:  # after ours exists: whatever ours misses, these hold
                try:
                    _seek_to_start(self._subscriber, path)
                except gexc.NotFound as exc:
                    raise SubscriptionGone(f"{path} is gone (deleted, or expired): {exc.message}") from exc
            if self._retain:
                self._puller = threading.Thread(target=self._pull_loop, name="pipes-pull", daemon=True)
                self._puller.start()
            else:
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
        if self._puller is not None:
            self._puller.join(timeout=CLEANUP_BUDGET_SECONDS)
        self._delete()

    def _pull_loop(self) -> None:
        """Synchronous pull of this subscription and the earlier attempts' until the block ends: each batch
        is handed on, then acknowledged."""
        try:
            while not self._closing:
                for path in self.paths:
                    received = self._pull(path)
                    for message in received:
                        self._on_message(_PulledMessage(message))  # type: ignore[arg-type]
                    ack(self._subscriber, path, [message.ack_id for message in received])
        except BaseException as exc:  # noqa: BLE001 - reported by stopped()
            self._pull_error = exc

    def _pull(self, path: str) -> list[Any]:
        """What is waiting, up to ``PULL_WAIT_SECONDS``; nothing while a NOT_FOUND may still be Pub/Sub catching up
        with the subscription's creation (see the module docstring)."""
        try:
            return _pull_once(self._subscriber, path)
        except gexc.NotFound:
            if path == self.path and not self._past_grace():
                time.sleep(REOPEN_FIRST_DELAY_SECONDS)
                return []
            raise

    @property
    def paths(self) -> list[str]:
        """This subscription and those it replays (what a later attempt must replay)."""
        return [*self._replay_from, self.path]

    def stopped(self) -> str | None:
        """Why reading stopped, if it did while it should be running (and is not about to be re-opened)."""
        if self._pull_error is not None:
            return f"reading {self.path} stopped: {self._pull_error!r}; check that Pub/Sub is reachable and the subscription exists"
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
            # pulled: a pull the client gave up on (its deadline passed while Pub/Sub was unreachable or slow) may
            # still be answered, into the void; those messages come back after the ack deadline, so keep it short
            "ack_deadline_seconds": PULLED_ACK_DEADLINE_SECONDS if self._retain else self._ack_deadline_seconds,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_SECONDS}},
            "message_retention_duration": {"seconds": RETAINED_SECONDS if self._retain else 600},
            "retain_acked_messages": self._retain,
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
        for path in [self.path, *self._replay_from]:
            delete_subscription(self._subscriber, path, self._log)


class ReplyDemux:
    """One subscription for a fan-out group: each reply goes to the reader of its session; replies of no
    running session (a late duplicate of a finished shard) are acked and dropped, except those of the
    sessions in ``expect`` (a re-opened group's shards still to re-attach), which wait for their reader."""

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        *,
        topic: str,
        group: str,
        log: logging.Logger | Any,
        retain: bool = False,
        replay_from: Sequence[str] = (),
        expect: Iterable[str] = (),
    ):
        """``replay_from``: the group's subscriptions of earlier attempts, whose shards (``expect``) re-attach."""
        self.group = group
        self.topic = topic
        #: every session routed through the group, in order (the group's teardown finishes them)
        self.sessions: list[str] = []
        self._routes: dict[str, OnMessage] = {}
        self._held: dict[str, list[pubsub_v1.subscriber.message.Message]] = {session: [] for session in expect}
        self._lock = threading.Lock()
        self._subscription = ReplySubscription(
            subscriber,
            topic=topic,
            name=subscription_name(f"group-{group}", reattaching=bool(replay_from)),
            filter=f'hasPrefix(attributes.{Attr.SESSION}, "{group}")',
            on_message=self._dispatch,
            log=log,
            retain=retain,
            replay_from=replay_from,
        )

    @property
    def subscription_path(self) -> str:
        return self._subscription.path

    @property
    def subscription_paths(self) -> list[str]:
        """The group's subscription and those of the earlier attempts it replays."""
        return self._subscription.paths

    def __enter__(self) -> ReplyDemux:
        self._subscription.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._subscription.__exit__(*exc)

    @contextmanager
    def route(self, session_id: str, on_message: OnMessage) -> Iterator[ReplySubscription]:
        with self._lock:
            self._routes[session_id] = on_message
            self.sessions.append(session_id)
            held = self._held.pop(session_id, [])
        for message in held:
            on_message(message)
        try:
            yield self._subscription
        finally:
            with self._lock:
                del self._routes[session_id]

    def _dispatch(self, message: pubsub_v1.subscriber.message.Message) -> None:
        session_id = message.attributes.get(Attr.SESSION, "")
        with self._lock:
            on_message = self._routes.get(session_id)
            if on_message is None and session_id in self._held:
                self._held[session_id].append(message)
        if on_message is None:
            message.ack()  # held or dropped: acked either way (retained: a later attempt can seek back to it)
        else:
            on_message(message)
