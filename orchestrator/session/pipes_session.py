"""Opening a Pipes session with the step's context data built once per step.

Dagster's ``open_pipes_session`` builds the context it injects (``build_external_execution_context_data``)
on every call, and that includes one event-log query per selected asset (``get_asset_provenance``): in a
fan-out of 1,000 shards it was the largest single share of the orchestrator's CPU (11 % in the profile of
docs/benchmarks.md). Nothing in that data changes while the step runs (a fan-out's materializations are
reported once, after every shard ended), so ``StepContextData`` builds it once and each session gets it with
its own ``extras``. ``open_session`` is otherwise ``open_pipes_session`` step for step (the typed-event-stream
check, the handler, the injector and reader contexts, the warning when no message came).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import (
    AssetExecutionContext,
    OpExecutionContext,
    PipesContextInjector,
    PipesMessageHandler,
    PipesMessageReader,
    PipesSession,
)
from dagster._core.pipes.context import build_external_execution_context_data
from dagster._core.pipes.utils import _FAIL_TO_YIELD_ERROR_MESSAGE
from dagster_pipes import PipesContextData, PipesExtras


class StepContextData:
    """The Pipes context of one step, built on first use and shared by the step's sessions (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: PipesContextData | None = None

    def for_session(self, context: OpExecutionContext | AssetExecutionContext, extras: PipesExtras | None) -> PipesContextData:
        with self._lock:
            if self._data is None:
                self._data = build_external_execution_context_data(context, None)
            return PipesContextData(**{**self._data, "extras": extras or {}})  # type: ignore[typeddict-item]


@contextmanager
def open_session(
    context: OpExecutionContext | AssetExecutionContext,
    context_injector: PipesContextInjector,
    message_reader: PipesMessageReader,
    extras: PipesExtras | None,
    step_data: StepContextData,
) -> Iterator[PipesSession]:
    if context.has_assets_def:
        context.set_requires_typed_event_stream(error_message=_FAIL_TO_YIELD_ERROR_MESSAGE)
    context_data = step_data.for_session(context, extras)
    message_handler = PipesMessageHandler(context, message_reader)
    try:
        with (
            context_injector.inject_context(context_data) as injector_params,
            message_handler.handle_messages() as reader_params,
        ):
            yield PipesSession(
                context_data=context_data,
                message_handler=message_handler,
                context_injector_params=injector_params,
                message_reader_params=reader_params,
                context=context,
            )
    finally:
        if not message_handler.received_opened_message:
            context.log.warning(
                "[pipes] did not receive any messages from external process. Check stdout / stderr"
                " logs from the external process if"
                f" possible.\n{context_injector.__class__.__name__}:"
                f" {context_injector.no_messages_debug_text()}\n{message_reader.__class__.__name__}:"
                f" {message_reader.no_messages_debug_text()}\n"
            )
        elif not message_handler.received_closed_message:
            context.log.warning(
                "[pipes] did not receive closed message from external process. Buffered messages"
                " may have been discarded without being delivered. Use `open_dagster_pipes` as a"
                " context manager (a with block) to ensure that cleanup is successfully completed."
                " If that is not possible, manually call `PipesContext.close()` before process"
                " exit."
            )
