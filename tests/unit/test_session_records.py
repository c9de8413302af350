"""Session records are read back from the event log checked (issue 24, item 14): a tampered record must not
make a re-execution drain and delete a foreign subscription, and a corrupt one must not break every
re-execution with a JSONDecodeError or KeyError."""

import json

import pytest

from dagster_gcf_pipes.orchestrator.session.reattach import CorruptRecord, SessionRecord

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
