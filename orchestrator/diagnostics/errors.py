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


def format_remote_traceback(exception: Mapping[str, Any]) -> str:
    """Render a dagster-pipes ``PipesException`` and its causes the way Python prints them: root cause first."""
    chain: list[Mapping[str, Any]] = []
    current: Mapping[str, Any] | None = exception
    while current:
        chain.append(current)
        current = current.get("cause") or current.get("context")
    # dagster-pipes' `message` is Python's format_exception_only(): it already starts with the exception's name
    blocks = [f"{''.join(e.get('stack') or [])}{str(e.get('message', '')).strip()}\n" for e in chain]
    return "\nThe above exception was the direct cause of the following exception:\n\n".join(reversed(blocks))


class FunctionHttpError(PipesPubSubError):
    """The HTTP-invoked function answered with an error status, or not in time."""

    def __init__(self, url: str, status: int | None, detail: str):
        self.status = status
        answer = f"answered HTTP {status}" if status is not None else "did not answer"
        super().__init__(f"the Cloud Function at {url} {answer}: {detail}")
