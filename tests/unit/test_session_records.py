"""Session records are read back from the event log checked (issue 24, item 14): a tampered record must not
make a re-execution drain and delete a foreign subscription, and a corrupt one must not break every
re-execution with a JSONDecodeError or KeyError."""

import json

import pytest
from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, asset, materialize

from dagster_gcf_pipes.orchestrator.session.reattach import (
    CorruptRecord,
    SessionJournal,
    SessionRecord,
    find_earlier_sessions,
)

SESSION = "0123456789abcdef" * 2
MINE = f"projects/p/subscriptions/dagster-pipes-{SESSION}"


def record(**changes) -> SessionRecord:
    values = dict(
        session_id=SESSION, subscriptions=(MINE,), function="projects/p/topics/t", partition_key="",
        payload_sha256="0" * 64, shard=-1, group="", triggered_at=1.0,
    )
    return SessionRecord(**{**values, **changes})


def test_a_record_reads_back_as_written():
    written = record(subscriptions=(MINE, f"{MINE}-0a1b2c3d"))
    assert SessionRecord.from_metadata(written.metadata(), "run") == SessionRecord(**{**written.__dict__, "run_id": "run"})


def test_a_fan_out_record_names_its_groups_subscription():
    group = SESSION[:16]
    written = record(group=group, shard=3, subscriptions=(f"projects/p/subscriptions/dagster-pipes-group-{group}",))
    assert SessionRecord.from_metadata(written.metadata(), "run").group == group


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"pipes_subscriptions": json.dumps(["projects/p/subscriptions/orders-prod"])}, "not its reply subscriptions"),
        ({"pipes_subscriptions": json.dumps([f"projects/p/subscriptions/dagster-pipes-{'f' * 32}"])}, "not its reply"),
        ({"pipes_subscriptions": json.dumps([])}, "not its reply subscriptions"),
        ({"pipes_subscriptions": "{not json"}, "unreadable"),
        ({"pipes_session_id": "../../etc"}, "is not a session id"),
        ({"pipes_shard": "3"}, "wrong type: shard"),
    ],
    ids=["foreign", "another-session", "none", "corrupt-json", "bad-id", "bad-type"],
)
def test_a_tampered_or_corrupt_record_is_refused(changes, problem):
    with pytest.raises(CorruptRecord, match=problem):
        SessionRecord.from_metadata({**record().metadata(), **changes}, "run")


def test_a_record_missing_a_field_is_refused():
    values = record().metadata()
    del values["pipes_function"]
    with pytest.raises(CorruptRecord, match="unreadable"):
        SessionRecord.from_metadata(values, "run")


def test_a_fan_outs_journal_gathers_its_progress_records_and_a_later_attempt_reads_them_back():
    """A fan-out's journal writes one engine event per session (before its trigger) and gathers the records
    of which trigger message and which invocation into one ``progress`` event (issue 26: two Dagster events
    per shard less); what it gathered is read back as if each had been written alone."""
    group = "0123456789abcdef"
    sessions = [f"{group}{i:016x}" for i in range(3)]
    subscription = f"projects/p/subscriptions/dagster-pipes-group-{group}"
    found: dict = {}

    @asset
    def fanned(context: AssetExecutionContext) -> None:
        journal = SessionJournal(context, coalesce=3600.0)  # nothing written by age: only by flush()
        for shard, session_id in enumerate(sessions):
            journal.session(record(session_id=session_id, group=group, shard=shard, subscriptions=(subscription,)),
                            reattached=False)
            journal.triggered(session_id, f"m{shard}", "projects/p/topics/t")
            journal.opened(session_id, f"inv{shard}")
        journal.flush()
        journal.flush()  # nothing gathered since: writes nothing
        found.update(find_earlier_sessions(context)[1])

    with DagsterInstance.ephemeral() as instance:
        result = materialize([fanned], instance=instance)
        engine_events = instance.all_logs(result.run_id, of_type=DagsterEventType.ENGINE_EVENT)
    records = [e for e in engine_events if "pipes_reattach_record" in e.dagster_event.engine_event_data.metadata]
    assert [e.dagster_event.engine_event_data.metadata["pipes_reattach_record"].value for e in records] == [
        "session", "session", "session", "progress"]
    by_session = {earlier.record.session_id: earlier.record for earlier in found.values()}
    assert {s: (r.trigger_message_id, r.invocation_id) for s, r in by_session.items()} == {
        session_id: (f"m{shard}", f"inv{shard}") for shard, session_id in enumerate(sessions)}
