"""What the layer knows of each subscription: its configuration (filter, topic, ack deadline, retention),
when it was created, the ack deadline of every message it has handed out, and the messages it holds back.

A subscription created through the layer is known from its CreateSubscription; any other (created before
the layer started, or straight on the emulator) is looked up with GetSubscription the first time a pull
names it, so a restarted layer applies the same filters.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from google.pubsub_v1.types import Subscription as SubscriptionType

from dagster_gcf_pipes.local.production_semantics.filters import FilterError, Predicate, compile_filter

_log = logging.getLogger(__name__)

SubscriptionPb = SubscriptionType.pb()


class Signal:
    """Wakes whoever waits on it: a publish on a topic, or a message of a subscription that became available
    (nacked, or held back and now due)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _future(self) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        return waiter

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        self._waiters.discard(waiter)


async def wait_any(signals: Iterable[Signal], timeout: float) -> None:
    """Until one of ``signals`` is notified or ``timeout`` seconds pass."""
    waiting = [(signal, signal._future()) for signal in signals]
    try:
        await asyncio.wait([future for _, future in waiting], timeout=max(timeout, 0.0))
    finally:
        for signal, future in waiting:
            future.cancel()
            signal._discard(future)


@dataclass
class Held:
    """A message the layer hands out later: delayed (latency), held back (reordering) or a duplicate."""

    due: float
    message: Any  # ReceivedMessage (protobuf)
    #: a duplicate's copy, with an ack id of the layer's own
    synthetic: bool


@dataclass
class Subscription:
    path: str
    topic: str = ""
    ack_deadline_seconds: int = 10
    retain_acked: bool = False
    exactly_once: bool = False
    predicate: Predicate | None = None
    #: the event loop's time of its CreateSubscription through the layer (None: created elsewhere)
    created_at: float | None = None
    #: read by the local stack's Eventarc stand-in: its pulls stand for push deliveries (no Pull to race)
    push_delivered: bool = False
    #: ack id -> the loop time its ack deadline passes
    deadlines: dict[str, float] = field(default_factory=dict)
    backlog: list[Held] = field(default_factory=list)
    signal: Signal = field(default_factory=Signal)

    def configure(self, pb: Any) -> None:
        """Take the configuration of a ``google.pubsub.v1.Subscription`` (protobuf)."""
        self.topic = pb.topic
        self.ack_deadline_seconds = pb.ack_deadline_seconds or 10
        self.retain_acked = pb.retain_acked_messages
        self.exactly_once = pb.enable_exactly_once_delivery
        try:
            self.predicate = compile_filter(pb.filter)
        except FilterError as exc:  # made straight on the emulator, which accepts anything
            _log.warning("%s has a filter Pub/Sub would refuse (%s); delivering everything", self.path, exc)
            self.predicate = None


class Registry:
    """The subscriptions the layer has seen, and a signal per topic (woken by each publish)."""

    def __init__(self, lookup: Callable[[str], Awaitable[bytes | None]]):
        """``lookup``: the GetSubscription answer for a path, None if the subscription does not exist."""
        self._lookup = lookup
        self._subscriptions: dict[str, Subscription] = {}
        self._configured: dict[str, asyncio.Future[bool]] = {}
        self._topics: defaultdict[str, Signal] = defaultdict(Signal)
        self._push_delivered: set[str] = set()

    def state(self, path: str) -> Subscription:
        """The subscription's state, configured or not (acks need only its ack deadlines)."""
        subscription = self._subscriptions.get(path)
        if subscription is None:
            subscription = self._subscriptions[path] = Subscription(path, push_delivered=path in self._push_delivered)
        return subscription

    def learn(self, pb: Any, *, created_at: float | None = None) -> Subscription:
        """Take what a CreateSubscription, GetSubscription or UpdateSubscription answered."""
        subscription = self.state(pb.name)
        subscription.configure(pb)
        if created_at is not None:
            subscription.created_at = created_at
        done = asyncio.get_running_loop().create_future()
        done.set_result(True)
        self._configured[pb.name] = done
        return subscription

    async def configured(self, path: str) -> Subscription | None:
        """The subscription with its configuration, looked up once; None if it does not exist."""
        pending = self._configured.get(path)
        if pending is None:
            pending = self._configured[path] = asyncio.ensure_future(self._look_up(path))
        try:
            exists = await asyncio.shield(pending)
        except Exception:  # noqa: BLE001 - the emulator did not answer: try again next time
            self._configured.pop(path, None)
            return self.state(path)
        return self.state(path) if exists else None

    async def _look_up(self, path: str) -> bool:
        answer = await self._lookup(path)
        if answer is None:
            self._configured.pop(path, None)  # it may be created later
            return False
        self.state(path).configure(SubscriptionPb.FromString(answer))
        return True

    def forget(self, path: str) -> None:
        self._subscriptions.pop(path, None)
        self._configured.pop(path, None)

    def mark_push_delivered(self, path: str) -> None:
        self._push_delivered.add(path)
        self.state(path).push_delivered = True

    def on_topic(self, topic: str) -> list[Subscription]:
        return [s for s in self._subscriptions.values() if s.topic == topic]

    def topic_signal(self, topic: str) -> Signal:
        return self._topics[topic]
