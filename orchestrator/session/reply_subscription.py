"""Where the Pub/Sub reader's replies come from: a filtered subscription on the reply topic, read by
streaming pull, created **before** the trigger is published (so no reply can be missed) and deleted when the
session ends; it also carries an expiration policy, the backstop for an orchestrator that dies without
cleaning up.

A single session has a subscription of its own, filtered on its session id. A fan-out group shares one:
its sessions' ids share a prefix (``new_session_id(group)``), the subscription's filter selects that prefix,
and ``ReplyDemux`` hands each message to its session's reader. One stream then serves every shard, instead
of one subscription, stream and thread pool per shard.

With re-attach on (``retain``), the subscription keeps acknowledged messages for ``RETAINED_SECONDS``, so a
later attempt of the step can receive every reply of its sessions again (``orchestrator/session/reattach.py``):
that attempt creates a subscription of its own (for what is published from then on) and seeks the earlier
attempts' subscriptions (``replay_from``) back to their start (everything published before); together they
hold every reply, and the reader drops what comes twice. Every subscription is read by **streaming pull**,
retained or not: a unary ``Pull`` whose client deadline passes after the server assigned it messages leaves
them outstanding until their ack deadline (googleapis/google-cloud-python#8087, google-cloud-php#710), and an
empty ``Pull`` proves nothing (https://cloud.google.com/pubsub/docs/pull), so a short pull loop delays
replies and heartbeats by the ack deadline again and again; the maintainers' advice for latency is streaming
pull (googleapis/python-pubsub#1414, #440). The client library extends the lease of every message a callback
holds, and each reply is acknowledged as soon as it was handed on. The streams of an orchestrator that was
killed end with it: Pub/Sub redelivers what they held after its ack deadline, and the seek hands back the
rest. (Google's emulator instead keeps feeding a killed process's stream, and never redelivers what it
assigned there; the local stack's production-semantics layer, which ends the upstream stream when its
client goes away, behaves as production does.) A re-attaching fan-out group holds the replies of the
shards it ``expect``s until their readers are routed, instead of dropping them as strays.

Two things production Pub/Sub does that the emulator never shows are handled here:

- a retried ``CreateSubscription`` whose first attempt landed answers ``ALREADY_EXISTS``: the name carries 128
  random bits (or 64 for a fan-out group), so nobody else can hold it and that answer means success;
- ``StreamingPull`` on a subscription created moments ago can answer ``NOT_FOUND`` for a short while
  (googleapis/java-pubsub#81, googleapis/google-cloud-go#9723), and google-cloud-pubsub ends the stream for
  good on ``NotFound``: the stream is re-opened (a synchronous pull retried), with backoff, for
  ``NEW_SUBSCRIPTION_GRACE_SECONDS`` after creation. The subscription already exists then, so replies published meanwhile wait in it.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.protobuf.timestamp_pb2 import Timestamp

from dagster_gcf_pipes.orchestrator.diagnostics.errors import GCPUnreachableError, PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.session.pull import MAX_PER_REQUEST, ack
from dagster_gcf_pipes.shared.protocol import Attr
from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS, transient_retry

#: How long tearing a session down may wait on an unreachable Pub/Sub before leaving the subscription to
#: its expiration policy: cleanup must not hold up (or mask) the step's real outcome.
CLEANUP_BUDGET_SECONDS = 10.0

#: Pub/Sub's minimum expiration TTL: an idle per-session subscription disappears a day after its last use.
SUBSCRIPTION_TTL_SECONDS = 24 * 3600

#: With re-attach on: how long a subscription keeps its replies, acknowledged or not, from their publication
#: (a step whose orchestrator died is re-attached if re-executed within this). Pub/Sub wants it shorter than
#: the expiration TTL, which stays at its minimum, SUBSCRIPTION_TTL_SECONDS.
RETAINED_SECONDS = 20 * 3600

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


def _create_subscription(subscriber: pubsub_v1.SubscriberClient, request: Mapping[str, Any], timeout: float) -> None:
    try:
        subscriber.create_subscription(request=request, retry=None, timeout=timeout)
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


#: what Pub/Sub shows as a subscription's topic once that topic was deleted
DELETED_TOPIC = "_deleted-topic_"
#: how long the diagnosis of a silent session waits for Pub/Sub
DIAGNOSIS_TIMEOUT_SECONDS = 5.0


def subscription_problem(subscriber: pubsub_v1.SubscriberClient, path: str) -> str | None:
    """What is wrong with a reply subscription, as Pub/Sub answers a GetSubscription now, or None if nothing
    is: it is gone, its topic was deleted, or Pub/Sub does not answer."""
    try:
        found = subscriber.get_subscription(
            request={"subscription": path}, retry=None, timeout=DIAGNOSIS_TIMEOUT_SECONDS
        )
    except gexc.NotFound:
        return f"the reply subscription {path} no longer exists (deleted by someone else, or expired)"
    except gexc.PermissionDenied as exc:
        return f"not allowed to read the reply subscription {path} any more ({exc.message})"
    except (*TRANSIENT_ERRORS, gexc.GoogleAPICallError) as exc:
        return f"Pub/Sub did not answer a GetSubscription of {path} within {DIAGNOSIS_TIMEOUT_SECONDS:g}s ({exc})"
    if found.topic == DELETED_TOPIC:
        return f"the reply topic of {path} was deleted: the function's replies have nowhere to go"
    return None


def subscription_name(owner: str, *, reattaching: bool) -> str:
    """``dagster-pipes-OWNER`` (a session id, or ``group-GROUP``); a re-attaching attempt's own one is
    suffixed, since the earlier attempt's still exists."""
    return f"dagster-pipes-{owner}" + (f"-{secrets.token_hex(4)}" if reattaching else "")


def _closed_cleanly(error: BaseException | None) -> bool:
    """Whether a stream ended because the server closed it with status OK: google-cloud-pubsub then ends the
    streaming pull for good with ``Exception(None)`` (``streaming_pull_manager._wrap_as_exception``) instead
    of reconnecting. Nothing is wrong with the subscription: the stream is re-opened."""
    return type(error) is Exception and error.args in ((None,), ())


class SubscriptionGone(Exception):
    """The subscription to re-open no longer exists (deleted, or expired)."""


@transient_retry(max_seconds=CLEANUP_BUDGET_SECONDS)
def _delete_subscription(subscriber: pubsub_v1.SubscriberClient, path: str) -> None:
    try:
        subscriber.delete_subscription(request={"subscription": path}, retry=None, timeout=5)
    except gexc.NotFound:
        pass


class ReplySubscription:
    """A context manager: the subscription exists and is streamed into ``on_message`` inside the block, and
    is deleted when the block ends.

    ``retain``: it keeps acknowledged replies (re-attach). ``replay_from``: the subscriptions of the earlier
    attempts of the step, sought back to their start and streamed into ``on_message`` too, then deleted with
    it (``SubscriptionGone`` if one is not there any more). ``create_budget_seconds``: how long creating the
    subscription retries while Pub/Sub does not answer (then ``GCPUnreachableError``)."""

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
        create_budget_seconds: float = 60.0,
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
        self._create_budget_seconds = create_budget_seconds
        self._lock = threading.Lock()
        self._streams: dict[str, StreamingPull] = {}
        self._created_at = 0.0
        self._reopens = 0
        self._reopening: dict[str, threading.Timer] = {}  # by path
        self._closing = False

    def __enter__(self) -> ReplySubscription:
        self._create()
        self._created_at = time.monotonic()
        try:
            for path in self._replay_from:  # after ours exists: whatever ours misses, these hold
                try:
                    _seek_to_start(self._subscriber, path)
                except gexc.NotFound as exc:
                    raise SubscriptionGone(f"{path} is gone (deleted, or expired): {exc.message}") from exc
            for path in self.paths:
                self._open_stream(path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closing = True
            for timer in self._reopening.values():
                timer.cancel()
            streams = list(self._streams.values())
        for streaming in streams:
            streaming.cancel()
        for streaming in streams:
            try:
                streaming.result(timeout=CLEANUP_BUDGET_SECONDS)
            except BaseException:  # noqa: BLE001 - the stream's end is not the step's outcome
                pass
        self._delete()

    @property
    def paths(self) -> list[str]:
        """This subscription and those it replays (what a later attempt must replay)."""
        return [*self._replay_from, self.path]

    def stopped(self) -> str | None:
        """Why reading stopped, if it did while it should be running (and is not about to be re-opened)."""
        with self._lock:
            if self._closing:
                return None
            ended = [
                (path, streaming) for path, streaming in self._streams.items()
                if streaming.done() and path not in self._reopening
            ]
        for path, streaming in ended:
            error = streaming.exception()
            if isinstance(error, gexc.NotFound):
                if not self._past_grace():
                    return None  # its done-callback is scheduling the re-open
                return (
                    f"reading {path} stopped: StreamingPull still answered NOT_FOUND "
                    f"{time.monotonic() - self._created_at:.0f}s after the subscription was created "
                    f"({self._reopens} re-opens; {error.message}): it was deleted while the session ran (by another "
                    "process, or a cleanup job matching dagster-pipes-*); check the project's audit log for "
                    "DeleteSubscription"
                )
            return f"reading {path} stopped: {error!r}; check that Pub/Sub is reachable and the subscription exists"
        return None

    def _past_grace(self) -> bool:
        return time.monotonic() - self._created_at >= NEW_SUBSCRIPTION_GRACE_SECONDS

    def _open_stream(self, path: str) -> None:
        with self._lock:
            self._reopening.pop(path, None)
            if self._closing:
                return
            try:
                streaming = self._subscriber.subscribe(
                    path,
                    self._on_message,
                    flow_control=pubsub_v1.types.FlowControl(max_messages=1000),
                    await_callbacks_on_shutdown=True,
                )
            except Exception as exc:  # noqa: BLE001 - see below
                # google-cloud-pubsub's open() races the shutdown of a stream that failed at once (NOT_FOUND
                # right after creation): the shutdown clears its leaser before open() starts it, and subscribe()
                # raises AttributeError (seen under load; the library's race of googleapis/google-cloud-python#5792)
                failed: Future[None] = Future()
                failed.set_exception(exc)
                self._streams[path] = failed  # type: ignore[assignment]
                if not self._past_grace():
                    self._schedule_reopen(path)
                return
            self._streams[path] = streaming
        streaming.add_done_callback(functools.partial(self._on_stream_end, path))

    def _on_stream_end(self, path: str, streaming: StreamingPull) -> None:
        """A stream ended: re-open it (with jittered exponential backoff) if it ended on NOT_FOUND within the
        grace period after we created ours (an earlier attempt's, sought just now, exists too: the service has
        not caught up with it yet); anything else is left for ``stopped()`` to report."""
        error = streaming.exception()
        if not (_closed_cleanly(error) or isinstance(error, gexc.NotFound) and not self._past_grace()):
            return
        with self._lock:
            if self._closing or streaming is not self._streams.get(path):
                return
            self._schedule_reopen(path)
        # expected on Pub/Sub (see the module docstring): not worth a line in every step
        what = "was closed by the server" if _closed_cleanly(error) else "answered NOT_FOUND"
        self._log.debug(
            f"[pipes] StreamingPull of {path} {what}, {self.path} created "
            f"{time.monotonic() - self._created_at:.1f}s ago; re-opening the stream (attempt {self._reopens})"
        )

    def _schedule_reopen(self, path: str) -> None:
        """Open ``path``'s stream again after a jittered, exponentially growing delay (call with the lock held)."""
        self._reopens += 1
        delay = min(REOPEN_MAX_DELAY_SECONDS, REOPEN_FIRST_DELAY_SECONDS * 2 ** min(self._reopens - 1, 8))
        timer = self._reopening[path] = threading.Timer(delay * random.uniform(0.5, 1.0), self._open_stream, args=(path,))
        timer.daemon = True
        timer.start()

    def _create(self) -> None:
        request = {
            "name": self.path,
            "topic": self._topic,
            "filter": self._filter,
            "ack_deadline_seconds": self._ack_deadline_seconds,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_SECONDS}},
            "message_retention_duration": {"seconds": RETAINED_SECONDS if self._retain else 600},
            "retain_acked_messages": self._retain,
        }
        try:
            transient_retry(max_seconds=self._create_budget_seconds, max_attempts=None)(
                _create_subscription
            )(self._subscriber, request, min(CREATE_TIMEOUT_SECONDS, self._create_budget_seconds))
        except gexc.NotFound as exc:
            raise PipesPubSubConfigError(
                f"reply_topic: topic {self._topic} does not exist; create it (gcloud pubsub topics create "
                f"{self._topic.rsplit('/', 1)[-1]} --project {self._topic.split('/')[1]}) or fix reply_topic / "
                "reply_topics / project"
            ) from exc
        except gexc.PermissionDenied as exc:
            raise PipesPubSubConfigError(
                f"not allowed to create subscription {self.path} on {self._topic}: "
                "grant the orchestrator's service account roles/pubsub.subscriber and roles/pubsub.editor "
                f"(or a custom role with pubsub.subscriptions.create/delete) ({exc.message})"
            ) from exc
        except TRANSIENT_ERRORS as exc:
            raise GCPUnreachableError(
                f"Pub/Sub did not answer within preflight_timeout={self._create_budget_seconds:g}s while creating "
                f"the reply subscription {self.path} ({exc}); check the network path to Pub/Sub (or that the "
                f"emulator at PUBSUB_EMULATOR_HOST={os.environ.get('PUBSUB_EMULATOR_HOST', '(unset)')} is running)"
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
        create_budget_seconds: float = 60.0,
    ):
        """``replay_from``: the group's subscriptions of earlier attempts, whose shards (``expect``) re-attach."""
        self.group = group
        self.topic = topic
        self.subscriber = subscriber
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
            create_budget_seconds=create_budget_seconds,
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
