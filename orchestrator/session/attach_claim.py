"""One re-attaching attempt per session at a time.

Two attempts can re-attach to the same earlier session at once: a run retry and a manual re-execution of
the same failed run, or two manual re-executions. Both would read the session's retained replies, declare it
dead or alive on their own, and record its outcome twice. Before it probes the session, a re-attaching attempt
takes the session's attach claim, ``PREFIX/SESSION/attached.json``: created only if absent (a generation
precondition), naming its run. A claim is taken over only from a run that is over (its status in the Dagster
instance is terminal: it was killed and marked failed, or it finished) or once the session's own cap has
passed; otherwise the attempt fails and names the run that holds it. The claim lies in the session's folder,
so the session's teardown removes it with the session's other objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.layout import session_prefix
from dagster_gcf_pipes.shared.retry import transient_retry


class AttachHeld(Exception):
    """Another attempt, still running, is re-attached to the session."""

    def __init__(self, run_id: str, session_id: str):
        self.run_id, self.session_id = run_id, session_id
        super().__init__(
            f"session {session_id} is being re-attached by run {run_id}, which is still running: this attempt does not "
            "read it too (its outcome would be recorded twice). Wait for that run, or terminate it and re-execute again"
        )


def attach_claim_key(prefix: str, session_id: str) -> str:
    return session_prefix(prefix, session_id) + "attached.json"


@transient_retry()
def take_attach_claim(
    gcs: storage.Client, bucket: str, prefix: str, session_id: str, *, run_id: str, until: float,
    is_over: Callable[[str], bool],
) -> None:
    """Take the session's attach claim for ``run_id`` until the wall-clock time ``until``, or raise
    ``AttachHeld`` naming the run that holds it (``is_over(run_id)``: whether that run has ended)."""
    blob = gcs.bucket(bucket).blob(attach_claim_key(prefix, session_id))
    body = json.dumps({"run_id": run_id, "until": until})
    try:
        blob.upload_from_string(body, content_type="application/json", if_generation_match=0)
        return
    except gexc.PreconditionFailed:
        pass
    held = gcs.bucket(bucket).get_blob(blob.name)
    if held is None:  # released in between: take it on the next try
        raise gexc.ServiceUnavailable("the attach claim was released while it was read")
    holder, held_until = _read(held)
    if holder and holder != run_id and time.time() < held_until and not is_over(holder):
        raise AttachHeld(holder, session_id)
    try:  # a run that is over, an expired or unreadable claim, or this run's own earlier attempt: take it over
        blob.upload_from_string(body, content_type="application/json", if_generation_match=held.generation)
    except gexc.PreconditionFailed:
        winner, _ = _read(gcs.bucket(bucket).get_blob(blob.name))
        raise AttachHeld(winner or "(unknown)", session_id) from None


def _read(blob: storage.Blob | None) -> tuple[str, float]:
    """(run id, until) of a claim; ("", 0) for one that is missing or does not parse."""
    try:
        values = json.loads(blob.download_as_bytes()) if blob is not None else {}
        return str(values["run_id"]), float(values["until"])
    except (gexc.NotFound, ValueError, KeyError, TypeError):
        return "", 0.0
