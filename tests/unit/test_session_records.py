"""Session records are read back from the event log checked (issue 24, item 14): a tampered record must not
make a re-execution drain and delete a foreign subscription, and a corrupt one must not break every
re-execution with a JSONDecodeError or KeyError."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, asset, materialize

from dagster_gcf_pipes.orchestrator.session.reattach import (
    CorruptRecord,
    SessionJournal,
    SessionRecord,
    find_earlier_sessions,
)
from dagster_gcf_pipes.orchestrator.session.group_commit import GroupCommit

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


def test_a_fan_outs_journal_gathers_its_records_and_a_later_attempt_reads_them_back():
    """A fan-out's journal writes the session records of shards that start together as one ``sessions`` event
    (each ``session()`` returning once its record is written), and gathers the records of which trigger message
    and which invocation into one ``progress`` event (issue 26: Dagster events a shard were the largest share
    of its CPU); what it gathered is read back as if each had been written alone."""
    group = "0123456789abcdef"
    sessions = [f"{group}{i:016x}" for i in range(3)]
    subscription = f"projects/p/subscriptions/dagster-pipes-group-{group}"
    found: dict = {}

    @asset
    def fanned(context: AssetExecutionContext) -> None:
        journal = SessionJournal(context, coalesce=3600.0, batch_sessions=0.5)  # progress written only by flush()

        def start(shard: int, session_id: str) -> None:
            journal.session(record(session_id=session_id, group=group, shard=shard, subscriptions=(subscription,)),
                            reattached=False)
            journal.triggered(session_id, f"m{shard}", "projects/p/topics/t")
            journal.opened(session_id, f"inv{shard}")

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(start, range(3), sessions))
        journal.flush()
        journal.flush()  # nothing gathered since: writes nothing
        found.update(find_earlier_sessions(context)[1])

    with DagsterInstance.ephemeral() as instance:
        result = materialize([fanned], instance=instance)
        engine_events = instance.all_logs(result.run_id, of_type=DagsterEventType.ENGINE_EVENT)
    records = [e for e in engine_events if "pipes_reattach_record" in e.dagster_event.engine_event_data.metadata]
    assert [e.dagster_event.engine_event_data.metadata["pipes_reattach_record"].value for e in records] == [
        "sessions", "progress"]
    by_session = {earlier.record.session_id: earlier.record for earlier in found.values()}
    assert {s: (r.shard, r.trigger_message_id, r.invocation_id) for s, r in by_session.items()} == {
        session_id: (shard, f"m{shard}", f"inv{shard}") for shard, session_id in enumerate(sessions)}


def test_a_corrupt_record_in_a_sessions_event_is_refused_and_the_others_read():
    group = "0123456789abcdef"
    good = record(session_id=f"{group}{1:016x}", group=group, shard=1,
                  subscriptions=(f"projects/p/subscriptions/dagster-pipes-group-{group}",))
    found: dict = {}

    @asset
    def fanned(context: AssetExecutionContext) -> None:
        journal = SessionJournal(context)
        listed = [{**good.metadata(), "pipes_session_id": "../x"}, good.metadata(), "not a record"]
        journal._write("sessions", "[pipes] recorded 3 session(s)", {"pipes_sessions": json.dumps(listed)})
        found.update(find_earlier_sessions(context)[1])

    with DagsterInstance.ephemeral() as instance:
        result = materialize([fanned], instance=instance)
        warnings = [e.user_message for e in instance.all_logs(result.run_id) if "ignoring a session record" in e.user_message]
    assert [earlier.record.session_id for earlier in found.values()] == [good.session_id]
    assert len(warnings) == 2, warnings


def test_a_failed_write_of_a_batch_raises_in_every_shard_that_waited_on_it():
    calls = []

    def write(items):
        calls.append(list(items))
        raise OSError("event log unreachable")

    batches = GroupCommit(write, window=0.3, max_items=100)

    def add(item: int) -> str:
        try:
            batches.add(item)
        except OSError as exc:
            return str(exc)
        return "written"

    with ThreadPoolExecutor(4) as pool:
        said = list(pool.map(add, range(4)))
    assert said == ["event log unreachable"] * 4
    assert sorted(item for batch in calls for item in batch) == [0, 1, 2, 3] and len(calls) == 1


def test_a_full_batch_is_written_and_the_next_item_starts_another():
    calls = []
    batches = GroupCommit(lambda items: calls.append(sorted(items)), window=0.3, max_items=2)
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(batches.add, range(5)))
    assert sorted(len(batch) for batch in calls) == [1, 2, 2]
    assert sorted(item for batch in calls for item in batch) == [0, 1, 2, 3, 4]
