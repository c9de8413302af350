"""A timeout blames what was observed: a session whose replies stopped because the reply channel broke is
not reported as a dead function (issue 24, item 15)."""

from __future__ import annotations

import threading
import uuid

from google.cloud import pubsub_v1

from dagster_gcf_pipes.local.local_stack import LocalStack
from tests.functions.main import wait_for_mark
from tests.integration.helpers import Outcome, make_client, run_asset


def test_a_deleted_reply_topic_is_named_instead_of_a_dead_function(stack: LocalStack) -> None:
    topic = f"blame-replies-{uuid.uuid4().hex[:8]}"
    stack.create_topics([topic])
    token = uuid.uuid4().hex
    client = make_client(reply_topic=topic, heartbeat_interval=1.0, heartbeat_timeout=4.0)
    outcomes: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcomes.append(run_asset(client, payload={"token": token, "sleep": 12})))
    runner.start()
    wait_for_mark("started", token)
    with pubsub_v1.PublisherClient() as publisher:
        publisher.delete_topic(request={"topic": f"projects/{stack.project}/topics/{topic}"})
    runner.join(timeout=90)
    (outcome,) = outcomes
    message = outcome.failure_message
    assert "FunctionHeartbeatTimeout" in message
    assert f"the reply topic of projects/{stack.project}/subscriptions/dagster-pipes-" in message
    assert "was deleted" in message
    assert "probably died" not in message
