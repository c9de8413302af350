"""Errors that end a step, each saying what happened and what to check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class PipesPubSubError(Exception):
    """Base of the errors with which a Pub/Sub Pipes session ends a step."""


class PipesPubSubConfigError(PipesPubSubError, ValueError):
    """The resource's configuration or the call's input is wrong; raised before anything is published."""


class GCPUnreachableError(PipesPubSubError):
    """Pub/Sub or GCS did not answer within the retry budget."""


class FunctionStartupTimeout(PipesPubSubError):
    """No ``opened`` message arrived within the startup timeout."""


class FunctionHeartbeatTimeout(PipesPubSubError):
    """The function went silent (no batch, no heartbeat) for longer than the heartbeat timeout."""


class FunctionTotalTimeout(PipesPubSubError):
    """The session ran longer than the configured total timeout, or than any session may
    (startup_timeout + function_timeout + a margin)."""


class ReplyStreamError(PipesPubSubError):
    """The reply stream could not be read (subscription gone, Pub/Sub unreachable past the retry budget)."""


class RunInterrupted(PipesPubSubError):
    """The step was interrupted while a fan-out shard ran; the shard's session was asked to cancel."""


class CloudFunctionError(PipesPubSubError):
    """The function's handler raised; the message carries the remote exception and traceback."""

    def __init__(self, session_id: str, exception: Mapping[str, Any]):
        self.session_id = session_id
        self.remote_exception = dict(exception)
        super().__init__(
            f"the Cloud Function raised in session {session_id}: {str(exception.get('message', '')).strip()}"
            f"\n\nRemote traceback:\n{format_remote_traceback(exception)}"
        )


#: Python's words between two exceptions of a chain, the earlier one printed first
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def format_remote_traceback(exception: Mapping[str, Any]) -> str:
    """Render a dagster-pipes ``PipesException`` and the exceptions chained to it the way Python prints them:
    root first, a ``cause`` joined as the direct cause, a ``context`` as raised during its handling (a function
    of this release sends no context that ``raise ... from None`` suppressed; one of an earlier release does,
    and it shows)."""
    parts: list[str] = []
    current: Mapping[str, Any] | None = exception
    while current:
        # dagster-pipes' `message` is Python's format_exception_only(): it already starts with the exception's name
        parts.append(f"{''.join(current.get('stack') or [])}{str(current.get('message', '')).strip()}\n")
        if current.get("cause"):
            parts.append(_CAUSE)
            current = current["cause"]
        elif current.get("context"):
            parts.append(_CONTEXT)
            current = current["context"]
        else:
            current = None
    return "".join(reversed(parts))


class FunctionHttpError(PipesPubSubError):
    """The HTTP-invoked function answered with an error status, or not in time."""

    def __init__(self, url: str, status: int | None, detail: str):
        self.status = status
        answer = f"answered HTTP {status}" if status is not None else "did not answer"
        super().__init__(f"the Cloud Function at {url} {answer}: {detail}")
