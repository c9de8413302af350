"""What production Pub/Sub does and the emulator never shows, simulated on the local stack with the real
client wrapped so that it meets the real error (issue 16, items 3, 4 and 5).

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

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.orchestrator import client as client_module
from dagster_gcf_pipes.orchestrator import reply_subscription
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


def _is_reply_subscription(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith("dagster-pipes-")


@pytest.fixture
def streams_not_found(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], _Budget]:
    """Make the first ``n`` reply streams meet NOT_FOUND, as a just-created subscription can in production."""

    def install(n: float) -> _Budget:
        budget = _Budget(n)

        class NotYetVisible(pubsub_v1.SubscriberClient):
            def subscribe(self, subscription: str, *args: Any, **kwargs: Any) -> Any:
                if _is_reply_subscription(subscription) and budget.take():
                    subscription = f"{subscription}-not-visible-yet"  # the emulator answers NOT_FOUND
                return super().subscribe(subscription, *args, **kwargs)

        monkeypatch.setattr(pubsub_v1, "SubscriberClient", NotYetVisible)
        return budget

    return install


@pytest.fixture
def lost_create_answers(monkeypatch: pytest.MonkeyPatch) -> _Budget:
    """The first reply-subscription create lands on the server, but its caller sees ServiceUnavailable."""
    budget = _Budget(1)

    class AnswerLost(pubsub_v1.SubscriberClient):
        def create_subscription(self, *args: Any, **kwargs: Any) -> Any:
            created = super().create_subscription(*args, **kwargs)
            if _is_reply_subscription(kwargs["request"]["name"]) and budget.take():
                raise gexc.ServiceUnavailable("the connection dropped before the answer arrived")
            return created

    monkeypatch.setattr(pubsub_v1, "SubscriberClient", AnswerLost)
    return budget


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

    result, _, outcomes = run_fan_out_asset(make_client(), [{"n": i} for i in range(4)], max_concurrency=4)

    assert result.success, step_failure(result)
    assert sorted(o.metadata["n"] for o in outcomes) == [0, 1, 2, 3]
    assert budget.used == 2
    assert session_subscriptions(stack.project) == []


def test_not_found_past_the_grace_period_fails_the_session_clearly(
    stack: LocalStack, streams_not_found, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reply_subscription, "NEW_SUBSCRIPTION_GRACE_SECONDS", 2.0)
    streams_not_found(float("inf"))

    outcome = run_asset(make_client(startup_timeout=60.0), payload={"n": 1})

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


def test_create_subscription_is_retried_by_one_layer_only(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated client's own retry (60 s on Unavailable) must not run under tenacity's."""
    seen: list[Any] = []

    class Recording(pubsub_v1.SubscriberClient):
        def create_subscription(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(kwargs.get("retry", "default"))
            return super().create_subscription(*args, **kwargs)

    monkeypatch.setattr(pubsub_v1, "SubscriberClient", Recording)
    outcome = run_asset(make_client(), payload={})

    assert outcome.result.success, outcome.failure_message
    assert seen == [None]


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

    monkeypatch.setattr(client_module, "_topic_exists", counting("topic", client_module._topic_exists))
    monkeypatch.setattr(client_module, "_bucket_exists", counting("bucket", client_module._bucket_exists))
    client_module.clear_resource_cache()
    yield counts
    client_module.clear_resource_cache()


def test_topic_and_bucket_checks_run_once_per_process(stack: LocalStack, counted_checks: dict[str, int]) -> None:
    first = run_asset(make_client(), payload={"n": 1})
    assert first.result.success, first.failure_message
    assert counted_checks == {"topic": 2, "bucket": 1}

    second = run_asset(make_client(), payload={"n": 2})
    assert second.result.success, second.failure_message
    assert counted_checks == {"topic": 2, "bucket": 1}  # the second run made no check


def test_a_missing_topic_is_not_cached(stack: LocalStack, counted_checks: dict[str, int]) -> None:
    for _ in range(2):
        outcome = run_asset(make_client(reply_topic="no-such-replies"), payload={})
        assert not outcome.result.success
        assert "reply_topic: topic projects/local-project/topics/no-such-replies does not exist" in outcome.failure_message
    # run 1 checks both topics; run 2 only the missing one: the trigger topic's success is remembered
    assert counted_checks["topic"] == 3
