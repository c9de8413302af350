"""Sensor-triggered mode: a sensor that turns the messages waiting on a Pub/Sub subscription into runs.

``pubsub_sensor`` builds a ``SensorDefinition``. Each tick pulls what is waiting (synchronous pull, at
most ``max_messages_per_tick`` messages, a short wait when the subscription is empty, transient errors
retried with the shared policy), turns every message into a ``PubSubEvent`` and hands it to
``build_run_request``; what that returns becomes one ``RunRequest`` whose ``run_key`` is the Pub/Sub
message id. Messages beyond the cap stay on the subscription for the next tick. ``gcs_object_event``
reads a Cloud Storage object notification out of an event, for sensors over a bucket's notifications.

Delivery, and where it can go wrong
-----------------------------------
Pub/Sub delivers at least once: a message can come back after it was pulled (its ack deadline passed,
the ack was lost, the tick failed) and, rarely, even after it was acked. Two mechanisms make a
redelivered message launch nothing twice:

* ``run_key`` = message id. A redelivery is the same message, so it carries the same id and the tick
  builds a request with the same run key; Dagster's sensor daemon creates no run for a run key this
  sensor has already launched (it looks the key up among the sensor's runs before creating one). This
  holds for any redelivery, however late, and whatever the cursor says. A *second publish* of the same
  logical event is a different message with a different id, so it is a second run; to merge those,
  return a ``RunRequest`` with your own ``run_key`` (for example ``bucket/object#generation``): the
  factory keeps a run key you set.
* the cursor: the ids of the messages acked by recent ticks. A message already in it is acked and
  skipped without building a request, so a redelivery within Pub/Sub's at-least-once window does not even
  show up as a skipped run request on the tick, and a redelivered malformed message is not reported twice.

The order of a tick: pull, build every request, ack the messages the tick is done with (those it returns
requests for, those ``build_run_request`` filtered out with ``None``, the malformed ones, the
duplicates), return ``SensorResult(run_requests=..., cursor=...)``. If building fails (a
``build_run_request`` that returns something other than a ``RunRequest`` or ``None``), nothing is acked:
the pulled messages are handed back (ack deadline 0) and the tick fails with the error. If the ack itself
fails past the retry budget, the tick still returns its requests (a warning says so): the messages come
back later, and the cursor and the run keys absorb them.

The limit: the messages are acked *before* Dagster persists the tick. The daemon launches the runs and
stores the cursor only after the evaluation has returned, so if that is lost after the ack (the daemon is
killed in between, or the evaluation outlived the daemon's sensor timeout, 60 s by default) Pub/Sub does
not redeliver and those runs are not launched. Run keys cover the opposite window (acked late or not at
all: redelivered, deduplicated), not this one. Keep ticks short (the default cap and pull timeout do)
and watch the sensor's failed ticks; a subscription with a dead-letter topic and
``--retain-acked-messages`` lets you ``gcloud pubsub subscriptions seek`` back over a lost tick, and the
run keys make that replay safe.
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
from google.cloud import pubsub_v1

from dagster_gcf_pipes.orchestrator.client import resolve_project
from dagster_gcf_pipes.orchestrator.pull import ack, nack, pull, subscription_path

#: Tag prefixes of the default run request (Dagster tag keys allow one ``namespace/`` section).
MESSAGE_ID_TAG = "pubsub/message_id"
PUBLISH_TIME_TAG = "pubsub/publish_time"
SUBSCRIPTION_TAG = "pubsub/subscription"
ATTRIBUTE_TAG_PREFIX = "pubsub.attr/"

#: The cursor remembers at least this many acked message ids (and at least two ticks' worth).
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


def _load_cursor(cursor: str | None) -> list[str]:
    if not cursor:
        return []
    try:
        ids = json.loads(cursor)
    except json.JSONDecodeError:
        return []  # a cursor set by hand: the run keys still deduplicate
    return [str(i) for i in ids] if isinstance(ids, list) else []


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
            message; ``None`` skips the message (acked). Raising (``ValueError``/``PubSubEventError`` for a
            malformed message, or anything else) acks and skips the message with a warning in the tick's
            log. Default: ``default_run_request`` (no run config, the message id and attributes as tags).
            The run key is the message id unless the request sets its own; the tags always include
            ``pubsub/message_id`` and ``pubsub/subscription``.
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
        acked_before = _load_cursor(context.cursor)
        already = set(acked_before)

        with pubsub_v1.SubscriberClient() as subscriber:
            received = pull(
                subscriber,
                path,
                max_messages=max_messages_per_tick,
                timeout=pull_timeout_seconds,
                follow_up_timeout=min(1.0, pull_timeout_seconds),
            )
            if not received:
                return SkipReason(f"no messages waiting on {path}")

            run_requests: list[RunRequest] = []
            done: list[str] = []  # ack ids
            newly_acked: list[str] = []  # message ids
            skipped = duplicates = 0
            try:
                for message in received:
                    event = PubSubEvent.from_received(message)
                    done.append(message.ack_id)
                    if event.message_id in already:
                        duplicates += 1
                        continue
                    already.add(event.message_id)
                    newly_acked.append(event.message_id)
                    try:
                        request = build(event)
                    except Exception as exc:  # noqa: BLE001 - a bad message must not block the others
                        skipped += 1
                        context.log.warning(
                            f"[pubsub] {name}: skipped message {event.message_id} from {short_name} (acked, no run): "
                            f"{type(exc).__name__}: {exc}"
                        )
                        continue
                    if request is None:
                        skipped += 1
                        continue
                    if not isinstance(request, RunRequest):
                        raise TypeError(
                            f"build_run_request of sensor {name} returned {type(request).__name__} for message "
                            f"{event.message_id}; it must return a RunRequest or None"
                        )
                    tags = {MESSAGE_ID_TAG: event.message_id, SUBSCRIPTION_TAG: short_name, **request.tags}
                    run_requests.append(
                        request.with_replaced_attrs(run_key=request.run_key or event.message_id, tags=tags)
                    )
            except BaseException:
                # nothing was acked: hand every pulled message back for a later tick, then fail the tick
                try:
                    nack(subscriber, path, [m.ack_id for m in received])
                except Exception as exc:  # noqa: BLE001 - the original error matters more
                    context.log.warning(
                        f"[pubsub] {name}: could not hand the messages back ({exc}); they return after their ack deadline"
                    )
                raise

            try:
                ack(subscriber, path, done)
            except Exception as exc:  # noqa: BLE001 - the requests are built: return them; redeliveries are skipped
                context.log.warning(
                    f"[pubsub] {name}: acking {len(done)} messages on {path} failed ({type(exc).__name__}: {exc}); "
                    "they will be redelivered and skipped as duplicates"
                )

        cursor = json.dumps((acked_before + newly_acked)[-remembered:])
        context.log.info(
            f"[pubsub] {name}: {len(received)} messages from {short_name}: {len(run_requests)} run requests, "
            f"{skipped} skipped, {duplicates} already handled"
        )
        if not run_requests:
            return SensorResult(
                skip_reason=f"{len(received)} messages on {path}, none requested a run "
                f"({skipped} skipped, {duplicates} already handled)",
                cursor=cursor,
            )
        return SensorResult(run_requests=run_requests, cursor=cursor)

    return _pubsub_sensor
