"""Property-based tests of the wire protocol v1: encode/decode round trips, the claim-check threshold
boundary (against fake-gcs-server), malformed input, and the reassembler under any delivery order."""

import json
import uuid
from typing import Any

import pytest
from google.cloud import storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagster_gcf_pipes.orchestrator.session.reassembly import ReassemblyError, SessionReassembler
from dagster_gcf_pipes.shared.claim_check import (
    DEFAULT_GRPC_RECEIVE_BYTES,
    MAX_INLINE_THRESHOLD,
    ClaimCheck,
    GCSBlobStore,
    validate_threshold,
)
from dagster_gcf_pipes.shared.protocol import (
    BOOTSTRAP_KEYS,
    REPLY_CHANNELS,
    Attr,
    ProtocolError,
    Reply,
    ReplyChannelParams,
    Trigger,
    new_session_id,
    parse_protocol_int,
    subscription_filter,
)
from tests.conftest import PAYLOAD_BUCKET

session_ids = st.text("0123456789abcdef", min_size=32, max_size=32)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)
payloads = st.dictionaries(st.text().filter(lambda k: k not in BOOTSTRAP_KEYS), json_values, max_size=6)
bootstraps = st.fixed_dictionaries({k: st.text() for k in BOOTSTRAP_KEYS})
pipes_messages = st.builds(lambda method, params: {"__dagster_pipes_version": "0.1", "method": method, "params": params},
                           st.sampled_from(["log", "report_asset_materialization", "report_custom_message"]),
                           st.dictionaries(st.text(), json_values, max_size=3))


@given(session_ids, payloads, bootstraps)
def test_trigger_round_trips(session_id: str, payload: dict[str, Any], bootstrap: dict[str, str]) -> None:
    body, attributes = Trigger(session_id, payload, bootstrap).encode()
    decoded = Trigger.decode(body, attributes)
    assert decoded == Trigger(session_id, payload, bootstrap)


@given(session_ids, st.text(min_size=1), st.integers(0, 10**9) | st.none(), st.lists(pipes_messages, max_size=5))
def test_reply_round_trips(session_id: str, invocation: str, seq: int | None, messages: list[dict[str, Any]]) -> None:
    reply = Reply(session_id, invocation, seq, messages if seq is not None else ())
    body, attributes = reply.encode()
    decoded = Reply.decode(body, attributes)
    assert (decoded.session_id, decoded.invocation_id, decoded.seq) == (session_id, invocation, seq)
    assert list(decoded.messages) == list(reply.messages)
    assert decoded.is_heartbeat == (seq is None)


@given(st.builds(ReplyChannelParams, topic=st.text(), session_id=session_ids, bucket=st.text(), prefix=st.text(),
                 channel=st.sampled_from(REPLY_CHANNELS), key_prefix=st.text(), chunk_interval=st.floats(0.1, 60),
                 flush_interval=st.floats(0, 10), signed=st.booleans()))
def test_reply_channel_params_round_trip_through_json(params: ReplyChannelParams) -> None:
    assert ReplyChannelParams.from_params(json.loads(json.dumps(params.to_params()))) == params


GOOD = {Attr.SESSION: "a" * 32, Attr.VERSION: "1", Attr.INVOCATION: "inv", Attr.KIND: "batch", Attr.SEQ: "0"}


@pytest.mark.parametrize(
    ("body", "attributes", "expected"),
    [
        (b"[]", {k: v for k, v in GOOD.items() if k != Attr.SESSION}, "missing attribute"),
        (b"[]", {**GOOD, Attr.SESSION: "not-hex"}, "32-hex-digit session id"),
        (b"[]", {**GOOD, Attr.VERSION: "2"}, "unsupported protocol version '2'"),
        (b"[]", {k: v for k, v in GOOD.items() if k != Attr.INVOCATION}, "without the"),
        (b"[]", {**GOOD, Attr.KIND: "other"}, "unknown reply kind 'other'"),
        (b"[]", {**GOOD, Attr.SEQ: "x1"}, "non-numeric"),
        (b"[]", {**GOOD, Attr.SEQ: "\u00b2"}, "non-numeric"),  # "²".isdigit() is True, int("²") raises
        (b"[]", {**GOOD, Attr.SEQ: "\u0663"}, "non-numeric"),  # an Arabic-Indic 3: int() would take it
        (b"[]", {**GOOD, Attr.SEQ: "-1"}, "non-numeric"),
        (b"[]", {**GOOD, Attr.SEQ: " 1"}, "non-numeric"),
        (b"[]", {**GOOD, Attr.SEQ: "1" * 16}, "1 to 15 ASCII digits"),
        (b"\xff\xfe", GOOD, "not UTF-8 JSON"),
        (b"{not json", GOOD, "not UTF-8 JSON"),
        (b'[{"no": "method"}]', GOOD, "objects with a 'method'"),
    ],
)
def test_malformed_replies_are_protocol_errors_naming_the_problem(body: bytes, attributes: dict[str, str], expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Reply.decode(body, attributes)


def test_malformed_triggers_and_payloads_are_protocol_errors() -> None:
    attributes = {Attr.SESSION: "b" * 32, Attr.VERSION: "1"}
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        Trigger.decode(b"[1]", attributes)
    with pytest.raises(ProtocolError, match="lacks the Pipes bootstrap params"):
        Trigger.decode(b'{"a": 1}', attributes)
    with pytest.raises(ProtocolError, match="reserved for the Pipes bootstrap params"):
        Trigger("b" * 32, {"DAGSTER_PIPES_CONTEXT": "x"}, {}).encode()
    with pytest.raises(ProtocolError, match="not JSON-serialisable"):
        Trigger("b" * 32, {"when": object()}, dict.fromkeys(BOOTSTRAP_KEYS, "")).encode()
    with pytest.raises(ProtocolError, match="lacks"):
        ReplyChannelParams.from_params({"topic": "t"})


def test_session_ids_are_128_random_bits_and_filter_names_the_attribute() -> None:
    ids = {new_session_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert subscription_filter("c" * 32) == f'attributes.{Attr.SESSION} = "{"c" * 32}"'


# ----------------------------------------------------------------------------------- claim-check on GCS


@pytest.fixture(scope="module")
def blob_store(stack: Any) -> GCSBlobStore:
    return GCSBlobStore(storage.Client(project=stack.project), PAYLOAD_BUCKET)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(threshold=st.integers(0, 4096), delta=st.integers(-3, 3), filler=st.binary(min_size=1, max_size=1))
def test_claim_check_threshold_boundary_and_round_trip(blob_store: GCSBlobStore, threshold: int, delta: int, filler: bytes) -> None:
    body = filler * max(0, threshold + delta)
    codec = ClaimCheck(blob_store, threshold)
    data, attributes = codec.wrap(body, f"unit/{uuid.uuid4().hex}")
    inline = len(body) <= threshold  # a body of exactly the threshold stays inline
    assert (attributes[Attr.BODY] == "inline") == inline
    if inline:
        assert data == body
    else:  # the message carries only a pointer to the object
        assert data.decode().startswith(f"gs://{PAYLOAD_BUCKET}/unit/")
    assert codec.unwrap(data, attributes) == body


def test_claim_check_errors(blob_store: GCSBlobStore) -> None:
    codec = ClaimCheck(blob_store, 10)
    with pytest.raises(ProtocolError, match="does not exist"):
        codec.unwrap(f"gs://{PAYLOAD_BUCKET}/unit/missing-{uuid.uuid4().hex}".encode(), {Attr.BODY: "claim"})
    with pytest.raises(ProtocolError, match="not a gs://BUCKET/KEY URL"):
        codec.unwrap(b"http://elsewhere/x", {Attr.BODY: "claim"})
    with pytest.raises(ProtocolError, match="unknown"):
        codec.unwrap(b"x", {Attr.BODY: "zip"})
    assert validate_threshold(MAX_INLINE_THRESHOLD) == MAX_INLINE_THRESHOLD
    assert MAX_INLINE_THRESHOLD < DEFAULT_GRPC_RECEIVE_BYTES  # what a default gRPC channel receives, with room
    with pytest.raises(ValueError, match="default gRPC channel"):
        validate_threshold(MAX_INLINE_THRESHOLD + 1)


def test_claim_check_reads_only_inside_the_given_folder_and_below_the_cap(blob_store: GCSBlobStore) -> None:
    folder = f"gs://{PAYLOAD_BUCKET}/unit/{uuid.uuid4().hex}/"
    codec = ClaimCheck(blob_store, 10)
    data, attributes = codec.wrap(b"x" * 100, folder[len(f"gs://{PAYLOAD_BUCKET}/"):] + "replies/1.json")
    assert codec.unwrap(data, attributes, within=folder) == b"x" * 100
    for outside in (f"gs://elsewhere/{folder[5:]}a.json", folder.rstrip("/") + "-twin/a.json", folder + "../x/a.json", folder + "a//b"):
        with pytest.raises(ProtocolError, match="is outside"):
            codec.unwrap(outside.encode(), attributes, within=folder)
    with pytest.raises(ProtocolError, match="above the 99-byte cap: not downloaded"):
        blob_store.get(data.decode(), max_bytes=99)


@given(st.text(max_size=20))
def test_protocol_integers_are_ascii_digits_or_a_protocol_error(raw: str) -> None:
    try:
        value = parse_protocol_int(raw, "n")
    except ProtocolError:
        assert not (raw.isascii() and raw.isdigit() and len(raw) <= 15)
    else:
        assert str(value) == raw.lstrip("0") or (value == 0 and set(raw) == {"0"})


# ----------------------------------------------------------------------------------- reassembly


def session_batches(sizes: list[int], invocation: str = "inv-a") -> tuple[list[Reply], list[dict[str, Any]]]:
    """A session's batches as the writer sends them: ``opened`` first, ``closed`` last."""
    stream: list[dict[str, Any]] = [{"method": "opened", "params": {}}]
    stream += [{"method": "log", "params": {"message": f"m{i}"}} for i in range(sum(sizes))]
    stream.append({"method": "closed", "params": {}})
    cuts = [0, 1] + [1 + sum(sizes[: i + 1]) for i in range(len(sizes))] + [len(stream)]
    batches = [stream[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    return [Reply("d" * 32, invocation, seq, batch) for seq, batch in enumerate(batches)], stream


@given(st.lists(st.integers(1, 4), max_size=6).flatmap(
    lambda sizes: st.tuples(st.just(sizes), st.permutations(range(len(session_batches(sizes)[0]))),
                            st.lists(st.integers(0, 20), max_size=5))))
def test_any_order_with_duplicates_releases_the_stream_once_in_order(case: tuple[list[int], list[int], list[int]]) -> None:
    sizes, order, duplicate_picks = case
    batches, stream = session_batches(sizes)
    deliveries = [batches[i] for i in order]
    for pick in duplicate_picks:  # redeliveries, anywhere in the sequence
        deliveries.insert(pick % (len(deliveries) + 1), batches[pick % len(batches)])
    warnings: list[str] = []
    reassembler = SessionReassembler("d" * 32, warn=warnings.append)
    released = [m for reply in deliveries for m in reassembler.offer(reply)]
    assert released == stream
    assert reassembler.closed and reassembler.duplicates_dropped == len(duplicate_picks)
    assert warnings == []


@given(st.booleans())
def test_a_second_invocation_is_fenced_with_a_warning_naming_both(second_first: bool) -> None:
    first, stream = session_batches([2], "inv-first")
    second, _ = session_batches([2], "inv-second")
    warnings: list[str] = []
    reassembler = SessionReassembler("d" * 32, warn=warnings.append)
    if second_first:  # the other invocation's later batches arrive before anyone's `opened`
        assert reassembler.offer(second[1]) == ()
    released = [m for reply in first[:1] + second + first[1:] for m in reassembler.offer(reply)]
    assert released == stream
    assert any("inv-first" in w and "inv-second" in w for w in warnings)


def test_heartbeats_release_nothing_and_foreign_sessions_are_refused() -> None:
    reassembler = SessionReassembler("d" * 32, warn=lambda _: None)
    assert reassembler.offer(Reply("d" * 32, "inv", None)) == ()
    with pytest.raises(ValueError, match="offered to session"):
        reassembler.offer(Reply("e" * 32, "inv", 0, [{"method": "opened", "params": {}}]))


def test_a_gap_that_never_fills_is_bounded() -> None:
    batches, _ = session_batches([1] * 8)
    reassembler = SessionReassembler("d" * 32, warn=lambda _: None, max_buffered_batches=3)
    reassembler.offer(batches[0])
    with pytest.raises(ReassemblyError, match="the missing batch never arrived"):
        for reply in batches[2:]:  # seq 1 never arrives
            reassembler.offer(reply)
