"""The durable end of a session, orchestrator side.

A session's trigger can be delivered after the session is over: a queued trigger of a terminated run, a
Pub/Sub or Eventarc duplicate (a lost 2xx is redelivered), a re-published message. Deleting the lease at the
end would let such a delivery run the handler again, with nobody listening, and leave its lease behind. So
the end is written into the lease instead (``shared/lease.py``): ``end_lease`` rewrites it **ended**, or
creates it ended when no function claimed it yet, with a generation precondition either way, so that the
end and a concurrent claim are ordered by GCS. A later claim fails; a running function sees it at its next
check and is cancelled.

The ended lease is the session's tombstone under ``PREFIX/leases/``, kept for the trigger's start window
plus ``TOMBSTONE_MARGIN_SECONDS`` after it was written. Until then a delivery could still run: a late one
inside the start window (counted from its ``publishTime``), or a re-publish of the same bytes (a fresh
``publishTime``) before the trigger's own deadline, ``issued_at`` + start window, which the function checks
with ``CLOCK_SKEW_ALLOWANCE_SECONDS`` of slack; the margin is twice that allowance (a clock off either way)
plus a minute. After it, the function refuses every delivery by itself. Every teardown sweeps the tombstones
whose time has passed (at most once per ``SWEEP_INTERVAL_SECONDS`` per process and bucket prefix), judging
their age by GCS's own timestamps (``updated``) only, never by this machine's clock, and skipping (with a
warning) any object there whose record does not parse: nothing another session left in the bucket may fail
this one. A bucket lifecycle rule on the prefix is the backstop for an orchestrator that stops for good.
Writing a tombstone, or finding the one the function wrote at the end of a session this process started,
also reads GCS's clock against this machine's: one warning per process when they are further apart than
the allowance, which the trigger's deadline relies on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from datetime import datetime

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.claim_check import GCSBlobStore, list_objects
from dagster_gcf_pipes.shared.layout import group_prefix, lease_key, leases_prefix, session_prefix
from dagster_gcf_pipes.shared.lease import (
    LeaseRecord,
    MalformedLease,
    fetch_lease,
    read_lease,
    tombstone,
    write_lease,
)
from dagster_gcf_pipes.shared.protocol import CLOCK_SKEW_ALLOWANCE_SECONDS
from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS, transient_retry

_log = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 60.0
#: a claim landing between our read and our write is retried; more than a few in a row cannot happen
_END_ATTEMPTS = 5

_last_sweep: dict[tuple[str, str], float] = {}
_sweep_lock = threading.Lock()
#: objects under a leases/ prefix already reported as unreadable (each is warned about once per process)
_reported: set[str] = set()
_clock_warned = threading.Event()


@transient_retry()
def end_lease(
    gcs: storage.Client, bucket: str, prefix: str, session_id: str, *, start_window: float, reason: str,
    known: storage.Blob | None = None,
) -> storage.Blob:
    """Mark the session ended in its lease, whoever holds it; returns the tombstone. Idempotent.

    ``known``: the lease as this process last read it; the tombstone is first written over that generation
    without reading the lease again (one request instead of two when the lease did not change since)."""
    blob = gcs.bucket(bucket).blob(lease_key(prefix, session_id))
    record = tombstone(reason, start_window)
    for attempt in range(_END_ATTEMPTS):
        held = known if attempt == 0 and known is not None else gcs.bucket(bucket).get_blob(blob.name)
        if held is None:
            ended, generation = record, 0
        else:
            lease = read_lease(held)
            if lease.ended:
                return held
            ended, generation = dataclasses.replace(record, invocation_id=lease.invocation_id), held.generation
        before = time.time()
        try:
            write_lease(blob, ended, generation)
        except gexc.PreconditionFailed:
            continue  # a function claimed, renewed or took over the lease in between: read it again
        _check_clock(before, blob.updated, time.time())
        return blob
    raise RuntimeError(f"gs://{bucket}/{blob.name} kept changing: could not end session {session_id}")


def _check_clock(before: float, server_time: datetime | None, after: float) -> None:
    """Warn (once per process) when GCS stamped the tombstone outside this machine's clock readings around
    the write by more than the allowance: the triggers this process stamps (``issued_at``) would then be
    refused while fresh, or not refused when re-published after their session's tombstone was swept."""
    if server_time is None or _clock_warned.is_set():
        return
    server = server_time.timestamp()
    ahead_by = server - after if server > after else min(server - before, 0.0)  # GCS's clock against ours
    if abs(ahead_by) > CLOCK_SKEW_ALLOWANCE_SECONDS:
        _clock_warned.set()
        _log.warning(
            "this machine's clock is %.0fs %s Cloud Storage's, more than the %gs the function allows for: triggers "
            "carry this clock's time (issued_at), so fresh ones may be refused as late, or re-published ones run "
            "again. Synchronise the clock (NTP)",
            abs(ahead_by), "behind" if ahead_by > 0 else "ahead of", CLOCK_SKEW_ALLOWANCE_SECONDS,
        )


def end_session(
    gcs: storage.Client, bucket: str, prefix: str, session_id: str, *, start_window: float, reason: str,
    known: storage.Blob | None = None, written_after: float | None = None,
) -> None:
    """The session is over: end its lease durably, delete every other object of the session, and sweep the
    tombstones whose time has passed (a sweep that fails is logged: it is housekeeping, never the session's
    outcome). ``written_after``: this machine's time before which nobody can have ended the lease (the
    trigger's sending): a tombstone the function wrote is then held against this machine's clock too."""
    tombstone = end_lease(gcs, bucket, prefix, session_id, start_window=start_window, reason=reason, known=known)
    if written_after is not None:
        _check_clock(written_after, tombstone.updated, time.time())
    GCSBlobStore(gcs, bucket).delete_prefix(session_prefix(prefix, session_id))
    if tombstone.updated is not None:
        _sweep_logged(gcs, bucket, prefix, tombstone.updated)


def end_group(
    gcs: storage.Client, bucket: str, prefix: str, group: str, session_ids: Iterable[str], *, start_window: float,
    reason: str, already_ended: AbstractSet[str],
) -> None:
    """A fan-out group is over: the leases of its sessions not ``already_ended`` are ended, the objects of all
    of them deleted with one listing of the group's prefix (not one per session), and the tombstones swept."""
    tombstone: storage.Blob | None = None
    first: str | None = None
    for session_id in session_ids:
        first = first or session_id
        if session_id not in already_ended:
            tombstone = end_lease(gcs, bucket, prefix, session_id, start_window=start_window, reason=reason)
    GCSBlobStore(gcs, bucket).delete_prefix(group_prefix(prefix, group))
    if tombstone is None and first is not None:
        tombstone = fetch_lease(gcs, bucket, lease_key(prefix, first))
    if tombstone is not None and tombstone.updated is not None:
        _sweep_logged(gcs, bucket, prefix, tombstone.updated)


def _sweep_logged(gcs: storage.Client, bucket: str, prefix: str, server_now: datetime) -> None:
    """Sweep; a sweep that fails is logged: it is housekeeping, never the session's outcome."""
    try:
        sweep_tombstones(gcs, bucket, prefix, server_now=server_now)
    except (gexc.GoogleAPIError, *TRANSIENT_ERRORS) as exc:
        _log.warning("sweeping the tombstones under gs://%s/%s failed (the next teardown tries again): %r",
                     bucket, leases_prefix(prefix), exc)


def sweep_tombstones(gcs: storage.Client, bucket: str, prefix: str, *, server_now: datetime) -> int:
    """Delete the ended leases under ``PREFIX/leases/`` kept long enough; returns how many. ``server_now`` is a
    GCS timestamp (the ``updated`` of an object just written), so no local clock is compared with GCS's."""
    with _sweep_lock:
        due = time.monotonic() - _last_sweep.get((bucket, prefix), float("-inf")) >= SWEEP_INTERVAL_SECONDS
        if not due:
            return 0
        _last_sweep[(bucket, prefix)] = time.monotonic()
    swept = 0
    for blob in list_objects(gcs, bucket, leases_prefix(prefix)):
        lease = _listed_lease(bucket, blob)
        if lease is not None and lease.ended and (server_now - blob.updated).total_seconds() > lease.keep_seconds:
            try:
                blob.delete(if_generation_match=blob.generation)
                swept += 1
            except (gexc.NotFound, gexc.PreconditionFailed):
                pass  # swept by another orchestrator, or rewritten since listed
    if swept:
        _log.debug("swept %d session tombstones under gs://%s/%s", swept, bucket, leases_prefix(prefix))
    return swept


def _listed_lease(bucket: str, blob: storage.Blob) -> LeaseRecord | None:
    """The record of a listed lease object; None (and one warning per object and process) for an object there
    that holds none, or one that does not parse: it is left alone, for a bucket lifecycle rule."""
    try:
        record = LeaseRecord.from_metadata(blob.metadata)
        problem = "it holds no lease record" if record is None else ""
    except MalformedLease as exc:
        record, problem = None, str(exc)
    if record is None and blob.name not in _reported:
        if len(_reported) < 10_000:
            _reported.add(blob.name)
        _log.warning("not sweeping gs://%s/%s: %s; left in place (delete it by hand, or let a lifecycle rule do it)",
                     bucket, blob.name, problem)
    return record
