"""The session lease on fake-gcs-server (which enforces generation preconditions, as GCS does): a live lease
blocks a duplicate; an expired one (a crashed attempt) is taken over by exactly one retry; a delivery after
the session's start window (counted from the trigger's publishTime) does not run; a lease object whose record
does not parse is claimed by no delivery and fails no other session's teardown."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import uuid
from datetime import datetime, timezone

from google.cloud import storage

from dagster_gcf_pipes.function.lease import Claim, claim_lease
from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.lease import HELD, LeaseRecord, write_lease
from tests.conftest import PAYLOAD_BUCKET
from tests.functions.main import main as scenario_function
from tests.integration.function_harness import FunctionHarness
from tests.integration.helpers import make_client, run_asset


def plant_lease(project: str, session_id: str, invocation: str, expires_in: float) -> None:
    blob = storage.Client(project=project).bucket(PAYLOAD_BUCKET).blob(lease_key("harness", session_id))
    write_lease(blob, LeaseRecord(HELD, invocation_id=invocation, expires_at=time.time() + expires_in), generation=0)


def test_a_live_lease_of_another_invocation_blocks_the_delivery(stack):
    h = FunctionHarness(stack, {"n": 1})
    try:
        plant_lease(stack.project, h.session_id, "still-running", expires_in=300)
        assert not scenario_function(h.cloud_event()).ran
    finally:
        h.close()


def test_an_expired_lease_of_a_crashed_attempt_is_taken_over_by_the_retry(stack):
    h = FunctionHarness(stack, {"n": 2})
    try:
        plant_lease(stack.project, h.session_id, "crashed", expires_in=-1)
        outcome = scenario_function(h.cloud_event())
        assert outcome.ran
        assert [m["method"] for m in h.read_until_closed()][-1] == "closed"
        lease = storage.Client(project=stack.project).bucket(PAYLOAD_BUCKET).blob(lease_key("harness", h.session_id))
        assert json.loads(lease.download_as_bytes())["invocation_id"] == outcome.invocation_id
    finally:
        h.close()


def test_only_one_of_several_concurrent_retries_takes_an_expired_lease_over(stack):
    h = FunctionHarness(stack)
    try:
        plant_lease(stack.project, h.session_id, "crashed", expires_in=-1)
        gcs = storage.Client(project=stack.project)
        key = lease_key("harness", h.session_id)
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            claims = list(pool.map(lambda i: claim_lease(gcs, PAYLOAD_BUCKET, key, f"retry-{i}", 60), range(6)))
        assert claims.count(Claim.CLAIMED) == 1
    finally:
        h.close()


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def test_a_delivery_after_the_start_window_does_not_run(stack):
    h = FunctionHarness(stack, {"n": 3}, start_window=5.0)
    try:
        event = h.cloud_event(message_id="late-1")
        event.data["message"]["publishTime"] = rfc3339(time.time() - 60)  # Pub/Sub stamped it a minute ago
        outcome = scenario_function(event)
        assert not outcome.ran
        assert "after its start window" in str(outcome.error) and "start_window=5s" in str(outcome.error)
        assert not storage.Client(project=stack.project).bucket(PAYLOAD_BUCKET).blob(lease_key("harness", h.session_id)).exists()
    finally:
        h.close()


def test_the_start_window_counts_from_publish_time_not_from_the_orchestrators_clock(stack):
    """The trigger carries a window, not a wall-clock deadline: a delivery inside the window runs whatever
    the orchestrator's clock said when it built the trigger."""
    h = FunctionHarness(stack, {"n": 4}, start_window=5.0)
    try:
        event = h.cloud_event(message_id="fresh-1")
        event.data["message"]["publishTime"] = rfc3339(time.time() - 1)
        assert scenario_function(event).ran
        assert [m["method"] for m in h.read_until_closed()][-1] == "closed"
    finally:
        h.close()


#: the lease record of issue 24 item 10, as anyone with write access to the bucket may leave one
MALFORMED = {"dagster_pipes_lease_state": "ended", "dagster_pipes_lease_expires_at": "soon"}


def plant_object(project: str, key: str, metadata: dict[str, str] | None) -> storage.Blob:
    blob = storage.Client(project=project).bucket(PAYLOAD_BUCKET).blob(key)
    blob.metadata = metadata
    blob.upload_from_string("{}")
    return blob


def test_a_malformed_lease_in_the_bucket_fails_no_other_session(stack, caplog):
    """Before: the tombstone sweep of every teardown raised ValueError on it, failing otherwise successful steps
    in every process. Now the sweep skips it with one warning, and leaves it (and an object there that holds no
    lease record) in place."""
    prefix = f"malformed-{uuid.uuid4().hex[:8]}"
    planted = [plant_object(stack.project, lease_key(prefix, "0" * 32), MALFORMED),
               plant_object(stack.project, f"{prefix}/leases/notes.txt", None)]
    try:
        with caplog.at_level(logging.WARNING, logger="dagster_gcf_pipes.orchestrator"):
            outcome = run_asset(make_client(prefix=prefix), {"n": 5})
        assert outcome.result.success, outcome.failure_message
        assert outcome.metadata["n"] == 5
        assert all(blob.exists() for blob in planted)  # not swept: not understood
        skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not sweeping")]
        assert len(skipped) == 2, skipped
        assert "expires_at 'soon' is not a finite, non-negative number of seconds" in skipped[0] + skipped[1]
        assert "holds no lease record" in skipped[0] + skipped[1]
    finally:
        GCSBlobStore(storage.Client(project=stack.project), PAYLOAD_BUCKET).delete_prefix(f"{prefix}/")


def test_a_delivery_meeting_a_malformed_lease_does_not_run(stack):
    """Nothing may claim a lease it cannot read: the delivery counts the session as ended (before: ValueError,
    and the trigger was redelivered)."""
    h = FunctionHarness(stack, {"n": 6})
    held = {**MALFORMED, "dagster_pipes_lease_state": "held"}
    lease = plant_object(stack.project, lease_key("harness", h.session_id), held)
    try:
        outcome = scenario_function(h.cloud_event())
        assert not outcome.ran and outcome.error is None
    finally:
        lease.delete()
        h.close()
