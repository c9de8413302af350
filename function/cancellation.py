"""Watching a running session: cooperative cancellation and the function's own deadline.

The function learns that it must stop from the session lease (``lease.why_stop``): the orchestrator ends the
lease when the Dagster run is terminated, when it stops waiting (a timeout), and whenever the session is
over. The watcher reads it once before the handler starts, then every ``interval`` seconds (at most
``POLL_SECONDS``), and sets the ``Cancellation`` that the handler's Pipes context exposes
(``pipes.is_cancelled`` / ``pipes.raise_if_cancelled()``).

The deadline: a gen2 function is not stopped at its timeout (the caller gets an error, the instance keeps
running), so the session stops itself a little before the function's timeout: ``on_deadline`` cancels the
handler and closes the session with a timeout error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS

_log = logging.getLogger(__name__)

#: the longest a running session goes without looking at its lease
POLL_SECONDS = 1.0


def deadline_margin(function_timeout: float) -> float:
    """How long before the platform's timeout the session closes itself: time to publish `closed`."""
    return min(10.0, 0.1 * function_timeout)


class Cancellation:
    """Set once, with the reason, when the session must stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def _check(why_stop: Callable[[], str | None], cancellation: Cancellation) -> None:
    try:
        reason = why_stop()
    except TRANSIENT_ERRORS as exc:  # a missed check is retried at the next interval
        _log.warning("could not read the session lease to check for cancellation: %s", exc)
        return
    if reason:
        _log.warning("cancelling the session: %s", reason)
        cancellation.set(reason)


@contextmanager
def watch_session(
    why_stop: Callable[[], str | None],
    cancellation: Cancellation,
    *,
    interval: float,
    deadline: float | None,
    on_deadline: Callable[[], None],
) -> Iterator[None]:
    """Check ``why_stop()`` now and every ``interval`` seconds until the block ends or the session is
    cancelled; call ``on_deadline()`` once at ``deadline`` (``time.monotonic()``) if the block runs that long."""
    _check(why_stop, cancellation)
    interval = min(interval, POLL_SECONDS)
    stop = threading.Event()

    def watch() -> None:
        while True:
            wait = interval if deadline is None else min(interval, max(deadline - time.monotonic(), 0.0))
            if stop.wait(wait):
                return
            if deadline is not None and time.monotonic() >= deadline:
                on_deadline()
                return
            if not cancellation.is_set():
                _check(why_stop, cancellation)

    thread = threading.Thread(target=watch, name="pipes-session-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread is not threading.current_thread():
            thread.join()
