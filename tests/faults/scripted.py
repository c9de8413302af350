"""A scripted function: plays the function's part by hand so a test can inject exactly the faults it wants.

It takes the trigger off a topic nobody else consumes (its own subscription), then publishes replies as the
test dictates: duplicated, reordered, from a second invocation, malformed, unsigned, or not at all."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from dagster_pipes import PIPES_PROTOCOL_VERSION, PIPES_PROTOCOL_VERSION_FIELD, decode_param
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.protocol import Reply, ReplyChannelParams, Trigger, dumps
from dagster_gcf_pipes.shared.signing import sign


def pipes_message(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": method, "params": params}


def opened() -> dict[str, Any]:
    return pipes_message("opened", {"extras": {}})


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
    def __init__(self, project: str, trigger_topic: str):
        self.project = project
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

    def batch(self, invocation: str, seq: int, messages: Sequence[Mapping[str, Any]], secret: str | None = None) -> None:
        assert self.params is not None, "take_trigger() first"
        body = dumps(list(messages), "batch")
        attributes = Reply(self.params.session_id, invocation, seq).attributes()
        self.raw(body, sign(secret, body, attributes) if secret else attributes)

    def heartbeat(self, invocation: str) -> None:
        assert self.params is not None
        self.raw(*Reply(self.params.session_id, invocation, None).encode())

    def raw(self, data: bytes, attributes: Mapping[str, str]) -> str:
        assert self.params is not None
        return self.publisher.publish(self.params.topic, data, **attributes).result(timeout=30)

    def close(self) -> None:
        self.subscriber.delete_subscription(request={"subscription": self.subscription})
        self.subscriber.close()
