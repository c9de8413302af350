"""Detached mode's completion sensor under what real Pub/Sub does and a second sensor: progress kept across
ticks (a backlog over the pull cap drains and expires what must expire), expiry only on evidence (an
empty pull proves nothing), and one completion sensor per reply topic (a second one refuses, naming both)."""

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason
from google.cloud import pubsub_v1

import dagster_gcf_pipes.orchestrator.definitions.completion_sensor as completion_module
from dagster_gcf_pipes.orchestrator.definitions.completion_sensor import OUTCOME_TAG, pipes_completion_sensor
from dagster_gcf_pipes.orchestrator.modes.detached_registry import RegistryOwned
from tests.integration.helpers import make_client
from tests.modes.test_detached import (
    ASSET,
    create_reply_topic,
    delete_reply_topic,
    failure_message,
    first_ending_tick,
    pending_entries,
    tick,
    trigger,
    wait_until_closed,
)


@pytest.fixture
def replies(stack: Any) -> Iterator[str]:
    """A detached reply topic and its durable subscription, both called by the returned name."""
    name = f"detached-{uuid.uuid4().hex[:8]}"
    create_reply_topic(stack.project, name)
    yield name
    delete_reply_topic(stack.project, name)


@pytest.fixture
def nobody(stack: Any) -> str:
    """A trigger topic no function consumes: its sessions never start."""
    name = f"detached-nobody-{uuid.uuid4().hex[:8]}"
    with pubsub_v1.PublisherClient() as publisher:
        publisher.create_topic(request={"name": publisher.topic_path(stack.project, name)})
    return name


def run_storage_id(instance: DagsterInstance) -> str:
    return instance.run_storage.get_run_storage_id()


def test_a_second_completion_sensor_on_the_reply_topic_refuses_naming_both(replies: str) -> None:
    """The same sensor in two Dagster instances: the first records the session, the second refuses with an
    error naming both (before, each recorded every session); once the first has been silent for its
    owner_timeout_seconds, the second takes over, saying from whom."""
    client = make_client(detached_reply_topic=replies)
    sensor = pipes_completion_sensor(
        subscription=replies, owner_timeout_seconds=6, minimum_interval_seconds=1, pull_timeout_seconds=2
    )
    with DagsterInstance.ephemeral() as first, DagsterInstance.ephemeral() as second:
        (session_id,) = trigger(client, [{"n": 3}], first)
        recorded = first_ending_tick(sensor, client, first)
        assert [e.metadata["pipes_session_id"].value for e in recorded.asset_events] == [session_id]

        with pytest.raises(RegistryOwned) as refused:
            tick(sensor, client, second, None)
        message = str(refused.value)
        assert f"run storage {run_storage_id(second)}" in message.split(" does not read ")[0]
        assert f"run storage {run_storage_id(first)}" in message.split(" does not read ")[1]
        assert "record every session twice" in message and "takes over once the other has not ticked for 6s" in message

        tick(sensor, client, first, recorded.cursor)  # the owner ticks on: its ack phase
        assert pending_entries(client) == []
        time.sleep(6.5)  # the first sensor was turned off
        assert isinstance(tick(sensor, client, second, None), SkipReason)  # taken over
        with pytest.raises(RegistryOwned):
            tick(sensor, client, first, recorded.cursor)  # and now the first one is the second


def test_an_empty_pull_past_the_deadline_does_not_expire_a_session_whose_replies_exist(
    stack: Any, replies: str
) -> None:
    """The session closed in time and its replies wait on the subscription; past its deadline a tick's pull
    comes back empty (real Pub/Sub may answer so while messages wait). Before, that tick reported the
    session expired; now it waits for evidence (a message published after the deadline, its probe) and the
    next tick records it."""
    client = make_client(detached_reply_topic=replies, detached_start_timeout=3.0, function_timeout=3.0)
    sensor = pipes_completion_sensor(subscription=replies, expiry_margin_seconds=0, pull_timeout_seconds=2)
    with DagsterInstance.ephemeral() as instance:
        (session_id,) = trigger(client, [{"n": 4}], instance)
        wait_until_closed(stack, replies, [session_id])
        time.sleep(6.5)  # past registration + detached_start_timeout + function_timeout

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(completion_module, "pull", lambda *args, **kwargs: [])
            empty = tick(sensor, client, instance, None)
        assert isinstance(empty, SkipReason), empty  # no failure run: nothing says the replies are not there

        recorded = first_ending_tick(sensor, client, instance)
        assert recorded.run_requests == []
        assert [e.metadata["pipes_session_id"].value for e in recorded.asset_events] == [session_id]
        tick(sensor, client, instance, recorded.cursor)  # the ack phase
        assert pending_entries(client) == []


def test_a_backlog_over_the_pull_cap_drains_and_a_dead_session_still_expires(replies: str, nobody: str) -> None:
    """Five batches a tick, one session sending forty while another never starts. Before, the running
    session's batches were handed back every tick, every pull met the cap and nothing ever expired (nor
    could the running session, larger than a tick, ever be recorded). Now every batch is kept in the
    session's progress and acked: the dead session expires, and the running one is recorded whole."""
    chatty = make_client(detached_reply_topic=replies)
    dead = make_client(
        trigger_topic=nobody, detached_reply_topic=replies, detached_start_timeout=1.0, function_timeout=1.0
    )
    sensor = pipes_completion_sensor(
        subscription=replies, max_messages_per_tick=5, expiry_margin_seconds=0, pull_timeout_seconds=2
    )
    with DagsterInstance.ephemeral() as instance:
        (running,) = trigger(chatty, [{"n": 9, "log_lines": 40, "line_interval": 0.1, "sleep": 4}], instance)
        (never,) = trigger(dead, [{}], instance)
        ended: dict[str, Any] = {}
        cursor = None
        deadline = time.monotonic() + 90
        while set(ended) != {running, never}:
            assert time.monotonic() < deadline, f"ended so far: {sorted(ended)}"
            result = tick(sensor, chatty, instance, cursor)
            if isinstance(result, SensorResult):
                ended.update({r.run_key: r for r in result.run_requests})
                ended.update({e.metadata["pipes_session_id"].value: e for e in result.asset_events})
                cursor = result.cursor
            time.sleep(0.3)
        tick(sensor, chatty, instance, cursor)  # the ack phase
        assert pending_entries(chatty) == []

    expired = ended[never]
    assert expired.tags[OUTCOME_TAG] == "expired" and "never started" in failure_message(expired)
    materialization = ended[running]
    assert materialization.asset_key == ASSET
    assert materialization.metadata["pipes_log_lines"].value == 41  # "scenario echo starts" and forty lines
    assert materialization.metadata["pipes_log_tail"].value.endswith("line 39")
    assert materialization.metadata["n"].value == 9
