"""Read a trigger message, whole, before anything acts on it: the envelope, the Pipes bootstrap params and
every field the function reads from them, each checked for its type.

Anyone who may publish to the trigger topic decides these bytes. A trigger that cannot run as it is (bad
JSON, a JSON list where an object belongs, ``start_window: "x"``, a body nested 100,000 deep, a zlib bomb in
a bootstrap param) must be refused here, as one ``ProtocolError`` naming the problem, and never surface later
as an ``AttributeError`` or ``TypeError`` that reads like a transient failure and gets the message
redelivered forever. Only reading a claim-checked body touches the network; its transient errors propagate
(a redelivery may fix them), everything else about the bytes is decided here once.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dagster_pipes import PipesParams, PipesParamsLoader
from google.api_core import exceptions as gexc

from dagster_gcf_pipes.function import clients
from dagster_gcf_pipes.shared.claim_check import MAX_CLAIM_BYTES, ClaimCheck, validate_threshold
from dagster_gcf_pipes.shared.protocol import ProtocolError, ReplyChannelParams, Trigger

#: the most a bootstrap param may inflate to (it is zlib-compressed): the largest body a claim-check carries
MAX_PARAM_BYTES = MAX_CLAIM_BYTES

#: what the bucket answers for a name that cannot be read, whatever the retry: no such bucket, an invalid name
PERMANENT_GCS_ERRORS = (gexc.NotFound, gexc.BadRequest)


@dataclass(frozen=True)
class ReadTrigger:
    trigger: Trigger
    settings: ReplyChannelParams
    params: PipesParamsLoader


class DecodedParamsLoader(PipesParamsLoader):
    """The bootstrap params, decoded once (and bounded) by ``read_trigger``, handed to the Pipes context."""

    def __init__(self, context: PipesParams, messages: PipesParams):
        self._context, self._messages = context, messages

    def is_dagster_pipes_process(self) -> bool:
        return True

    def load_context_params(self) -> PipesParams:
        return self._context

    def load_messages_params(self) -> PipesParams:
        return self._messages


def read_trigger(data: bytes, attributes: Mapping[str, str]) -> ReadTrigger:
    """The trigger in ``data``; ``ProtocolError`` for anything a redelivery of the same bytes cannot change."""
    body = _unwrap(data, attributes)
    try:
        return _decode(body, attributes)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoding is a pure function of the bytes: the same bytes fail again
        raise ProtocolError(f"the trigger does not decode ({type(exc).__name__}: {exc})") from exc


def _unwrap(data: bytes, attributes: Mapping[str, str]) -> bytes:
    # Only reads: a claim-check pointer names its own bucket, so the store needs no default one.
    try:
        return ClaimCheck(clients.blob_store(bucket="")).unwrap(data, attributes)
    except ProtocolError:
        raise
    except (*PERMANENT_GCS_ERRORS, ValueError, IndexError) as exc:  # the client refuses a malformed name unsent
        raise ProtocolError(f"the trigger's claim-checked body cannot be read ({type(exc).__name__}: {exc})") from exc


def _decode(body: bytes, attributes: Mapping[str, str]) -> ReadTrigger:
    trigger = Trigger.decode(body, attributes)
    context = _param(trigger.bootstrap, "DAGSTER_PIPES_CONTEXT")
    messages = _param(trigger.bootstrap, "DAGSTER_PIPES_MESSAGES")
    settings = ReplyChannelParams.from_params(messages)
    if settings.session_id != trigger.session_id:
        raise ProtocolError(
            f"DAGSTER_PIPES_MESSAGES names session {settings.session_id!r}, the message's attributes {trigger.session_id!r}"
        )
    validate_threshold(settings.inline_threshold)
    _check_context_params(context)
    return ReadTrigger(trigger, settings, DecodedParamsLoader(context, messages))


def _param(bootstrap: Mapping[str, str], key: str) -> dict[str, Any]:
    """A bootstrap param as dagster-pipes encodes it (base64 of zlib of JSON), inflated to at most
    ``MAX_PARAM_BYTES``; it must be a JSON object."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(bootstrap[key], validate=True), MAX_PARAM_BYTES)
    except (zlib.error, ValueError) as exc:  # binascii.Error is a ValueError
        raise ProtocolError(f"{key} is not a Pipes param (base64 of zlib-compressed JSON): {exc}") from exc
    if inflater.unconsumed_tail:
        raise ProtocolError(f"{key} inflates to more than {MAX_PARAM_BYTES} bytes: not read")
    if not inflater.eof:
        raise ProtocolError(f"{key} is a truncated zlib stream")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{key} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{key} must decode to a JSON object, got a JSON {type(value).__name__}")
    return value


def _check_context_params(params: Mapping[str, Any]) -> None:
    """The two shapes the orchestrator's context injector sends: the context inline, or its GCS object."""
    if isinstance(params.get("data"), dict):
        return
    if isinstance(params.get("bucket"), str) and isinstance(params.get("key"), str):
        return
    raise ProtocolError(
        'DAGSTER_PIPES_CONTEXT must be {"data": {...}} or {"bucket": "...", "key": "..."}, got keys '
        f"{sorted(params)[:10]}"
    )
