"""The durable registry of detached sessions that have not ended, in the claim-check bucket.

``run_detached`` writes one entry per session, ``gs://BUCKET/PREFIX/detached/TOPIC/SESSION``, *before* it
publishes the trigger; ``pipes_completion_sensor`` lists the entries of its reply topic after each pull
(so every reply it pulled belongs to a session registered before the listing) and deletes an entry, with
the session's objects, once a tick that ended the session (recorded, failed or expired) was kept by
Dagster. The entry is what lets the sensor report a session that never replied at all: without it, a
function that never started would leave nothing for the sensor to see.

The entry's fields travel in the object's custom metadata, so one list call returns every pending session.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.retry import transient_retry

_METADATA_KEY = "pipes-detached-session"


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

    def expires_at(self, margin: float) -> float:
        """After this, a session that has not closed never will: it cannot start any more (start window),
        and one that started in time has outlived the function's timeout. ``margin`` absorbs clock skew
        and the delivery of its last replies."""
        return self.registered_at + self.start_window + self.function_timeout + margin

    @property
    def started_by(self) -> str:
        return f"run {self.run_id} (step {self.step_key})" if self.run_id else "an unknown run"


def registry_prefix(prefix: str, reply_topic: str) -> str:
    """Entries of the sessions replying to ``reply_topic`` (a name or ``projects/P/topics/T``)."""
    base = prefix.strip("/")
    topic = reply_topic.rsplit("/", 1)[-1]
    return f"{base}/detached/{topic}/" if base else f"detached/{topic}/"


@dataclass(frozen=True)
class DetachedRegistry:
    gcs: storage.Client
    bucket: str
    prefix: str  # registry_prefix(...)

    @transient_retry()
    def register(self, session: PendingSession) -> None:
        blob = self.gcs.bucket(self.bucket).blob(self.prefix + session.session_id)
        blob.metadata = {_METADATA_KEY: json.dumps(asdict(session))}
        blob.upload_from_string(b"", content_type="application/json")

    @transient_retry()
    def pending(self) -> dict[str, PendingSession]:
        sessions = {}
        for blob in self.gcs.list_blobs(self.bucket, prefix=self.prefix):
            raw = (blob.metadata or {}).get(_METADATA_KEY)
            if raw:
                session = PendingSession(**json.loads(raw))
                sessions[session.session_id] = session
        return sessions

    @transient_retry()
    def remove(self, session_id: str) -> None:
        try:
            self.gcs.bucket(self.bucket).blob(self.prefix + session_id).delete()
        except gexc.NotFound:
            pass  # removed by an earlier tick whose cursor Dagster did not keep
