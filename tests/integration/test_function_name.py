"""``PipesPubSubClient(function_name=...)``: the trigger topic and timeouts come from the deployed function,
read through the real Cloud Functions v2 client from an in-process gRPC fake of FunctionService, while the
session itself runs on the local stack."""

from __future__ import annotations

import threading
import uuid
import time
from typing import Any

from google.cloud import functions_v2, pubsub_v1

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from tests.conftest import TEST_TOPIC
from tests.faults.test_session_end import Queue
from tests.fakes.function_service import FakeFunctionService
from tests.integration.helpers import make_client, run_asset

NAME = "projects/local-project/locations/europe-west1/functions/pipes-test"


def named_client(fake: FakeFunctionService, **overrides: Any) -> PipesPubSubClient:
    """The resource, with its Cloud Functions client pointed at the fake (the client itself is the real one)."""

    class PointedAtFake(PipesPubSubClient):
        def _functions_client(self) -> functions_v2.FunctionServiceClient:
            return fake.client()

    settings = make_client(**{"trigger_topic": None, "function_name": NAME, **overrides})
    return PointedAtFake(**settings.model_dump())


def deploy(fake: FakeFunctionService, *, topic: str, state: str = "ACTIVE", timeout_seconds: int = 120) -> None:
    fake.add(functions_v2.Function(
        name=NAME,
        state=functions_v2.Function.State[state],
        service_config=functions_v2.ServiceConfig(timeout_seconds=timeout_seconds, uri="https://pipes-test.run.app"),
        event_trigger=functions_v2.EventTrigger(
            event_type="google.cloud.pubsub.topic.v1.messagePublished", pubsub_topic=topic
        ),
    ))


def test_the_session_runs_on_the_topic_read_from_the_deployment(stack, fake):
    deploy(fake, topic=f"projects/{stack.project}/topics/{TEST_TOPIC}")

    first = run_asset(named_client(fake), payload={"n": 4})
    second = run_asset(named_client(fake), payload={"n": 5})

    assert first.result.success, first.failure_message
    assert second.result.success, second.failure_message
    assert (first.metadata["n"], second.metadata["n"]) == (4, 5)
    assert fake.calls == 1  # resolved once per process


def test_a_function_that_is_not_active_fails_the_step_before_anything_is_published(stack, fake):
    deploy(fake, topic=f"projects/{stack.project}/topics/{TEST_TOPIC}", state="DEPLOYING")

    outcome = run_asset(named_client(fake), payload={})

    assert not outcome.result.success
    assert "is in state DEPLOYING" in outcome.failure_message
    assert not any("trigger sent" in line for line in outcome.log_messages)


def test_a_trigger_topic_that_contradicts_the_deployment_is_refused(stack, fake):
    deploy(fake, topic=f"projects/{stack.project}/topics/{TEST_TOPIC}")

    outcome = run_asset(named_client(fake, trigger_topic="another-topic"), payload={})

    assert not outcome.result.success
    assert "is not the topic" in outcome.failure_message and TEST_TOPIC in outcome.failure_message


def test_function_name_with_http_invocation_is_refused(stack, fake):
    outcome = run_asset(named_client(fake, invocation="http", function_url="https://f.run.app"), payload={})

    assert not outcome.result.success
    assert "with invocation='http' set function_url instead" in outcome.failure_message


def test_a_late_start_does_not_cut_short_a_session_that_closes_within_the_functions_timeout(stack, fake):
    """Eventarc retries a failed delivery with backoff, so a function may start well after its trigger was
    published, then run up to its whole timeout. Before: with function_name, total_timeout defaulted to the
    function's timeout + 60 s counted from the trigger, and failed such a session while the function still
    ran (this test fails so with total_timeout=11, the old default with its 60 s margin shrunk to 1 s). Now
    the bound is startup_timeout + function_timeout + a margin."""
    queue = Queue(stack)  # the deployed trigger: nothing consumes it until the test redelivers
    deploy(fake, topic=queue.topic, timeout_seconds=10)

    def redeliver_late() -> None:
        deadline = time.monotonic() + 30
        while queue.take() < 1 and time.monotonic() < deadline:
            pass
        time.sleep(6)  # a delivery retried with backoff
        (message,) = queue.held
        with pubsub_v1.PublisherClient() as publisher:
            publisher.publish(f"projects/{stack.project}/topics/{TEST_TOPIC}", message.data, **message.attributes).result(30)

    late = threading.Thread(target=redeliver_late, daemon=True)
    late.start()
    try:
        outcome = run_asset(named_client(fake), payload={"n": 3, "sleep": 6})
    finally:
        late.join(timeout=40)
        queue.close()

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 3 and outcome.metadata["pipes_session_seconds"] > 11


def test_run_many_runs_no_more_shards_at_once_than_the_deployed_function_can_take(stack, fake):
    """Above --max-instances x --concurrency Cloud Run answers 429 and Eventarc retries after 10 s doubling to
    600 s (the local dispatcher plays both): run_many lowers max_concurrency to the capacity the Cloud Functions
    API reports, says so, and no shard meets a 429 (issue 23, item 5)."""
    from dagster_gcf_pipes.local.dispatcher import read_meter
    from dagster_gcf_pipes.local.local_stack import LocalFunction
    from tests.modes.test_fanout import run_fan_out_asset

    topic = f"capacity-{uuid.uuid4().hex[:8]}"
    stack.add_function(LocalFunction("tests/functions/main.py", "main", topic, max_instances=2, instance_concurrency=1))
    fake.add(functions_v2.Function(
        name=NAME,
        state=functions_v2.Function.State.ACTIVE,
        service_config=functions_v2.ServiceConfig(timeout_seconds=120, max_instance_count=2, max_instance_request_concurrency=1),
        event_trigger=functions_v2.EventTrigger(
            event_type="google.cloud.pubsub.topic.v1.messagePublished", pubsub_topic=f"projects/{stack.project}/topics/{topic}"
        ),
    ))
    try:
        started = time.monotonic()
        result, logs, _ = run_fan_out_asset(named_client(fake), [{"n": i, "sleep": 1.5} for i in range(6)], max_concurrency=6)
        seconds = time.monotonic() - started
        meter = read_meter(stack.servers[f"dispatcher-{topic}"].log_path)
    finally:
        stack.servers.pop(f"function-{topic}").stop()  # its dispatcher with it
        stack.servers.pop(f"dispatcher-{topic}", None)
        with pubsub_v1.SubscriberClient() as subscriber:
            subscriber.delete_subscription(request={"subscription": stack.trigger_subscription(topic)})
    assert result.success
    assert any("max_concurrency=6 is above the capacity of the deployed function (2 sessions at once" in m for m in logs)
    # no 429; a delivery may wait a moment for an instance ("queued"): a shard ends for run_many when its
    # `closed` arrives, and its function's request can still be finishing then (Cloud Run queues the next)
    assert meter["rejected"] == 0 and meter["deliveries"] >= 6, meter
    assert seconds < 19.5, seconds  # a 429 alone costs 10 s queued + 10 s before its retry
