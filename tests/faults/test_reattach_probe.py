"""Re-attach's probe of a session whose function never started it (issue 23, item 10): its create-if-absent
write of the ended lease is retried; when the first write landed but its answer was lost, the retry must not
take the tombstone it wrote itself for a session to collect (it would wait a whole startup_timeout for a
function that will never come)."""

from __future__ import annotations

import uuid

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.session import reattach
from dagster_gcf_pipes.orchestrator.session.reattach import SessionRecord, probe
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.lease import read_lease
from tests.conftest import PAYLOAD_BUCKET

PREFIX = "dagster-pipes"


def record() -> SessionRecord:
    return SessionRecord(
        session_id=uuid.uuid4().hex, subscriptions=(), function="projects/p/topics/t", partition_key="",
        payload_sha256="0" * 64, shard=-1, group="", triggered_at=0.0,
    )


def test_a_lost_answer_to_the_probes_own_tombstone_write_does_not_re_attach(stack, monkeypatch) -> None:
    gcs = storage.Client(project=stack.project)
    real_write = reattach.write_lease
    lost = []

    def write_then_lose_the_answer(*args, **kwargs):
        real_write(*args, **kwargs)  # it lands ...
        if not lost:
            lost.append(True)
            raise gexc.ServiceUnavailable("the connection dropped before the answer arrived")  # ... unanswered

    monkeypatch.setattr(reattach, "write_lease", write_then_lose_the_answer)
    found = record()

    decision = probe(None, gcs, bucket=PAYLOAD_BUCKET, prefix=PREFIX, record=found, start_window=120.0)

    assert lost, "the write's answer was lost and the probe retried"
    assert not decision.attach, decision.state
    lease = read_lease(gcs.bucket(PAYLOAD_BUCKET).get_blob(lease_key(PREFIX, found.session_id)))
    assert lease.ended and lease.reason == reattach.NEVER_STARTED
    gcs.bucket(PAYLOAD_BUCKET).blob(lease_key(PREFIX, found.session_id)).delete()


def test_a_session_whose_function_never_started_is_ended_and_not_re_attached(stack) -> None:
    gcs = storage.Client(project=stack.project)
    found = record()
    decision = probe(None, gcs, bucket=PAYLOAD_BUCKET, prefix=PREFIX, record=found, start_window=120.0)
    assert not decision.attach and "had not started it" in decision.state
    gcs.bucket(PAYLOAD_BUCKET).blob(lease_key(PREFIX, found.session_id)).delete()


def test_a_subscription_recorded_by_a_killed_attempt_but_never_created_does_not_end_the_session(stack) -> None:
    """An attempt that re-attached records its own subscription before creating it (so no crash leaves one
    unrecorded); killed in between, or its create failed, the record names a subscription that does not exist.
    The next attempt must not read that as "gone" and end the live session (issue 24, item 9): the first
    subscription, made before the trigger, holds every reply."""
    from google.cloud import pubsub_v1

    from dagster_gcf_pipes.function.lease import claim_lease
    from tests.conftest import REPLY_TOPIC

    gcs = storage.Client(project=stack.project)
    found = record()
    original = f"projects/{stack.project}/subscriptions/dagster-pipes-{found.session_id}"
    never_created = f"{original}-0a1b2c3d"
    found = SessionRecord(**{**found.__dict__, "subscriptions": (original, never_created)})
    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.create_subscription(request={"name": original, "topic": f"projects/{stack.project}/topics/{REPLY_TOPIC}"})
        try:
            assert claim_lease(gcs, PAYLOAD_BUCKET, lease_key(PREFIX, found.session_id), "inv", 600.0)
            decision = probe(subscriber, gcs, bucket=PAYLOAD_BUCKET, prefix=PREFIX, record=found, start_window=120.0)
        finally:
            subscriber.delete_subscription(request={"subscription": original})
            gcs.bucket(PAYLOAD_BUCKET).blob(lease_key(PREFIX, found.session_id)).delete()
    assert decision.attach, decision.state
    assert decision.subscriptions == (original,)
