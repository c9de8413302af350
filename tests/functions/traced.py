"""The tracing test's function: the user's work in a span of the Pipes context and in a plain OpenTelemetry
span, a log line, a materialization."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from dagster_gcf_pipes.function.context import CloudFunctionPipesContext
from dagster_gcf_pipes.function.entrypoint import pipes_function


@pipes_function
def main(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    # plain OpenTelemetry nests the same way (the handler runs with the session's span current): "plain otel
    # work" is a child of "load rows"
    with pipes.span("load rows", rows=payload["rows"]), trace.get_tracer(__name__).start_as_current_span("plain otel work"):
        pipes.log.info("traced work done")
    pipes.report_asset_materialization(metadata={"rows": payload["rows"]})
