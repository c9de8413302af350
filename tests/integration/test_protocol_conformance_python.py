"""Everything the Python side puts on the wire in real sessions, captured and checked against the protocol's
JSON Schemas (shared/schemas/) and the rules of docs/protocol.md that no schema states.

A spy subscription on the trigger topic and one on the reply topic (no filter) receive a copy of every
message of a session; the lease object is read while the session runs and after it ended. The first test is
a whole Dagster run against a Functions Framework function (prints, logs, a check, custom messages, a
claim-checked reply, extras, a partition, signing on); the second drives the function's Pipes context and
writer directly, so nothing deletes the claim-checked objects before they are read and every method and
metadata type is sent, with an exception chain in ``closed``.
"""

import concurrent.futures
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    DagsterInstance,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.function.cancellation import Cancellation
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext
from dagster_gcf_pipes.function.context_loader import PipesInlineOrGCSContextLoader
from dagster_gcf_pipes.function.message_writer import PubSubMessageWriter
from dagster_gcf_pipes.function.trigger import DecodedParamsLoader
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.layout import lease_key, session_prefix
from dagster_gcf_pipes.shared.protocol import Attr, ReplyChannelParams, new_session_id
from dagster_gcf_pipes.shared.pubsub import publisher_client, subscriber_client
from tests.conftest import PAYLOAD_BUCKET, REPLY_TOPIC
from tests.integration.helpers import make_client
from tests.unit.test_protocol_schemas import decode_param, errors, reply_problems, strict_json, trigger_problems

SECRET = "conformance-secret"
PREFIX = "dagster-pipes"


# ---------------------------------------------------------------------------------------------- capture


class Spy:
    """A subscription of the test's own on ``topic``, read by streaming pull: a copy of everything published
    there. A wiretap, not a party to the session: it reads the emulator itself, beneath the local stack's
    production-semantics layer (no NOT_FOUND window after its creation, no pull races, no hold-backs)."""

    def __init__(self, stack: LocalStack, topic: str):
        with stack.provisioning():
            self._subscriber = subscriber_client()
        self.path = self._subscriber.subscription_path(stack.project, f"spy-{uuid.uuid4().hex[:12]}")
        self._subscriber.create_subscription(request={"name": self.path, "topic": f"projects/{stack.project}/topics/{topic}"})
        self.messages: list[Any] = []
        self._arrived = threading.Condition()
        self._stream = self._subscriber.subscribe(self.path, self._take)

    def _take(self, message: Any) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()
        message.ack()

    def pull_until(self, done: Any, timeout: float = 30.0) -> list[Any]:
        """Wait until ``done(messages)`` holds; the emulator applies no filter: callers select."""
        with self._arrived:
            assert self._arrived.wait_for(lambda: done(list(self.messages)), timeout), (
                f"{self.path}: only {len(self.messages)} messages after {timeout:g}s")
            return list(self.messages)

    def close(self) -> None:
        self._stream.cancel()
        self._subscriber.delete_subscription(request={"subscription": self.path})
        self._subscriber.close()


@pytest.fixture
def spies(stack: LocalStack) -> Iterator[Any]:
    made: list[Spy] = []

    def spy(topic: str) -> Spy:
        made.append(Spy(stack, topic))
        return made[-1]

    yield spy
    for each in made:
        each.close()


def of_session(messages: list[Any], session_id: str) -> list[tuple[bytes, dict[str, str]]]:
    return [(m.data, dict(m.attributes)) for m in messages if m.attributes.get(Attr.SESSION) == session_id]


def complete(replies: list[tuple[bytes, dict[str, str]]], gcs: storage.Client | None) -> bool:
    """Whether every batch up to the one holding ``closed`` arrived (Pub/Sub delivers them in any order)."""
    batches = {int(a[Attr.SEQ]): (data, a) for data, a in replies if a[Attr.KIND] == "batch"}
    last = [seq for seq, (data, a) in batches.items() if b'"method":"closed"' in (body(data, a, gcs) or b"")]
    return bool(last) and set(range(last[0] + 1)) <= set(batches)


def body(data: bytes, attributes: dict[str, str], gcs: storage.Client | None) -> bytes | None:
    """The reply's body: the data, or the claim-checked object; None for a claim when ``gcs`` is None (a whole
    session's objects are deleted when it ends, maybe before the spy reads them)."""
    if attributes.get(Attr.BODY) != "claim":
        return data
    if gcs is None:
        return None
    bucket, key = data.decode()[len("gs://"):].split("/", 1)
    return gcs.bucket(bucket).blob(key).download_as_bytes()


def page_signature(secret: str, body: bytes, attributes: dict[str, str]) -> str:
    """HMAC-SHA256 as docs/protocol.md section 16 describes it, written from the page (not shared/signing.py)."""
    signed = {k: v for k, v in attributes.items()
              if k not in (Attr.SIGNATURE, Attr.BODY) and not k.startswith("googclient_")}
    canonical = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n" + body
    return hmac.new(secret.encode("utf-8"), canonical, hashlib.sha256).hexdigest()


def check_replies(replies: list[tuple[bytes, dict[str, str]]], gcs: storage.Client | None, *, session_id: str, prefix: str,
                  secret: str | None) -> list[dict[str, Any]]:
    """Every reply against the schemas and the page's rules (11.1, 11.2, 15, 16); returns the Pipes messages in
    ``seq`` order (a claim-checked batch left unread, ``gcs`` None, counts as an empty one)."""
    invocations = {attributes[Attr.INVOCATION] for _, attributes in replies}
    assert len(invocations) == 1
    batches: dict[int, list[dict[str, Any]]] = {}
    for data, attributes in replies:
        assert not errors("reply-attributes", attributes), errors("reply-attributes", attributes)
        unwrapped = body(data, attributes, gcs)
        if attributes[Attr.KIND] == "heartbeat":
            assert data == b"" and Attr.SEQ not in attributes and Attr.BODY not in attributes
        elif attributes[Attr.BODY] == "claim":
            pointer = data.decode()
            assert not errors("claim-check-pointer", pointer)
            invocation, seq = attributes[Attr.INVOCATION], attributes[Attr.SEQ]
            assert pointer == f"gs://{PAYLOAD_BUCKET}/{session_prefix(prefix, session_id)}replies/{invocation}/{seq}.json"
        if unwrapped is None:
            batches.setdefault(int(attributes[Attr.SEQ]), [])
            continue
        if secret is not None:
            assert attributes[Attr.SIGNATURE] == page_signature(secret, unwrapped, attributes)
        if attributes[Attr.KIND] == "batch":
            assert not reply_problems(unwrapped, {**attributes, Attr.BODY: "inline"})
            batches.setdefault(int(attributes[Attr.SEQ]), strict_json(unwrapped))  # a duplicate is the same batch
    assert sorted(batches) == list(range(len(batches)))  # seq from 0, no gap
    messages = [message for seq in sorted(batches) for message in batches[seq]]
    assert messages[0]["method"] == "opened" and messages[0]["params"]["extras"]["invocation_id"] in invocations
    assert messages[-1]["method"] == "closed" and [m["method"] for m in messages].count("closed") == 1
    return messages


def check_lease(gcs: storage.Client, prefix: str, session_id: str, state: str) -> dict[str, Any]:
    blob = gcs.bucket(PAYLOAD_BUCKET).get_blob(lease_key(prefix, session_id))
    assert blob is not None and blob.content_type == "application/json"
    record = strict_json(blob.download_as_bytes())
    assert not errors("lease-metadata", dict(blob.metadata)) and not errors("lease", record)
    assert record["state"] == state
    assert {f"dagster_pipes_lease_{k}": str(v) for k, v in record.items()} == dict(blob.metadata)  # one record, twice
    return record


def wait_for_lease(gcs: storage.Client, prefix: str, session_id: str, timeout: float = 30.0) -> None:
    blob = gcs.bucket(PAYLOAD_BUCKET).blob(lease_key(prefix, session_id))
    deadline = time.monotonic() + timeout
    while not blob.exists():
        assert time.monotonic() < deadline, f"no lease for {session_id} within {timeout:g}s"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- a whole session


@pytest.fixture
def signing_function(stack: LocalStack) -> Iterator[str]:
    """The test function, served with the signing secret, on a trigger topic of its own."""
    topic = f"conformance-{uuid.uuid4().hex[:8]}"
    stack.add_function(LocalFunction("tests/functions/main.py", "main", topic, env={"DAGSTER_PIPES_SIGNING_SECRET": SECRET}))
    yield topic
    stack.servers.pop(f"function-{topic}").stop()  # its dispatcher with it
    stack.servers.pop(f"dispatcher-{topic}", None)
    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.delete_subscription(request={"subscription": stack.trigger_subscription(topic)})


PARTITIONS = StaticPartitionsDefinition(["2026-11-01", "2026-11-02"])


def run_conformance_asset(client: PipesPubSubClient, payload: dict[str, Any], extras: dict[str, Any]) -> Any:
    @asset(name="conformance", partitions_def=PARTITIONS, check_specs=[AssetCheckSpec("rows_valid", asset="conformance")])
    def conformance(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        return pipes_pubsub.run(context=context, payload=payload, extras=extras).get_results()

    with DagsterInstance.ephemeral() as instance:
        return materialize([conformance], resources={"pipes_pubsub": client}, instance=instance, partition_key="2026-11-02")


def test_a_whole_session_on_the_wire_validates(stack: LocalStack, spies: Any, signing_function: str) -> None:
    topic = signing_function
    triggers, replies = spies(topic), spies(REPLY_TOPIC)
    gcs = storage.Client(project=stack.project)
    payload = {
        "scenario": "print", "tag": "conformance", "prints": 3, "log_lines": 2, "sleep": 1.5, "n": 7,
        "checks": [{"name": "rows_valid", "passed": True, "severity": "WARN", "metadata": {"bad_rows": 0}}],
        "custom_messages": [{"a": [1, 2.5, None]}, "done"],
        "reply_bytes": 1_100_000,  # a custom message above the inline threshold: a claim-checked batch
    }
    client = make_client(trigger_topic=topic, signing_secret=SECRET, heartbeat_interval=0.5, heartbeat_timeout=5.0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(run_conformance_asset, client, payload, {"region": "eu"})
        (trigger,) = triggers.pull_until(lambda m: len(m) >= 1)
        session_id = trigger.attributes[Attr.SESSION]
        wait_for_lease(gcs, PREFIX, session_id)
        held = check_lease(gcs, PREFIX, session_id, "held")
        captured = replies.pull_until(lambda m: complete(of_session(m, session_id), None))
        result = run.result(timeout=60)
    assert result.success

    # the trigger (section 6)
    data, attributes = trigger.data, dict(trigger.attributes)
    assert attributes[Attr.BODY] == "inline" and not trigger_problems(data, attributes), trigger_problems(data, attributes)
    sent = strict_json(data)
    params = decode_param(sent["DAGSTER_PIPES_MESSAGES"])
    assert set(params) == set(ReplyChannelParams.__dataclass_fields__) and params["signed"] is True
    context_params = decode_param(sent["DAGSTER_PIPES_CONTEXT"])
    assert not errors("context-params", context_params)
    context = context_params["data"]  # Dagster's own context data, as a real step builds it
    assert (context["asset_keys"], context["partition_key"], context["extras"]) == (["conformance"], "2026-11-02", {"region": "eu"})
    assert {k: sent[k] for k in payload} == payload

    # the replies (sections 11, 12, 15, 16) and the lease, held then ended (section 9)
    messages = check_replies(of_session(captured, session_id), None, session_id=session_id, prefix=PREFIX, secret=SECRET)
    methods = {m["method"] for m in messages}
    assert methods == {"opened", "log", "log_external_stream", "report_asset_check", "report_custom_message",
                       "report_asset_materialization", "closed"}  # the claim-checked batch's custom message aside
    assert any(a[Attr.KIND] == "heartbeat" for _, a in of_session(captured, session_id))
    assert any(a.get(Attr.BODY) == "claim" for _, a in of_session(captured, session_id))
    assert held["invocation_id"] == messages[0]["params"]["extras"]["invocation_id"]
    ended = check_lease(gcs, PREFIX, session_id, "ended")
    assert ended["invocation_id"] == held["invocation_id"] and ended["keep_seconds"] == pytest.approx(30.0 + 1260)


# ---------------------------------------------------------------------------------------------- the writer, directly


def test_the_function_writer_sends_every_method_and_metadata_type_valid(stack: LocalStack, spies: Any) -> None:
    gcs = storage.Client(project=stack.project)
    replies = spies(REPLY_TOPIC)
    session_id, prefix = new_session_id(), f"conformance-{uuid.uuid4().hex[:8]}"
    params = ReplyChannelParams(
        topic=f"projects/{stack.project}/topics/{REPLY_TOPIC}", session_id=session_id, bucket=PAYLOAD_BUCKET,
        prefix=prefix, inline_threshold=2000, heartbeat_interval=0.2, max_batch_messages=3,
    ).to_params()
    context = {"asset_keys": ["a/b", "c"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
               "partition_key": None, "partition_key_range": None, "partition_time_window": None, "run_id": "r",
               "job_name": None, "retry_number": 0, "extras": {}}
    writer = PubSubMessageWriter(publisher_client(), lambda bucket: GCSBlobStore(gcs, bucket), signing_secret=SECRET)
    metadata = {
        "text": "t", "url": {"raw_value": "https://example.com", "type": "url"}, "path": {"raw_value": "/p", "type": "path"},
        "notebook": {"raw_value": "n.ipynb", "type": "notebook"}, "json": {"raw_value": {"k": [1]}, "type": "json"},
        "md": {"raw_value": "# h", "type": "md"}, "float": {"raw_value": 3.0, "type": "float"},
        "int": {"raw_value": 3, "type": "int"}, "bool": {"raw_value": True, "type": "bool"},
        "run": {"raw_value": "r", "type": "dagster_run"}, "asset": {"raw_value": "a/b", "type": "asset"},
        "null": {"raw_value": None, "type": "null"}, "timestamp": {"raw_value": 1.5e9, "type": "timestamp"},
        "table": {"raw_value": {"records": [], "schema": []}, "type": "table"},
        "schema": {"raw_value": {"columns": []}, "type": "table_schema"},
        "lineage": {"raw_value": {"deps_by_column": {}}, "type": "table_column_lineage"},
    }
    with pytest.raises(RuntimeError):
        with CloudFunctionPipesContext(DecodedParamsLoader({"data": context}, params), PipesInlineOrGCSContextLoader(gcs),
                                       writer, Cancellation()) as pipes:
            pipes.log.warning("a warning")
            pipes.log_external_stream("stderr", "printed\n")
            pipes.report_asset_materialization(metadata=metadata, data_version="v1", asset_key="a/b")
            pipes.report_asset_check("rows_valid", passed=False, severity="WARN", asset_key="c", metadata={"n": 1})
            pipes.report_custom_message("x" * 5000)  # above inline_threshold: its batch is claim-checked
            time.sleep(2.0)  # quiet: heartbeats (ten intervals: under load a publish before it took most of 0.5 s)
            try:
                raise ValueError("the cause")
            except ValueError as exc:
                raise RuntimeError("the handler failed") from exc

    captured = replies.pull_until(lambda m: complete(of_session(m, session_id), gcs))
    try:
        messages = check_replies(of_session(captured, session_id), gcs, session_id=session_id, prefix=prefix, secret=SECRET)
        assert {m["method"] for m in messages} == {"opened", "log", "log_external_stream", "report_asset_materialization",
                                                  "report_asset_check", "report_custom_message", "closed"}
        exception = messages[-1]["params"]["exception"]
        assert exception["name"] == "RuntimeError" and exception["cause"]["name"] == "ValueError"
        assert not errors("pipes-exception", exception)
        assert any(a.get(Attr.BODY) == "claim" for _, a in of_session(captured, session_id))
        assert any(a[Attr.KIND] == "heartbeat" for _, a in of_session(captured, session_id))
    finally:
        GCSBlobStore(gcs, PAYLOAD_BUCKET).delete_prefix(f"{prefix}/")
