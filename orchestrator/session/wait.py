"""Waiting for a session's end, the same for both reply channels: ``closed`` handled, or a timeout.

A reader mixes in ``SessionWaiter`` and says what it knows: whether ``opened``/``closed`` were handled, when
the function was last heard from (``None`` where the channel carries no heartbeats, which turns the
heartbeat check off), and whether the channel broke.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from dagster_pipes import PipesOpenedData

from dagster_gcf_pipes.orchestrator.diagnostics.errors import FunctionHeartbeatTimeout, FunctionStartupTimeout, FunctionTotalTimeout

#: how often a waiting session checks its timeouts and ``stop()`` when no message wakes it (every message
#: does): what a timeout or an interrupt may be noticed late by. A fan-out's hundred waiting sessions wake
#: 100 times a second at this: 100 sessions waiting cost the orchestrator 33 ms of CPU a second at 0.5 s,
#: which a 10,000-shard step stretched to four minutes paid as 0.8 ms a shard.
CHECK_INTERVAL_SECONDS = 1.0


class SessionWaiter:
    session_id: str
    _cond: threading.Condition
    _last_heard: tuple[float, float] | None = None  # (monotonic, wall clock)
    opened_extras: Mapping[str, Any] = {}  # what the function's writer reported in `opened`

    @property
    def expected_writer_count(self) -> int:
        """One writer per session (the invocation that owns its lease). Overrides Dagster's default, the same
        value, which is marked preview and warned about on every session it is read."""
        return 1

    def on_opened(self, opened_payload: PipesOpenedData) -> None:
        """Dagster's hook for the ``opened`` message: keep the writer's extras (invocation id, trace id)."""
        self.opened_extras = dict(opened_payload.get("extras") or {})
        super().on_opened(opened_payload)  # type: ignore[misc]

    @property
    def trace_id(self) -> str | None:
        """The trace of the request that ran the session, when the platform passed one."""
        return self.opened_extras.get("trace_id")

    @property
    def opened(self) -> bool:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    @property
    def invocation_id(self) -> str | None:
        raise NotImplementedError

    def _raise_if_broken(self) -> None:
        """Raise if the channel can no longer deliver this session's replies."""

    def _stream_trouble_since(self, since: float) -> str | None:
        """What went wrong reading the channel since the wall-clock time ``since``, if anything: a timeout
        then blames the channel, not the function."""
        return None

    def _channel_problem(self) -> str | None:
        """What a look at the channel itself shows is wrong with it, asked once a timeout is about to blame the
        function (so it may make a slow call): e.g. the subscription or topic is gone, Pub/Sub does not answer."""
        return None

    def _heard_from_function(self) -> None:
        self._last_heard = (time.monotonic(), time.time())

    def wait_for_close(
        self,
        *,
        triggered_at: float,
        sent_to: str,
        startup_hint: str,
        startup_timeout: float,
        heartbeat_timeout: float,
        total_timeout: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Block until the session's ``closed`` message was handled (True), or ``stop()`` returns True (False);
        raise if a timeout expires first. ``stop`` may raise to end the wait with an error (an interrupted
        step, a failed HTTP invocation).

        ``triggered_at`` is the ``time.monotonic()`` at which the trigger was sent to ``sent_to``;
        ``startup_hint`` says what to check when the function never starts."""
        with self._cond:
            while not self.closed:
                if stop is not None and stop():
                    return False
                self._raise_if_broken()
                now = time.monotonic()
                if total_timeout is not None and now - triggered_at > total_timeout:
                    raise FunctionTotalTimeout(
                        f"session {self.session_id} ran longer than total_timeout={total_timeout:g}s without closing; "
                        "the function may still be running: raise total_timeout if the work needs longer"
                    )
                if not self.opened:
                    if now - triggered_at > startup_timeout:
                        problem = self._channel_problem()
                        raise FunctionStartupTimeout(
                            f"the Cloud Function did not start session {self.session_id} within "
                            f"startup_timeout={startup_timeout:g}s of the trigger being sent to {sent_to}. "
                            + self._blame(time.time() - (now - triggered_at), "started", end=" ")
                            + (f"The reply channel is broken: {problem}; the function may have started, unheard. " if problem else "")
                            + f"{startup_hint}; raise startup_timeout for slow cold starts."
                        )
                elif self._last_heard is not None and now - self._last_heard[0] > heartbeat_timeout:
                    raise FunctionHeartbeatTimeout(self._heartbeat_message(now - self._last_heard[0], heartbeat_timeout))
                self._cond.wait(timeout=CHECK_INTERVAL_SECONDS)
        return True

    def _heartbeat_message(self, silent_for: float, heartbeat_timeout: float) -> str:
        assert self._last_heard is not None
        last_heard_at = datetime.fromtimestamp(self._last_heard[1], tz=timezone.utc).isoformat(timespec="seconds")
        heard = (
            f"invocation {self.invocation_id} of session {self.session_id} was last heard from at {last_heard_at} "
            f"({silent_for:.1f}s ago; heartbeat_timeout={heartbeat_timeout:g}s)."
        )
        blame = self._blame(self._last_heard[1], "running")
        if blame:
            return f"no heartbeat arrived from the Cloud Function: {heard} {blame}"
        problem = self._channel_problem()
        if problem:
            return (
                f"no heartbeat arrived from the Cloud Function: {heard} The reply channel is broken: {problem}. The "
                "function may still be running, unheard; fix the channel, then re-execute the step (with reattach "
                "on, it collects what the session sent)."
            )
        return (
            f"the Cloud Function stopped sending heartbeats: {heard} Its process probably died (out of memory, a "
            "crash, the instance shut down; a function past its timeout closes the session itself, and a stuck "
            "one is stopped only with THREADED_TIMEOUT_ENABLED=true): check the function's logs for that "
            "invocation and its memory settings."
        )

    def _blame(self, since: float, state: str, end: str = "") -> str:
        """The channel's trouble since ``since``, as the first suspect of a timeout, or ""."""
        trouble = self._stream_trouble_since(since)
        if trouble is None:
            return ""
        return (
            f"Meanwhile {trouble}: the function may have {state} and still be running, unheard; check that Pub/Sub "
            f"is reachable from here.{end}"
        )
