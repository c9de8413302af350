"""The durable end of a session, orchestrator side.

A session's trigger can be delivered after the session is over: a queued trigger of a terminated run, a
Pub/Sub or Eventarc duplicate (a lost 2xx is redelivered), a re-published message. Deleting the lease at the
end would let such a delivery run the handler again, with nobody listening, and leave its lease behind. So
the end is written into the lease instead (``shared/lease.py``): ``end_lease`` rewrites it **ended**, or
creates it ended when no function claimed it yet, with a generation precondition either way, so that the
end and a concurrent claim are ordered by GCS. A later claim fails; a running function sees it at its next
check and is cancelled.

The ended lease is the session's tombstone under ``PREFIX/leases/``, kept for the trigger's start window
plus ``TOMBSTONE_MARGIN_SECONDS`` after it was written: until then a delivery could still fall inside the
start window; after it, the window refuses every delivery by itself. Every teardown sweeps the tombstones
whose time has passed (at most once per ``SWEEP_INTERVAL_SECONDS`` per process and bucket prefix), judging
their age by GCS's own timestamps (``updated``) only, never by this machine's clock; a bucket lifecycle rule
on the prefix is the backstop for an orchestrator that stops for good.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import datetime, timedelta

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.layout import lease_key, leases_prefix, session_prefix
from dagster_gcf_pipes.shared.lease import ENDED, LeaseRecord, read_lease, write_lease
from dagster_gcf_pipes.shared.retry import transient_retry

_log = logging.getLogger(__name__)

#: a function's clock against Pub/Sub's publishTime, and a delivery in flight when the window closes
TOMBSTONE_MARGIN_SECONDS = 60.0
SWEEP_INTERVAL_SECONDS = 60.0
#: a claim landing between our read and our write is retried; more than a few in a row cannot happen
_END_ATTEMPTS = 5

_last_sweep: dict[tuple[str, str], float] = {}
_sweep_lock = threading.Lock()


@transient_retry()
def end_lease(gcs: storage.Client, bucket: str, prefix: str, session_id: str, *, start_window: float, reason: str) -> storage.Blob:
    """Mark the session ended in its lease, whoever holds it; returns the tombstone. Idempotent."""
    blob = gcs.bucket(bucket).blob(lease_key(prefix, session_id))
    record = LeaseRecord(ENDED, reason=reason, keep_seconds=start_window + TOMBSTONE_MARGIN_SECONDS)
    for _ in range(_END_ATTEMPTS):
        held = gcs.bucket(bucket).get_blob(blob.name)
        if held is None:
            ended, generation = record, 0
        else:
            lease = read_lease(held)
            if lease.ended:
                return held
            ended, generation = dataclasses.replace(record, invocation_id=lease.invocation_id), held.generation
        try:
            write_lease(blob, ended, generation)
        except gexc.PreconditionFailed:
            continue  # a function claimed (or took over) the lease in between: read it again
        return blob
    raise RuntimeError(f"gs://{bucket}/{blob.name} kept changing: could not end session {session_id}")


def end_session(gcs: storage.Client, bucket: str, prefix: str, session_id: str, *, start_window: float, reason: str) -> None:
    """The session is over: end its lease durably, delete every other object of the session, and sweep the
    tombstones whose start window has passed."""
    tombstone = end_lease(gcs, bucket, prefix, session_id, start_window=start_window, reason=reason)
    GCSBlobStore(gcs, bucket).delete_prefix(session_prefix(prefix, session_id))
    if tombstone.updated is not None:
        sweep_tombstones(gcs, bucket, prefix, server_now=tombstone.updated)


def sweep_tombstones(gcs: storage.Client, bucket: str, prefix: str, *, server_now: datetime) -> int:
    """Delete the ended leases under ``PREFIX/leases/`` kept long enough; returns how many. ``server_now`` is a
    GCS timestamp (the ``updated`` of an object just written), so no local clock is compared with GCS's."""
    with _sweep_lock:
        due = time.monotonic() - _last_sweep.get((bucket, prefix), float("-inf")) >= SWEEP_INTERVAL_SECONDS
        if not due:
            return 0
        _last_sweep[(bucket, prefix)] = time.monotonic()
    swept = 0
    for blob in gcs.list_blobs(bucket, prefix=leases_prefix(prefix)):
        lease = read_lease(blob)
        if lease.ended and blob.updated + timedelta(seconds=lease.keep_seconds) < server_now:
            try:
                blob.delete(if_generation_match=blob.generation)
                swept += 1
            except (gexc.NotFound, gexc.PreconditionFailed):
                pass  # swept by another orchestrator, or rewritten since listed
    if swept:
        _log.debug("swept %d session tombstones under gs://%s/%s", swept, bucket, leases_prefix(prefix))
    return swept
