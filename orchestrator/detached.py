"""Detached mode's second half: a sensor that records what detached sessions reported.

``PipesPubSubClient.run_detached`` publishes a trigger and ends its step; the function replies on the
detached reply topic, whose durable subscription keeps the replies (for days if need be: an orchestrator
that is down loses nothing). Each tick of ``pipes_completion_sensor`` pulls what is waiting, decodes it
exactly as the attached reader does (``decode_reply``), puts each session back in order with the same
``SessionReassembler``, and for every session that has closed returns its materializations and asset
checks as ``SensorResult(asset_events=...)``, with a summary of the function's logs in the metadata.

Exactly once, in two phases. A tick that records a session does not ack its messages: it hands them back
and writes the session id into the cursor. Dagster persists the events and the cursor together; the next
tick finds the session in the cursor and acks its messages (and deletes its GCS objects) without
recording it again. If a tick's result is lost, neither the events nor the cursor were kept and the
messages come back, so the session is recorded by a later tick: never lost, never twice. Sessions not yet
closed are handed back (nacked) until their ``closed`` arrives; heartbeats and malformed messages are acked.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.client import PipesPubSubClient, resolve_project
from dagster_gcf_pipes.orchestrator.errors import format_remote_traceback
from dagster_gcf_pipes.orchestrator.message_reader import decode_reply
from dagster_gcf_pipes.orchestrator.pull import ack, nack, pull, subscription_path
from dagster_gcf_pipes.orchestrator.reassembly import ReassemblyError, SessionReassembler
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.layout import session_prefix
from dagster_gcf_pipes.shared.protocol import ProtocolError, Reply
from dagster_gcf_pipes.shared.pubsub import subscriber_client

#: How many recorded session ids the cursor remembers: far more than can be waiting for their ack phase.
CURSOR_SESSIONS = 1000

AssetEvent = AssetMaterialization | AssetCheckEvaluation


@dataclass
class _Session:
    replies: list[Reply] = field(default_factory=list)
    ack_ids: list[str] = field(default_factory=list)


def session_events(
    session_id: str, pipes_messages: Sequence[Mapping[str, Any]], log_tail_lines: int
) -> tuple[list[AssetEvent], Mapping[str, Any] | None]:
    """The asset events one closed session reported, and the exception it closed with (if any)."""
    logs = [m["params"]["message"] for m in pipes_messages if m.get("method") == "log"]
    closed = next((m.get("params") or {} for m in pipes_messages if m.get("method") == "closed"), {})
    summary = {
        "pipes_session_id": session_id,
        "pipes_log_lines": len(logs),
        "pipes_log_tail": "\n".join(logs[-log_tail_lines:]),
    }
    events: list[AssetEvent] = []
    for message in pipes_messages:
        params = message.get("params") or {}
        if message.get("method") == "report_asset_materialization":
            tags = {"dagster/data_version": params["data_version"]} if params.get("data_version") else None
            events.append(AssetMaterialization(
                asset_key=AssetKey.from_escaped_user_string(params["asset_key"]),
                metadata={**metadata_map_from_external(params.get("metadata") or {}), **summary},
                tags=tags,
            ))
        elif message.get("method") == "report_asset_check":
            events.append(AssetCheckEvaluation(
                asset_key=AssetKey.from_escaped_user_string(params["asset_key"]),
                check_name=params["check_name"],
                passed=params["passed"],
                severity=AssetCheckSeverity(params.get("severity", "ERROR")),
                metadata={**metadata_map_from_external(params.get("metadata") or {}), "pipes_session_id": session_id},
            ))
    return events, closed.get("exception")


def pipes_completion_sensor(
    *,
    subscription: str,
    name: str = "pipes_completion_sensor",
    max_messages_per_tick: int = 10_000,
    log_tail_lines: int = 20,
    minimum_interval_seconds: int = 30,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
) -> SensorDefinition:
    """A sensor recording detached sessions' results from ``subscription`` (a durable subscription on the
    client's ``detached_reply_topic``). The ``pipes_pubsub`` resource (the client) provides the project,
    the claim-check bucket and the signing secret.

    A session must fit in one tick (``max_messages_per_tick`` reply batches; each batch holds up to a
    thousand Pipes messages); its messages are handed back until all of them have arrived."""

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=f"Records materializations and asset checks of detached Pipes sessions from {subscription}.",
    )
    def _completion_sensor(context: SensorEvaluationContext, pipes_pubsub: PipesPubSubClient) -> SensorResult | SkipReason:
        client = pipes_pubsub
        project = resolve_project(client.project)
        path = subscription_path(project, subscription)
        blob_store = GCSBlobStore(storage.Client(project=project), client.bucket)
        claim_check = ClaimCheck(blob_store, client.inline_threshold_bytes)
        recorded: list[str] = json.loads(context.cursor) if context.cursor else []
        already = set(recorded)

        with subscriber_client() as subscriber:
            received = pull(subscriber, path, max_messages=max_messages_per_tick)
            to_ack: list[str] = []
            finished: set[str] = set()
            sessions: dict[str, _Session] = defaultdict(_Session)
            for message in received:
                try:
                    reply = decode_reply(message.message.data, dict(message.message.attributes), claim_check, client.signing_secret, bucket=client.bucket, prefix=client.prefix)
                except ProtocolError as exc:
                    context.log.warning(f"[pipes] dropped reply message {message.message.message_id}: {exc}")
                    to_ack.append(message.ack_id)
                    continue
                if reply.is_heartbeat:
                    to_ack.append(message.ack_id)
                elif reply.session_id in already:  # recorded by an earlier tick whose result Dagster kept
                    to_ack.append(message.ack_id)
                    finished.add(reply.session_id)
                else:
                    sessions[reply.session_id].replies.append(reply)
                    sessions[reply.session_id].ack_ids.append(message.ack_id)

            events: list[AssetEvent] = []
            to_nack: list[str] = []
            for session_id, session in sessions.items():
                reassembler = SessionReassembler(session_id, warn=context.log.warning)
                try:
                    pipes_messages = [m for reply in session.replies for m in reassembler.offer(reply)]
                except ReassemblyError as exc:
                    context.log.error(f"[pipes] detached session {session_id} cannot be reassembled, dropped: {exc}")
                    to_ack.extend(session.ack_ids)
                    continue
                to_nack.extend(session.ack_ids)  # acked by the next tick, once this tick's result is kept
                if not reassembler.closed:
                    continue
                reported, exception = session_events(session_id, pipes_messages, log_tail_lines)
                if exception:
                    context.log.error(
                        f"[pipes] detached session {session_id} failed; nothing recorded:\n"
                        f"{format_remote_traceback(exception)}"
                    )
                else:
                    events.extend(reported)
                    context.log.info(f"[pipes] detached session {session_id} closed: {len(reported)} asset events")
                recorded.append(session_id)

            ack(subscriber, path, to_ack)
            nack(subscriber, path, to_nack)
        for session_id in finished:
            blob_store.delete_prefix(session_prefix(client.prefix, session_id))
        cursor = json.dumps(recorded[-CURSOR_SESSIONS:])
        if not events and cursor == (context.cursor or "[]"):
            return SkipReason(f"no detached session closed ({len(received)} messages pulled from {path})")
        return SensorResult(asset_events=events, cursor=cursor)

    return _completion_sensor
