"""The session lease object ``PREFIX/leases/SESSION``, which both sides read and write.

Its life: the first delivery of the trigger creates it **held** (``if_generation_match=0``) and runs the
session; when the session ends, it is rewritten **ended** with a generation precondition: by the function
itself as it closes the session (over the generation it claimed, before it sends ``closed``, which then says
so), or else by the orchestrator (which creates it ended if no function ever claimed it). An ended lease is the session's tombstone: a later
delivery of the same trigger cannot claim it, so it never runs, and the function polls it to learn that
the session was cancelled or abandoned. The tombstone is kept ``keep_seconds`` after it was written (the
trigger's start window plus a margin: after that the trigger's start window refuses every late delivery of
it, and its own deadline every re-publish of it) and then swept.

The record is the object's custom metadata (one metadata GET reads it; a listing returns it for every
lease at once); the body repeats it as JSON for people reading the bucket.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from google.cloud import storage

from dagster_gcf_pipes.shared.protocol import CLOCK_SKEW_ALLOWANCE_SECONDS
from dagster_gcf_pipes.shared.retry import transient_retry

HELD = "held"
ENDED = "ended"

_FIELD = "dagster_pipes_lease_"

#: how long past the start window a tombstone is kept: the trigger's own deadline with its skew allowance,
#: for an orchestrator clock off either way, and a minute for a function's clock against Pub/Sub's
#: publishTime and a delivery in flight when the window closes
TOMBSTONE_MARGIN_SECONDS = 2 * CLOCK_SKEW_ALLOWANCE_SECONDS + 60.0


@dataclass(frozen=True)
class LeaseRecord:
    state: str
    #: the invocation that holds (or last held) the session
    invocation_id: str = ""
    #: when a held lease may be taken over by a platform retry (the function's clock, epoch seconds)
    expires_at: float = 0.0
    #: ended: why the session ended, for the log line of a refused late delivery
    reason: str = ""
    #: ended: how long after the tombstone was written a delivery could still fall in the start window
    keep_seconds: float = 0.0

    @property
    def ended(self) -> bool:
        return self.state != HELD

    def metadata(self) -> dict[str, str]:
        return {_FIELD + key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> LeaseRecord | None:
        """The record in an object's metadata; None for an object that is not a lease (or predates them);
        ``MalformedLease`` for a record that does not parse (anyone with write access to the bucket wrote it)."""
        values = {key[len(_FIELD):]: value for key, value in (metadata or {}).items() if key.startswith(_FIELD)}
        if "state" not in values:
            return None
        if values["state"] not in (HELD, ENDED):
            raise MalformedLease(f"state {values['state'][:40]!r} is neither {HELD!r} nor {ENDED!r}")
        return cls(
            state=values["state"],
            invocation_id=values.get("invocation_id", ""),
            expires_at=_seconds(values, "expires_at"),
            reason=values.get("reason", ""),
            keep_seconds=_seconds(values, "keep_seconds"),
        )


def tombstone(reason: str, start_window: float, invocation_id: str = "") -> LeaseRecord:
    """The ended record of a session whose trigger had ``start_window`` seconds to start it."""
    return LeaseRecord(ENDED, invocation_id=invocation_id, reason=reason,
                       keep_seconds=start_window + TOMBSTONE_MARGIN_SECONDS)


class MalformedLease(ValueError):
    """A lease object whose record does not parse; the text says which field."""


def _seconds(values: Mapping[str, str], key: str) -> float:
    try:
        number = float(values.get(key) or 0.0)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise MalformedLease(f"{key} {values[key][:40]!r} is not a finite, non-negative number of seconds")
    return number


@transient_retry()
def fetch_lease(gcs: storage.Client, bucket: str, key: str) -> storage.Blob | None:
    """The lease object with its record (one metadata GET), or None if there is none."""
    return gcs.bucket(bucket).get_blob(key)


def read_lease(blob: storage.Blob) -> LeaseRecord:
    """The record of a lease object as listed or fetched; an object without one, or with one that does not
    parse, counts as ended (nothing may claim a lease it cannot read)."""
    try:
        record = LeaseRecord.from_metadata(blob.metadata)
    except MalformedLease as exc:
        return LeaseRecord(ENDED, reason=f"unreadable lease object: {exc}")
    return record or LeaseRecord(ENDED, reason="unreadable lease object")


def write_lease(blob: storage.Blob, record: LeaseRecord, generation: int) -> None:
    """Create (``generation`` 0) or replace (the generation read) the lease; raises ``PreconditionFailed``
    if someone else wrote it first. Always a full upload, never a metadata patch: a patch keeps the
    generation, so a concurrent conditional claim would overwrite an ended lease."""
    blob.metadata = record.metadata()
    blob.upload_from_string(
        json.dumps(asdict(record)), content_type="application/json", if_generation_match=generation
    )
