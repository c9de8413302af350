"""The orchestrator's spans: the Dagster step's session (parent of the trigger publish, and so of the whole
function side), the reader's hand-off of each reply to Dagster, and the step's trace metadata. No-ops when
tracing is off (``shared/tracing.py``), except ``trace_metadata``, which also links a trace the function
reported (a platform's request trace).
"""

from __future__ import annotations

import contextlib
import functools
import os
import string
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from dagster import MetadataValue

from dagster_gcf_pipes.shared import tracing
from dagster_gcf_pipes.shared.protocol import Attr

if TYPE_CHECKING:
    from opentelemetry.context import Context

#: Cloud Trace's console, for ``trace_url_template``
CLOUD_TRACE_URL_TEMPLATE = "https://console.cloud.google.com/traces/list?tid={trace_id}&project={project}"
_URL_FIELDS = {"trace_id", "project"}
_SERVICE_NAME = "dagster"

F = TypeVar("F", bound=Callable[..., Any])


def url_template_problems(template: str | None) -> list[str]:
    """What is wrong with a ``trace_url_template``, checked before anything is published."""
    if not template:
        return []
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return [f"trace_url_template={template!r} is not a format string: {exc}"]
    unknown = fields - _URL_FIELDS
    if unknown or "trace_id" not in fields:
        named = ", ".join(sorted(unknown)) or "neither"
        problem = (
            f"trace_url_template={template!r} must name {{trace_id}} (and may name {{project}}), not {named}; "
            f"e.g. {CLOUD_TRACE_URL_TEMPLATE}"
        )
        return [problem]
    return []


def trace_url(template: str | None, trace_id: str, project: str) -> str | None:
    return template.format(trace_id=trace_id, project=project) if template else None


def trace_metadata(reported_trace_id: str | None, template: str | None, project: str) -> dict[str, Any]:
    """The step's ``pipes_trace_id`` (the step's own trace when tracing is on, else the one the function
    reported, if any) and ``pipes_trace_url`` when a ``trace_url_template`` is set."""
    trace_id = tracing.trace_id_of_current_span() or reported_trace_id
    if not trace_id:
        return {}
    url = trace_url(template, trace_id, project)
    return {"pipes_trace_id": trace_id, **({"pipes_trace_url": MetadataValue.url(url)} if url else {})}


@contextlib.contextmanager
def _step_span(context: Any, name: str, client: Any, project: str, *, log: bool) -> Iterator[None]:
    """The span; ``log``: say the trace (and its link) in the step's log, once per step (not per shard)."""
    from opentelemetry import trace

    step = context.op_execution_context.get_step_execution_context().step.key
    attributes = {"dagster.run_id": context.run.run_id, "dagster.step_key": step}
    with tracing.tracer(_SERVICE_NAME).start_as_current_span(f"dagster step {step}{name}", attributes=attributes) as span:
        if log:
            trace_id = trace.format_trace_id(span.get_span_context().trace_id)
            url = trace_url(client.trace_url_template, trace_id, project)
            context.log.info(f"[pipes] trace {trace_id}" + (f": {url}" if url else ""))
        yield


def traced_session(run_session: F) -> F:
    """Decorates ``PipesPubSubClient._run_session(context, resolved, ...)`` (``SessionLifecycle.run_session``):
    one span per session (a shard's under its fan-out's), current while the trigger is published, so the
    whole session is one trace."""

    @functools.wraps(run_session)
    def wrapper(client: Any, context: Any, resolved: Any, *args: Any, **kwargs: Any) -> Any:
        if not tracing.enabled():
            return run_session(client, context, resolved, *args, **kwargs)
        log_prefix = kwargs.get("log_prefix", "")
        suffix = f" {log_prefix.strip()}" if log_prefix else ""
        with _step_span(context, suffix, client, resolved.project, log=not log_prefix):
            return run_session(client, context, resolved, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def traced_fan_out(run_many: F) -> F:
    """Decorates ``PipesPubSubClient.run_many``: the fan-out's span, parent of every shard's session (the
    shards run on pool threads: ``run_many`` hands them this context with ``shared.tracing.carried``)."""

    @functools.wraps(run_many)
    def wrapper(client: Any, *args: Any, **kwargs: Any) -> Any:
        if not tracing.enabled():
            return run_many(client, *args, **kwargs)
        project = client.project or os.environ.get("GOOGLE_CLOUD_PROJECT") or ""  # for the link only
        with _step_span(kwargs["context"], " fan-out", client, project, log=True):
            return run_many(client, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def hand_off(parent: Context | None, attributes: Mapping[str, str], message_id: str) -> contextlib.AbstractContextManager[Any]:
    """The reader taking one reply (decode, reassemble, hand to Dagster's handler) as a span under the
    session's (``parent``, captured where the reader was built), linked to the function's publish of it;
    nothing when ``parent`` is None (tracing was off)."""
    if parent is None:
        return contextlib.nullcontext()
    from opentelemetry import trace

    published = trace.get_current_span(tracing.extract(attributes)).get_span_context()
    return tracing.tracer(_SERVICE_NAME).start_as_current_span(
        "pipes hand-off",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=[trace.Link(published)] if published.is_valid else None,
        attributes={
            "messaging.system": "gcp_pubsub",
            "messaging.operation": "process",
            "messaging.message.id": message_id,
            "dagster_pipes.kind": attributes.get(Attr.KIND, ""),
            "dagster_pipes.seq": attributes.get(Attr.SEQ, ""),
        },
    )
