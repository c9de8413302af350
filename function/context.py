"""The Pipes context handed to a handler: dagster-pipes' ``PipesContext``, one per invocation, plus the
session's cooperative cancellation and its deadline."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from traceback import TracebackException
from types import TracebackType
from typing import Any

from dagster_pipes import (
    PIPES_PROTOCOL_VERSION,
    PIPES_PROTOCOL_VERSION_FIELD,
    PipesContext,
    PipesContextLoader,
    PipesException,
    PipesMessageWriter,
    PipesParamsLoader,
)

from dagster_gcf_pipes.function import tracing
from dagster_gcf_pipes.function.cancellation import Cancellation
from dagster_gcf_pipes.shared.protocol import LEASE_ENDED_PARAM


class SessionCancelled(Exception):
    """Raised by ``raise_if_cancelled()`` once the session must stop (the run was terminated, or the
    orchestrator ended the session)."""


class SessionTimeout(Exception):
    """The session reached the function's timeout and was closed by the function itself."""


class CloudFunctionPipesContext(PipesContext):
    def __init__(
        self,
        params_loader: PipesParamsLoader,
        context_loader: PipesContextLoader,
        message_writer: PipesMessageWriter,
        cancellation: Cancellation,
        end_lease: Callable[[], bool] | None = None,
    ) -> None:
        self._close_lock = threading.Lock()
        self._end_lease = end_lease
        try:
            super().__init__(params_loader, context_loader, message_writer)
        except Exception as exc:
            _report_unloadable_context(params_loader, message_writer, exc)
            raise ContextUnloadable(f"the session's context could not be loaded: {exc!r}") from exc
        self._cancellation = cancellation

    @property
    def is_cancelled(self) -> bool:
        """True once the session must stop: the Dagster run was terminated, the orchestrator ended the session,
        or the function's timeout is near."""
        return self._cancellation.is_set()

    def raise_if_cancelled(self) -> None:
        """Stop here (with ``SessionCancelled``, reported through ``closed``) if the session was cancelled."""
        if self.is_cancelled:
            raise SessionCancelled(f"the session was cancelled: {self._cancellation.reason}")

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A span of your own work in the session's trace (``with pipes.span("load", rows=n) as span:``), a
        child of the span current in your code (the handler's, or another ``pipes.span``). Yields the
        OpenTelemetry span, or None when tracing is off (then it costs nothing). Plain OpenTelemetry works
        too: the handler runs with the session's span current, so ``trace.get_tracer(__name__)`` spans nest
        under it the same way."""
        return tracing.user_span(name, attributes)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(pipes_exception(TracebackException.from_exception(exc_value)) if exc_value is not None else None)

    def close(self, exc: PipesException | None = None) -> None:
        """``PipesContext.close``, which ends the session's lease first (``end_lease``, when given) and says in
        ``closed`` whether it did: the orchestrator then need not write the session's tombstone itself."""
        # the deadline closes the session from the watcher's thread while the handler may be closing it too
        with self._close_lock:
            if self._closed:
                return
            params: dict[str, Any] = {"exception": exc} if exc else {}
            if self._end_lease is not None and self._end_lease():
                params[LEASE_ENDED_PARAM] = True
            self._message_channel.write_message(_message("closed", params))
            self._io_stack.close()
            self._closed = True

    def close_at_deadline(self, message: str, handler_thread: threading.Thread) -> None:
        """Close the session with ``SessionTimeout(message)`` while the handler still runs: ``closed`` carries
        where the handler was (its thread's stack); whatever it writes afterwards is refused."""
        frame = sys._current_frames().get(handler_thread.ident or -1)
        stack = traceback.format_stack(frame) if frame is not None else []
        self.close(PipesException(
            message=f"{SessionTimeout.__name__}: {message}\n", stack=stack, name=SessionTimeout.__name__,
            cause=None, context=None,
        ))


class ContextUnloadable(Exception):
    """The session's Pipes context could not be loaded (its context object is missing or unreadable); what
    happened was reported to Dagster through ``opened`` and ``closed``, if the reply channel works."""


def _report_unloadable_context(params_loader: PipesParamsLoader, writer: PipesMessageWriter, exc: Exception) -> None:
    """dagster-pipes loads the context before it opens the reply channel, so a context that cannot be loaded
    (a claim-checked context object gone, unreadable) would send nothing and leave Dagster waiting out its
    startup timeout: open the channel here and send ``opened`` and ``closed`` with the error."""
    try:
        with writer.open(params_loader.load_messages_params()) as channel:
            exception = pipes_exception(TracebackException.from_exception(exc))
            for method, params in (("opened", writer.get_opened_payload()), ("closed", {"exception": exception})):
                channel.write_message(_message(method, params))
    except Exception:  # noqa: BLE001 - the channel fails too: the original error is what the function raises
        pass


def _message(method: str, params: dict[str, Any]) -> Any:
    return {PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": method, "params": params}


def pipes_exception(tb: TracebackException) -> PipesException:
    """The ``closed`` message's exception, chained as Python prints it: the cause (``raise ... from exc``), or
    else the context (an exception raised while handling another) unless it is suppressed (``raise ... from
    None``). dagster-pipes sends a suppressed context too, and Dagster then shows what the handler hid."""
    context = tb.__context__ if tb.__cause__ is None and not tb.__suppress_context__ else None
    return PipesException(
        message="".join(tb.format_exception_only()),
        stack=tb.stack.format(),
        name=_type_name(tb),
        cause=pipes_exception(tb.__cause__) if tb.__cause__ is not None else None,
        context=pipes_exception(context) if context is not None else None,
    )


def _type_name(tb: TracebackException) -> str | None:
    if sys.version_info >= (3, 13):  # exc_type is deprecated there
        return tb.exc_type_str.rsplit(".", 1)[-1]
    return tb.exc_type.__name__ if tb.exc_type is not None else None
