"""The OpenTelemetry SDK's side of tracing: a tracer provider configured the standard way, from the ``OTEL_*``
environment, and the ``file`` exporter. Imported only once tracing is on (``shared/tracing.py``).

- An application that set a tracer provider itself (``opentelemetry-instrument``, its own code) keeps it:
  nothing is configured here, the integration's spans go where the application's go.
- Otherwise: a ``TracerProvider`` whose resource comes from ``OTEL_SERVICE_NAME`` /
  ``OTEL_RESOURCE_ATTRIBUTES`` (service name by default: the side's own), sampler from ``OTEL_TRACES_SAMPLER``,
  and one batch processor per exporter named in ``OTEL_TRACES_EXPORTER`` (default ``otlp``), each loaded from
  the ``opentelemetry_traces_exporter`` entry points as ``opentelemetry-instrument`` loads them:
  ``otlp`` (``OTEL_EXPORTER_OTLP_*``; the ``tracing`` extra installs it), ``console``, ``gcp_trace``
  (``opentelemetry-exporter-gcp-trace``: Cloud Trace), ``none``, and ``file``, the one shipped here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

#: the ``file`` exporter's path: one JSON object a line per finished span, appended
FILE_ENV_VAR = "DAGSTER_GCF_PIPES_TRACE_FILE"

_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
_INSTALL_HINTS = {
    "otlp_proto_grpc": "pip install 'dagster-gcf-pipes[tracing]'",
    "otlp_proto_http": "pip install 'dagster-gcf-pipes[tracing]'",
    "gcp_trace": "pip install opentelemetry-exporter-gcp-trace",
}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_configured = False


class FileSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (ids in hex, times in epoch nanoseconds): a trace
    to read without a collector, and what the local stack's tracing test collects from each process."""

    def __init__(self, path: str | os.PathLike[str]):
        self._path = os.fspath(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(span), default=str) + "\n" for span in spans)
        with self._lock, open(self._path, "a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
        "parent_span_id": trace.format_span_id(span.parent.span_id) if span.parent else None,
        "kind": span.kind.name,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": trace.format_trace_id(link.context.trace_id), "span_id": trace.format_span_id(link.context.span_id)}
            for link in span.links
        ],
        "service": span.resource.attributes.get(SERVICE_NAME),
    }


def ensure_provider(default_service_name: str) -> None:
    """Configure the global tracer provider from the environment, once per process, unless one is set."""
    global _configured
    with _lock:
        if _configured:
            return
        _configured = True
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return  # the application's own provider
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
        provider = TracerProvider(resource=resource)
        for exporter in span_exporters():
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)


def span_exporters() -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (comma-separated; ``otlp`` when unset). One that cannot be
    made is logged as an error and left out: a tracing misconfiguration never fails a step or a function."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    exporters = []
    for name in names:
        if name == "none":
            continue
        try:
            exporters.append(_exporter(name))
        except Exception as exc:  # noqa: BLE001 - a missing package, a bad setting: reported, spans dropped
            _log.error("tracing is on but its spans are not exported to %r: %s", name, exc)
    return exporters


def _exporter(name: str) -> SpanExporter:
    if name == "file":
        path = os.environ.get(FILE_ENV_VAR)
        if not path:
            raise ValueError(f"set {FILE_ENV_VAR} to the file to append spans to")
        return FileSpanExporter(path)
    if name == "otlp":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
        if protocol not in _OTLP_BY_PROTOCOL:
            raise ValueError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")
        name = _OTLP_BY_PROTOCOL[protocol]
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        hint = _INSTALL_HINTS.get(name, "install the package that provides it, or fix OTEL_TRACES_EXPORTER")
        raise ValueError(f"no span exporter {name!r} is installed: {hint}")
    return next(iter(found)).load()()


def flush(timeout_millis: int = 5000) -> None:
    """Export the spans finished so far: a function's CPU may be throttled once its response is sent, so it
    exports before answering rather than in the batch processor's own time."""
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force_flush is not None:
        force_flush(timeout_millis)
