"""The layer's settings: which production behaviours it plays, and how often. One frozen dataclass; the
control endpoint replaces it whole (``POST /settings`` with the fields to change), so a request in flight
always sees one consistent set.

The defaults are what every local stack runs with (the test suite, the bench, ``gcf-pipes dev``/``up``):
every behaviour on, at rates low enough that a correct client barely notices them and high enough that a
suite run meets each of them many times. Tests that study one behaviour set its rate to 0 or 1 for their
block (``stack.semantics.behaving(...)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _has_type(value: Any, annotation: str) -> bool:
    """JSON brings numbers as int or float and never a bool for a number (``True`` is an int in Python)."""
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int | None" and value is None:
        return True
    number = (int,) if annotation.startswith("int") else (int, float)
    return isinstance(value, number) and not isinstance(value, bool)


@dataclass(frozen=True)
class Behaviours:
    #: apply subscription filters (Pub/Sub's filtering page); filtered-out messages are acked by the layer
    filters: bool = True
    #: a Pull whose messages are obtained this close to its client's deadline (or after the client went away)
    #: loses them: they are neither returned nor nacked, and come back after their ack deadline
    #: (googleapis/google-cloud-python#8087)
    pull_race_window_ms: float = 50.0
    #: share of Pull calls answered empty at once although messages may be waiting (Pub/Sub's pull page:
    #: "a response with zero messages ... does not necessarily indicate that there are no messages")
    empty_pull_rate: float = 0.01
    #: share of delivered messages delivered once more, later, on the same subscription (at-least-once)
    duplicate_rate: float = 0.01
    #: a duplicate arrives up to this long after the original (uniformly drawn)
    duplicate_delay_ms: float = 500.0
    #: an ack or modack that arrives after the message's ack deadline is not honoured: the message comes back
    #: (REST acknowledge: "may succeed, but such a message may be redelivered later")
    refuse_late_acks: bool = True
    #: shuffle the messages within each response (no order across publishes without ordering keys)
    reorder: bool = True
    #: share of delivered messages held back to a later response, by up to ``hold_back_ms``
    hold_back_rate: float = 0.05
    hold_back_ms: float = 200.0
    #: StreamingPull answers NOT_FOUND for this long after CreateSubscription (googleapis/java-pubsub#81,
    #: googleapis/google-cloud-go#9723: both report it of streaming pull) ...
    new_subscription_not_found_seconds: float = 1.0
    #: ... for this share of the subscriptions created (both sources report it as intermittent, "for a short
    #: while" after some creations, not every one; 1.0 for a test that studies it)
    new_subscription_not_found_rate: float = 0.25
    #: unary Pull too (no source reports it of Pull; off unless a test wants it)
    new_subscription_not_found_on_pull: bool = False
    #: share of admin operations performed but answered UNAVAILABLE (the caller's retry then meets
    #: ALREADY_EXISTS or NOT_FOUND)
    lost_admin_response_rate: float = 0.0
    #: the "Administrator operations" quota (https://cloud.google.com/pubsub/quotas; 6,000 a minute by
    #: default): a token bucket of one minute's operations, refilled continuously; past it RESOURCE_EXHAUSTED
    admin_ops_per_minute: int = 6000
    #: a message is handed to a subscriber no earlier than this long after it was published (production:
    #: "on the order of 100 ms"); 0 adds nothing to the emulator's own latency
    delivery_latency_ms: float = 0.0
    #: seed of the layer's random choices (None: a fresh one); setting it makes a run repeatable
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{f.name}={getattr(self, f.name)!r} must be {f.type}" for f in dataclasses.fields(self)
            if not _has_type(getattr(self, f.name), str(f.type))
        ]
        for name in ("empty_pull_rate", "duplicate_rate", "hold_back_rate", "lost_admin_response_rate",
                     "new_subscription_not_found_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value!r} must be between 0 and 1")
        for name in (
            "pull_race_window_ms", "duplicate_delay_ms", "hold_back_ms", "new_subscription_not_found_seconds",
            "delivery_latency_ms",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} must not be negative")
        if self.admin_ops_per_minute < 1:
            problems.append(f"admin_ops_per_minute={self.admin_ops_per_minute!r} must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))

    def updated(self, **changes: Any) -> Behaviours:
        """A copy with ``changes``; an unknown name is refused with the list of known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
