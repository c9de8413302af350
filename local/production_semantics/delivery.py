"""What happens to the messages the emulator hands out, before a subscriber sees them, and to the acks and
modacks that come back.

Out (``Deliveries.received``), in this order:

1. every message is counted as delivered (billed), whatever happens next;
2. **filters**: a message the subscription's filter rejects is acknowledged by the layer on the subscriber's
   behalf and counted as filtered out (https://cloud.google.com/pubsub/docs/filtering: "Pub/Sub
   automatically acknowledges the messages that don't match the filter"; delivery fees still apply);
3. its ack deadline is noted (the subscription's, or the stream's ``stream_ack_deadline_seconds``);
4. **latency**: a message is not handed out before ``delivery_latency_ms`` after its publish time;
5. **no order**: some messages are held back to a later response (``hold_back_rate``), and each response is
   shuffled (``reorder``);
6. **at least once**: some are delivered again later (``duplicate_rate``), as a copy with an ack id of the
   layer's own, whose ack and modack the layer answers itself.

Messages with an ordering key are never held back, shuffled or copied (Pub/Sub keeps their order on a
subscription with message ordering), nor are messages of exactly-once subscriptions copied.

In (``screen``): an ack id whose ack deadline has passed is not passed on (``refuse_late_acks``): the message
comes back, as the REST reference of ``acknowledge`` warns ("Acknowledging a message whose ack deadline has
expired may succeed, but such a message may be redelivered later"); the emulator would honour it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from dagster_gcf_pipes.local.production_semantics.behaviours import Behaviours
from dagster_gcf_pipes.local.production_semantics.meter import Meter, message_bytes
from dagster_gcf_pipes.local.production_semantics.subscriptions import Held, Subscription

#: the ack ids of the layer's duplicates start with this
SYNTHETIC_ACK_PREFIX = "production-semantics-duplicate:"
#: a duplicate nobody pulled within this long is dropped (its subscription is idle or gone)
DUPLICATE_TTL_SECONDS = 60.0

#: past this many ack ids noted on one subscription, those whose deadline passed FORGET_AFTER_SECONDS ago go
MAX_TRACKED_ACK_IDS = 10_000
FORGET_AFTER_SECONDS = 600.0

_serial = itertools.count()


class Deliveries:
    def __init__(
        self,
        settings: Callable[[], Behaviours],
        meter: Meter,
        rng: random.Random,
        acknowledge: Callable[[str, list[str]], Awaitable[None]],
    ):
        """``acknowledge(subscription, ack_ids)`` acks upstream (for filtered-out messages)."""
        self._settings = settings
        self._meter = meter
        self._rng = rng
        self._acknowledge = acknowledge
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------------------------ out
    def received(
        self, subscription: Subscription, messages: Sequence[Any], ack_deadline_seconds: float, *,
        lose: bool = False, limit: int | None = None,
    ) -> list[Any]:
        """The messages of a batch the emulator handed out that go to the subscriber now, with those of the
        subscription's backlog that are due (up to ``limit`` in all: a Pull's ``max_messages``; the batch
        itself is never larger); the rest is acknowledged (filtered out) or waits in the backlog.

        ``lose``: the batch was assigned to a pull that cannot return it (its client's deadline is about to
        pass, or the client went away): its messages are billed and filtered, and the others are neither
        returned nor acked nor nacked: they come back after their ack deadline."""
        settings = self._settings()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._count_delivered(subscription, messages)
        kept, dropped = list(messages), []
        if settings.filters and subscription.predicate is not None:
            matches = [subscription.predicate(m.message.attributes) for m in messages]
            kept = [m for m, match in zip(messages, matches) if match]
            dropped = [m for m, match in zip(messages, matches) if not match]
            self._filtered_out(subscription, dropped)
        if lose:
            self._meter.count(subscription=subscription.path, pull_race_lost=len(kept))
            return []
        if len(subscription.deadlines) > MAX_TRACKED_ACK_IDS:  # those never acked (lost, or their client died)
            subscription.deadlines = {k: d for k, d in subscription.deadlines.items() if d > now - FORGET_AFTER_SECONDS}
        for message in kept:
            subscription.deadlines[message.ack_id] = now + ack_deadline_seconds
        ready = []
        wall = time.time()
        for message in kept:
            ordered = bool(message.message.ordering_key)
            due = now
            if settings.delivery_latency_ms:
                published = message.message.publish_time.seconds + message.message.publish_time.nanos / 1e9
                due += max(0.0, published + settings.delivery_latency_ms / 1000 - wall)
            if not ordered and settings.hold_back_ms and self._rng.random() < settings.hold_back_rate:
                due += self._rng.uniform(0.0, settings.hold_back_ms / 1000)
                self._meter.count(subscription=subscription.path, held_back=1)
            if due > now:
                self._hold(subscription, Held(due, message, synthetic=False))
            else:
                ready.append(message)
            if not (ordered or subscription.exactly_once) and self._rng.random() < settings.duplicate_rate:
                copy = type(message)()
                copy.CopyFrom(message)
                copy.ack_id = f"{SYNTHETIC_ACK_PREFIX}{next(_serial)}"
                self._hold(subscription, Held(due + self._rng.uniform(0.0, settings.duplicate_delay_ms / 1000), copy, True))
        return self._arranged(ready + self._take_due(subscription, None if limit is None else max(0, limit - len(ready))))

    def due(self, subscription: Subscription, limit: int | None = None) -> list[Any]:
        """Up to ``limit`` messages of the subscription's backlog that are due, in the order a response has."""
        return self._arranged(self._take_due(subscription, limit))

    def _take_due(self, subscription: Subscription, limit: int | None = None) -> list[Any]:
        """A held message whose ack deadline passed meanwhile is dropped: the emulator delivers it again."""
        now = asyncio.get_running_loop().time()
        taken, kept = [], []
        for held in subscription.backlog:
            if held.due > now or (limit is not None and len(taken) >= limit):
                kept.append(held)
            elif held.synthetic:
                if now - held.due < DUPLICATE_TTL_SECONDS:
                    taken.append(held.message)
                    self._count_delivered(subscription, [held.message], duplicates=1)
            elif subscription.deadlines.get(held.message.ack_id, now) >= now:
                taken.append(held.message)
        subscription.backlog = kept
        return taken

    def _arranged(self, messages: list[Any]) -> list[Any]:
        if self._settings().reorder:
            self._rng.shuffle(messages)
        return messages

    def _hold(self, subscription: Subscription, held: Held) -> None:
        subscription.backlog.append(held)
        asyncio.get_running_loop().call_at(held.due, subscription.signal.notify)

    def _count_delivered(self, subscription: Subscription, messages: Sequence[Any], **more: int) -> None:
        self._meter.count(
            subscription=subscription.path, messages_delivered=len(messages),
            bytes_delivered=sum(message_bytes(m.message) for m in messages), **more,
        )

    def _filtered_out(self, subscription: Subscription, messages: list[Any]) -> None:
        if not messages:
            return
        self._meter.count(
            subscription=subscription.path, messages_filtered_out=len(messages),
            bytes_filtered_out=sum(message_bytes(m.message) for m in messages),
        )
        task = asyncio.ensure_future(self._acknowledge(subscription.path, [m.ack_id for m in messages]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------------- in
    def screen(self, subscription: Subscription, ack_ids: Sequence[str]) -> list[bool]:
        """For each ack id (of an ack or modack): whether to pass it on to the emulator. A duplicate's id is the
        layer's own (answered here); an id whose ack deadline has passed is not honoured."""
        settings = self._settings()
        now = asyncio.get_running_loop().time()
        verdicts = []
        for ack_id in ack_ids:
            if ack_id.startswith(SYNTHETIC_ACK_PREFIX):
                verdicts.append(False)
            elif settings.refuse_late_acks and subscription.deadlines.get(ack_id, now) < now:
                subscription.deadlines.pop(ack_id, None)
                self._meter.count(subscription=subscription.path, late_acks_refused=1)
                verdicts.append(False)
            else:
                verdicts.append(True)
        return verdicts

    def acknowledged(self, subscription: Subscription, ack_ids: Iterable[str]) -> None:
        for ack_id in ack_ids:
            subscription.deadlines.pop(ack_id, None)

    def extended(self, subscription: Subscription, ack_ids: Iterable[str], seconds: float) -> None:
        """A modack passed on: the new deadline, or (0 s, a nack) the message is available again at once."""
        if seconds <= 0:
            self.acknowledged(subscription, ack_ids)
            subscription.signal.notify()
            return
        deadline = asyncio.get_running_loop().time() + seconds
        for ack_id in ack_ids:
            subscription.deadlines[ack_id] = deadline
