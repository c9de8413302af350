"""The wire protocol's JSON Schemas (shared/schemas/) against the Python side, and both against docs/protocol.md.

* The schemas are valid draft 2020-12, their ``$ref``s resolve, and they cover what the code names: every
  attribute of ``Attr``, every field of the reply channel params (with the same defaults) and of the lease
  record, every Pipes method and metadata type of dagster-pipes, the params Dagster's handlers take.
* What the Python side SENDS validates: triggers built by the orchestrator's code (channel params, context
  injector, ``Trigger.encode``, ``ClaimCheck.wrap``), replies by ``Reply``/``sign``, leases by the function's
  claim and the orchestrator's end, on fake-gcs-server. (Whole sessions, captured off Pub/Sub: the
  integration test ``test_protocol_conformance_python.py``.)
* What the Python side ACCEPTS agrees: every instance of a catalogue the schemas refuse is refused by the
  Python receiver too (``ProtocolError``, ``MalformedLease``, ``ValueError`` for a push body); instances
  generated from the schemas' valid space decode; and the leniencies docs/protocol.md lists (section 19) are
  exactly where the Python receivers accept more.
"""

from __future__ import annotations

import base64
import datetime
import inspect
import json
import re
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, get_args

import dagster_pipes
import pytest
from dagster._core.pipes.context import PipesMessageHandler
from google.cloud import storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from dagster_gcf_pipes.function.entrypoint import pubsub_message_from_push_body
from dagster_gcf_pipes.function.lease import Claim, claim_lease
from dagster_gcf_pipes.function.trigger import read_trigger
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.client.resolution import ResolvedCall
from dagster_gcf_pipes.orchestrator.client.session_lifecycle import SessionLifecycle
from dagster_gcf_pipes.orchestrator.session.context_injectors import PipesPubSubContextInjector
from dagster_gcf_pipes.orchestrator.session.end import end_lease
from dagster_gcf_pipes.orchestrator.session.message_reader import decode_reply
from dagster_gcf_pipes.shared.claim_check import MAX_INLINE_THRESHOLD, ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.layout import context_key, lease_key, session_prefix, trigger_key
from dagster_gcf_pipes.shared.lease import LeaseRecord, MalformedLease, read_lease
from dagster_gcf_pipes.shared.protocol import (
    BOOTSTRAP_KEYS,
    Attr,
    ProtocolError,
    Reply,
    ReplyChannelParams,
    Trigger,
    new_session_id,
)
from dagster_gcf_pipes.shared.schemas import SCHEMA_BASE, all_schemas, load_schema, schema_names
from dagster_gcf_pipes.shared.signing import sign
from tests.conftest import PAYLOAD_BUCKET

#: the function's readers make their Cloud Storage client from the environment the stack sets, even for an inline trigger
pytestmark = pytest.mark.usefixtures("stack")

PAGE = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
REGISTRY: Registry = Registry().with_resources((i, Resource.from_contents(s)) for i, s in all_schemas().items())
#: the sessions these tests make live apart from the client's own (other tests check dagster-pipes/ for leftovers)
PREFIX = "test-protocol-schemas"


def errors(schema: str, instance: Any) -> list[str]:
    validator = Draft202012Validator(load_schema(schema), registry=REGISTRY)
    return [f"{schema}: {'/'.join(map(str, e.absolute_path))}: {e.message[:160]}" for e in validator.iter_errors(instance)]


def strict_json(data: bytes) -> Any:
    """RFC 8259 JSON, as the page requires of every sender: no NaN or Infinity, no duplicate keys."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys in {keys}")
        return dict(pairs)

    return json.loads(data.decode("utf-8"), parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)


def encode_param(value: Any) -> str:
    """What dagster-pipes' ``encode_param`` writes (the orchestrator's bootstrap params): base64(zlib(JSON))."""
    return dagster_pipes.encode_param(value)


def decode_param(text: str) -> Any:
    return strict_json(zlib.decompress(base64.b64decode(text, validate=True)))


# ---------------------------------------------------------------------------------------------- the oracles
# What the schemas, plus the rules the page marks "not in the schema", say of a whole message.


def trigger_problems(data: bytes, attributes: Mapping[str, str]) -> list[str]:
    """An inline trigger judged by the schemas and the page (section 6)."""
    problems = errors("trigger-attributes", dict(attributes))
    try:
        obj = strict_json(data)
    except ValueError as exc:
        return [*problems, f"data: {exc}"]
    problems += errors("trigger-data", obj)
    if problems:
        return problems
    decoded: dict[str, Any] = {}
    for key, schema in (("DAGSTER_PIPES_CONTEXT", "context-params"), ("DAGSTER_PIPES_MESSAGES", "reply-channel-params")):
        try:
            decoded[key] = decode_param(obj[key])
        except (ValueError, zlib.error) as exc:
            problems.append(f"{key}: not base64(zlib(JSON)): {exc}")
            continue
        problems += errors(schema, decoded[key])
    messages = decoded.get("DAGSTER_PIPES_MESSAGES")
    if not problems and messages["session_id"] != attributes[Attr.SESSION]:
        problems.append("session_id differs from the attribute (page 6.4)")
    return problems


def reply_problems(data: bytes, attributes: Mapping[str, str]) -> list[str]:
    """An inline reply judged by the schemas and the page (section 11)."""
    problems = errors("reply-attributes", dict(attributes))
    if attributes.get(Attr.KIND) != "batch":
        return problems
    try:
        batch = strict_json(data)
    except ValueError as exc:
        return [*problems, f"data: {exc}"]
    return problems + errors("reply-batch", batch)


def refuses(call: Callable[[], Any], *errors_: type[BaseException]) -> bool:
    try:
        call()
    except errors_:
        return True
    return False


class _NoStore:
    """The reader's store for inline replies: never asked for anything."""

    def put(self, key: str, data: bytes) -> str:
        raise AssertionError("an inline reply touched the store")

    def get(self, url: str, max_bytes: int) -> bytes:
        raise AssertionError("an inline reply touched the store")


_NO_STORE = _NoStore()


# ---------------------------------------------------------------------------------------------- valid instances

hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | texts
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=12)
json_objects = st.dictionaries(texts, json_values, max_size=4)
seconds = st.integers(0, 10**9) | st.floats(0, 1e9)
positive_seconds = st.integers(1, 10**6) | st.floats(1e-3, 1e6)

METADATA_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **{t: texts for t in ("text", "url", "path", "notebook", "md", "dagster_run", "asset")},
    "int": st.integers(-(2**53), 2**53), "float": finite, "timestamp": finite, "bool": st.booleans(), "null": st.none(),
    "json": json_values, "__infer__": json_values,
    **{t: json_objects for t in ("table", "table_schema", "table_column_lineage")},
}
metadata = st.none() | st.dictionaries(texts, st.sampled_from(sorted(METADATA_VALUES)).flatmap(
    lambda t: METADATA_VALUES[t].map(lambda v: {"raw_value": v, "type": t})), max_size=3)


def _message(method: str, params: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return params.map(lambda p: {"__dagster_pipes_version": "0.1", "method": method, "params": p})


exceptions = st.deferred(lambda: st.fixed_dictionaries({
    "message": texts, "stack": st.lists(texts, max_size=3), "name": st.none() | texts,
    "cause": st.none() | exceptions, "context": st.none() | exceptions,
}))
pipes_messages = st.one_of(
    _message("opened", st.fixed_dictionaries({"extras": st.fixed_dictionaries({"invocation_id": hex32}, optional={"trace_id": hex32})})),
    _message("closed", st.fixed_dictionaries({}, optional={"exception": exceptions})),
    _message("log", st.fixed_dictionaries({"message": texts, "level": st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])})),
    _message("log_external_stream", st.fixed_dictionaries({"stream": st.sampled_from(["stdout", "stderr"]), "text": texts, "extras": json_objects})),
    _message("report_asset_materialization", st.fixed_dictionaries({"asset_key": texts, "data_version": st.none() | texts, "metadata": metadata})),
    _message("report_asset_check", st.fixed_dictionaries({
        "asset_key": texts, "check_name": texts, "passed": st.booleans(), "severity": st.sampled_from(["WARN", "ERROR"]), "metadata": metadata})),
    _message("report_custom_message", st.fixed_dictionaries({"payload": json_values})),
)
invocation_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
seqs = st.integers(0, 10**15 - 1).map(str)


@st.composite
def replies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    attributes = {Attr.SESSION: draw(hex32), Attr.VERSION: "1", Attr.INVOCATION: draw(invocation_ids)}
    if draw(st.booleans()):
        return b"", {**attributes, Attr.KIND: "heartbeat"}
    attributes.update({Attr.KIND: "batch", Attr.SEQ: draw(seqs)})
    if draw(st.booleans()):
        attributes[Attr.BODY] = "inline"
    return json.dumps(draw(st.lists(pipes_messages, min_size=1, max_size=4))).encode(), attributes


context_data = st.fixed_dictionaries({
    "asset_keys": st.none() | st.lists(texts, max_size=2),
    "code_version_by_asset_key": st.none() | st.dictionaries(texts, st.none() | texts, max_size=2),
    "provenance_by_asset_key": st.none() | st.dictionaries(texts, st.none(), max_size=2),
    "partition_key": st.none() | texts,
    "partition_key_range": st.none() | st.fixed_dictionaries({"start": texts, "end": texts}),
    "partition_time_window": st.none() | st.fixed_dictionaries({"start": texts, "end": texts}),
    "run_id": texts, "job_name": st.none() | texts, "retry_number": st.integers(0, 10), "extras": json_objects,
})
context_params = context_data.map(lambda d: {"data": d}) | st.fixed_dictionaries(
    {"bucket": texts.filter(bool), "key": texts.filter(bool)})
OPTIONAL_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "chunk_interval": seconds, "inline_threshold": st.integers(0, MAX_INLINE_THRESHOLD), "flush_interval": seconds,
    "heartbeat_interval": positive_seconds, "max_batch_messages": st.integers(1, 10**6),
    "max_batch_bytes": st.integers(1, 10**9), "publish_timeout": positive_seconds, "lease_seconds": positive_seconds,
    "function_timeout": st.none() | seconds, "start_window": st.none() | seconds, "signed": st.booleans(),
    "issued_at": st.none() | seconds,
}


@st.composite
def channel_params(draw: st.DrawFn, session_id: str) -> dict[str, Any]:
    params = draw(st.fixed_dictionaries({"session_id": st.just(session_id), "bucket": texts, "prefix": texts},
                                        optional=OPTIONAL_PARAMS))
    channel = draw(st.sampled_from([None, "pubsub", "gcs"]))
    if channel is not None:
        params["channel"] = channel
    params["topic"] = "" if channel == "gcs" else draw(texts)
    if channel == "gcs":
        params["key_prefix"] = draw(texts)
    unknown = draw(st.dictionaries(st.text("xyz_", min_size=1, max_size=8), json_values, max_size=2))
    return {**unknown, **params}  # keys of a newer orchestrator: ignored


@st.composite
def triggers(draw: st.DrawFn) -> tuple[bytes, dict[str, str], dict[str, Any], dict[str, Any]]:
    session_id = draw(hex32)
    payload = draw(st.dictionaries(texts.filter(lambda k: k not in BOOTSTRAP_KEYS), json_values, max_size=4))
    params = draw(channel_params(session_id))
    bootstrap = {"DAGSTER_PIPES_CONTEXT": encode_param(draw(context_params)), "DAGSTER_PIPES_MESSAGES": encode_param(params)}
    attributes = {Attr.SESSION: session_id, Attr.VERSION: "1", **draw(st.sampled_from([{}, {Attr.BODY: "inline"}]))}
    return json.dumps({**payload, **bootstrap}).encode(), attributes, payload, params


# ---------------------------------------------------------------------------------------------- the schemas themselves


def test_every_schema_is_valid_draft_2020_12_with_its_id_and_resolvable_refs() -> None:
    assert len(schema_names()) >= 20
    for name in schema_names():
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$id"] == SCHEMA_BASE + name
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        resolver = REGISTRY.resolver(base_uri=schema["$id"])
        for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema)):
            resolver.lookup(ref)  # raises for a $ref that names nothing


def test_the_page_names_every_schema_file_and_every_attribute_and_each_is_in_a_schema() -> None:
    for name in schema_names():
        assert f"`{name}`" in PAGE, f"docs/protocol.md does not name {name}"
    attribute_names = [v for k, v in vars(Attr).items() if k.isupper()]
    assert len(attribute_names) == 7
    in_schemas = {key for name in ("trigger-attributes", "reply-attributes") for key in load_schema(name)["properties"]}
    for attribute in attribute_names:
        assert f"`{attribute}`" in PAGE, f"docs/protocol.md does not name the attribute {attribute}"
        assert attribute in in_schemas, f"no schema describes the attribute {attribute}"


def test_the_channel_params_schema_and_page_have_every_field_with_the_dataclass_defaults() -> None:
    schema = load_schema("reply-channel-params")
    fields = ReplyChannelParams.__dataclass_fields__
    assert set(schema["properties"]) == set(fields)
    for name, spec in fields.items():
        assert re.search(rf"^\| `{name}` \|", PAGE, re.M), f"the page's channel params table lacks {name}"
        if "default" in schema["properties"][name]:
            assert schema["properties"][name]["default"] == spec.default, name
    assert {n for n, p in schema["properties"].items() if "default" not in p} == set(schema["required"])
    assert schema["properties"]["inline_threshold"]["maximum"] == MAX_INLINE_THRESHOLD


def test_the_lease_schemas_and_page_have_every_field_of_the_record() -> None:
    fields = list(LeaseRecord.__dataclass_fields__)
    assert set(load_schema("lease")["properties"]) == set(fields)
    assert set(load_schema("lease-metadata")["properties"]) == set(LeaseRecord("held").metadata())
    for name, key in zip(fields, LeaseRecord("held").metadata()):
        assert f"`{name}` | `{key}`" in PAGE


def test_one_schema_per_dagster_pipes_method_and_the_metadata_types_and_exception_are_dagster_pipes_own() -> None:
    methods = set(get_args(dagster_pipes.Method))
    assert {n.removeprefix("pipes-message-").removesuffix(".json") for n in schema_names() if n.startswith("pipes-message-")} == methods
    assert {ref["$ref"].removeprefix("pipes-message-").removesuffix(".json") for ref in load_schema("pipes-message")["oneOf"]} == methods
    for method in methods:
        assert f"| `{method}` |" in PAGE
    metadata_types = load_schema("pipes-metadata")["$defs"]["value"]["properties"]["type"]["enum"]
    assert set(metadata_types) == set(get_args(dagster_pipes.PipesMetadataType))
    assert set(load_schema("pipes-exception")["required"]) == set(dagster_pipes.PipesException.__annotations__)
    assert set(load_schema("context-data")["required"]) == set(dagster_pipes.PipesContextData.__annotations__)


@pytest.mark.parametrize("method, handler", [
    ("log", "_handle_log"),
    ("log_external_stream", "_handle_log_external_stream"),
    ("report_asset_materialization", "_handle_report_asset_materialization"),
    ("report_asset_check", "_handle_report_asset_check"),
    ("report_custom_message", "_handle_extra_message"),
])
def test_each_methods_params_are_what_dagsters_handler_takes(method: str, handler: str) -> None:
    """Dagster calls ``handler(**params)``: a required param is one without a default (a writer MAY send more
    of the optional ones), and no other member is taken (``additionalProperties: false``)."""
    parameters = list(inspect.signature(getattr(PipesMessageHandler, handler)).parameters.values())[1:]
    params = load_schema(f"pipes-message-{method}")["properties"]["params"]
    assert set(params["properties"]) == {p.name for p in parameters}
    assert {p.name for p in parameters if p.default is inspect.Parameter.empty} <= set(params["required"])
    assert params["additionalProperties"] is False and not any(p.kind is p.VAR_KEYWORD for p in parameters)


# ---------------------------------------------------------------------------------------------- what Python sends


@pytest.fixture(scope="module")
def gcs(stack: Any) -> Iterator[storage.Client]:
    client = storage.Client(project=stack.project)
    yield client
    GCSBlobStore(client, PAYLOAD_BUCKET).delete_prefix(f"{PREFIX}/")


def _resolved(gcs: storage.Client) -> ResolvedCall:
    return ResolvedCall(project="p", publisher=None, gcs=gcs, http=None, trigger_topic="projects/p/topics/t",
                        reply_channel="pubsub", reply_topics=("projects/p/topics/replies",), function_timeout=540.0,
                        heartbeat_timeout=60.0)


@given(context=context_data, payload=st.dictionaries(texts.filter(lambda k: k not in BOOTSTRAP_KEYS), json_values, max_size=3),
       threshold=st.sampled_from([0, 200, 1_000_000]), signing=st.booleans())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_triggers_the_orchestrator_builds_validate_and_the_function_reads_them(
    gcs: storage.Client, context: dict[str, Any], payload: dict[str, Any], threshold: int, signing: bool
) -> None:
    """The orchestrator's own pieces, end to end: channel params, the context injector (inline or the
    context.json object), ``Trigger.encode`` and ``ClaimCheck.wrap`` (inline or the trigger.json object)."""
    client = PipesPubSubClient(trigger_topic="t", reply_topic="replies", bucket=PAYLOAD_BUCKET, prefix=PREFIX,
                               inline_threshold_bytes=threshold, signing_secret="s" if signing else None)
    session_id = new_session_id()
    store = GCSBlobStore(gcs, PAYLOAD_BUCKET)
    params = SessionLifecycle(client).session_params(_resolved(gcs), session_id, "projects/p/topics/replies").to_params()
    injector = PipesPubSubContextInjector(blob_store=store, key=context_key(PREFIX, session_id), inline_threshold=threshold)
    with injector.inject_context(context) as context_params:  # type: ignore[arg-type]
        bootstrap = {"DAGSTER_PIPES_CONTEXT": encode_param(context_params), "DAGSTER_PIPES_MESSAGES": encode_param(params)}
    body, attributes = Trigger(session_id, payload, bootstrap).encode()
    data, codec = ClaimCheck(store, threshold).wrap(body, trigger_key(PREFIX, session_id))
    attributes = {**attributes, **codec}

    assert not errors("trigger-attributes", attributes)
    assert set(params) == set(load_schema("reply-channel-params")["properties"])  # every field, every time
    assert not errors("reply-channel-params", params)
    assert not errors("context-params", context_params)
    if codec[Attr.BODY] == "claim":
        assert not errors("claim-check-pointer", data.decode())
        assert data.decode() == f"gs://{PAYLOAD_BUCKET}/{session_prefix(PREFIX, session_id)}trigger.json"
    assert not trigger_problems(body, attributes)
    if "key" in context_params:
        assert not errors("context-data", strict_json(gcs.bucket(PAYLOAD_BUCKET).blob(context_params["key"]).download_as_bytes()))
    read = read_trigger(data, attributes)
    assert (read.trigger.payload, read.settings.to_params()) == (payload, params)


@given(reply=replies(), secret=st.none() | texts.filter(bool))
def test_replies_the_writers_code_builds_validate(reply: tuple[bytes, dict[str, str]], secret: str | None) -> None:
    data, attributes = reply
    messages = json.loads(data) if data else ()
    seq = None if attributes[Attr.KIND] == "heartbeat" else int(attributes[Attr.SEQ])
    body, built = Reply(attributes[Attr.SESSION], attributes[Attr.INVOCATION], seq, messages).encode()
    if secret:
        built = sign(secret, body, built)
    assert not reply_problems(body, built), reply_problems(body, built)


def test_leases_as_the_function_claims_and_the_orchestrator_ends_them_validate(gcs: storage.Client) -> None:
    bucket = gcs.bucket(PAYLOAD_BUCKET)

    def record(session_id: str) -> tuple[dict[str, str], Any]:
        blob = bucket.get_blob(lease_key(PREFIX, session_id))
        return dict(blob.metadata), strict_json(blob.download_as_bytes())

    held, never_claimed = new_session_id(), new_session_id()
    assert claim_lease(gcs, PAYLOAD_BUCKET, lease_key(PREFIX, held), uuid.uuid4().hex, 600.0) is Claim.CLAIMED
    metadata, body = record(held)
    assert not errors("lease-metadata", metadata) and not errors("lease", body) and body["state"] == "held"

    end_lease(gcs, PAYLOAD_BUCKET, PREFIX, held, start_window=120.0, reason="the session closed")
    end_lease(gcs, PAYLOAD_BUCKET, PREFIX, never_claimed, start_window=120.0, reason="terminated before it started")
    for session_id in (held, never_claimed):
        metadata, body = record(session_id)
        assert not errors("lease-metadata", metadata) and not errors("lease", body) and body["state"] == "ended"
    assert record(never_claimed)[1]["invocation_id"] == ""

    taken_over = new_session_id()
    claim_lease(gcs, PAYLOAD_BUCKET, lease_key(PREFIX, taken_over), "first", 0.001)
    assert claim_lease(gcs, PAYLOAD_BUCKET, lease_key(PREFIX, taken_over), "second", 600.0) is Claim.CLAIMED
    metadata, body = record(taken_over)
    assert not errors("lease-metadata", metadata) and not errors("lease", body) and body["invocation_id"] == "second"


def test_claim_checked_reply_pointers_validate(gcs: storage.Client) -> None:
    session_id = new_session_id()
    key = f"{session_prefix(PREFIX, session_id)}replies/{uuid.uuid4().hex}/0.json"
    data, codec = ClaimCheck(GCSBlobStore(gcs, PAYLOAD_BUCKET), 10).wrap(b'[{"method": "log"}]' * 2, key)
    assert codec == {Attr.BODY: "claim"}
    assert not errors("claim-check-pointer", data.decode())


# ---------------------------------------------------------------------------------------------- what Python accepts


@given(trigger=triggers())
@settings(max_examples=150, deadline=None)
def test_triggers_valid_by_the_schemas_are_read_by_the_function(trigger: tuple[bytes, dict[str, str], dict[str, Any], dict[str, Any]]) -> None:
    data, attributes, payload, params = trigger
    assert not trigger_problems(data, attributes)  # the strategy makes only valid triggers
    read = read_trigger(data, attributes)
    assert read.trigger.payload == payload
    assert {k: v for k, v in read.settings.to_params().items() if k in params} == {
        k: v for k, v in params.items() if k in ReplyChannelParams.__dataclass_fields__}


@given(reply=replies())
@settings(max_examples=150, deadline=None)
def test_replies_valid_by_the_schemas_are_decoded_by_the_reader(reply: tuple[bytes, dict[str, str]]) -> None:
    data, attributes = reply
    assert not reply_problems(data, attributes)
    decoded = decode_reply(data, attributes, ClaimCheck(_NO_STORE), None, bucket=PAYLOAD_BUCKET, prefix=PREFIX)
    assert list(decoded.messages) == (json.loads(data) if data else [])



lease_numbers = st.just(0.0) | st.floats(1e-6, 1e15) | st.integers(0, 10**15).map(float)


@given(state=st.sampled_from(["held", "ended"]), invocation=hex32, expires=lease_numbers, keep=lease_numbers, reason=texts,
       extra=st.dictionaries(st.text("abc", min_size=1, max_size=5), texts, max_size=2))
def test_lease_metadata_valid_by_the_schema_is_read_with_its_values(
    state: str, invocation: str, expires: float, keep: float, reason: str, extra: dict[str, str]
) -> None:
    metadata = {**extra, **LeaseRecord(state, invocation, expires, reason, keep).metadata()}
    assert not errors("lease-metadata", metadata)
    assert LeaseRecord.from_metadata(metadata) == LeaseRecord(state, invocation, expires, reason, keep)


@given(data=st.binary(max_size=64), attributes=st.dictionaries(texts, texts, max_size=3), message_id=texts,
       published=st.datetimes(datetime.datetime(1970, 1, 2), datetime.datetime(9999, 1, 1), timezones=st.just(datetime.timezone.utc)))
def test_cloudevent_data_valid_by_the_schema_is_read_by_the_entry_point(
    data: bytes, attributes: dict[str, str], message_id: str, published: Any
) -> None:
    stamp = published.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = {"message": {"data": base64.b64encode(data).decode(), "attributes": attributes, "messageId": message_id,
                        "publishTime": stamp, "message_id": message_id, "publish_time": stamp},
            "subscription": "projects/p/subscriptions/s"}
    assert not errors("cloudevent-data", body)
    pushed = pubsub_message_from_push_body(body)
    assert (pushed.data, pushed.attributes, pushed.message_id) == (data, attributes, message_id)
    assert pushed.publish_time == pytest.approx(published.timestamp())


# ---------------------------------------------------------------------------------------------- what Python refuses

SESSION = "0123456789abcdef" * 2
GOOD_PARAMS = {"topic": "projects/p/topics/r", "session_id": SESSION, "bucket": PAYLOAD_BUCKET, "prefix": PREFIX}
GOOD_CONTEXT = {"bucket": PAYLOAD_BUCKET, "key": "k"}
GOOD_ATTRIBUTES = {Attr.SESSION: SESSION, Attr.VERSION: "1", Attr.BODY: "inline"}


def _trigger(payload: Any = None, *, context: Any = GOOD_CONTEXT, params: Any = GOOD_PARAMS, raw: Mapping[str, Any] | None = None) -> bytes:
    bootstrap = raw if raw is not None else {"DAGSTER_PIPES_CONTEXT": encode_param(context), "DAGSTER_PIPES_MESSAGES": encode_param(params)}
    return json.dumps({**(payload or {}), **bootstrap}).encode()


def _bad_zlib() -> str:
    return base64.b64encode(b"not zlib").decode()


def _zlib_of(text: bytes) -> str:
    return base64.b64encode(zlib.compress(text)).decode()


INVALID_TRIGGERS: dict[str, tuple[bytes, dict[str, str]]] = {
    "no session attribute": (_trigger(), {Attr.VERSION: "1"}),
    "session in upper case": (_trigger(), {**GOOD_ATTRIBUTES, Attr.SESSION: SESSION.upper()}),
    "session of 31 digits": (_trigger(), {**GOOD_ATTRIBUTES, Attr.SESSION: SESSION[:31]}),
    "version 2": (_trigger(), {**GOOD_ATTRIBUTES, Attr.VERSION: "2"}),
    "no version": (_trigger(), {Attr.SESSION: SESSION}),
    "unknown body encoding": (_trigger(), {**GOOD_ATTRIBUTES, Attr.BODY: "zip"}),
    "data not JSON": (b"{", GOOD_ATTRIBUTES),
    "data a list": (b"[]", GOOD_ATTRIBUTES),
    "no DAGSTER_PIPES_CONTEXT": (_trigger(raw={"DAGSTER_PIPES_MESSAGES": encode_param(GOOD_PARAMS)}), GOOD_ATTRIBUTES),
    "a param not a string": (_trigger(raw={"DAGSTER_PIPES_CONTEXT": 1, "DAGSTER_PIPES_MESSAGES": encode_param(GOOD_PARAMS)}), GOOD_ATTRIBUTES),
    "a param not base64": (_trigger(raw={"DAGSTER_PIPES_CONTEXT": "!!!!", "DAGSTER_PIPES_MESSAGES": encode_param(GOOD_PARAMS)}), GOOD_ATTRIBUTES),
    "a param not zlib": (_trigger(raw={"DAGSTER_PIPES_CONTEXT": _bad_zlib(), "DAGSTER_PIPES_MESSAGES": encode_param(GOOD_PARAMS)}), GOOD_ATTRIBUTES),
    "a param not JSON": (_trigger(raw={"DAGSTER_PIPES_CONTEXT": _zlib_of(b"{"), "DAGSTER_PIPES_MESSAGES": encode_param(GOOD_PARAMS)}), GOOD_ATTRIBUTES),
    "channel params a list": (_trigger(params=[GOOD_PARAMS]), GOOD_ATTRIBUTES),
    "no bucket": (_trigger(params={k: v for k, v in GOOD_PARAMS.items() if k != "bucket"}), GOOD_ATTRIBUTES),
    "pubsub without topic": (_trigger(params={k: v for k, v in GOOD_PARAMS.items() if k != "topic"}), GOOD_ATTRIBUTES),
    "gcs without key_prefix": (_trigger(params={**GOOD_PARAMS, "channel": "gcs"} | {"topic": ""}), GOOD_ATTRIBUTES),
    "unknown channel": (_trigger(params={**GOOD_PARAMS, "channel": "sqs"}), GOOD_ATTRIBUTES),
    "session_id differs": (_trigger(params={**GOOD_PARAMS, "session_id": "f" * 32}), GOOD_ATTRIBUTES),
    "heartbeat_interval 0": (_trigger(params={**GOOD_PARAMS, "heartbeat_interval": 0}), GOOD_ATTRIBUTES),
    "heartbeat_interval a string": (_trigger(params={**GOOD_PARAMS, "heartbeat_interval": "10"}), GOOD_ATTRIBUTES),
    "max_batch_messages 1.5": (_trigger(params={**GOOD_PARAMS, "max_batch_messages": 1.5}), GOOD_ATTRIBUTES),
    "max_batch_bytes true": (_trigger(params={**GOOD_PARAMS, "max_batch_bytes": True}), GOOD_ATTRIBUTES),
    "inline_threshold above 4 MiB - 64 KiB": (_trigger(params={**GOOD_PARAMS, "inline_threshold": MAX_INLINE_THRESHOLD + 1}), GOOD_ATTRIBUTES),
    "start_window a string": (_trigger(params={**GOOD_PARAMS, "start_window": "x"}), GOOD_ATTRIBUTES),
    "function_timeout negative": (_trigger(params={**GOOD_PARAMS, "function_timeout": -1}), GOOD_ATTRIBUTES),
    "signed a string": (_trigger(params={**GOOD_PARAMS, "signed": "yes"}), GOOD_ATTRIBUTES),
    "issued_at a string": (_trigger(params={**GOOD_PARAMS, "issued_at": "now"}), GOOD_ATTRIBUTES),
    "bucket null": (_trigger(params={**GOOD_PARAMS, "bucket": None}), GOOD_ATTRIBUTES),
    "context a path": (_trigger(context={"path": "/tmp/context.json"}), GOOD_ATTRIBUTES),
    "context data a list": (_trigger(context={"data": []}), GOOD_ATTRIBUTES),
    "context bucket without key": (_trigger(context={"bucket": PAYLOAD_BUCKET}), GOOD_ATTRIBUTES),
    "context key a number": (_trigger(context={"bucket": PAYLOAD_BUCKET, "key": 1}), GOOD_ATTRIBUTES),
}


@pytest.mark.parametrize("case", sorted(INVALID_TRIGGERS))
def test_triggers_the_schemas_refuse_the_function_refuses(case: str) -> None:
    data, attributes = INVALID_TRIGGERS[case]
    assert trigger_problems(data, attributes), f"the schemas accept {case}"
    with pytest.raises(ProtocolError):
        read_trigger(data, attributes)


REPLY = {Attr.SESSION: SESSION, Attr.VERSION: "1", Attr.INVOCATION: "a" * 32, Attr.KIND: "batch", Attr.SEQ: "0"}
BATCH = b'[{"__dagster_pipes_version":"0.1","method":"log","params":{"message":"m","level":"INFO"}}]'
INVALID_REPLIES: dict[str, tuple[bytes, dict[str, str]]] = {
    "no session": (BATCH, {k: v for k, v in REPLY.items() if k != Attr.SESSION}),
    "session not hex": (BATCH, {**REPLY, Attr.SESSION: "x" * 32}),
    "version 2": (BATCH, {**REPLY, Attr.VERSION: "2"}),
    "no invocation": (BATCH, {k: v for k, v in REPLY.items() if k != Attr.INVOCATION}),
    "empty invocation": (BATCH, {**REPLY, Attr.INVOCATION: ""}),
    "unknown kind": (BATCH, {**REPLY, Attr.KIND: "ping"}),
    "no kind": (BATCH, {k: v for k, v in REPLY.items() if k != Attr.KIND}),
    "batch without seq": (BATCH, {k: v for k, v in REPLY.items() if k != Attr.SEQ}),
    "seq negative": (BATCH, {**REPLY, Attr.SEQ: "-1"}),
    "seq with a fraction": (BATCH, {**REPLY, Attr.SEQ: "1.0"}),
    "seq in Arabic-Indic digits": (BATCH, {**REPLY, Attr.SEQ: "\u0663"}),
    "seq of 16 digits": (BATCH, {**REPLY, Attr.SEQ: "1" * 16}),
    "unknown body encoding": (BATCH, {**REPLY, Attr.BODY: "zip"}),
    "data not JSON": (b"[", REPLY),
    "data not UTF-8": (b"\xff", REPLY),
    "data an object": (b'{"method": "log"}', REPLY),
    "a message not an object": (b'["log"]', REPLY),
    "a message without method": (b'[{"params": {}}]', REPLY),
    "a method not a string": (b'[{"method": 1, "params": {}}]', REPLY),
}


@pytest.mark.parametrize("case", sorted(INVALID_REPLIES))
def test_replies_the_schemas_refuse_the_reader_refuses(case: str) -> None:
    data, attributes = INVALID_REPLIES[case]
    assert reply_problems(data, attributes), f"the schemas accept {case}"
    with pytest.raises(ProtocolError):
        decode_reply(data, attributes, ClaimCheck(_NO_STORE), None, bucket=PAYLOAD_BUCKET, prefix=PREFIX)


FOLDER = f"gs://{PAYLOAD_BUCKET}/{session_prefix(PREFIX, SESSION)}"
INVALID_POINTERS = {
    "not gs": "https://storage.googleapis.com/b/k",
    "no key": f"gs://{PAYLOAD_BUCKET}",
    "no bucket": "gs:///k",
    "empty key": f"gs://{PAYLOAD_BUCKET}/",
    "bucket in upper case": "gs://Bad_Bucket/k",
    "bucket name invalid": "gs://bucket!/k",
}


@pytest.mark.parametrize("case", sorted(INVALID_POINTERS))
def test_pointers_the_schema_refuses_the_reader_refuses(case: str) -> None:
    pointer = INVALID_POINTERS[case]
    assert errors("claim-check-pointer", pointer)
    attributes = {**REPLY, Attr.BODY: "claim"}
    with pytest.raises(ProtocolError):
        decode_reply(pointer.encode(), attributes, ClaimCheck(_NO_STORE), None, bucket=PAYLOAD_BUCKET, prefix=PREFIX)


@pytest.mark.parametrize("case", ["no bucket", "empty key", "bucket name invalid"])
def test_trigger_pointers_the_schema_refuses_the_function_refuses(case: str) -> None:
    with pytest.raises(ProtocolError):
        read_trigger(INVALID_POINTERS[case].encode(), {**GOOD_ATTRIBUTES, Attr.BODY: "claim"})


INVALID_LEASE_METADATA: dict[str, dict[str, str]] = {
    "state unknown": {"dagster_pipes_lease_state": "running"},
    "expires_at a word": {"dagster_pipes_lease_state": "held", "dagster_pipes_lease_expires_at": "soon"},
    "expires_at negative": {"dagster_pipes_lease_state": "held", "dagster_pipes_lease_expires_at": "-1"},
    "expires_at infinite": {"dagster_pipes_lease_state": "held", "dagster_pipes_lease_expires_at": "inf"},
    "keep_seconds not a number": {"dagster_pipes_lease_state": "ended", "dagster_pipes_lease_keep_seconds": "nan"},
    "no state": {"dagster_pipes_lease_invocation_id": "x"},
}


@pytest.mark.parametrize("case", sorted(INVALID_LEASE_METADATA))
def test_lease_metadata_the_schema_refuses_is_not_a_lease_to_python(case: str) -> None:
    """Not a lease (None) or a malformed one (``MalformedLease``): ``read_lease`` counts either as ended."""
    metadata = INVALID_LEASE_METADATA[case]
    assert errors("lease-metadata", metadata)
    assert refuses(lambda: LeaseRecord.from_metadata(metadata), MalformedLease) or LeaseRecord.from_metadata(metadata) is None
    blob = storage.Blob("leases/x", bucket=None)  # type: ignore[arg-type]
    blob.metadata = metadata
    lease = read_lease(blob)
    assert lease.ended and lease.reason.startswith("unreadable lease object")


INVALID_PUSH_BODIES: dict[str, Any] = {
    "no message": {"subscription": "s"},
    "message a list": {"message": []},
    "data a number": {"message": {"data": 1}},
    "data not base64": {"message": {"data": "***"}},
    "data without padding": {"message": {"data": "YQ"}},
    "an attribute not a string": {"message": {"data": "", "attributes": {"a": 1}}},
    "not an object": [],
}


@pytest.mark.parametrize("case", sorted(INVALID_PUSH_BODIES))
def test_push_bodies_the_schema_refuses_the_entry_point_refuses(case: str) -> None:
    body = INVALID_PUSH_BODIES[case]
    assert errors("cloudevent-data", body)
    with pytest.raises(ValueError):
        pubsub_message_from_push_body(body)


# ---------------------------------------------------------------------------------------------- the leniencies

LENIENCIES: dict[str, tuple[Callable[[], list[str]], Callable[[], Any]]] = {
    "a reply batch `[]`": (
        lambda: reply_problems(b"[]", REPLY),
        lambda: Reply.decode(b"[]", REPLY)),
    'a Pipes message that is only `{"method": "log"}`': (
        lambda: reply_problems(b'[{"method": "log"}]', REPLY),
        lambda: Reply.decode(b'[{"method": "log"}]', REPLY)),
    "a reply batch holding `NaN`": (
        lambda: reply_problems(b'[{"method": "report_custom_message", "params": {"payload": NaN}}]', REPLY),
        lambda: Reply.decode(b'[{"method": "report_custom_message", "params": {"payload": NaN}}]', REPLY)),
    '`dagster_pipes_seq` `"007"`': (
        lambda: reply_problems(BATCH, {**REPLY, Attr.SEQ: "007"}),
        lambda: Reply.decode(BATCH, {**REPLY, Attr.SEQ: "007"})),
    "lease metadata with only `dagster_pipes_lease_state`": (
        lambda: errors("lease-metadata", {"dagster_pipes_lease_state": "ended"}),
        lambda: LeaseRecord.from_metadata({"dagster_pipes_lease_state": "ended"})),
    'a lease metadata number `" 5"`, `"+5"` or `"1_0"`': (
        lambda: [e for n in (" 5", "+5", "1_0") for e in errors("lease-metadata", {**LeaseRecord("held", "i").metadata(), "dagster_pipes_lease_expires_at": n})],
        lambda: [LeaseRecord.from_metadata({"dagster_pipes_lease_state": "held", "dagster_pipes_lease_expires_at": n}) for n in (" 5", "+5", "1_0")]),
    'context params `{"data": {}}` (a context without its keys)': (
        lambda: trigger_problems(_trigger(context={"data": {}}), GOOD_ATTRIBUTES),
        lambda: read_trigger(_trigger(context={"data": {}}), GOOD_ATTRIBUTES)),
}


@pytest.mark.parametrize("case", sorted(LENIENCIES))
def test_each_leniency_of_the_python_receivers_is_on_the_page_and_holds(case: str) -> None:
    """Where a Python receiver accepts what the schemas refuse: listed in docs/protocol.md section 19, and still
    so (a fix that makes the receiver strict fails this test: then drop the row from the page and here)."""
    schema_problems, python_reads = LENIENCIES[case]
    section = PAGE[PAGE.index("## 19."):PAGE.index("## 20.")]
    assert f"| {case} |" in section
    assert schema_problems(), f"the schemas accept {case}"
    python_reads()  # raises if Python refuses it after all


def test_the_pages_leniency_table_has_no_row_without_a_test() -> None:
    section = PAGE[PAGE.index("## 19."):PAGE.index("## 20.")]
    rows = re.findall(r"^\| (.+?) \| refuses", section, re.M)
    assert sorted(rows) == sorted(LENIENCIES)
