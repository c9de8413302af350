"""A scripted function: plays the function's part by hand so a test can inject exactly the faults it wants.

It takes the trigger off a topic nobody else consumes (its own subscription), then publishes replies as the
test dictates: duplicated, reordered, from a second invocation, malformed, unsigned, or not at all. Like the
real function it claims the session lease before an invocation's ``opened`` (a forger does not: ``lease=False``)."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from dagster_pipes import PIPES_PROTOCOL_VERSION, PIPES_PROTOCOL_VERSION_FIELD, decode_param
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.function.lease import claim_lease
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.protocol import Reply, ReplyChannelParams, Trigger, dumps
from dagster_gcf_pipes.shared.signing import sign
from tests.conftest import SCRIPTED_TOPIC
from tests.integration.helpers import Outcome, make_client, run_asset


def pipes_message(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": method, "params": params}


def opened(owner_token: str | None = None) -> dict[str, Any]:
    return pipes_message("opened", {"extras": {"owner_token": owner_token} if owner_token is not None else {}})


def log(text: str) -> dict[str, Any]:
    return pipes_message("log", {"message": text, "level": "INFO"})


def materialization(asset_key: str, **metadata: Any) -> dict[str, Any]:
    return pipes_message("report_asset_materialization", {
        "asset_key": asset_key, "data_version": None,
        "metadata": {k: {"raw_value": v, "type": "__infer__"} for k, v in metadata.items()},
    })


def closed() -> dict[str, Any]:
    return pipes_message("closed", {})


class ScriptedFunction:
    def __init__(self, stack: Any, trigger_topic: str):
        project = self.project = stack.project
        with stack.provisioning():  # the trigger is taken on the emulator itself (a function gets it pushed)
            self.subscriber = pubsub_v1.SubscriberClient()
        self.publisher = pubsub_v1.PublisherClient()
        self.subscription = self.subscriber.subscription_path(project, f"scripted-{uuid.uuid4().hex[:12]}")
        self.subscriber.create_subscription(request={
            "name": self.subscription, "topic": f"projects/{project}/topics/{trigger_topic}",
        })
        self.trigger: Trigger | None = None
        self.params: ReplyChannelParams | None = None
        self.context: Mapping[str, Any] | None = None

    def take_trigger(self, timeout: float = 15.0) -> ReplyChannelParams:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.subscriber.pull(request={"subscription": self.subscription, "max_messages": 1}, timeout=5)
            for received in response.received_messages:
                self.subscriber.acknowledge(request={"subscription": self.subscription, "ack_ids": [received.ack_id]})
                attributes = dict(received.message.attributes)
                body = ClaimCheck(GCSBlobStore(storage.Client(project=self.project), "")).unwrap(received.message.data, attributes)
                self.trigger = Trigger.decode(body, attributes)
                self.params = ReplyChannelParams.from_params(decode_param(self.trigger.bootstrap["DAGSTER_PIPES_MESSAGES"]))
                self.context = decode_param(self.trigger.bootstrap["DAGSTER_PIPES_CONTEXT"])
                return self.params
        raise AssertionError(f"no trigger arrived on {self.subscription} within {timeout}s")

    @property
    def asset_key(self) -> str:
        assert self.context is not None
        return self.context["data"]["asset_keys"][0]

    def batch(
        self, invocation: str, seq: int, messages: Sequence[Mapping[str, Any]], secret: str | None = None, lease: bool = True
    ) -> None:
        """Publish one batch; an ``opened`` batch claims the session lease first, as the function does, if ``lease``."""
        assert self.params is not None, "take_trigger() first"
        if lease and seq == 0 and messages and messages[0].get("method") == "opened":
            self.claim_lease(invocation)
        body = dumps(list(messages), "batch")
        attributes = Reply(self.params.session_id, invocation, seq).attributes()
        self.raw(body, sign(secret, body, attributes) if secret else attributes)

    def claim_lease(self, invocation: str) -> bool:
        assert self.params is not None
        gcs = storage.Client(project=self.project)
        key = lease_key(self.params.prefix, self.params.session_id)
        return claim_lease(gcs, self.params.bucket, key, invocation, self.params.lease_seconds)

    def heartbeat(self, invocation: str) -> None:
        assert self.params is not None
        self.raw(*Reply(self.params.session_id, invocation, None).encode())

    def raw(self, data: bytes, attributes: Mapping[str, str]) -> str:
        assert self.params is not None
        return self.publisher.publish(self.params.topic, data, **attributes).result(timeout=30)

    def close(self) -> None:
        self.subscriber.delete_subscription(request={"subscription": self.subscription})
        self.subscriber.close()


@pytest.fixture
def scripted(stack: Any) -> Iterator[Callable[..., tuple[ScriptedFunction, concurrent.futures.Future]]]:
    """Start a run against the scripted topic in the background; return the scripted function and the run."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    functions: list[ScriptedFunction] = []

    def start(**client_overrides: Any) -> tuple[ScriptedFunction, concurrent.futures.Future]:
        function = ScriptedFunction(stack, SCRIPTED_TOPIC)
        functions.append(function)
        future = pool.submit(run_asset, make_client(trigger_topic=SCRIPTED_TOPIC, **client_overrides), {"n": 1})
        function.take_trigger()
        return function, future

    yield start
    pool.shutdown(wait=True)
    for function in functions:
        function.close()


def finished(future: concurrent.futures.Future) -> Outcome:
    return future.result(timeout=60)
