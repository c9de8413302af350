"""Detached mode's second half: a sensor that ends every detached session visibly.

``PipesPubSubClient.run_detached`` registers the session (``detached_registry``), publishes its trigger
and ends its step; the function replies on the detached reply topic, whose durable subscription keeps the
replies (for days if need be: an orchestrator that is down loses nothing). Each tick of
``pipes_completion_sensor`` pulls what is waiting, decodes it exactly as the attached reader does
(``decode_reply``), puts each session back in order with the same ``SessionReassembler``, and ends every
registered session in one of three ways:

* **recorded**: it closed without an error; its materializations and asset checks are returned as
  ``SensorResult(asset_events=...)``, with a summary of the function's logs in the metadata;
* **failed**: it closed with an error (or its replies cannot be put back in order); the sensor requests a
  run of its job ``<sensor name>_failed_sessions``, keyed by the session id, that fails with the remote
  traceback. A failed run is what Dagster's run-failure sensors and alerts already watch, and it needs
  no asset key (a function that never started names none);
* **expired**: it has not closed by its registration + ``detached_start_timeout`` + the function's
  timeout + ``expiry_margin_seconds``: it can no longer start (the function refuses a trigger delivered
  after its start window) and one that started in time is past its timeout. Reported by a failed run
  too, saying whether the function ever opened the session.

Exactly once, whatever the daemon's crash point. A tick that ends a session does not ack its messages:
it hands them back and writes the session id into the cursor. The next tick finds the session in the
cursor, acks its messages and deletes its objects (``PREFIX/SESSION/``) and its registry entry, without
ending it again. If a tick's result is lost, the cursor was not kept and the messages come back, so a
later tick ends the session again; what the lost tick had already written is not written twice: Dagster's
daemon writes a tick's asset events one at a time before it saves the cursor, so before returning a
session's events the sensor looks up the instance's records of those assets and checks for that session
id (``pipes_session_id`` metadata) and returns only the ones missing; the failure runs are deduplicated by
their run key. Sessions not yet closed are handed back (nacked) until their ``closed`` arrives; heartbeats,
malformed messages and replies of sessions that are not registered (an expired session's late replies)
are acked, the last two with a warning.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    DefaultSensorStatus,
    Failure,
    JobDefinition,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    job,
    op,
    sensor,
)
from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.modes.detached_registry import DetachedRegistry, PendingSession, registry_prefix
from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError, format_remote_traceback
from dagster_gcf_pipes.orchestrator.session.message_reader import decode_reply
from dagster_gcf_pipes.orchestrator.session.pull import ack, nack, pull, subscription_path
from dagster_gcf_pipes.orchestrator.session.reassembly import ReassemblyError, SessionReassembler
from dagster_gcf_pipes.orchestrator.client.resolution import resolve_project
from dagster_gcf_pipes.orchestrator.session.end import end_session
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.protocol import ProtocolError, Reply
from dagster_gcf_pipes.shared.pubsub import subscriber_client

#: How many ended session ids the cursor remembers: far more than can be waiting for their ack phase.
CURSOR_SESSIONS = 1000

#: How long before a session's registration the instance is searched for the events of an earlier tick
#: whose cursor was lost (the step's and the daemon's clocks may differ by this much).
RECORDED_LOOKBACK_SECONDS = 600.0

#: How many of an asset's latest materializations (or a check's evaluations) are searched.
RECORDED_LOOKUP_LIMIT = 1000

#: Tags of a failure run.
SESSION_TAG = "pipes/session_id"
OUTCOME_TAG = "pipes/outcome"

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


def _failure_job(sensor_name: str) -> tuple[JobDefinition, str]:
    """The job whose runs report failed and expired sessions, and its op's name."""
    op_name = f"{sensor_name}_session_failed"

    @op(
        name=op_name,
        config_schema={"session_id": str, "outcome": str, "message": str},
        description="Fails with what ended a detached Pipes session: the remote traceback, or its expiry.",
    )
    def report_failed_session(context) -> None:  # noqa: ANN001 - Dagster rejects a string annotation here
        config = context.op_config
        raise Failure(
            description=config["message"],
            metadata={"pipes_session_id": config["session_id"], "pipes_outcome": config["outcome"]},
            allow_retries=False,
        )

    @job(name=f"{sensor_name}_failed_sessions", description=f"One failed run per detached session {sensor_name} saw fail or expire.")
    def failed_sessions() -> None:
        report_failed_session()

    return failed_sessions, op_name


def _event_key(event: AssetEvent) -> tuple[str, str]:
    if isinstance(event, AssetCheckEvaluation):
        return event.asset_key.to_user_string(), event.check_name
    return event.asset_key.to_user_string(), ""


def _recorded_counts(instance: DagsterInstance, session_id: str, keys: set[tuple[str, str]], since: float) -> Counter:
    """How many events of ``session_id`` the instance holds, per (asset, check name or "")."""
    counts: Counter = Counter()
    for asset, check_name in keys:
        asset_key = AssetKey.from_user_string(asset)
        if check_name:
            history = instance.event_log_storage.get_asset_check_execution_history(
                AssetCheckKey(asset_key, check_name), limit=RECORDED_LOOKUP_LIMIT
            )
            metadata = [
                r.event.asset_check_evaluation.metadata
                for r in history
                if r.event is not None and r.event.asset_check_evaluation is not None and r.create_timestamp >= since
            ]
        else:
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=asset_key, after_timestamp=since), limit=RECORDED_LOOKUP_LIMIT
            ).records
            metadata = [r.asset_materialization.metadata for r in records if r.asset_materialization is not None]
        counts[(asset, check_name)] = sum(
            1 for m in metadata if getattr(m.get("pipes_session_id"), "value", None) == session_id
        )
    return counts


def unrecorded_events(
    instance: DagsterInstance, session_id: str, events: Sequence[AssetEvent], since: float
) -> list[AssetEvent]:
    """The events of the session the instance does not hold yet. A tick whose cursor was lost may have
    written the first few (the daemon writes them one at a time, in order): those are left out."""
    recorded = _recorded_counts(instance, session_id, {_event_key(e) for e in events}, since)
    seen: Counter = Counter()
    missing = []
    for event in events:
        seen[_event_key(event)] += 1
        if seen[_event_key(event)] > recorded[_event_key(event)]:
            missing.append(event)
    return missing


def _load_cursor(cursor: str | None) -> list[str]:
    try:
        ids = json.loads(cursor) if cursor else []
    except json.JSONDecodeError:
        return []  # a cursor set by hand: the instance lookups and run keys still deduplicate
    return [str(i) for i in ids] if isinstance(ids, list) else []


@dataclass
class _Tick:
    """What one tick decides: events to record, failure runs to request, sessions ended, messages to settle."""

    context: SensorEvaluationContext
    failure_op: str
    log_tail_lines: int
    events: list[AssetEvent] = field(default_factory=list)
    failures: list[RunRequest] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    to_ack: list[str] = field(default_factory=list)
    to_nack: list[str] = field(default_factory=list)

    def fail(self, session: PendingSession, outcome: str, message: str) -> None:
        self.context.log.error(f"[pipes] {message}")
        config = {"session_id": session.session_id, "outcome": outcome, "message": message}
        self.failures.append(RunRequest(
            run_key=session.session_id,
            run_config={"ops": {self.failure_op: {"config": config}}},
            tags={SESSION_TAG: session.session_id, OUTCOME_TAG: outcome},
        ))
        self.ended.append(session.session_id)

    def closed(self, session: PendingSession, pipes_messages: Sequence[Mapping[str, Any]]) -> None:
        reported, exception = session_events(session.session_id, pipes_messages, self.log_tail_lines)
        if exception:
            self.fail(
                session,
                "failed",
                f"detached session {session.session_id} (started by {session.started_by}) failed in the function; "
                f"nothing recorded:\n{format_remote_traceback(exception)}",
            )
            return
        missing = unrecorded_events(
            self.context.instance, session.session_id, reported, session.registered_at - RECORDED_LOOKBACK_SECONDS
        )
        self.events.extend(missing)
        already = f" ({len(reported) - len(missing)} already recorded by a tick whose cursor was lost)" if len(missing) < len(reported) else ""
        self.context.log.info(f"[pipes] detached session {session.session_id} closed: {len(reported)} asset events{already}")
        self.ended.append(session.session_id)

    def expire(self, session: PendingSession, reassembler: SessionReassembler, margin: float) -> None:
        budget = (
            f"detached_start_timeout={session.start_window:g}s + function_timeout={session.function_timeout:g}s + "
            f"expiry_margin_seconds={margin:g}s"
        )
        if reassembler.opened:
            what = (
                f"started (invocation {reassembler.accepted_invocation}) but never closed within {budget}: the function "
                "died or overran its timeout; check its logs"
            )
        else:
            what = (
                f"never started within {budget}: no reply arrived. Check that a function consumes "
                f"{session.trigger_topic}, that it is ACTIVE, and its logs; the trigger can no longer start the session"
            )
        self.fail(session, "expired", f"detached session {session.session_id} (started by {session.started_by}) {what}")


def pipes_completion_sensor(
    *,
    subscription: str,
    name: str = "pipes_completion_sensor",
    max_messages_per_tick: int = 10_000,
    log_tail_lines: int = 20,
    minimum_interval_seconds: int = 30,
    expiry_margin_seconds: float = 300.0,
    pull_timeout_seconds: float = 5.0,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
) -> SensorDefinition:
    """A sensor ending the detached sessions that reply to ``subscription`` (a durable subscription on the
    client's ``detached_reply_topic``): recorded, failed or expired (see the module's docstring). The
    ``pipes_pubsub`` resource (the client) provides the project, the bucket and prefix (the sessions'
    objects and the registry of pending sessions), the reply topic and the signing secret. One sensor per
    ``detached_reply_topic``.

    Failed and expired sessions are reported by runs of the job ``<name>_failed_sessions`` (the sensor's
    target, added to the code location with the sensor), keyed by the session id, which fail with the
    reason. A session must fit in one tick (``max_messages_per_tick`` reply batches; each batch holds up to
    a thousand Pipes messages); its messages are handed back until all of them have arrived.
    ``expiry_margin_seconds`` is added to a session's start window and function timeout before it
    expires: clock skew and the delivery of its last replies. ``pull_timeout_seconds``: how long a tick's
    first pull waits when nothing is waiting."""
    failure_job, failure_op = _failure_job(name)

    @sensor(
        name=name,
        job=failure_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=f"Records, or reports as failed or expired, the detached Pipes sessions replying to {subscription}.",
    )
    def _completion_sensor(context: SensorEvaluationContext, pipes_pubsub: PipesPubSubClient) -> SensorResult | SkipReason:
        client = pipes_pubsub
        if not client.detached_reply_topic:
            raise PipesPubSubConfigError(
                "detached_reply_topic is not set on the pipes_pubsub resource: the completion sensor finds the "
                "pending sessions by it; set it to the topic run_detached replies to"
            )
        project = resolve_project(client.project)
        path = subscription_path(project, subscription)
        gcs = storage.Client(project=project)
        blob_store = GCSBlobStore(gcs, client.bucket)
        claim_check = ClaimCheck(blob_store, client.inline_threshold_bytes)
        registry = DetachedRegistry(gcs, client.bucket, registry_prefix(client.prefix, client.detached_reply_topic))
        ended_before = _load_cursor(context.cursor)
        ended = set(ended_before)
        tick = _Tick(context, failure_op, log_tail_lines)

        with subscriber_client() as subscriber:
            received = pull(
                subscriber, path, max_messages=max_messages_per_tick, timeout=pull_timeout_seconds,
                follow_up_timeout=min(1.0, pull_timeout_seconds),
            )
            pending = registry.pending()  # after the pull: every reply pulled is of a session registered by now
            sessions: dict[str, _Session] = defaultdict(_Session)
            unknown: set[str] = set()
            for message in received:
                try:
                    reply = decode_reply(
                        message.message.data, dict(message.message.attributes), claim_check, client.signing_secret,
                        bucket=client.bucket, prefix=client.prefix,
                    )
                except ProtocolError as exc:
                    context.log.warning(f"[pipes] dropped reply message {message.message.message_id}: {exc}")
                    tick.to_ack.append(message.ack_id)
                    continue
                if reply.session_id in ended or reply.is_heartbeat:  # ended by a tick Dagster kept, or a heartbeat
                    tick.to_ack.append(message.ack_id)
                elif reply.session_id not in pending:
                    unknown.add(reply.session_id)
                    tick.to_ack.append(message.ack_id)
                else:
                    sessions[reply.session_id].replies.append(reply)
                    sessions[reply.session_id].ack_ids.append(message.ack_id)
            for session_id in sorted(unknown):
                context.log.warning(
                    f"[pipes] dropped the replies of detached session {session_id}: it is not pending (it expired "
                    f"and was reported, or it was registered under another prefix than {client.prefix!r})"
                )

            # the cap was met: a pending session's replies may still be waiting, so none is expired this tick
            drained = len(received) < max_messages_per_tick
            for session_id, session in sorted(pending.items()):
                if session_id in ended:
                    continue
                replies = sessions.get(session_id, _Session())
                tick.to_nack.extend(replies.ack_ids)  # acked by the next tick, once this tick's result is kept
                reassembler = SessionReassembler(session_id, warn=context.log.warning)
                try:
                    pipes_messages = [m for reply in replies.replies for m in reassembler.offer(reply)]
                except ReassemblyError as exc:
                    tick.fail(session, "failed", f"detached session {session_id} cannot be reassembled: {exc}")
                    continue
                if reassembler.closed:
                    tick.closed(session, pipes_messages)
                elif drained and time.time() > session.expires_at(expiry_margin_seconds):
                    tick.expire(session, reassembler, expiry_margin_seconds)

            ack(subscriber, path, tick.to_ack)
            nack(subscriber, path, tick.to_nack)

        for session_id in ended & pending.keys():  # the ack phase of a session ended by a tick Dagster kept
            end_session(gcs, client.bucket, client.prefix, session_id, start_window=pending[session_id].start_window,
                        reason="the completion sensor recorded the detached session")  # durable: a late trigger never runs
            registry.remove(session_id)
        cursor = json.dumps((ended_before + tick.ended)[-CURSOR_SESSIONS:])
        if not tick.events and not tick.failures and cursor == json.dumps(ended_before):
            return SkipReason(
                f"no detached session ended ({len(received)} messages pulled from {path}, {len(pending)} pending)"
            )
        return SensorResult(asset_events=tick.events, run_requests=tick.failures, cursor=cursor)

    return _completion_sensor
