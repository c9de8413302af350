"""Sensor-triggered mode: a sensor that turns the messages waiting on a Pub/Sub subscription into runs.

``pubsub_sensor`` builds a ``SensorDefinition``. Each tick pulls what is waiting (synchronous pull, at
most ``max_messages_per_tick`` messages, a short wait when the subscription is empty, transient errors
retried with the shared policy), turns every message into a ``PubSubEvent`` and hands it to
``build_run_request``; what that returns becomes one ``RunRequest``. Messages beyond the cap stay on the
subscription for a later tick. ``gcs_object_event`` reads a Cloud Storage object notification out of an
event, for sensors over a bucket's notifications.

Exactly once: a message is acked once its run is in the instance
----------------------------------------------------------------
Pub/Sub delivers at least once and in any order, and Dagster's sensor daemon keeps a tick's result (it
creates its runs, then saves its cursor) only after the evaluation has returned. So a tick never acks a
message it requests a run for: it hands the message back (ack deadline 0). A message is acked by the first
tick that pulls it *after* its run exists: the tick builds the message's request again, and if the
instance holds a run with that run key launched by this sensor (in this code location and repository,
and past ``NOT_STARTED``: the checks of Dagster's own run-key dedupe), the run request is durable and the
message is acked without requesting anything. So:

* **Nothing lost.** A message is acked only once Dagster has created and submitted its run. If a tick's
  result is lost (the daemon died after the evaluation, or the evaluation outlived the daemon's sensor
  timeout), no run exists, the message comes back and a later tick requests it again.
* **Nothing twice.** The run key: by default the message id, or ``bucket/object#generation`` for a Cloud
  Storage notification (``GcsObjectEvent.run_key``), so duplicate notifications of one object write,
  which Cloud Storage publishes as different messages, launch one run. A request that sets its own
  ``run_key`` keeps it; it must be a function of the message (the same message, the same key), or a
  redelivery is another run. Dagster's daemon creates no run for a run key this sensor has already
  launched, however late the redelivery.
* **Any backlog drains.** Whether a message is done is read from the instance, not from a bounded memory
  of message ids, so a redelivery is recognised whenever it comes back and in whatever order: every
  message is pulled at most twice (once to request its run, once to ack it) unless a tick's result is
  lost, and a backlog of N messages drains in about ``2 N / max_messages_per_tick`` ticks.

A message that makes no run is acked by the tick that pulls it: ``build_run_request`` returned ``None``
(filtered on purpose), or it raised (a malformed message: one warning in the tick's log, naming the
message). If building fails in a way that is a bug (``build_run_request`` returned something other than a
``RunRequest`` or ``None``), the tick fails and every message is handed back. A failed ack (past the retry
budget) is a warning: the messages come back and are recognised again. The price: each message that makes
a run is pulled twice, so a subscription kept full moves about ``max_messages_per_tick / 2`` new messages
per tick, and the run-key check reads the instance once per such message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from dagster_gcf_pipes.orchestrator.client.resolution import resolve_project
from dagster_gcf_pipes.orchestrator.session.pull import ack, nack, pull, subscription_path
from dagster_gcf_pipes.shared.pubsub import subscriber_client

#: Tag prefixes of the default run request (Dagster tag keys allow one ``namespace/`` section).
MESSAGE_ID_TAG = "pubsub/message_id"
PUBLISH_TIME_TAG = "pubsub/publish_time"
SUBSCRIPTION_TAG = "pubsub/subscription"
ATTRIBUTE_TAG_PREFIX = "pubsub.attr/"

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


@dataclass
class _Tick:
    """What one tick decides for the messages it pulled: the runs to request, the deliveries to ack now
    (``done``: no run to request, or their run already launched) and those handed back (``requested``: acked
    by a later tick, once their run exists)."""

    run_requests: list[RunRequest] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    skipped: int = 0
    launched: int = 0

    def summary(self, pulled: int, short_name: str) -> str:
        return (
            f"{pulled} messages on {short_name}: {len(self.run_requests)} run requests, {self.skipped} skipped, "
            f"{self.launched} with their run already launched (acked)"
        )


def _request_for(
    received: Any, build: Callable[[PubSubEvent], RunRequest | None], name: str, short_name: str, log: Any
) -> RunRequest | None:
    """The message's run request with its run key and tags, or None: filtered, or malformed (warned)."""
    event = PubSubEvent.from_received(received)
    try:
        request = build(event)
    except Exception as exc:  # noqa: BLE001 - a bad message must not block the others
        log.warning(
            f"[pubsub] {name}: skipped message {event.message_id} from {short_name} (no run; acked): "
            f"{type(exc).__name__}: {exc}"
        )
        return None
    if request is None:
        return None
    if not isinstance(request, RunRequest):
        raise TypeError(
            f"build_run_request of sensor {name} returned {type(request).__name__} for message "
            f"{event.message_id}; it must return a RunRequest or None"
        )
    tags = {MESSAGE_ID_TAG: event.message_id, SUBSCRIPTION_TAG: short_name, **request.tags}
    return request.with_replaced_attrs(run_key=request.run_key or default_run_key(event), tags=tags)


def _launched_run_keys(context: SensorEvaluationContext, sensor_name: str, run_keys: Iterable[str]) -> set[str]:
    """The keys among ``run_keys`` whose run this sensor has launched: a run with the key and the sensor's name,
    from the sensor's code location and repository when both record one, past ``NOT_STARTED`` (a run the
    daemon created but never submitted is submitted when its key is requested again). These are the checks
    of Dagster's own run-key dedupe (``dagster._daemon.sensor.fetch_existing_runs``), one query per key as
    there (a query with many tag values is slow on large run storages)."""
    origin = context.code_location_origin
    repository = (origin.location_name, context.repository_name) if origin is not None else None
    launched = set()
    for key in run_keys:
        for run in context.instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: key})):
            if run.tags.get(SENSOR_NAME_TAG) != sensor_name or run.status == DagsterRunStatus.NOT_STARTED:
                continue
            selector = run.remote_job_origin.repository_origin.get_selector() if run.remote_job_origin else None
            if selector is None or repository is None or (selector.location_name, selector.repository_name) == repository:
                launched.add(key)
                break
    return launched


def _evaluate(
    received: list[Any], build: Callable[[PubSubEvent], RunRequest | None], name: str, short_name: str,
    context: SensorEvaluationContext,
) -> _Tick:
    """Decide every pulled message: one run request per run key not launched yet; the deliveries of one message
    (Pub/Sub may hand out a message twice in one pull) settled alike."""
    deliveries: dict[str, list[Any]] = {}
    for message in received:
        deliveries.setdefault(message.message.message_id, []).append(message)
    tick = _Tick()
    candidates: list[tuple[list[str], RunRequest]] = []
    for copies in deliveries.values():
        ack_ids = [m.ack_id for m in copies]
        request = _request_for(copies[0], build, name, short_name, context.log)
        if request is None:
            tick.done += ack_ids
            tick.skipped += 1
        else:
            candidates.append((ack_ids, request))
    launched = _launched_run_keys(context, name, {request.run_key for _, request in candidates if request.run_key})
    requested: set[str | None] = set()
    for ack_ids, request in candidates:
        if request.run_key in launched:
            tick.done += ack_ids
            tick.launched += 1
            continue
        tick.requested += ack_ids
        if request.run_key not in requested:  # one request per key: duplicate notifications of one write
            requested.add(request.run_key)
            tick.run_requests.append(request)
    return tick


def _settle(subscriber: Any, path: str, done: list[str], handed_back: list[str], name: str, log: Any) -> None:
    """Ack what needs no run or whose run exists; hand the rest back for a tick after this one's is kept."""
    for settle, ack_ids, what in ((ack, done, "acking"), (nack, handed_back, "handing back")):
        if not ack_ids:
            continue
        try:
            settle(subscriber, path, ack_ids)
        except Exception as exc:  # noqa: BLE001 - a redelivery is recognised by its run key
            log.warning(
                f"[pubsub] {name}: {what} {len(ack_ids)} messages on {path} failed ({type(exc).__name__}: {exc}); "
                "they come back after their ack deadline and are recognised by their run keys"
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
            message; ``None`` skips the message (acked, no run). Raising (``ValueError``/``PubSubEventError``
            for a malformed message, or anything else) skips and acks the message with a warning in the
            tick's log. Default: ``default_run_request`` (no run config, the message id and attributes as
            tags). The run key is ``default_run_key`` (``bucket/object#generation`` for a Cloud Storage
            notification, else the message id) unless the request sets its own, which must be the same
            for every delivery of the message; the tags always include ``pubsub/message_id`` and
            ``pubsub/subscription``.
        max_messages_per_tick: pull at most this many messages per tick; the rest wait for a later tick.
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
            try:
                tick = _evaluate(received, build, name, short_name, context)
            except BaseException:
                _settle(subscriber, path, [], [m.ack_id for m in received], name, context.log)
                raise
            _settle(subscriber, path, tick.done, tick.requested, name, context.log)

        summary = tick.summary(len(received), short_name)
        context.log.info(f"[pubsub] {name}: {summary}")
        if not tick.run_requests:
            return SkipReason(summary)
        return SensorResult(run_requests=tick.run_requests)

    return _pubsub_sensor
