"""``reply_topics=[...]``: sessions spread over several reply topics (issue 16, item 5).

Pub/Sub bills a reply once per subscription open on its topic, filtered out or not ("Filter messages from a
subscription" page): with one reply topic, N concurrent sessions make every reply billed N times. Spread
over K topics, a reply only meets the subscriptions of its own topic. The emulator shows exactly what is
billed, since it applies no filter and delivers every reply to every subscription on its topic: an
unfiltered "meter" subscription on each topic sees which replies were published where.
"""

from __future__ import annotations

import secrets
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from google.cloud import pubsub_v1

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.session.pull import ack, pull
from dagster_gcf_pipes.orchestrator.client.resolution import shard_of
from dagster_gcf_pipes.shared.protocol import Attr
from tests.conftest import REPLY_SHARDS, REPLY_TOPIC
from tests.integration.helpers import make_client, run_asset, session_subscriptions
from tests.modes.test_fanout import run_fan_out_asset


@contextmanager
def meters(stack: LocalStack, topics: list[str]) -> Iterator[dict[str, Counter[str]]]:
    """Count every reply published to each topic while the block runs, per session id. A wiretap on the emulator
    itself: through the production-semantics layer a pull may come back empty while messages wait (and this
    loop stops at the first empty pull), so a count read through it once missed a session."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    project = stack.project
    with stack.provisioning():
        subscriber = pubsub_v1.SubscriberClient()
    with subscriber:
        paths = {topic: subscriber.subscription_path(project, f"meter-{topic}-{secrets.token_hex(4)}") for topic in topics}
        for topic, path in paths.items():
            subscriber.create_subscription(request={"name": path, "topic": f"projects/{project}/topics/{topic}"})
        try:
            yield counts
            for topic, path in paths.items():
                while received := pull(subscriber, path, max_messages=1000, timeout=2.0):
                    counts[topic].update(m.message.attributes.get(Attr.SESSION, "") for m in received)
                    ack(subscriber, path, [m.ack_id for m in received])
        finally:
            for path in paths.values():
                subscriber.delete_subscription(request={"subscription": path})


def shards_client(**overrides):
    return make_client(reply_topic=None, reply_topics=REPLY_SHARDS, **overrides)


def test_each_session_replies_on_the_topic_its_id_hashes_to_and_nowhere_else(stack: LocalStack) -> None:
    with meters(stack, [REPLY_TOPIC, *REPLY_SHARDS]) as counts:
        outcomes = [run_asset(shards_client(), {"token": uuid.uuid4().hex, "log_lines": 3}) for _ in range(6)]

    topic_of = {}
    for outcome in outcomes:
        assert outcome.result.success, outcome.log_messages
        assert [m for m in outcome.log_messages if m.startswith("line ")] == ["line 0", "line 1", "line 2"]
        session_id, topic = outcome.metadata["pipes_session_id"], outcome.metadata["pipes_reply_topic"]
        assert topic == f"projects/{stack.project}/topics/{shard_of(REPLY_SHARDS, session_id)}"
        topic_of[session_id] = topic.rsplit("/", 1)[-1]
    for topic in [REPLY_TOPIC, *REPLY_SHARDS]:
        expected = {session for session, its_topic in topic_of.items() if its_topic == topic}
        assert set(counts[topic]) == expected, (topic, counts[topic], topic_of)
    assert session_subscriptions(stack.project) == []


def test_a_fan_out_group_replies_on_one_topic(stack: LocalStack) -> None:
    with meters(stack, REPLY_SHARDS) as counts:
        result, logs, outcomes = run_fan_out_asset(shards_client(), [{"n": shard} for shard in range(4)])

    assert result.success, logs
    (topic,) = {outcome.metadata["pipes_reply_topic"].rsplit("/", 1)[-1] for outcome in outcomes}
    sessions = {outcome.metadata["pipes_session_id"] for outcome in outcomes}
    assert set(counts[topic]) == sessions
    assert all(not counts[other] for other in REPLY_SHARDS if other != topic), counts


def test_sessions_spread_evenly_over_the_topics() -> None:
    """Session ids are random: 3,000 of them over 3 topics put each within a few percent of a third."""
    spread = Counter(shard_of(REPLY_SHARDS, uuid.uuid4().hex) for _ in range(3000))
    assert set(spread) == set(REPLY_SHARDS)
    assert all(850 < n < 1150 for n in spread.values()), spread


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"reply_topic": REPLY_TOPIC, "reply_topics": REPLY_SHARDS}, "reply_topic and reply_topics are both set"),
        ({"reply_topic": None, "reply_topics": [*REPLY_SHARDS, REPLY_SHARDS[0]]}, "more than once"),
        # topics are not checked up front (GetTopic is an admin operation): the session's own topic is, when used
        ({"reply_topic": None, "reply_topics": ["no-such-topic"]}, "topic projects/local-project/topics/no-such-topic does not exist"),
    ],
    ids=["both", "repeated", "missing"],
)
def test_bad_reply_topics_fail_before_anything_is_published(stack: LocalStack, settings, problem: str) -> None:
    outcome = run_asset(make_client(**settings), {"token": uuid.uuid4().hex})
    assert not outcome.result.success
    assert PipesPubSubConfigError.__name__ in outcome.failure_message and problem in outcome.failure_message
    assert "trigger sent" not in " ".join(outcome.log_messages)
