"""Sensor-triggered mode: a sensor that turns the messages waiting on a Pub/Sub subscription into runs.

``pubsub_sensor`` builds a ``SensorDefinition``. Each tick pulls what is waiting (synchronous pull, at
most ``max_messages_per_tick`` messages, a short wait when the subscription is empty, transient errors
retried with the shared policy), turns every message into a ``PubSubEvent`` and hands it to
``build_run_request``; what that returns becomes one ``RunRequest``. Messages beyond the cap stay on the
subscription for the next tick. ``gcs_object_event`` reads a Cloud Storage object notification out of an
event, for sensors over a bucket's notifications.

Exactly once, in two phases
---------------------------
Pub/Sub delivers at least once, and Dagster's sensor daemon persists a tick's result (its runs, then its
cursor) only after the evaluation has returned. So a tick never acks the messages it turns into
requests: it hands them back (ack deadline 0) and writes their ids into the cursor. The next tick finds
them in the cursor and acks them without requesting anything. Two mechanisms make every message launch
exactly one run:

* **Nothing lost.** A message is acked only by a tick whose cursor holds its id, and the cursor is only
  ever the one Dagster kept: if a tick's result is lost (the daemon died after the evaluation, or the
  evaluation outlived the daemon's sensor timeout), neither its runs nor its cursor were kept, the
  messages come back and a later tick requests them again.
* **Nothing twice.** The run key: by default the message id, or ``bucket/object#generation`` for a
  Cloud Storage notification (``GcsObjectEvent.run_key``), so duplicate notifications of one object
  write, which Cloud Storage publishes as different messages, launch one run. A request that sets its own
  ``run_key`` keeps it. Dagster's sensor daemon creates no run for a run key this sensor has already
  launched, however late the redelivery and whatever the cursor says; so a tick result lost *after* some
  of its runs were created, then evaluated again, launches only the rest.

The cursor remembers at least ``CURSOR_MESSAGE_IDS`` ids (and two ticks' worth), so a redelivery within
Pub/Sub's at-least-once window is acked and skipped without even a skipped run request in the tick.

The order of a tick: pull; ack the messages in the cursor; for every other message build the request
(``None`` or a malformed message: skipped, with a warning for the malformed one); hand the new messages
back; return ``SensorResult(run_requests=..., cursor=...)``. If building fails (a ``build_run_request``
that returns something other than a ``RunRequest`` or ``None``), the tick fails and every new message is
handed back. A failed ack (past the retry budget) is a warning: the messages come back and the cursor
and the run keys absorb them. The price of the two phases: each message is pulled twice, so a
subscription kept full moves about ``max_messages_per_tick / 2`` new messages per tick.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from dagster_gcf_pipes.orchestrator.session.pull import ack, nack, pull, subscription_path
from dagster_gcf_pipes.orchestrator.client.resolution import resolve_project
from dagster_gcf_pipes.shared.pubsub import subscriber_client

#: Tag prefixes of the default run request (Dagster tag keys allow one ``namespace/`` section).
MESSAGE_ID_TAG = "pubsub/message_id"
PUBLISH_TIME_TAG = "pubsub/publish_time"
SUBSCRIPTION_TAG = "pubsub/subscription"
ATTRIBUTE_TAG_PREFIX = "pubsub.attr/"

#: The cursor remembers at least this many handled message ids (and at least two ticks' worth).
CURSOR_MESSAGE_IDS = 1000

_TAG_NAME_INVALID = re.compile(r"[^A-Za-z0-9_.-]")


class PubSubEventError(ValueError):
    """A message is not what ``build_run_request`` expects; the sensor acks and skips it with a warning."""


@dataclass(frozen=True)
class PubSubEvent:
    """One message pulled from the sensor's subscription."""

    message_id: str
    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)
    publish_time: datetime | None = None
    #: how many times Pub/Sub has delivered it; only set on subscriptions with a dead-letter policy
    delivery_attempt: int | None = None

    def text(self) -> str:
        """``data`` decoded as UTF-8; ``PubSubEventError`` if it is not."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PubSubEventError(f"message {self.message_id}: data is not UTF-8 text ({exc})") from exc

    def json(self) -> Any:
        """``data`` parsed as JSON; ``PubSubEventError`` naming the message if it is not JSON."""
        text = self.text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            preview = text[:80] + ("..." if len(text) > 80 else "")
            raise PubSubEventError(f"message {self.message_id}: data is not JSON ({exc}): {preview!r}") from exc

    @classmethod
    def from_received(cls, received: Any) -> PubSubEvent:
        """From a ``ReceivedMessage`` of a synchronous pull."""
        message = received.message
        publish_time = message.publish_time
        if publish_time is not None and not isinstance(publish_time, datetime):  # a protobuf Timestamp
            publish_time = publish_time.ToDatetime(tzinfo=timezone.utc)
        return cls(
            message_id=message.message_id,
            data=bytes(message.data),
            attributes=dict(message.attributes),
            publish_time=publish_time,
            delivery_attempt=received.delivery_attempt or None,
        )


def _tag_name(key: str) -> str:
    return _TAG_NAME_INVALID.sub("_", key)[:63] or "_"


def default_run_request(event: PubSubEvent) -> RunRequest:
    """No run config; tags: the message id, its publish time and every attribute (``pubsub.attr/NAME``;
    characters a tag key cannot hold become ``_``)."""
    tags = {f"{ATTRIBUTE_TAG_PREFIX}{_tag_name(k)}": v for k, v in sorted(event.attributes.items())}
    tags[MESSAGE_ID_TAG] = event.message_id
    if event.publish_time is not None:
        tags[PUBLISH_TIME_TAG] = event.publish_time.isoformat()
    return RunRequest(tags=tags)


@dataclass(frozen=True)
class GcsObjectEvent:
    """A Cloud Storage object notification (``gcloud storage buckets notifications create``)."""

    bucket: str
    name: str
    event_type: str  # OBJECT_FINALIZE, OBJECT_METADATA_UPDATE, OBJECT_DELETE, OBJECT_ARCHIVE
    generation: str | None = None
    event_time: str | None = None
    #: the object's resource (size, contentType, md5Hash, ...) when the payload format is JSON_API_V1
    resource: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @property
    def created(self) -> bool:
        """A new object or a new generation of one (``OBJECT_FINALIZE``)."""
        return self.event_type == "OBJECT_FINALIZE"

    @property
    def run_key(self) -> str:
        """``bucket/object#generation``: one key per write of an object, however many notifications of it
        arrive (Cloud Storage may publish one twice, as two messages); other event types than
        ``OBJECT_FINALIZE`` add ``@EVENT_TYPE`` (a delete of that generation is another event)."""
        key = f"{self.bucket}/{self.name}#{self.generation or ''}"
        return key if self.created else f"{key}@{self.event_type}"


def gcs_object_event(event: PubSubEvent) -> GcsObjectEvent:
    """Read a Cloud Storage notification; ``PubSubEventError`` if the message is not one."""
    missing = [k for k in ("bucketId", "objectId", "eventType") if not event.attributes.get(k)]
    if missing:
        raise PubSubEventError(
            f"message {event.message_id} is not a Cloud Storage notification: attribute(s) {', '.join(missing)} missing"
        )
    resource: Mapping[str, Any] = {}
    if event.attributes.get("payloadFormat") == "JSON_API_V1" and event.data:
        parsed = event.json()
        resource = parsed if isinstance(parsed, dict) else {}
    return GcsObjectEvent(
        bucket=event.attributes["bucketId"],
        name=event.attributes["objectId"],
        event_type=event.attributes["eventType"],
        generation=event.attributes.get("objectGeneration"),
        event_time=event.attributes.get("eventTime"),
        resource=resource,
    )


def default_run_key(event: PubSubEvent) -> str:
    """The run key of a request that sets none: ``GcsObjectEvent.run_key`` for a Cloud Storage notification,
    else the message id."""
    try:
        return gcs_object_event(event).run_key
    except PubSubEventError:
        return event.message_id


def _load_cursor(cursor: str | None) -> list[str]:
    if not cursor:
        return []
    try:
        ids = json.loads(cursor)
    except json.JSONDecodeError:
        return []  # a cursor set by hand: the run keys still deduplicate
    return [str(i) for i in ids] if isinstance(ids, list) else []


@dataclass
class _Requests:
    run_requests: list[RunRequest] = field(default_factory=list)
    skipped: int = 0


def _requests_for(
    received: list[Any], build: Callable[[PubSubEvent], RunRequest | None], name: str, short_name: str, log: Any
) -> _Requests:
    """One run request per new message (a message delivered twice within the tick counts once)."""
    outcome = _Requests()
    seen: set[str] = set()
    for message in received:
        event = PubSubEvent.from_received(message)
        if event.message_id in seen:
            continue
        seen.add(event.message_id)
        try:
            request = build(event)
        except Exception as exc:  # noqa: BLE001 - a bad message must not block the others
            outcome.skipped += 1
            log.warning(
                f"[pubsub] {name}: skipped message {event.message_id} from {short_name} (no run): "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        if request is None:
            outcome.skipped += 1
            continue
        if not isinstance(request, RunRequest):
            raise TypeError(
                f"build_run_request of sensor {name} returned {type(request).__name__} for message "
                f"{event.message_id}; it must return a RunRequest or None"
            )
        tags = {MESSAGE_ID_TAG: event.message_id, SUBSCRIPTION_TAG: short_name, **request.tags}
        outcome.run_requests.append(
            request.with_replaced_attrs(run_key=request.run_key or default_run_key(event), tags=tags)
        )
    return outcome


def _settle(subscriber: Any, path: str, handled: list[Any], new: list[Any], name: str, log: Any) -> None:
    """Ack what an earlier tick handled; hand the new messages back for the tick after this one."""
    for settle, messages, what in ((ack, handled, "acking"), (nack, new, "handing back")):
        if not messages:
            continue
        try:
            settle(subscriber, path, [m.ack_id for m in messages])
        except Exception as exc:  # noqa: BLE001 - the cursor and the run keys absorb the redelivery
            log.warning(
                f"[pubsub] {name}: {what} {len(messages)} messages on {path} failed ({type(exc).__name__}: {exc}); "
                "they come back after their ack deadline and the cursor and run keys absorb them"
            )


def pubsub_sensor(
    name: str,
    subscription: str,
    *,
    target: Any,
    build_run_request: Callable[[PubSubEvent], RunRequest | None] | None = None,
    max_messages_per_tick: int = 100,
    minimum_interval_seconds: int = 30,
    project: str | None = None,
    pull_timeout_seconds: float = 2.0,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
    description: str | None = None,
) -> SensorDefinition:
    """A sensor requesting one run per message on the pull ``subscription`` (see the module's docstring
    for what is acked when, and how redelivery is deduplicated).

    Args:
        name: the sensor's name (run keys are deduplicated per sensor name: keep it stable).
        subscription: a pull subscription, ``NAME`` in ``project`` or ``projects/P/subscriptions/NAME``.
        target: what the runs materialize or execute: an asset selection, assets, or a job (as for
            ``@sensor(target=...)``).
        build_run_request: ``PubSubEvent -> RunRequest | None``: run config, tags, partition key for a
            message; ``None`` skips the message (acked by the next tick). Raising (``ValueError``/
            ``PubSubEventError`` for a malformed message, or anything else) skips the message with a warning
            in the tick's log. Default: ``default_run_request`` (no run config, the message id and
            attributes as tags). The run key is ``default_run_key`` (``bucket/object#generation`` for a Cloud
            Storage notification, else the message id) unless the request sets its own; the tags always
            include ``pubsub/message_id`` and ``pubsub/subscription``.
        max_messages_per_tick: pull at most this many messages per tick; the rest wait for the next tick.
        minimum_interval_seconds: the sensor's interval.
        project: the subscription's project; default ``GOOGLE_CLOUD_PROJECT``, then ADC (read at each tick).
        pull_timeout_seconds: how long the first pull of a tick waits for messages when none are waiting
            (the follow-up pulls that fill the cap wait at most a second).
    """
    if max_messages_per_tick < 1:
        raise ValueError(f"max_messages_per_tick={max_messages_per_tick} must be at least 1")
    if pull_timeout_seconds <= 0:
        raise ValueError(f"pull_timeout_seconds={pull_timeout_seconds} must be positive")
    if not subscription:
        raise ValueError("subscription is empty: name the pull subscription the sensor reads")
    build = build_run_request or default_run_request
    remembered = max(CURSOR_MESSAGE_IDS, 2 * max_messages_per_tick)

    @sensor(
        name=name,
        target=target,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=description or f"Requests one run per message on the Pub/Sub subscription {subscription}.",
    )
    def _pubsub_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        path = subscription_path(resolve_project(project), subscription)
        short_name = path.rsplit("/", 1)[-1]
        handled_before = _load_cursor(context.cursor)
        already = set(handled_before)

        with subscriber_client() as subscriber:
            received = pull(
                subscriber,
                path,
                max_messages=max_messages_per_tick,
                timeout=pull_timeout_seconds,
                follow_up_timeout=min(1.0, pull_timeout_seconds),
            )
            if not received:
                return SkipReason(f"no messages waiting on {path}")
            handled = [m for m in received if m.message.message_id in already]  # kept by an earlier tick: ack
            new = [m for m in received if m.message.message_id not in already]
            try:
                outcome = _requests_for(new, build, name, short_name, context.log)
            finally:
                # a new message is acked by the tick that finds it in the cursor Dagster kept, never by this one
                _settle(subscriber, path, handled, new, name, context.log)

        newly_handled = list(dict.fromkeys(m.message.message_id for m in new))
        cursor = json.dumps((handled_before + newly_handled)[-remembered:])
        summary = (
            f"{len(received)} messages on {short_name}: {len(outcome.run_requests)} run requests, "
            f"{outcome.skipped} skipped, {len(handled)} already handled"
        )
        context.log.info(f"[pubsub] {name}: {summary}")
        if not outcome.run_requests:
            return SensorResult(skip_reason=f"{summary} (acked)", cursor=cursor)
        return SensorResult(run_requests=outcome.run_requests, cursor=cursor)

    return _pubsub_sensor
