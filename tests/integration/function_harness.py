"""Drive the function side in-process, the way Eventarc would: a trigger message built as PipesPubSubClient
builds it, wrapped in a messagePublished CloudEvent, and the replies read back from the real emulator."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

from cloudevents.http import CloudEvent
from dagster_pipes import encode_param
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.session.reassembly import SessionReassembler
from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.layout import session_prefix
from dagster_gcf_pipes.shared.protocol import Reply, ReplyChannelParams, Trigger, new_session_id, subscription_filter
from tests.conftest import PAYLOAD_BUCKET, REPLY_TOPIC


def context_data(asset_key: str = "harness_asset") -> dict[str, Any]:
    return {
        "asset_keys": [asset_key], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
        "partition_key": None, "partition_key_range": None, "partition_time_window": None,
        "run_id": "harness-run", "job_name": "harness", "retry_number": 0, "extras": {},
    }


class FunctionHarness:
    """One session: a test-owned reply subscription and the trigger to feed the entry point."""

    def __init__(self, stack: Any, payload: Mapping[str, Any] | None = None, **channel: Any):
        project = self.project = stack.project
        self.session_id = new_session_id()
        params = ReplyChannelParams(
            topic=f"projects/{project}/topics/{REPLY_TOPIC}", session_id=self.session_id, bucket=PAYLOAD_BUCKET,
            prefix="harness", **{"flush_interval": 0.05, "heartbeat_interval": 1.0, **channel},
        )
        bootstrap = {
            "DAGSTER_PIPES_CONTEXT": encode_param({"data": context_data()}),
            "DAGSTER_PIPES_MESSAGES": encode_param(params.to_params()),
        }
        self.data, self.attributes = Trigger(self.session_id, dict(payload or {}), bootstrap).encode()
        with stack.provisioning():  # the replies are read on the emulator itself: a test's reading is no product path
            self.subscriber = pubsub_v1.SubscriberClient()
        self.subscription = self.subscriber.subscription_path(project, f"harness-{self.session_id}")
        self.subscriber.create_subscription(request={
            "name": self.subscription, "topic": params.topic, "filter": subscription_filter(self.session_id),
        })
        self.warnings: list[str] = []
        self.reassembler = SessionReassembler(self.session_id, warn=self.warnings.append)
        self.invocations: set[str] = set()

    def cloud_event(self, message_id: str = "1", data: bytes | None = None, attributes: Mapping[str, str] | None = None) -> CloudEvent:
        message = {
            "data": base64.b64encode(self.data if data is None else data).decode(),
            "attributes": dict(self.attributes if attributes is None else attributes),
            "messageId": message_id,
        }
        return CloudEvent(
            {"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//pubsub.googleapis.com/test"},
            {"message": message, "subscription": "test"},
        )

    def read_until_closed(self, timeout: float = 20.0) -> list[Mapping[str, Any]]:
        """Pull this session's replies until `closed`; return the reassembled Pipes messages."""
        messages: list[Mapping[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not self.reassembler.closed:
            assert time.monotonic() < deadline, f"no 'closed' within {timeout}s; got {messages}"
            response = self.subscriber.pull(request={"subscription": self.subscription, "max_messages": 100}, timeout=5)
            for received in response.received_messages:
                attributes = dict(received.message.attributes)
                if attributes.get("dagster_pipes_session") != self.session_id:
                    continue
                reply = Reply.decode(received.message.data, attributes)
                self.invocations.add(reply.invocation_id)
                messages.extend(self.reassembler.offer(reply))
            if response.received_messages:
                self.subscriber.acknowledge(request={
                    "subscription": self.subscription, "ack_ids": [r.ack_id for r in response.received_messages],
                })
        return messages

    def close(self) -> None:
        GCSBlobStore(storage.Client(project=self.project), PAYLOAD_BUCKET).delete_prefix(session_prefix("harness", self.session_id))
        self.subscriber.delete_subscription(request={"subscription": self.subscription})
        self.subscriber.close()
