"""What a run cost in Pub/Sub terms, counted by the layer per subscription, per topic and in total.

Billable sizes follow "Pub/Sub pricing" (https://cloud.google.com/pubsub/pricing): a message's volume is its
data, each attribute's key and value, 20 bytes of timestamp and its message id; a publish request is billed
at least 1,000 bytes. Messages a filter drops are counted as delivered too ("message delivery fees ... still
apply", https://cloud.google.com/pubsub/docs/filtering), and also as ``messages_filtered_out``. Redeliveries
(duplicates, messages lost to a pull race and delivered again) are delivered messages like any other.

The counters of the layer's own interventions (``pull_race_lost`` ... ``admin_quota_refused``) say how often
each modelled behaviour happened, so a test or the bench can tell that it did.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: "A minimum of 1000 bytes per publish, push or pull request" (pricing page)
MIN_BILLED_REQUEST_BYTES = 1000
#: the publish timestamp each message is billed for
TIMESTAMP_BYTES = 20


def message_bytes(message: Any, message_id: str | None = None) -> int:
    """The billable size of a ``PubsubMessage`` (protobuf); ``message_id`` for a published one (the request
    has none yet, the response names it)."""
    return (
        len(message.data) + sum(len(k.encode()) + len(v.encode()) for k, v in message.attributes.items())
        + TIMESTAMP_BYTES + len(message.message_id if message_id is None else message_id)
    )


@dataclass
class Counts:
    """One subscription's, one topic's or the whole stack's figures since the last reset."""

    #: admin operations by method name (CreateSubscription, DeleteSubscription, GetTopic, Seek, ...)
    admin_ops: Counter[str] = field(default_factory=Counter)
    pull_calls: int = 0
    streaming_pulls_opened: int = 0
    acknowledge_calls: int = 0
    modify_ack_deadline_calls: int = 0
    #: messages the service handed out (filtered-out, duplicated and lost-to-a-race ones included)
    messages_delivered: int = 0
    bytes_delivered: int = 0
    messages_filtered_out: int = 0
    bytes_filtered_out: int = 0
    publish_requests: int = 0
    messages_published: int = 0
    bytes_published: int = 0
    #: bytes_published with the 1,000-byte minimum per request applied
    billed_publish_bytes: int = 0
    #: bytes published to the topic of a subscription that retains acknowledged messages (seek-related storage)
    retained_bytes: int = 0
    seeks: int = 0
    # the layer's interventions
    pull_race_lost: int = 0
    empty_pulls: int = 0
    duplicates: int = 0
    held_back: int = 0
    late_acks_refused: int = 0
    not_found: int = 0
    lost_admin_responses: int = 0
    admin_quota_refused: int = 0

    @property
    def admin_ops_total(self) -> int:
        return sum(self.admin_ops.values())

    def add(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "admin_ops": dict(self.admin_ops)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Counts:
        return cls(**{**values, "admin_ops": Counter(values.get("admin_ops", {}))})


@dataclass
class Meter:
    """The stack's counts, and each subscription's and topic's (keyed by their full resource path)."""

    total: Counts = field(default_factory=Counts)
    subscriptions: dict[str, Counts] = field(default_factory=dict)
    topics: dict[str, Counts] = field(default_factory=dict)

    def count(self, *, subscription: str | None = None, topic: str | None = None, **amounts: int) -> None:
        """Add ``amounts`` to the total and to the subscription's or topic's counts."""
        self.total.add(**amounts)
        for key, table in ((subscription, self.subscriptions), (topic, self.topics)):
            if key:
                table.setdefault(key, Counts()).add(**amounts)

    def admin_op(self, method: str, *, subscription: str | None = None, topic: str | None = None) -> None:
        self.total.admin_ops[method] += 1
        for key, table in ((subscription, self.subscriptions), (topic, self.topics)):
            if key:
                table.setdefault(key, Counts()).admin_ops[method] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.as_dict(),
            "subscriptions": {k: v.as_dict() for k, v in self.subscriptions.items()},
            "topics": {k: v.as_dict() for k, v in self.topics.items()},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Meter:
        return cls(
            Counts.from_dict(values["total"]),
            {k: Counts.from_dict(v) for k, v in values["subscriptions"].items()},
            {k: Counts.from_dict(v) for k, v in values["topics"].items()},
        )

    def subscription(self, name: str) -> Counts:
        """A subscription's counts by path or by short name (zero counts if it saw nothing)."""
        return next((c for path, c in self.subscriptions.items() if path == name or path.endswith(f"/{name}")), Counts())

    def topic(self, name: str) -> Counts:
        """A topic's counts by path or by short name (zero counts if it saw nothing)."""
        return next((c for path, c in self.topics.items() if path == name or path.endswith(f"/{name}")), Counts())
