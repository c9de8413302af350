"""The session lease, function side: the first execution to create ``PREFIX/leases/SESSION`` runs the session;
every other execution of the same trigger (a Pub/Sub redelivery, a push retry while it runs, a duplicate
after the session ended) finds it and returns without running.

The object is created with ``if_generation_match=0``, so GCS creates it only if it does not exist,
atomically. A held lease records when it expires (``lease_seconds`` after the claim, derived by the
orchestrator from the function's timeout): a lease left by an attempt that crashed can be taken over after
that, with ``if_generation_match`` set to the stale lease's generation so that only one retry wins. An
ended lease (``shared/lease.py``) is never taken over: the session is over. The invocation that holds the
lease ends it itself as it closes the session, over the generation it claimed (``end_own_lease``).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.claim_check import CLAIM, parse_gs_url
from dagster_gcf_pipes.shared.layout import lease_key, trigger_key
from dagster_gcf_pipes.shared.lease import HELD, LeaseRecord, read_lease, tombstone, write_lease
from dagster_gcf_pipes.shared.protocol import Attr, ProtocolError, require_session_id
from dagster_gcf_pipes.shared.retry import transient_retry

_log = logging.getLogger(__name__)


class Claim(enum.Enum):
    CLAIMED = "claimed"  # this invocation holds the lease: run the session
    HELD = "held"  # a live lease of another invocation: a duplicate delivery
    ENDED = "ended"  # the session is over (tombstone): a late delivery

    def __bool__(self) -> bool:
        """True only when this invocation holds the lease (so ``if claim_lease(...):`` reads naturally)."""
        return self is Claim.CLAIMED


def claim_lease(client: storage.Client, bucket: str, key: str, invocation_id: str, lease_seconds: float) -> Claim:
    """Try to take the session's lease for ``invocation_id``."""
    return take_lease(client, bucket, key, invocation_id, lease_seconds)[0]


@transient_retry()
def take_lease(
    client: storage.Client, bucket: str, key: str, invocation_id: str, lease_seconds: float
) -> tuple[Claim, int]:
    """``claim_lease``, with the generation of the lease this invocation now holds (0 if it holds none), over
    which it ends the lease when it closes the session (``end_own_lease``)."""
    now = time.time()
    record = LeaseRecord(HELD, invocation_id=invocation_id, expires_at=now + lease_seconds)
    blob = client.bucket(bucket).blob(key)
    try:
        write_lease(blob, record, generation=0)
        return Claim.CLAIMED, blob.generation or 0
    except gexc.PreconditionFailed:
        pass
    held = client.bucket(bucket).get_blob(key)
    if held is None:  # removed between our two calls: only a sweep or a lifecycle rule removes leases
        return Claim.ENDED, 0
    lease = read_lease(held)
    if lease.ended:
        _log.info("lease gs://%s/%s: the session already ended (%s): this delivery is late and does not run",
                  bucket, key, lease.reason)
        return Claim.ENDED, 0
    if lease.invocation_id == invocation_id:
        return Claim.CLAIMED, held.generation or 0  # a retried upload whose first attempt landed: ours
    if lease.expires_at > now:
        _log.info("lease gs://%s/%s is held by invocation %s: this delivery is a duplicate and does not run",
                  bucket, key, lease.invocation_id)
        return Claim.HELD, 0
    try:
        write_lease(held, record, generation=held.generation)
    except gexc.PreconditionFailed:
        return Claim.HELD, 0  # another retry took the stale lease first (or the orchestrator ended it)
    _log.warning("lease gs://%s/%s of invocation %s expired; invocation %s takes the session over",
                 bucket, key, lease.invocation_id, invocation_id)
    return Claim.CLAIMED, held.generation or 0


def end_own_lease(
    client: storage.Client, bucket: str, key: str, invocation_id: str, generation: int, *, start_window: float
) -> bool:
    """End the session in the lease this invocation holds (``generation``, as it claimed it), as it closes the
    session: the tombstone a late delivery finds, written here so that the orchestrator need not write it.
    False when the lease changed since the claim (the orchestrator ended the session, or a retry took it
    over: then it is not ours to end) or GCS could not be reached within the retry budget; the orchestrator
    then ends it as before."""
    record = tombstone("the function closed the session", start_window, invocation_id)
    try:
        _write_if_unchanged(client.bucket(bucket).blob(key), record, generation)
        return True
    except gexc.PreconditionFailed:
        return False
    except Exception as exc:  # noqa: BLE001 - `closed` must go out whatever happened here
        _log.warning("could not end the lease gs://%s/%s (%r): the orchestrator ends it", bucket, key, exc)
        return False


@transient_retry(max_seconds=10.0)
def _write_if_unchanged(blob: storage.Blob, record: LeaseRecord, generation: int) -> None:
    write_lease(blob, record, generation)


def why_stop(client: storage.Client, bucket: str, key: str, invocation_id: str) -> str | None:
    """Why the session ``invocation_id`` runs must stop (the orchestrator ended it, another invocation took it
    over), or None while the lease is still ours. One metadata GET."""
    held = client.bucket(bucket).get_blob(key)
    if held is None:
        return "its lease is gone: the session was ended"
    lease = read_lease(held)
    if lease.ended:
        return f"the orchestrator ended the session ({lease.reason})"
    if lease.invocation_id != invocation_id:
        return f"invocation {lease.invocation_id} took the session over"
    return None


def ended_session_of_claim(client: storage.Client, data: bytes, attributes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(session id, reason)`` when ``data`` is a claim-checked trigger's pointer and its session has ended:
    a late delivery whose body was deleted with the session. The lease lies beside the body
    (``gs://B/PREFIX/SESSION/trigger.json`` → ``gs://B/PREFIX/leases/SESSION``); None for anything else."""
    if attributes.get(Attr.BODY) != CLAIM:
        return None
    try:
        session_id = require_session_id(attributes)
        bucket, key = parse_gs_url(data.decode("utf-8"))
    except (ProtocolError, UnicodeDecodeError):
        return None
    prefix = key.removesuffix(trigger_key("", session_id)).rstrip("/")
    if trigger_key(prefix, session_id) != key:
        return None
    held = client.bucket(bucket).get_blob(lease_key(prefix, session_id))
    lease = read_lease(held) if held is not None else None
    return (session_id, lease.reason) if lease is not None and lease.ended else None
