"""One retry policy for every Pub/Sub and GCS call on both sides of the wire.

Transient failures (the service is unavailable, overloaded, timed out or reset the connection) are retried
with bounded, jittered exponential backoff; anything else (not found, permission denied, a failed
precondition, bad input) is permanent and raised at once, so a misconfiguration fails fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import requests
from google.api_core import exceptions as gexc
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.GatewayTimeout,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.Aborted,
    gexc.Unknown,
    gexc.RetryError,
    requests.ConnectionError,
    requests.Timeout,
    ConnectionError,
    TimeoutError,
)

_log = logging.getLogger(__name__)


def transient_retry(
    *, max_seconds: float = 60.0, max_attempts: int | None = 12
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: retry ``TRANSIENT_ERRORS`` for at most ``max_seconds`` / ``max_attempts``, then re-raise.

    ``max_attempts=None``: bounded by time alone, for a budget the user set in seconds (a fast-failing call,
    such as a refused connection, would otherwise use up its attempts long before the seconds it was given)."""
    stop = stop_after_delay(max_seconds)
    if max_attempts is not None:
        stop = stop | stop_after_attempt(max_attempts)
    return retry(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        wait=wait_random_exponential(multiplier=0.2, max=5.0),
        stop=stop,
        before_sleep=before_sleep_log(_log, logging.WARNING),
        reraise=True,
    )
