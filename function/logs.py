"""Structured log lines for the function's own messages: one JSON object per line on stdout, which Cloud
Logging parses into ``severity`` and ``message`` (and the Functions Framework passes through locally).

While a session runs, its lines carry the request's trace (``logging.googleapis.com/trace``), so Cloud
Logging shows them under the request that ran the session; the trace id also reaches Dagster in ``opened``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar

#: the library's logger: its modules log under it by module name (dagster_gcf_pipes.function.session, ...)
LOGGER_NAME = "dagster_gcf_pipes"

#: the trace resource name (projects/P/traces/T) of the request being served, if it carried one
current_trace: ContextVar[str | None] = ContextVar("current_trace", default=None)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?P<trace>[0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_CLOUD_TRACE_CONTEXT = re.compile(r"^(?P<trace>[0-9a-fA-F]{32})(/.*)?$")


def trace_id_from(headers: Mapping[str, str]) -> str | None:
    """The trace id of a request (W3C ``traceparent``, or Google's ``X-Cloud-Trace-Context``), or of a
    CloudEvent (its ``traceparent`` extension: pass the event's attributes)."""
    for key, pattern in (("traceparent", _TRACEPARENT), ("x-cloud-trace-context", _CLOUD_TRACE_CONTEXT)):
        value = next((v for k, v in headers.items() if k.lower() == key), None)
        match = pattern.match(value.strip()) if isinstance(value, str) else None
        if match:
            return match["trace"].lower()
    return None


class CloudLoggingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"severity": record.levelname, "message": record.getMessage(), "logger": record.name}
        trace = current_trace.get()
        if trace:
            entry["logging.googleapis.com/trace"] = trace
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_function_logging(level: int = logging.INFO) -> None:
    """Give the integration's logger a JSON handler, unless the application configured one already."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
