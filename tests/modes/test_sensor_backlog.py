"""A backlog far larger than anything the sensor could remember, redelivered out of order, through Dagster's
own sensor daemon on a persistent instance and the real emulator: it drains in a bounded number of ticks,
every object write gets one run, and every malformed message is warned about once and acked.

The order is the test's, not the emulator's (real Pub/Sub promises none): each tick, the sensor's pull
sees everything waiting, gets a hundred of the messages it has never been handed (in a random order), and
only after those the ones it has: a redelivery comes back behind the whole backlog."""

import random
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    Config,
    DefaultSensorStatus,
    Definitions,
    OpExecutionContext,
    RunConfig,
    RunRequest,
    in_process_executor,
    job,
    op,
)
from dagster._core.definitions.instigation_logger import get_instigation_log_records
from dagster._core.storage.tags import RUN_KEY_TAG

import dagster_gcf_pipes.orchestrator.definitions.sensors as sensors_module
from dagster_gcf_pipes.orchestrator.definitions.sensors import PubSubEvent, gcs_object_event, pubsub_sensor
from dagster_gcf_pipes.orchestrator.session.pull import nack
from tests.modes.daemon import SensorDaemon, TickStatus, sensor_daemon
from tests.modes.test_sensor import Feed

SUBSCRIPTION = "pubsub-sensor-backlog-test"
SENSOR = "backlog_sensor"
PER_TICK = 100
OBJECTS = 2_000  # the burst of the report (the long run); the sensor of an earlier release remembered 1,000 message ids
DUPLICATES = 20  # Cloud Storage published these writes' notifications twice
MALFORMED = 2
WINDOW = 3_000  # more than the backlog: the test's pull sees everything waiting and chooses what the sensor gets


class Landed(Config):
    uri: str = ""


@op
def load_landed(context: OpExecutionContext, config: Landed) -> None:
    context.log.info(f"loading {config.uri}")


@job(executor_def=in_process_executor)
def load_landed_job() -> None:  # a job of one op: creating 2,500 runs of it is what the test spends its time on
    load_landed()


def landed_request(event: PubSubEvent) -> RunRequest:
    obj = gcs_object_event(event)  # a message that is not a notification: warned about, acked, no run
    return RunRequest(run_config=RunConfig(ops={"load_landed": Landed(uri=obj.uri)}))


backlog_defs = Definitions(
    jobs=[load_landed_job],
    sensors=[
        pubsub_sensor(
            SENSOR,
            SUBSCRIPTION,
            target=load_landed_job,
            build_run_request=landed_request,
            max_messages_per_tick=PER_TICK,
            # not 0.5 s: the production-semantics layer polls the emulator every 0.5 s during a pull and loses
            # (until its ack deadline) what reaches the poll at the pull's very end, every time for a 0.5 s pull
            pull_timeout_seconds=1.5,
            default_status=DefaultSensorStatus.RUNNING,
        )
    ],
)


@pytest.fixture
def backlog_feed(stack: Any) -> Iterator[Feed]:
    with Feed(stack, SUBSCRIPTION) as feed:
        yield feed


@pytest.fixture
def out_of_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sensor's pull returns ``max_messages`` of everything waiting: first the messages it has never been
    handed, then those it has, each group in a random order (seeded). A redelivery thus comes back only
    after the whole backlog, which is the worst case for a sensor that remembers message ids, and in no
    order the emulator chose."""
    real_pull = sensors_module.pull
    shuffle = random.Random(24)
    handed: set[str] = set()

    def pull(subscriber: Any, path: str, *, max_messages: int, **kwargs: Any) -> list[Any]:
        waiting = real_pull(subscriber, path, max_messages=WINDOW, **kwargs)
        shuffle.shuffle(waiting)
        waiting.sort(key=lambda m: m.message.message_id in handed)  # stable: the new ones first, still shuffled
        nack(subscriber, path, [m.ack_id for m in waiting[max_messages:]])
        handed.update(m.message.message_id for m in waiting[:max_messages])
        return waiting[:max_messages]

    monkeypatch.setattr(sensors_module, "pull", pull)


def notify(feed: Feed, name: str) -> Future:
    """Publish a Cloud Storage OBJECT_FINALIZE notification of generation 1 of ``name``, as the service does."""
    return feed.publisher.publish(
        feed.topic, b"{}", bucketId="raw-drops", objectId=name, objectGeneration="1", eventType="OBJECT_FINALIZE",
        payloadFormat="JSON_API_V1",
    )


def warnings_of(daemon: SensorDaemon, ticks: list[Any]) -> list[str]:
    return [
        record["msg"]
        for t in ticks
        if t.log_key
        for record in get_instigation_log_records(daemon.instance, t.log_key)
        if record.get("levelname") == "WARNING"
    ]


@pytest.mark.timeout(900)  # creating 2,000 runs in SQLite takes most of it
@pytest.mark.parametrize(
    "objects",
    # the default run: a backlog of several ticks, redelivered behind itself; the long run: the report's burst
    [pytest.param(2 * PER_TICK, id="200"), pytest.param(OBJECTS, id="2000", marks=pytest.mark.long)],
)
def test_a_backlog_far_above_any_remembered_ids_drains_in_bounded_ticks_whatever_the_order(
    backlog_feed: Feed, out_of_order: None, tmp_path: Path, objects: int
) -> None:
    names = [f"landing/part-{i:04d}.csv" for i in range(objects)]
    futures = [notify(backlog_feed, name) for name in names + names[:DUPLICATES]]
    malformed = [backlog_feed.publisher.publish(backlog_feed.topic, b"not a notification", origin="someone")
                 for _ in range(MALFORMED)]
    for future in futures:
        future.result(timeout=60)
    malformed_ids = [f.result(timeout=60) for f in malformed]
    messages = objects + DUPLICATES + MALFORMED
    # every message is pulled once to request its run and once to ack it (a malformed one only once)
    bound = -(-2 * messages // PER_TICK) + 5  # and a few for pulls that return less than is waiting

    ticks: list[Any] = []
    working, idle = 0, 0  # ticks that pulled something; empty ticks in a row (an empty pull proves nothing)
    # one event log database for all runs (SQLite's default opens a file per run: 0.45 s a run here)
    event_log = {"module": "dagster._core.storage.event_log", "class": "ConsolidatedSqliteEventLogStorage",
                 "config": {"base_dir": str(tmp_path)}}
    location = {"python_file": str(Path(__file__).resolve()), "attribute": "backlog_defs"}
    with sensor_daemon("backlog", **location, overrides={"event_log_storage": event_log}) as daemon:
        while working <= bound and idle < 3:
            ticks.append(daemon.tick())
            assert ticks[-1].status in (TickStatus.SUCCESS, TickStatus.SKIPPED), ticks[-1]
            empty = "no messages waiting" in (ticks[-1].skip_reason or "")
            working, idle = (working, idle + 1) if empty else (working + 1, 0)
        runs = daemon.instance.get_runs()
        warnings = warnings_of(daemon, ticks)

    assert working <= bound and idle == 3, f"not drained after {working} ticks that pulled messages"
    assert backlog_feed.waiting() == []
    keys = sorted(run.tags[RUN_KEY_TAG] for run in runs)
    assert keys == [f"raw-drops/{name}#1" for name in names]  # one run per object write
    assert sum(len(t.run_keys) for t in ticks) == objects  # and one request: nothing asked for twice
    for message_id in malformed_ids:
        assert len([w for w in warnings if f"skipped message {message_id}" in w]) == 1, warnings
    assert len(warnings) == MALFORMED
