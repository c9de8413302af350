"""The admin plane: which calls are administrator operations, their quota, and the resource each names.

"Pub/Sub quotas and limits" (https://cloud.google.com/pubsub/quotas): administrator operations have a
per-project rate quota, charged to the project of the caller's credentials, 6,000 a minute by default (the
figure this project documents; read the project's quotas page before relying on it). Every call that is not a
data-plane call counts: create, get, update, list and delete of topics, subscriptions, snapshots and schemas,
ModifyPushConfig, DetachSubscription, the IAM methods, and Seek (it moves no message bytes, which is what the
throughput quotas measure, and it changes a subscription's state as an admin call does). The data plane is
Publish, Pull, StreamingPull, Acknowledge and ModifyAckDeadline.

The quota is a token bucket holding one minute's operations and refilled continuously, so a burst of up to a
minute's worth passes and a sustained rate above it is refused with RESOURCE_EXHAUSTED, the error the client
libraries retry with backoff.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from google.pubsub_v1 import types as pubsub_types

DATA_METHODS = frozenset({"Publish", "Pull", "StreamingPull", "Acknowledge", "ModifyAckDeadline"})


def is_admin(method: str) -> bool:
    """``method``: the gRPC path, ``/google.pubsub.v1.Subscriber/Pull``."""
    return method.rsplit("/", 1)[-1] not in DATA_METHODS


#: the request type of the pubsub methods not named ``<Method>Request``
_REQUEST_TYPES = {"CreateSubscription": "Subscription", "CreateTopic": "Topic"}


@cache
def request_class(method: str) -> type | None:
    """The protobuf class of a ``google.pubsub.v1`` method's request (None for other services: IAM)."""
    service, _, name = method.strip("/").partition("/")
    if not service.startswith("google.pubsub.v1."):
        return None
    proto_plus = getattr(pubsub_types, _REQUEST_TYPES.get(name, f"{name}Request"), None)
    return None if proto_plus is None else proto_plus.pb()


def resources(method: str, request: Any) -> tuple[str | None, str | None]:
    """(subscription, topic) an admin request is about, for the meter; None where it names none."""
    name = method.rsplit("/", 1)[-1]
    fields = request.DESCRIPTOR.fields_by_name

    def named(field: str) -> str | None:
        return getattr(request, field) or None if fields.get(field) and fields[field].type == fields[field].TYPE_STRING else None

    if name == "CreateSubscription":
        return named("name"), None
    if name == "UpdateSubscription":
        return request.subscription.name or None, None
    if name == "CreateTopic":
        return None, named("name")
    if name == "UpdateTopic":
        return None, request.topic.name or None
    return named("subscription"), named("topic")


class TokenBucket:
    """``per_minute`` operations a minute: a minute's worth at most at once, refilled continuously."""

    def __init__(self, per_minute: int, clock: Any = time.monotonic):
        self._clock = clock
        self._per_minute = per_minute
        self._tokens = float(per_minute)
        self._at = clock()

    def take(self, per_minute: int) -> bool:
        """Take one operation under a quota of ``per_minute`` (the current setting: a new quota starts full);
        False past the quota."""
        now = self._clock()
        if per_minute != self._per_minute:
            self._per_minute, self._tokens = per_minute, float(per_minute)
        self._tokens = min(float(per_minute), self._tokens + (now - self._at) * per_minute / 60.0)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
