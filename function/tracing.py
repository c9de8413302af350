"""The function's spans: the invocation (parented on the trigger's trace context), the handler, and the
user's own (``pipes.span``). No-ops when tracing is off (``shared/tracing.py``).

A push delivery (Eventarc, the local dispatcher) or the pull worker's loop hands the function the trigger's
attributes, not a span: the library's subscriber tracing never runs here, so the invocation reads the trace
context from the attributes itself (``googclient_traceparent``, written by the orchestrator's publisher).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from dagster_gcf_pipes.shared import tracing
from dagster_gcf_pipes.shared.protocol import Attr


def _service_name() -> str:
    # Cloud Run (and so a 2nd gen function) names its service in K_SERVICE
    return os.environ.get("K_SERVICE") or "cloud-function"


@contextlib.contextmanager
def invocation_span(attributes: Mapping[str, str], message_id: str) -> Iterator[str | None]:
    """One delivery of a trigger, as a consumer span under the span that published it; yields the span's
    trace id (None when tracing is off), which the session's log lines and ``opened`` then carry. Spans are
    exported before the delivery is answered."""
    if not tracing.enabled():
        yield None
        return
    from opentelemetry import trace

    from dagster_gcf_pipes.shared.tracing_sdk import flush

    span_attributes = {
        "messaging.system": "gcp_pubsub",
        "messaging.operation": "process",
        "messaging.message.id": message_id,
        "dagster_pipes.session_id": attributes.get(Attr.SESSION, ""),
    }
    try:
        with tracing.tracer(_service_name()).start_as_current_span(
            "pipes invocation", context=tracing.extract(attributes), kind=trace.SpanKind.CONSUMER, attributes=span_attributes
        ) as span:
            yield trace.format_trace_id(span.get_span_context().trace_id)
    finally:
        flush()


def handler_span(session_id: str) -> contextlib.AbstractContextManager[Any]:
    """The Pipes session on the function: from ``opened`` through the handler to ``closed``. The writer's
    publishes (every reply batch and heartbeat) and the user's spans are its children."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    return tracing.tracer(_service_name()).start_as_current_span(
        "pipes handler", attributes={"dagster_pipes.session_id": session_id}
    )


def user_span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A span of the user's own work, a child of the current span (the handler's); yields the span, or None
    when tracing is off."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    return tracing.tracer(_service_name()).start_as_current_span(name, attributes=dict(attributes or {}))
