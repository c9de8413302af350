"""``@pipes_function``: turns ``def handler(pipes, payload)`` into a Cloud Functions CloudEvent entry point.

Eventarc (and the Functions Framework locally, when fed by a Pub/Sub push subscription) hands the function a
CloudEvent of type ``google.cloud.pubsub.topic.v1.messagePublished`` whose data is
``{"message": {"data": <base64>, "attributes": {...}, "messageId": ...}}``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable
from typing import Any

import functions_framework

from function.logs import configure_function_logging
from function.session import Handler, SessionOutcome, run_session

_log = logging.getLogger("dagster_pipes_gcp.function")


def pubsub_message_from_cloud_event(cloud_event: Any) -> tuple[bytes, dict[str, str], str]:
    """(data, attributes, message id) of the Pub/Sub message inside a messagePublished CloudEvent."""
    event_data = cloud_event.data if hasattr(cloud_event, "data") else cloud_event.get("data")
    message = (event_data or {}).get("message") if isinstance(event_data, dict) else None
    if not isinstance(message, dict):
        raise ValueError(
            "the CloudEvent carries no Pub/Sub message: deploy the function with --trigger-topic "
            "(event type google.cloud.pubsub.topic.v1.messagePublished)"
        )
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the Pub/Sub message's data is not base64: {exc}") from exc
    return data, dict(message.get("attributes") or {}), str(message.get("messageId", ""))


def pipes_function(handler: Handler) -> Callable[[Any], SessionOutcome]:
    """Decorate a business function ``handler(pipes, payload)``; the result is a Functions Framework
    ``cloud_event`` entry point with the same name (use it as ``--target`` / ``--entry-point``)."""
    configure_function_logging()

    @functools.wraps(handler)
    def entry_point(cloud_event: Any) -> SessionOutcome:
        try:
            data, attributes, message_id = pubsub_message_from_cloud_event(cloud_event)
        except ValueError as exc:
            _log.error("ignoring event %s: %s", getattr(cloud_event, "get", lambda _k: None)("id"), exc)
            return SessionOutcome(None, "", ran=False, error=exc)
        return run_session(handler, data, attributes, message_id=message_id)

    decorated = functions_framework.cloud_event(entry_point)
    decorated.pipes_handler = handler  # the plain business function, for the pull worker
    return decorated
