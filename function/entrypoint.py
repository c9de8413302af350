"""``@pipes_function``: turns ``def handler(pipes, payload)`` into Cloud Functions entry points.

The decorated name is a CloudEvent entry point: Eventarc (and the Functions Framework locally, when fed by a
Pub/Sub push subscription) hands it a CloudEvent of type ``google.cloud.pubsub.topic.v1.messagePublished``
whose data is ``{"message": {"data": <base64>, "attributes": {...}, "messageId": ..., "publishTime": ...}}``.

Its ``.http`` attribute is an HTTP entry point for the HTTP-invoked mode (the earlier design): the
orchestrator POSTs a body of that same ``{"message": ...}`` shape and the response comes when the session
has ended. Expose it under a name of its own (``main_http = main.http``) and deploy it with
``--trigger-http`` (locally: ``--signature-type http``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import functions_framework

from dagster_gcf_pipes.function.logs import configure_function_logging, trace_id_from
from dagster_gcf_pipes.function.session import Handler, SessionOutcome, run_session

_log = logging.getLogger(__name__)

#: set by ``@pipes_function`` on the entry points it returns, to the Functions Framework signature type each
#: is served with; tooling that imports a module tells a pipes function from a plain one by it
MARKER = "__pipes_function__"


@dataclass(frozen=True)
class PushedMessage:
    """The Pub/Sub message of a push body: ``publish_time`` is its ``publishTime`` in epoch seconds (Pub/Sub's
    server clock), None when the body has none (an HTTP invocation)."""

    data: bytes
    attributes: dict[str, str]
    message_id: str
    publish_time: float | None


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_publish_time(value: Any) -> float | None:
    """RFC 3339 ``publishTime`` (``2026-11-25T14:44:26.123456789Z``) as epoch seconds; None if absent or not
    a timestamp (the start window is then not checked, rather than a good trigger refused)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00"))).timestamp()
    except ValueError:
        _log.warning("ignoring a publishTime that is not an RFC 3339 timestamp: %r", value)
        return None


def pubsub_message_from_push_body(body: Any) -> PushedMessage:
    """The Pub/Sub message in a push body ``{"message": {...}}``."""
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, dict):
        raise ValueError(
            "the request carries no Pub/Sub message: deploy the function with --trigger-topic "
            "(event type google.cloud.pubsub.topic.v1.messagePublished), or POST {\"message\": {...}} to .http"
        )
    encoded, attributes = message.get("data") or "", message.get("attributes") or {}
    if not isinstance(encoded, str):
        raise ValueError(f"the Pub/Sub message's data must be a base64 string, got a JSON {type(encoded).__name__}")
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise ValueError("the Pub/Sub message's attributes must be an object of strings")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the Pub/Sub message's data is not base64: {exc}") from exc
    message_id, publish_time = str(message.get("messageId", "")), parse_publish_time(message.get("publishTime"))
    return PushedMessage(data, attributes, message_id, publish_time)


def _run(handler: Handler, message: PushedMessage, trace_id: str | None) -> SessionOutcome:
    return run_session(
        handler, message.data, message.attributes,
        message_id=message.message_id, trace_id=trace_id, publish_time=message.publish_time,
    )


def _http_status(outcome: SessionOutcome) -> int:
    """200 once the session ran (a handler error reached Dagster through ``closed``); 409 when another
    invocation holds the session; 400 for a trigger that can never run."""
    if outcome.ran:
        return 200
    return 400 if outcome.error is not None else 409


def is_pipes_function(obj: Any) -> bool:
    """Whether ``obj`` is an entry point made by ``@pipes_function`` (the CloudEvent one or its ``.http``)."""
    return getattr(obj, MARKER, None) in ("cloudevent", "http")


def pipes_function(handler: Handler) -> Callable[[Any], SessionOutcome]:
    """Decorate a business function ``handler(pipes, payload)``; the result is a Functions Framework
    ``cloud_event`` entry point with the same name (use it as ``--target`` / ``--entry-point``), with the
    HTTP entry point as ``.http`` and the plain handler as ``.pipes_handler`` (for the pull worker)."""
    configure_function_logging()

    @functools.wraps(handler)
    def entry_point(cloud_event: Any) -> SessionOutcome:
        event_data = cloud_event.data if hasattr(cloud_event, "data") else cloud_event.get("data")
        try:
            message = pubsub_message_from_push_body(event_data)
        except ValueError as exc:
            _log.error("ignoring event %s: %s", getattr(cloud_event, "get", lambda _k: None)("id"), exc)
            return SessionOutcome(None, "", ran=False, error=exc)
        trace_id = trace_id_from(cloud_event.get_attributes()) if hasattr(cloud_event, "get_attributes") else None
        return _run(handler, message, trace_id)

    def http_entry_point(request: Any) -> tuple[str, int, dict[str, str]]:
        try:
            message = pubsub_message_from_push_body(request.get_json(silent=True))
        except ValueError as exc:
            _log.error("rejecting HTTP request: %s", exc)
            outcome = SessionOutcome(None, "", ran=False, error=exc)
        else:
            outcome = _run(handler, message, trace_id_from(request.headers))
        response = {
            "session_id": outcome.session_id,
            "invocation_id": outcome.invocation_id,
            "ran": outcome.ran,
            "error": None if outcome.error is None else str(outcome.error),
        }
        return json.dumps(response), _http_status(outcome), {"Content-Type": "application/json"}

    decorated = functions_framework.cloud_event(entry_point)
    setattr(decorated, MARKER, "cloudevent")
    setattr(http_entry_point, MARKER, "http")
    decorated.http = http_entry_point
    decorated.pipes_handler = handler
    return decorated
