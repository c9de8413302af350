"""What production Pub/Sub does and the emulator never shows, simulated on the local stack with the real
client wrapped so that it meets the real error (issue 16, items 3, 4 and 5).

Every subscriber client the orchestrator opens is wrapped (``wrap_subscribers``); the calls go on to the emulator.

- StreamingPull right after CreateSubscription can answer NOT_FOUND for a short while
  (googleapis/java-pubsub#81, googleapis/google-cloud-go#9723): the wrapper points the first streams at a
  subscription that does not exist yet, so the emulator itself answers NOT_FOUND.
- A CreateSubscription that succeeded but whose answer was lost is retried and meets ALREADY_EXISTS: the
  wrapper lets the create reach the emulator, then raises the transient error the caller would have seen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from bench.cost_model import ReplyVolume, model
from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.orchestrator.client import client as client_module
from dagster_gcf_pipes.orchestrator.client import resolution, session_lifecycle
from dagster_gcf_pipes.orchestrator.session import reply_subscription
from tests.integration.helpers import make_client, run_asset, session_subscriptions
from tests.modes.test_fanout import run_fan_out_asset, step_failure


class _Budget:
    """A thread-safe count of the faults still to inject."""

    def __init__(self, faults: float) -> None:
        self._left = faults
        self._lock = threading.Lock()
        self.used = 0

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            self.used += 1
            return True


class WrappedSubscriber:
    """The subscriber client the orchestrator would have used, with some of its calls replaced by a subclass."""

    def __init__(self, real: pubsub_v1.SubscriberClient) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> "WrappedSubscriber":
        self.real.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.__exit__(*exc)


def wrap_subscribers(monkeypatch: pytest.MonkeyPatch, wrapper: type[WrappedSubscriber]) -> None:
    """Every subscriber client the orchestrator opens (a session's, a fan-out group's) comes wrapped."""
    real_factory = client_module.subscriber_client
    for module in (client_module, session_lifecycle):
        monkeypatch.setattr(module, "subscriber_client", lambda: wrapper(real_factory()))


@pytest.fixture
def streams_not_found(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], _Budget]:
    """Make the first ``n`` reply streams meet NOT_FOUND, as a just-created subscription can in production."""

    def install(n: float) -> _Budget:
        budget = _Budget(n)

        class NotYetVisible(WrappedSubscriber):
            def subscribe(self, subscription: str, *args: Any, **kwargs: Any) -> Any:
                if budget.take():
                    subscription = f"{subscription}-not-visible-yet"  # the emulator answers NOT_FOUND
                return self.real.subscribe(subscription, *args, **kwargs)

        wrap_subscribers(monkeypatch, NotYetVisible)
        return budget

    return install


@pytest.fixture
def lost_create_answers(monkeypatch: pytest.MonkeyPatch) -> _Budget:
    """The first reply-subscription create lands on the server, but its caller sees ServiceUnavailable."""
    budget = _Budget(1)

    class AnswerLost(WrappedSubscriber):
        def create_subscription(self, *args: Any, **kwargs: Any) -> Any:
            created = self.real.create_subscription(*args, **kwargs)
            if budget.take():
                raise gexc.ServiceUnavailable("the connection dropped before the answer arrived")
            return created

    wrap_subscribers(monkeypatch, AnswerLost)
    return budget


@pytest.fixture
def created_subscriptions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """(name, the retry argument) of every CreateSubscription the orchestrator sends."""
    created: list[tuple[str, Any]] = []

    class Recording(WrappedSubscriber):
        def create_subscription(self, *args: Any, **kwargs: Any) -> Any:
            created.append((kwargs["request"]["name"], kwargs.get("retry", "the client's default")))
            return self.real.create_subscription(*args, **kwargs)

    wrap_subscribers(monkeypatch, Recording)
    return created


def test_a_stream_whose_open_loses_the_librarys_shutdown_race_is_opened_again(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """google-cloud-pubsub's ``subscribe()`` raised ``AttributeError: 'NoneType' object has no attribute 'start'``
    when the stream it opened failed at once (NOT_FOUND right after creation) and the library's shutdown of it
    cleared its leaser before ``open()`` started it (seen once in the suite under load, in the timer thread that
    re-opens streams, which died: the session hung). Before: the error escaped; now the stream is opened again."""
    budget = _Budget(2)

    class LosesTheRace(WrappedSubscriber):
        def subscribe(self, subscription: str, *args: Any, **kwargs: Any) -> Any:
            if budget.take():
                raise AttributeError("'NoneType' object has no attribute 'start'")
            return self.real.subscribe(subscription, *args, **kwargs)

    wrap_subscribers(monkeypatch, LosesTheRace)
    outcome = run_asset(make_client(), payload={"n": 32, "log_lines": 3})

    assert outcome.result.success, outcome.failure_message
    assert [m for m in outcome.log_messages if m.startswith("line ")] == [f"line {i}" for i in range(3)]
    assert budget.used == 2


# ------------------------------------------------------------------ item 3: NOT_FOUND right after creation
def test_a_session_rides_out_not_found_from_a_just_created_subscription(stack: LocalStack, streams_not_found) -> None:
    budget = streams_not_found(3)

    outcome = run_asset(make_client(), payload={"n": 31, "log_lines": 5})

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 31
    assert [m for m in outcome.log_messages if m.startswith("line ")] == [f"line {i}" for i in range(5)]
    assert budget.used == 3
    assert sum("re-opening the stream" in m for m in outcome.log_messages) == 3
    assert session_subscriptions(stack.project) == []


def test_a_fan_out_group_rides_out_not_found_from_its_just_created_subscription(stack: LocalStack, streams_not_found) -> None:
    budget = streams_not_found(2)

    result, _, outcomes = run_fan_out_asset(make_client(reattach=False), [{"n": i} for i in range(4)], max_concurrency=4)

    assert result.success, step_failure(result)
    assert sorted(o.metadata["n"] for o in outcomes) == [0, 1, 2, 3]
    assert budget.used == 2
    assert session_subscriptions(stack.project) == []


def test_not_found_past_the_grace_period_fails_the_session_clearly(
    stack: LocalStack, streams_not_found, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reply_subscription, "NEW_SUBSCRIPTION_GRACE_SECONDS", 2.0)
    streams_not_found(float("inf"))

    outcome = run_asset(make_client(startup_timeout=60.0, reattach=False), payload={"n": 1})

    assert not outcome.result.success
    failure = outcome.failure_message
    assert "ReplyStreamError" in failure
    assert "StreamingPull still answered NOT_FOUND" in failure and "re-opens" in failure
    assert "FunctionStartupTimeout" not in failure
    assert session_subscriptions(stack.project) == []


# ------------------------------------------------------------------ item 4: ALREADY_EXISTS on a retried create
def test_a_retried_create_that_had_succeeded_is_taken_as_success(stack: LocalStack, lost_create_answers) -> None:
    outcome = run_asset(make_client(), payload={"n": 41})

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 41
    assert lost_create_answers.used == 1
    assert session_subscriptions(stack.project) == []


def test_create_subscription_is_retried_by_one_layer_only(stack: LocalStack, created_subscriptions) -> None:
    """The generated client's own retry (60 s on Unavailable) must not run under tenacity's."""
    outcome = run_asset(make_client(), payload={})

    assert outcome.result.success, outcome.failure_message
    assert [retry for _, retry in created_subscriptions] == [None]


# ------------------------------------------------------------------ item 5: topic and bucket checks once per process
@pytest.fixture
def counted_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the GetTopic / bucket-exists checks the client makes (each still goes to the emulator)."""
    counts = {"topic": 0, "bucket": 0}

    def counting(kind: str, check: Callable[..., bool]) -> Callable[..., bool]:
        def wrapped(*args: Any) -> bool:
            counts[kind] += 1
            return check(*args)

        return wrapped

    monkeypatch.setattr(resolution, "_topic_exists", counting("topic", resolution._topic_exists))
    monkeypatch.setattr(resolution, "_bucket_exists", counting("bucket", resolution._bucket_exists))
    resolution.clear_resource_cache()
    yield counts
    resolution.clear_resource_cache()


def test_a_step_checks_no_topic_and_the_bucket_once_per_process(stack: LocalStack, counted_checks: dict[str, int]) -> None:
    """GetTopic is an admin operation (the caller's admin quota) and Dagster runs each step in a process of its
    own, so no topic is checked beforehand: the session's CreateSubscription and publish say what is missing."""
    first = run_asset(make_client(), payload={"n": 1})
    assert first.result.success, first.failure_message
    assert counted_checks == {"topic": 0, "bucket": 1}

    second = run_asset(make_client(), payload={"n": 2})
    assert second.result.success, second.failure_message
    assert counted_checks == {"topic": 0, "bucket": 1}  # the second run made no check


def test_a_missing_topic_is_named_at_its_first_use(stack: LocalStack, counted_checks: dict[str, int]) -> None:
    for _ in range(2):
        outcome = run_asset(make_client(reply_topic="no-such-replies"), payload={})
        assert not outcome.result.success
        assert "reply_topic: topic projects/local-project/topics/no-such-replies does not exist" in outcome.failure_message
    trigger = run_asset(make_client(trigger_topic="no-such-trigger"), payload={})
    assert "trigger_topic: topic projects/local-project/topics/no-such-trigger does not exist" in trigger.failure_message
    assert counted_checks["topic"] == 0
    assert session_subscriptions(stack.project) == []  # the reply subscription made for it is deleted


def test_the_cost_model_bills_every_reply_once_per_subscription_on_the_topic() -> None:
    """The arithmetic behind "Cost and quotas" in docs/architecture.md (the figures come from bench.cost_model)."""
    no_heartbeats = 1e12
    per_session, sharded, per_group = model(
        ReplyVolume(batches=2, batch_bytes=5000, heartbeat_bytes=0),
        session_seconds=10,
        heartbeat_interval=no_heartbeats,
        group_size=100,
        reply_topics=10,
        concurrency=[100],
    )
    published = 100 / 10 * 5000  # 10 sessions start a second, 5000 bytes each
    assert per_session.subscriptions_on_topic == 100 and per_group.subscriptions_on_topic == 1
    assert per_session.published_bytes_per_second == pytest.approx(published)
    assert per_session.delivered_bytes_per_second == pytest.approx(100 * published)  # 1 own + 99 filtered out
    assert per_group.delivered_bytes_per_second == pytest.approx(published)
    assert sharded.subscriptions_on_topic == 10  # 100 sessions over 10 topics
    assert sharded.delivered_bytes_per_second == pytest.approx(10 * published)
    assert sharded.admin_ops_per_second == per_session.admin_ops_per_second
    assert per_group.admin_ops_per_second == pytest.approx(2 * 1 / 10)  # one group of 100 every 10 s
    assert per_session.admin_ops_per_second == pytest.approx(2 * 100 / 10)  # create + delete per session


# ------------------------------------------------------------------ item 8: the reply topic in a project of its own
def test_session_subscriptions_live_in_the_reply_topics_project(stack: LocalStack, created_subscriptions) -> None:
    """What docs/deploy.md's narrowed role relies on: with the reply topic in a dedicated project, every
    subscription Dagster creates, streams and deletes is in that project, never in the function's."""
    replies = "projects/pipes-replies-project/topics/pipes-replies"
    with pubsub_v1.PublisherClient() as publisher:
        try:
            publisher.create_topic(request={"name": replies})
        except gexc.AlreadyExists:
            pass
    client = make_client(reply_topic=replies)
    single = run_asset(client, payload={"n": 81})
    result, _, _ = run_fan_out_asset(client, [{"n": i} for i in range(3)], max_concurrency=3)

    assert single.result.success, single.failure_message
    assert result.success, step_failure(result)
    assert len(created_subscriptions) == 2  # the session's and the fan-out group's
    assert all(
        name.startswith("projects/pipes-replies-project/subscriptions/dagster-pipes-") for name, _ in created_subscriptions
    )
    assert session_subscriptions("pipes-replies-project") == []
