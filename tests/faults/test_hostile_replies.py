"""Replies written by someone other than the session's function, on the real local stack: anyone allowed to
publish to the reply topic can send them (docs/reliability.md, "Threat model"). Signing is off in these
tests, as it is by default: what is proven here holds without a shared secret."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.cloud import storage

from dagster_gcf_pipes.shared.claim_check import MAX_CLAIM_BYTES
from dagster_gcf_pipes.shared.protocol import Attr, Reply, dumps, new_session_id
from tests.conftest import LAKE_BUCKET, PAYLOAD_BUCKET, SCRIPTED_TOPIC
from tests.faults.scripted import ScriptedFunction, closed, finished, log, materialization, opened, scripted  # noqa: F401
from tests.integration.helpers import Outcome, session_objects, session_subscriptions


def dropped(outcome: Outcome, message_id: str) -> list[str]:
    return [m for m in outcome.log_messages if f"dropped reply message {message_id}:" in m]


def claim(f: ScriptedFunction, url: str, seq: int = 1) -> str:
    """Publish a batch whose body is claim-checked at ``url``."""
    return f.raw(url.encode(), {**Reply(f.params.session_id, "inv", seq).attributes(), Attr.BODY: "claim"})


@pytest.fixture
def bait(stack) -> Iterator[tuple[str, str]]:
    """A valid batch in another bucket and in another session's folder, where a pointer could send the reader."""
    gcs = storage.Client(project=stack.project)
    body = dumps([log("read from elsewhere")], "batch")
    placed = [(LAKE_BUCKET, "secrets/pii.json"), (PAYLOAD_BUCKET, f"dagster-pipes/{new_session_id()}/replies/inv/1.json")]
    for bucket, key in placed:
        gcs.bucket(bucket).blob(key).upload_from_string(body)
    yield placed[0][1], placed[1][1]
    for bucket, key in placed:
        gcs.bucket(bucket).blob(key).delete()


@pytest.fixture(autouse=True)
def in_publish_order(stack) -> Iterator[None]:
    """These scenarios script the order in which a forger's and the function's replies arrive, and each hostile
    reply must reach the reader before `closed` ends the session: the production-semantics layer delivers in
    publish order here (no reordering, hold-back or duplicates); the reader's order handling has its own tests."""
    with stack.semantics.behaving(reorder=False, hold_back_rate=0.0, duplicate_rate=0.0):
        yield


def test_claim_check_pointers_outside_the_session_folder_are_not_fetched(stack, scripted, bait):
    lake_key, other_session = bait
    f, run = scripted()
    sid = f.params.session_id
    f.batch("inv", 0, [opened()])
    # seqs never taken: a pointer reusing a taken (invocation, seq) is dropped as a duplicate before any fetch
    pointers = {
        claim(f, f"gs://{LAKE_BUCKET}/{lake_key}", seq=5): "another bucket",
        claim(f, f"gs://{PAYLOAD_BUCKET}/{other_session}", seq=6): "another session's folder",
        claim(f, f"gs://{PAYLOAD_BUCKET}/dagster-pipes/{sid}/../{other_session[len('dagster-pipes/'):]}", seq=7): "climbing out",
    }
    f.batch("inv", 1, [log("the real line"), materialization(f.asset_key), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    assert "read from elsewhere" not in outcome.log_messages and "the real line" in outcome.log_messages
    for message_id, case in pointers.items():
        mentions = dropped(outcome, message_id)
        assert len(mentions) == 1 and f"is outside gs://{PAYLOAD_BUCKET}/dagster-pipes/{sid}/" in mentions[0], case
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == [other_session]  # the bait, removed by the fixture


def test_a_claim_check_object_over_the_cap_is_refused_before_download(stack, scripted):
    f, run = scripted()
    key = f"dagster-pipes/{f.params.session_id}/replies/inv/1.json"
    storage.Client(project=stack.project).bucket(PAYLOAD_BUCKET).blob(key).upload_from_string(b" " * (MAX_CLAIM_BYTES + 1))
    f.batch("inv", 0, [opened()])
    huge = claim(f, f"gs://{PAYLOAD_BUCKET}/{key}", seq=5)  # a seq never taken: never dropped unread as a duplicate
    f.batch("inv", 1, [materialization(f.asset_key), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    (mention,) = dropped(outcome, huge)
    assert f"is {MAX_CLAIM_BYTES + 1} bytes, above the {MAX_CLAIM_BYTES}-byte cap: not downloaded" in mention
    assert session_objects(stack.project) == []


@pytest.mark.parametrize("by_token", [False, True], ids=["the-lease-names-the-owner", "the-owner-token-echoed"])
def test_a_forged_opened_does_not_hijack_the_session(stack, scripted, by_token: bool):
    """A forger who learned the session id sends ``opened`` before the function starts, without the trigger's
    owner token (a guess, or none) and without the lease: its ``opened`` is ignored and its later batches are
    fenced off, named as what they may be (forged), not as a duplicate execution. The real function's
    ``opened`` is accepted because the lease names it (a function of an earlier release, which sends no token),
    or because it echoes the trigger's token (the real function then claims no lease: no lease read)."""
    f, run = scripted()
    assert len(f.params.owner_token) == 32
    forged = opened(owner_token="0" * 32) if by_token else opened()
    forged_opened = f.raw(dumps([forged, log("hijacked")], "batch"), Reply(f.params.session_id, "forger", 0).attributes())
    f.batch("forger", 1, [materialization(f.asset_key, who="forger"), closed()])
    real = opened(owner_token=f.params.owner_token) if by_token else opened()
    f.batch("real", 0, [real, log("the function's line")], lease=not by_token)  # claims the lease first, if not by token
    f.batch("real", 1, [materialization(f.asset_key, who="real"), closed()])

    outcome = finished(run)
    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["who"] == "real"
    assert "hijacked" not in outcome.log_messages and "the function's line" in outcome.log_messages
    (ignored,) = dropped(outcome, forged_opened)
    assert "'opened' of invocation forger, which neither echoes the trigger's owner token nor holds the session lease" in ignored
    (fenced,) = [m for m in outcome.log_messages if "dropping replies of invocation forger" in m]
    assert "forged by someone who can publish to the reply topic" in fenced and "duplicate execution" not in fenced
    assert session_objects(stack.project) == []
