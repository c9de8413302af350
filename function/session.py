"""One Pipes session on the function side: decode the trigger, claim the lease, open Pipes, run the handler.

Shared by the push entry point (``entrypoint.py``) and the pull worker. A fresh ``PipesContext`` is built for
every invocation and handed to the handler; the process-wide ``PipesContext`` singleton that
``open_dagster_pipes`` sets is never touched, so a warm instance serving several requests, one after the
other or at once, keeps them apart.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dagster_pipes import PipesMessageWriter
from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.function import clients
from dagster_gcf_pipes.function.cancellation import Cancellation, deadline_margin, watch_session
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext, ContextUnloadable, SessionCancelled
from dagster_gcf_pipes.function.context_loader import PipesInlineOrGCSContextLoader
from dagster_gcf_pipes.function.gcs_chunk_writer import GCSChunkMessageWriter
from dagster_gcf_pipes.function.lease import Claim, end_own_lease, ended_session_of_claim, take_lease, why_stop
from dagster_gcf_pipes.function.logs import current_trace
from dagster_gcf_pipes.function.message_writer import PubSubMessageWriter
from dagster_gcf_pipes.function.stdio import capture_output
from dagster_gcf_pipes.function.tracing import handler_span, invocation_span
from dagster_gcf_pipes.function.trigger import PERMANENT_GCS_ERRORS, read_trigger
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.protocol import (
    CLOCK_SKEW_ALLOWANCE_SECONDS,
    REPLY_CHANNEL_GCS,
    ProtocolError,
    ReplyChannelParams,
    Trigger,
)
from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS
from dagster_gcf_pipes.shared.signing import SECRET_ENV_VAR

Handler = Callable[[CloudFunctionPipesContext, dict[str, Any]], Any]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOutcome:
    session_id: str | None
    invocation_id: str
    ran: bool
    error: BaseException | None = None


def _ended_session(data: bytes, attributes: Mapping[str, str]) -> tuple[str, str] | None:
    try:
        return ended_session_of_claim(clients.storage_client(), data, attributes)
    except PERMANENT_GCS_ERRORS:  # no such bucket: no session ended there
        return None
    except (gexc.GoogleAPIError, *TRANSIENT_ERRORS) as exc:  # cannot tell: report the undecodable trigger as it is
        _log.warning("could not read the session lease of an undecodable trigger: %s", exc)
        return None


def _refusal(
    trigger: Trigger, settings: ReplyChannelParams, signing_secret: str | None, publish_time: float | None
) -> str | None:
    """Why this delivery must not start the session, if it must not.

    The start window counts from the message's ``publishTime``, stamped by Pub/Sub's servers: the
    orchestrator's clock never enters the comparison, so a skewed orchestrator cannot make every trigger
    look late (or a late one look fresh). Without a ``publishTime`` (an HTTP invocation) the window is not
    checked; the session lease's durable end still refuses a delivery after the session ended.

    A re-published trigger (a dead-letter re-drive, a replay tool) gets a fresh ``publishTime``: its own
    deadline refuses it, ``issued_at`` + ``start_window`` by the orchestrator's clock, with
    ``CLOCK_SKEW_ALLOWANCE_SECONDS`` of slack for the two clocks, by when its session's tombstone may have
    been swept (docs/reliability.md, guarantee 1)."""
    if settings.start_window is not None and publish_time is not None:
        late_by = time.time() - (publish_time + settings.start_window)
        if late_by > 0:
            return (
                f"session {trigger.session_id}: delivered {late_by:.1f}s after its start window (start_window="
                f"{settings.start_window:g}s from the trigger's publishTime; the orchestrator stopped waiting for it "
                "to start): a late duplicate or a backlog; not running it"
            )
    if settings.start_window is not None and settings.issued_at is not None:
        late_by = time.time() - (settings.issued_at + settings.start_window + CLOCK_SKEW_ALLOWANCE_SECONDS)
        if late_by > 0:
            return (
                f"session {trigger.session_id}: {late_by:.1f}s past the trigger's own deadline (issued_at + "
                f"start_window={settings.start_window:g}s + {CLOCK_SKEW_ALLOWANCE_SECONDS:g}s allowed for clock "
                "skew): a re-published or replayed trigger of a session that is over; not running it"
            )
    if settings.signed and not signing_secret:
        return (
            f"session {trigger.session_id}: the orchestrator requires signed replies but {SECRET_ENV_VAR} is not set "
            "on the function: set it to the orchestrator's signing_secret"
        )
    return None


def run_session(
    handler: Handler,
    data: bytes,
    attributes: Mapping[str, str],
    *,
    message_id: str = "",
    trace_id: str | None = None,
    publish_time: float | None = None,
) -> SessionOutcome:
    """Run ``handler`` for one trigger message. Never raises for a handler error: that is reported to Dagster
    through ``closed`` (with its traceback) and returned, so the platform does not redeliver a trigger
    whose failure Dagster already knows about. A trigger that cannot run (malformed in any field, late, a
    duplicate, its bucket missing) is logged in one line and returned too: redelivering it could never help.
    It raises only what a redelivery may fix (Cloud Storage unreachable past its retry budget, permission
    denied, anything unforeseen while taking the lease): the push path answers an error, the worker backs
    off; the start window bounds how long either keeps trying. ``trace_id`` is the request's trace, if any:
    the session's log lines carry it and Dagster records it. ``publish_time`` is the trigger message's
    ``publishTime`` (epoch seconds, Pub/Sub's server clock), which the start window counts from. With
    tracing on, the session's trace is the trigger's (``function/tracing.py``), and its id replaces ``trace_id``."""
    with invocation_span(attributes, message_id) as traced_id:
        trace_id = traced_id or trace_id
        token = current_trace.set(f"projects/{clients.storage_client().project}/traces/{trace_id}" if trace_id else None)
        try:
            return _run_session(handler, data, attributes, message_id, trace_id, publish_time)
        finally:
            current_trace.reset(token)


def _run_session(
    handler: Handler,
    data: bytes,
    attributes: Mapping[str, str],
    message_id: str,
    trace_id: str | None,
    publish_time: float | None,
) -> SessionOutcome:
    arrived = time.monotonic()
    invocation_id = uuid.uuid4().hex
    try:
        read = read_trigger(data, attributes)
    except ProtocolError as exc:
        ended = _ended_session(data, attributes)
        if ended is not None:  # its claim-checked body went with the session: a late delivery, not a bad one
            _log.info("dropping trigger message %s: session %s already ended (%s): this delivery is late and does "
                      "not run", message_id or "?", *ended)
            return SessionOutcome(ended[0], invocation_id, ran=False)
        _log.error("dropping trigger message %s: %s", message_id or "?", exc)
        return SessionOutcome(None, invocation_id, ran=False, error=exc)
    trigger, settings = read.trigger, read.settings

    signing_secret = os.environ.get(SECRET_ENV_VAR) or None
    refusal = _refusal(trigger, settings, signing_secret, publish_time)
    if refusal:
        _log.error("dropping trigger message %s: %s", message_id or "?", refusal)
        return SessionOutcome(trigger.session_id, invocation_id, ran=False, error=ProtocolError(refusal))

    gcs = clients.storage_client()
    key = lease_key(settings.prefix, trigger.session_id)
    try:
        claim, generation = take_lease(gcs, settings.bucket, key, invocation_id, settings.lease_seconds)
    except PERMANENT_GCS_ERRORS as exc:  # no such bucket (or no valid name): no redelivery creates it
        problem = ProtocolError(
            f"session {trigger.session_id}: its lease gs://{settings.bucket}/{key} cannot be written ({exc.code} "
            f"{type(exc).__name__}): the orchestrator's bucket={settings.bucket!r} must be a bucket this function can "
            "reach (the same project, or the same emulator); not running it"
        )
        _log.error("dropping trigger message %s: %s", message_id or "?", problem)
        return SessionOutcome(trigger.session_id, invocation_id, ran=False, error=problem)
    if claim is not Claim.CLAIMED:
        return SessionOutcome(trigger.session_id, invocation_id, ran=False)

    _log.info("session %s: invocation %s starts (trigger message %s)", trigger.session_id, invocation_id, message_id)
    writer: PipesMessageWriter
    if settings.channel == REPLY_CHANNEL_GCS:
        writer = GCSChunkMessageWriter(gcs, invocation_id, trace_id=trace_id, interval=settings.chunk_interval)
    else:
        writer = PubSubMessageWriter(
            clients.publisher(), clients.blob_store, invocation_id, signing_secret=signing_secret, trace_id=trace_id
        )
    cancellation = Cancellation()
    handler_started = False
    try:
        with (
            handler_span(trigger.session_id),  # the session's replies and the user's spans nest under it
            CloudFunctionPipesContext(
                read.params, PipesInlineOrGCSContextLoader(gcs), writer, cancellation,
                end_lease=_lease_ender(gcs, settings, key, invocation_id, generation),
            ) as pipes,
            watch_session(
                functools.partial(why_stop, gcs, settings.bucket, key, invocation_id),
                cancellation,
                interval=settings.heartbeat_interval,
                deadline=_deadline(settings, arrived),
                on_deadline=functools.partial(_close_at_deadline, pipes, cancellation, settings, threading.current_thread()),
            ),
        ):
            pipes.raise_if_cancelled()  # ended while the session was being set up: the handler never starts
            handler_started = True
            with capture_output(pipes):  # prints reach the step's stdout/stderr; the rest is sent before `closed`
                handler(pipes, dict(trigger.payload))
    except Exception as exc:  # noqa: BLE001 - reported through `closed` by PipesContext.__exit__
        if not handler_started and isinstance(exc, SessionCancelled):
            _log.warning("session %s: the handler was not started: %s", trigger.session_id, exc)
            return SessionOutcome(trigger.session_id, invocation_id, ran=False, error=exc)
        if isinstance(exc, ContextUnloadable):  # reported to Dagster by the context itself; no redelivery helps
            _log.error("session %s: the handler was not started: %s; reported to Dagster", trigger.session_id, exc)
            return SessionOutcome(trigger.session_id, invocation_id, ran=False, error=exc)
        if isinstance(exc, SessionCancelled):  # a terminated run, not a failure: no ERROR, no traceback
            _log.info("session %s: the handler stopped: %s; reported to Dagster", trigger.session_id, exc)
        else:
            _log.exception("session %s: the handler raised; reported to Dagster", trigger.session_id)
        return SessionOutcome(trigger.session_id, invocation_id, ran=True, error=exc)
    return SessionOutcome(trigger.session_id, invocation_id, ran=True)


def _lease_ender(
    gcs: storage.Client, settings: ReplyChannelParams, key: str, invocation_id: str, generation: int
) -> Callable[[], bool] | None:
    """How the session's context ends the lease as it closes the session, if it may: only on the Pub/Sub
    channel with a start window to keep the tombstone for (the earlier design's orchestrator ends it)."""
    if settings.channel == REPLY_CHANNEL_GCS or settings.start_window is None or not generation:
        return None
    return functools.partial(
        end_own_lease, gcs, settings.bucket, key, invocation_id, generation, start_window=settings.start_window
    )


def _deadline(settings: ReplyChannelParams, arrived: float) -> float | None:
    """When (``time.monotonic()``) the session closes itself: the function's timeout, counted from the
    delivery's arrival, less a margin to publish ``closed`` before the platform gives up on the request."""
    if settings.function_timeout is None:
        return None
    return arrived + settings.function_timeout - deadline_margin(settings.function_timeout)


def _close_at_deadline(
    pipes: CloudFunctionPipesContext, cancellation: Cancellation, settings: ReplyChannelParams, handler: threading.Thread
) -> None:
    """The function's timeout is near and the handler still runs. Cloud Functions (2nd gen) would not stop it:
    tell the handler to stop (cooperatively), and end the session now with a timeout error, which also stops
    the heartbeats, so Dagster is not kept waiting by a function that overran."""
    message = (
        f"session {settings.session_id}: the handler was still running at the function's timeout "
        f"(function_timeout={settings.function_timeout:g}s, less {deadline_margin(settings.function_timeout or 0):g}s "
        "to report it); the session was closed and the handler asked to stop. Raise the function's timeout "
        "(gcloud functions deploy --timeout, then function_timeout), or split the work (run_many)"
    )
    _log.error(message)
    cancellation.set(f"the function's timeout (function_timeout={settings.function_timeout:g}s) is reached")
    pipes.close_at_deadline(message, handler)
