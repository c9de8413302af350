"""The durable registry of detached sessions that have not ended, in the claim-check bucket, and the claim
that makes one completion sensor its only reader.

``run_detached`` writes one entry per session, ``gs://BUCKET/PREFIX/detached/TOPIC/SESSION``, *before* it
publishes the trigger; ``pipes_completion_sensor`` lists the entries of its reply topic after each pull
(so every reply it pulled belongs to a session registered before the listing), keeps each session's
progress in its entry (``detached_progress``: the content, with the session's state in the metadata, so
one list call shows which sessions closed), and deletes the entry, with the session's objects, once a tick
that ended the session (recorded, failed or expired) was kept by Dagster. The entry is what lets the
sensor report a session that never replied at all: without it, a function that never started would leave
nothing for the sensor to see. Every write of an entry after its registration is conditional on the
generation the sensor read, so two evaluations that overlap never overwrite each other's progress.

``gs://BUCKET/PREFIX/detached-owner/TOPIC`` names the completion sensor that reads the registry (its
Dagster instance, code location, repository and name). A second sensor on the same reply topic would
record every session a second time (two subscriptions each get every reply) or split the replies between
them (one subscription), so a tick first claims the registry: it refreshes the claim if it is its own,
takes it over from an owner silent for longer than that owner's timeout, and otherwise refuses with an
error naming both sensors.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.modes.detached_progress import SessionProgress
from dagster_gcf_pipes.shared.claim_check import list_objects
from dagster_gcf_pipes.shared.retry import transient_retry

_SESSION_KEY = "pipes-detached-session"
_STATUS_KEY = "pipes-detached-status"
_OWNER_KEY = "pipes-detached-owner"
#: a claim written between our read and our write is read again; more than a few in a row cannot happen
_CLAIM_ATTEMPTS = 5


@dataclass(frozen=True)
class PendingSession:
    """A detached session whose end the completion sensor has not recorded yet."""

    session_id: str
    #: the orchestrator's clock when the trigger was about to be published (epoch seconds)
    registered_at: float
    #: seconds from the trigger's publishTime within which the function may still start the session
    start_window: float
    function_timeout: float
    trigger_topic: str
    #: the Dagster run and step that started it, for the failure report
    run_id: str = ""
    step_key: str = ""
    #: the partitions the run targeted (one, a range, or none): the recorded materializations are theirs
    partition_keys: tuple[str, ...] = ()

    def expires_at(self, margin: float) -> float:
        """After this, a session that has not closed never will: it cannot start any more (start window),
        and one that started in time has outlived the function's timeout. ``margin`` absorbs clock skew
        and the delivery of its last replies."""
        return self.registered_at + self.start_window + self.function_timeout + margin

    @property
    def started_by(self) -> str:
        if not self.run_id:
            return "an unknown run"
        partitions = f", partition {', '.join(self.partition_keys)}" if self.partition_keys else ""
        return f"run {self.run_id} (step {self.step_key}{partitions})"

    @classmethod
    def from_json(cls, raw: str) -> PendingSession:
        """An entry's fields; those a later release added are ignored."""
        fields = {k: v for k, v in json.loads(raw).items() if k in cls.__dataclass_fields__}
        fields["partition_keys"] = tuple(fields.get("partition_keys") or ())
        return cls(**fields)


@dataclass(frozen=True)
class RegistryEntry:
    """A pending session as one listing saw it: the generation its next write must match, and its state."""

    session: PendingSession
    generation: int
    #: ``detached_progress.OPENED``, ``CLOSED``, ``FAILED``, or "" (nothing received yet)
    status: str = ""


@dataclass(frozen=True)
class Owner:
    """The completion sensor that reads a registry: ``key`` identifies it, ``description`` names it for people."""

    key: str
    description: str
    #: after this many seconds without a tick of its owner, a claim may be taken over
    timeout: float


class RegistryOwned(PipesPubSubConfigError):
    """Another completion sensor reads the detached replies of this topic."""


def _per_topic(prefix: str, folder: str, reply_topic: str) -> str:
    base = prefix.strip("/")
    topic = reply_topic.rsplit("/", 1)[-1]
    return f"{base}/{folder}/{topic}" if base else f"{folder}/{topic}"


def registry_prefix(prefix: str, reply_topic: str) -> str:
    """Entries of the sessions replying to ``reply_topic`` (a name or ``projects/P/topics/T``)."""
    return _per_topic(prefix, "detached", reply_topic) + "/"


def owner_key(prefix: str, reply_topic: str) -> str:
    """The claim naming the completion sensor that reads the sessions replying to ``reply_topic``."""
    return _per_topic(prefix, "detached-owner", reply_topic)


@dataclass(frozen=True)
class DetachedRegistry:
    gcs: storage.Client
    bucket: str
    prefix: str  # registry_prefix(...)

    @transient_retry()
    def register(self, session: PendingSession) -> None:
        blob = self.gcs.bucket(self.bucket).blob(self.prefix + session.session_id)
        blob.metadata = {_SESSION_KEY: json.dumps(asdict(session))}
        blob.upload_from_string(b"", content_type="application/json")

    @transient_retry()
    def pending(self, warn: Callable[[str], None]) -> dict[str, RegistryEntry]:
        """Every pending session; an entry that does not parse is reported through ``warn`` and left alone."""
        entries = {}
        for blob in list_objects(self.gcs, self.bucket, self.prefix):
            metadata: Mapping[str, Any] = blob.metadata or {}
            try:
                session = PendingSession.from_json(metadata[_SESSION_KEY])
            except (KeyError, TypeError, ValueError) as exc:
                warn(
                    f"[pipes] gs://{self.bucket}/{blob.name} is not a detached session's registry entry "
                    f"({type(exc).__name__}: {exc}); left alone: delete it if nothing of this release wrote it"
                )
                continue
            entries[session.session_id] = RegistryEntry(session, blob.generation, metadata.get(_STATUS_KEY, ""))
        return entries

    @transient_retry()
    def progress(self, entry: RegistryEntry) -> SessionProgress:
        """What earlier ticks kept of the session; ``PreconditionFailed`` if the entry changed since it was
        listed, ``NotFound`` if it was removed."""
        blob = self.gcs.bucket(self.bucket).blob(self.prefix + entry.session.session_id)
        return SessionProgress.from_json(blob.download_as_bytes(if_generation_match=entry.generation))

    @transient_retry()
    def save(self, entry: RegistryEntry, progress: SessionProgress) -> RegistryEntry:
        """Keep ``progress`` in the entry, if the entry is still as listed (``PreconditionFailed`` otherwise)."""
        blob = self.gcs.bucket(self.bucket).blob(self.prefix + entry.session.session_id)
        blob.metadata = {_SESSION_KEY: json.dumps(asdict(entry.session)), _STATUS_KEY: progress.status}
        blob.upload_from_string(progress.to_json(), content_type="application/json", if_generation_match=entry.generation)
        return dataclasses.replace(entry, generation=blob.generation, status=progress.status)

    @transient_retry()
    def remove(self, session_id: str) -> None:
        try:
            self.gcs.bucket(self.bucket).blob(self.prefix + session_id).delete()
        except gexc.NotFound:
            pass  # removed by an earlier tick whose cursor Dagster did not keep

    def claim(self, key: str, owner: Owner, topic: str) -> Owner | None:
        """Make ``owner`` the reader of the sessions replying to ``topic`` until its timeout; returns the owner
        it took over from (silent for longer than that owner's timeout), if any. ``RegistryOwned`` if another
        owner has ticked within its timeout. Liveness is the claim's ``updated`` (GCS's clock) against this
        machine's clock: the timeouts are minutes, clock skew seconds."""
        bucket = self.gcs.bucket(self.bucket)
        for _ in range(_CLAIM_ATTEMPTS):
            held = _get_blob(bucket, key)
            holder = _owner_of(held) if held is not None else None
            if held is not None and holder is not None and holder.key != owner.key:
                silent = time.time() - held.updated.timestamp()
                if silent < holder.timeout:
                    raise RegistryOwned(
                        f"completion sensor {owner.description} does not read the detached replies of {topic}: "
                        f"{holder.description} reads them (its last tick {silent:.0f}s ago). Two completion sensors "
                        "on one detached_reply_topic, in two Dagster instances or two code locations, would record "
                        "every session twice or split its replies between them. Turn one of them off; this one "
                        f"takes over once the other has not ticked for {holder.timeout:g}s (its owner_timeout_seconds)"
                    )
            blob = bucket.blob(key)
            blob.metadata = {_OWNER_KEY: json.dumps(asdict(owner))}
            try:
                _write_claim(blob, held.generation if held is not None else 0)
            except gexc.PreconditionFailed:
                continue  # another tick wrote the claim in between: read it again
            return holder if holder is not None and holder.key != owner.key else None
        raise RuntimeError(f"gs://{self.bucket}/{key} kept changing: could not claim the detached replies of {topic}")


@transient_retry()
def _get_blob(bucket: storage.Bucket, key: str) -> storage.Blob | None:
    return bucket.get_blob(key)


@transient_retry()
def _write_claim(blob: storage.Blob, generation: int) -> None:
    blob.upload_from_string(b"", content_type="application/json", if_generation_match=generation)


def _owner_of(blob: storage.Blob) -> Owner | None:
    """The claim's owner; None for a claim that does not parse (it is overwritten)."""
    try:
        return Owner(**json.loads((blob.metadata or {})[_OWNER_KEY]))
    except (KeyError, TypeError, ValueError):
        return None
