"""Wire protocol v1 between the orchestrator and the function.

Two kinds of Pub/Sub message cross the wire:

* the **trigger** (orchestrator -> trigger topic): data is one JSON object, the user's payload merged with
  the Pipes bootstrap params (``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES``, encoded as dagster
  encodes them for environment variables, so ``PipesMappingParamsLoader`` reads them unchanged);
* the **reply** (function -> reply topic): either a batch of Pipes messages (a JSON list) carrying a
  per-invocation sequence number, or an empty heartbeat.

Every message carries the session id and the protocol version as attributes, so a subscription filter can
select one session and a reader can reject what it does not understand. This module knows nothing about
transports or storage: it maps values to ``(bytes, attributes)`` and back, and raises ``ProtocolError`` with
a message that names the problem.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = "1"

#: Pub/Sub's hard limit for one message (data + attributes), in bytes.
PUBSUB_MAX_MESSAGE_BYTES = 10_000_000

BOOTSTRAP_KEYS = ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES")

#: How replies travel: Pub/Sub batches (the default), or the earlier design's JSON chunks in GCS.
REPLY_CHANNEL_PUBSUB = "pubsub"
REPLY_CHANNEL_GCS = "gcs"
REPLY_CHANNELS = (REPLY_CHANNEL_PUBSUB, REPLY_CHANNEL_GCS)

#: Default claim-check threshold: well under the 4 MiB that a default gRPC channel will receive.
DEFAULT_INLINE_THRESHOLD = 1_000_000

#: How far the orchestrator's clock (which stamps a trigger's ``issued_at``) may be from the function's before
#: a trigger's own deadline misjudges it: the function accepts a trigger until ``issued_at + start_window`` plus
#: this, and the orchestrator keeps a session's tombstone for twice this past the start window (see
#: ``orchestrator/session/end.py``), so a clock off by less than this either way neither refuses a fresh
#: trigger nor lets a re-published one run.
CLOCK_SKEW_ALLOWANCE_SECONDS = 600.0


#: the key of ``opened``'s extras that echoes the trigger's ``owner_token``
OWNER_TOKEN_EXTRA = "owner_token"
#: the key of ``closed``'s params that is true when the function ended its own lease before sending it (so
#: the orchestrator need not write the session's tombstone)
LEASE_ENDED_PARAM = "lease_ended"


class Attr:
    """Attribute names on every message of the protocol."""

    SESSION = "dagster_pipes_session"
    VERSION = "dagster_pipes_version"
    INVOCATION = "dagster_pipes_invocation"
    SEQ = "dagster_pipes_seq"
    KIND = "dagster_pipes_kind"
    #: set by the claim-check codec: ``inline`` or ``claim`` (data is a ``gs://`` pointer)
    BODY = "dagster_pipes_body"
    #: optional HMAC-SHA256 of a reply (see ``dagster_gcf_pipes.shared.signing``)
    SIGNATURE = "dagster_pipes_signature"


class ReplyKind:
    BATCH = "batch"
    HEARTBEAT = "heartbeat"


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong with it."""


_SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_session_id(group: str = "") -> str:
    """32 hex digits (valid in subscription names and filters): random bits from ``secrets`` after ``group``,
    the 16-hex-digit prefix shared by a fan-out group's sessions (one subscription filter selects them all)."""
    if group and (len(group) != 16 or not _SESSION_ID_RE.match(group * 2)):
        raise ValueError(f"a session group is 16 hex digits, got {group!r}")
    return group + secrets.token_hex(16 - len(group) // 2)


def subscription_filter(session_id: str) -> str:
    """The Pub/Sub filter that selects one session's replies."""
    return f'attributes.{Attr.SESSION} = "{session_id}"'


def require_session_id(attributes: Mapping[str, str]) -> str:
    session_id = attributes.get(Attr.SESSION)
    if session_id is None:
        raise ProtocolError(f"missing attribute {Attr.SESSION!r}: not a Dagster Pipes message")
    if not _SESSION_ID_RE.match(session_id):
        raise ProtocolError(f"attribute {Attr.SESSION!r} is not a 32-hex-digit session id: {session_id!r}")
    version = attributes.get(Attr.VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION!r}); "
            "deploy the same release of the integration on both sides"
        )
    return session_id


#: protocol integers: ASCII digits only (``str.isdigit`` also takes "²" and "٣"), at most 15 of them
_PROTOCOL_INT_RE = re.compile(r"[0-9]{1,15}")


def parse_protocol_int(raw: str, what: str) -> int:
    """A non-negative integer attribute, parsed strictly; anything else is a ``ProtocolError`` naming ``what``."""
    if not _PROTOCOL_INT_RE.fullmatch(raw):
        raise ProtocolError(f"missing or non-numeric {what!r} attribute {raw[:40]!r}: expected 1 to 15 ASCII digits")
    return int(raw)


def dumps(value: Any, what: str) -> bytes:
    """Compact JSON, failing with a message that names ``what`` could not be serialised."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"{what} is not JSON-serialisable ({exc}); pass only dicts with string keys, lists, strings, "
            "finite numbers, booleans and None"
        ) from exc


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} is not UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:
        raise ProtocolError(f"{what} is nested too deeply to decode: {exc}") from exc


# ---------------------------------------------------------------------------------------------- trigger


@dataclass(frozen=True)
class Trigger:
    session_id: str
    payload: Mapping[str, Any]
    bootstrap: Mapping[str, str]

    def encode(self) -> tuple[bytes, dict[str, str]]:
        if not isinstance(self.payload, Mapping):
            raise ProtocolError(f"the payload must be a JSON object (a dict), got {type(self.payload).__name__}")
        clash = sorted(set(self.payload) & set(BOOTSTRAP_KEYS))
        if clash:
            raise ProtocolError(f"payload keys {clash} are reserved for the Pipes bootstrap params; rename them")
        body = dumps({**self.payload, **self.bootstrap}, "the payload")
        return body, {Attr.SESSION: self.session_id, Attr.VERSION: PROTOCOL_VERSION}

    @classmethod
    def decode(cls, body: bytes, attributes: Mapping[str, str]) -> Trigger:
        session_id = require_session_id(attributes)
        obj = _loads(body, "the trigger")
        if not isinstance(obj, dict):
            raise ProtocolError(f"the trigger must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in BOOTSTRAP_KEYS if not isinstance(obj.get(k), str)]
        if missing:
            raise ProtocolError(f"the trigger lacks the Pipes bootstrap params {missing}")
        bootstrap = {k: obj.pop(k) for k in BOOTSTRAP_KEYS}
        return cls(session_id=session_id, payload=obj, bootstrap=bootstrap)


# ---------------------------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """One reply message: a batch of Pipes messages (``seq`` set) or a heartbeat (``seq`` None, no messages)."""

    session_id: str
    invocation_id: str
    seq: int | None
    messages: Sequence[Mapping[str, Any]] = field(default_factory=tuple)

    @property
    def is_heartbeat(self) -> bool:
        return self.seq is None

    def attributes(self) -> dict[str, str]:
        attributes = {
            Attr.SESSION: self.session_id,
            Attr.VERSION: PROTOCOL_VERSION,
            Attr.INVOCATION: self.invocation_id,
            Attr.KIND: ReplyKind.HEARTBEAT if self.is_heartbeat else ReplyKind.BATCH,
        }
        if not self.is_heartbeat:
            attributes[Attr.SEQ] = str(self.seq)
        return attributes

    def encode(self) -> tuple[bytes, dict[str, str]]:
        body = b"" if self.is_heartbeat else dumps(list(self.messages), "a Pipes message batch")
        return body, self.attributes()

    @classmethod
    def decode(cls, body: bytes, attributes: Mapping[str, str]) -> Reply:
        session_id = require_session_id(attributes)
        invocation_id = attributes.get(Attr.INVOCATION)
        if not invocation_id:
            raise ProtocolError(f"reply without the {Attr.INVOCATION!r} attribute")
        kind = attributes.get(Attr.KIND)
        if kind == ReplyKind.HEARTBEAT:
            return cls(session_id=session_id, invocation_id=invocation_id, seq=None)
        if kind != ReplyKind.BATCH:
            raise ProtocolError(f"unknown reply kind {kind!r} (expected {ReplyKind.BATCH!r} or {ReplyKind.HEARTBEAT!r})")
        seq = parse_protocol_int(attributes.get(Attr.SEQ, ""), Attr.SEQ)
        messages = _loads(body, "the reply batch")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("method"), str) for m in messages
        ):
            raise ProtocolError("a reply batch must be a JSON list of Pipes messages (objects with a 'method')")
        return cls(session_id=session_id, invocation_id=invocation_id, seq=seq, messages=messages)


# ---------------------------------------------------------------------------------------------- channel


@dataclass(frozen=True)
class ReplyChannelParams:
    """How the function takes part in the session: the reader's ``DAGSTER_PIPES_MESSAGES`` params, sent in
    the trigger. Where to reply and how to batch; where the session's objects live (claim-checks, the lease);
    how long the lease lasts and the session may run; how long after its publication the trigger may still
    start the session; and whether replies must be signed.

    ``channel`` is ``pubsub`` (batches published to ``topic``) or ``gcs``: the earlier design's JSON chunks
    ``{key_prefix}/{n}.json`` uploaded every ``chunk_interval`` seconds by dagster-pipes' GCS writer (the
    ``bucket``/``key_prefix`` keys are the ones that writer reads)."""

    topic: str
    session_id: str
    bucket: str
    prefix: str
    channel: str = REPLY_CHANNEL_PUBSUB
    key_prefix: str = ""
    chunk_interval: float = 10.0
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD
    flush_interval: float = 0.0
    heartbeat_interval: float = 10.0
    max_batch_messages: int = 1000
    max_batch_bytes: int = 512_000
    publish_timeout: float = 60.0
    #: lifetime of the session lease: the function's timeout plus a margin
    lease_seconds: float = 600.0
    #: seconds the session may run: the function closes it (with a timeout error) a little before
    function_timeout: float | None = None
    #: seconds after the trigger's ``publishTime`` (Pub/Sub's server clock, never the orchestrator's) after
    #: which a (late, duplicate) delivery of the trigger must not start the session
    start_window: float | None = None
    #: whether the orchestrator verifies an HMAC on every reply (both sides then need the same secret)
    signed: bool = False
    #: when the orchestrator built the trigger (epoch seconds, its own clock): with ``start_window``, the
    #: trigger's own deadline, which a re-publish of the same bytes (a fresh ``publishTime``) cannot move;
    #: checked with ``CLOCK_SKEW_ALLOWANCE_SECONDS`` of slack. None in triggers of earlier releases
    issued_at: float | None = None
    #: a random token of this session (32 hex digits), which the function echoes in ``opened``
    #: (``extras[OWNER_TOKEN_EXTRA]``): the orchestrator then accepts the invocation as the session's owner
    #: without reading the lease. "" from an orchestrator of an earlier release
    owner_token: str = ""

    @classmethod
    def from_params(cls, params: Any) -> ReplyChannelParams:
        """The params as sent, each field checked for its type (``ProtocolError`` naming the first that is
        wrong); keys this release does not know are ignored (a newer orchestrator's)."""
        if not isinstance(params, Mapping):
            raise ProtocolError(f"DAGSTER_PIPES_MESSAGES must be a JSON object, got a JSON {type(params).__name__}")
        channel = params.get("channel", REPLY_CHANNEL_PUBSUB)
        if channel not in REPLY_CHANNELS:
            raise ProtocolError(f"unknown reply channel {channel!r} (expected one of {list(REPLY_CHANNELS)})")
        required = ("topic" if channel == REPLY_CHANNEL_PUBSUB else "key_prefix", "session_id", "bucket", "prefix")
        missing = [k for k in required if k not in params]
        if missing:
            raise ProtocolError(f"DAGSTER_PIPES_MESSAGES lacks {missing}: the trigger was not sent by PipesPubSubClient")
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        for key, value in known.items():
            problem = _field_problem(key, value)
            if problem:
                raise ProtocolError(f"DAGSTER_PIPES_MESSAGES field {key!r} = {repr(value)[:80]}: {problem}")
        return cls(**known)

    def to_params(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: fields that must be above zero (a zero heartbeat interval or batch size would spin), and that the
#: orchestrator never sends as zero
_POSITIVE_FIELDS = frozenset(
    {"heartbeat_interval", "max_batch_messages", "max_batch_bytes", "publish_timeout", "lease_seconds"}
)
_FIELD_TYPES = typing.get_type_hints(ReplyChannelParams)


def _field_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``key``, or None: strings are strings, booleans booleans,
    numbers finite and not negative (and above zero where zero makes no sense), integers whole; None only
    where the field is optional."""
    hint = _FIELD_TYPES[key]
    kinds = typing.get_args(hint) or (hint,)
    if value is None:
        return None if type(None) in kinds else "must not be null"
    if str in kinds:
        return None if isinstance(value, str) else "must be a string"
    if bool in kinds:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool) or not isinstance(value, int if int in kinds else (int, float)):
        return "must be a whole number" if int in kinds else "must be a number"
    try:
        number = float(value)
    except OverflowError:
        return "is too large"
    if key in _POSITIVE_FIELDS:
        return None if math.isfinite(number) and number > 0 else "must be a finite number above zero"
    return None if math.isfinite(number) and number >= 0 else "must be a finite number, not negative"
    return None
