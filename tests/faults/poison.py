"""Poison triggers, as issue 24 found them by hand: valid envelopes (session id, protocol version) around
contents that no redelivery can change. Each comes with the words the function's one log line must carry."""

from __future__ import annotations

from typing import Any

from dagster_pipes import encode_param

from dagster_gcf_pipes.shared.protocol import ReplyChannelParams, Trigger, new_session_id
from tests.conftest import PAYLOAD_BUCKET, REPLY_TOPIC
from tests.integration.function_harness import context_data

#: the prefix of these triggers' sessions in the payload bucket
PREFIX = "poison"


def trigger(
    project: str, payload: dict[str, Any] | None = None, *, messages: Any = None, context: Any = None, **params: Any
) -> tuple[bytes, dict[str, str]]:
    """A trigger as the orchestrator encodes one; ``params`` replace fields of its DAGSTER_PIPES_MESSAGES as
    they are (no type checks: a publisher may write anything), ``messages``/``context`` replace a whole param."""
    session_id = new_session_id()
    channel = ReplyChannelParams(
        topic=f"projects/{project}/topics/{REPLY_TOPIC}", session_id=session_id, bucket=PAYLOAD_BUCKET, prefix=PREFIX,
        heartbeat_interval=1.0, start_window=600.0,
    ).to_params()
    bootstrap = {
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": context_data()} if context is None else context),
        "DAGSTER_PIPES_MESSAGES": encode_param({**channel, **params} if messages is None else messages),
    }
    return Trigger(session_id, dict(payload or {}), bootstrap).encode()


def poison_triggers(project: str, token: str) -> dict[str, tuple[bytes, dict[str, str], str]]:
    """name -> (data, attributes, what the function's log line says); every one carries ``token`` where a
    handler that ran would mark it (tests/functions/main.py)."""
    payload = {"token": token}
    _, attributes = trigger(project, payload)
    return {
        "messages_a_json_list": (*trigger(project, payload, messages=[1, 2]),
                                 "DAGSTER_PIPES_MESSAGES must decode to a JSON object, got a JSON list"),
        "missing_bucket": (*trigger(project, payload, bucket=f"no-such-bucket-{token[:8]}"),
                           f"bucket='no-such-bucket-{token[:8]}' must be a bucket this function can reach"),
        "nested_100000_deep": (b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", attributes,
                               "the trigger is nested too deeply to decode"),
        "start_window_x": (*trigger(project, payload, start_window="x"),
                           "DAGSTER_PIPES_MESSAGES field 'start_window' = 'x': must be a number"),
    }
