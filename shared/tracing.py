"""End-to-end tracing with OpenTelemetry, the part both sides share: the switch, the Pub/Sub publisher's
own tracing, and trace context in message attributes.

Off unless ``DAGSTER_GCF_PIPES_TRACING`` is ``1``/``true``/``on`` in the process's environment (each side
reads its own). Off, every helper here is a no-op that imports nothing of OpenTelemetry, and the Pub/Sub
publishers are built exactly as before.

On, the context crosses Pub/Sub the way google-cloud-pubsub's built-in tracing carries it: a W3C
``traceparent`` (and ``tracestate``) message attribute, prefixed ``googclient_``, written by the publisher's
``create`` span (``PublisherOptions(enable_open_telemetry_tracing=True)``). Receivers read it back with
``extract`` (a plain ``traceparent`` attribute is accepted too): a push delivery or the pull worker's loop is
not fed by the library's subscriber, and the reader hands replies off under the step's span, not under
their publisher's (the library's subscriber spans would hang under the function's, and it ends their
``process`` span twice when the callback acks, a warning per message), so the subscriber's tracing stays off.

The SDK (provider, exporters) is configured on first use, in ``tracing_sdk``: see ``docs/architecture.md``,
"Tracing".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from google.cloud.pubsub_v1 import types as pubsub_types

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer

#: the switch, on each side
ENV_VAR = "DAGSTER_GCF_PIPES_TRACING"
#: the instrumentation scope of the integration's own spans
TRACER_NAME = "dagster_gcf_pipes"
#: where trace context may travel in message attributes: the client library's prefix first, then bare
ATTRIBUTE_PREFIXES = ("googclient_", "")

_ON = {"1", "true", "on", "yes"}

F = TypeVar("F", bound=Callable[..., Any])


def enabled() -> bool:
    """Whether this process traces sessions (read on every call: cheap, and a test may switch it)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _ON


def publisher_options() -> pubsub_types.PublisherOptions:
    """The publisher's options: the library's own tracing (a ``create`` span per message, context injected
    into the message's attributes) when tracing is on; the defaults otherwise (before google-cloud-pubsub 2.27
    the option does not exist)."""
    return pubsub_types.PublisherOptions(enable_open_telemetry_tracing=True) if enabled() else pubsub_types.PublisherOptions()


def tracer(default_service_name: str) -> Tracer:
    """The integration's tracer; the first call configures the SDK from the ``OTEL_*`` environment unless the
    application configured a tracer provider itself (``tracing_sdk.ensure_provider``)."""
    from opentelemetry import trace

    from dagster_gcf_pipes.shared.tracing_sdk import ensure_provider

    ensure_provider(default_service_name)
    return trace.get_tracer(TRACER_NAME)


class _AttributeGetter:
    """Reads propagation fields (``traceparent``, ``tracestate``, ``baggage``) out of message attributes."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        for prefix in ATTRIBUTE_PREFIXES:
            value = carrier.get(prefix + key)
            if value:
                return [value]
        return None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


def extract(attributes: Mapping[str, str]) -> Context:
    """The trace context a message carries in its attributes (an empty context if none), through the
    configured propagators (``OTEL_PROPAGATORS``; W3C trace context and baggage by default)."""
    from opentelemetry import propagate

    return propagate.extract(attributes, getter=_AttributeGetter())  # type: ignore[arg-type]


def current_context() -> Context | None:
    """The OpenTelemetry context current in this thread, or None when tracing is off."""
    if not enabled():
        return None
    from opentelemetry import context

    return context.get_current()


def carried(fn: F) -> F:
    """``fn``, run in the OpenTelemetry context current now, wherever it is called (a new thread starts with
    an empty one); ``fn`` itself when tracing is off. Only OpenTelemetry's context is carried, not every
    context variable (the function's print capture keeps a session per context)."""
    parent = current_context()
    if parent is None:
        return fn
    from opentelemetry import context

    def run_in_parent(*args: Any, **kwargs: Any) -> Any:
        token = context.attach(parent)
        try:
            return fn(*args, **kwargs)
        finally:
            context.detach(token)

    return run_in_parent  # type: ignore[return-value]


def trace_id_of_current_span() -> str | None:
    """The current span's trace id (32 hex digits), or None when tracing is off or no span is recording."""
    if not enabled():
        return None
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None
