"""Detached mode's second half: a sensor that ends every detached session visibly.

``PipesPubSubClient.run_detached`` registers the session (``detached_registry``), publishes its trigger
and ends its step; the function replies on the detached reply topic, whose durable subscription keeps the
replies (for days if need be: an orchestrator that is down loses nothing). Each tick of
``pipes_completion_sensor`` first claims the registry (one completion sensor per reply topic: a second one,
in another Dagster instance or code location, refuses with an error naming both), pulls what is waiting,
decodes it exactly as the attached reader does (``decode_reply``), folds each session's replies into the
progress kept in its registry entry (``detached_progress``: the same ``SessionReassembler`` puts them in
order) and acks them, then ends every registered session in one of three ways:

* **recorded**: it closed without an error; its materializations (on the partitions of the run that
  started it) and asset checks are returned as ``SensorResult(asset_events=...)``, with a summary of the
  function's logs in the metadata;
* **failed**: it closed with an error (or its replies cannot be put back in order); the sensor requests a
  run of its job ``<sensor name>_failed_sessions``, keyed by the session id, that fails with the remote
  traceback. A failed run is what Dagster's run-failure sensors and alerts already watch, and it needs
  no asset key (a function that never started names none);
* **expired**: it has not closed by its registration + ``detached_start_timeout`` + the function's
  timeout + ``expiry_margin_seconds`` (its deadline: it can no longer start, the function refuses a
  trigger delivered after its start window, and one that started in time is past its timeout), *and* the
  subscription has been read past that deadline: the tick pulled a message published after it. An empty
  or short pull proves nothing on Pub/Sub (https://cloud.google.com/pubsub/docs/pull), so while a session
  past its deadline waits for that evidence, each tick publishes a probe message to the reply topic (an
  attribute ``dagster_pipes_probe``, acked when pulled); the session's replies, all published before the
  deadline, are read by the time the probe is. Reported by a failed run too, saying whether the function
  ever opened the session.

Progress survives ticks, so a session may take any number of ticks and batches, a backlog drains whatever
its size, and a reply is pulled once (twice if the registry entry changed under the tick: then it is
handed back). Exactly once, whatever the daemon's crash point: a tick that ends a session writes the
session id into the cursor; the next tick finds the session in the cursor and deletes its objects
(``PREFIX/SESSION/``) and its registry entry, without ending it again. If a tick's result is lost, the
cursor was not kept, the registry entry (with the session's outcome) is still there, and a later tick ends
the session again; what the lost tick had already written is not written twice: Dagster's daemon writes a
tick's asset events one at a time before it saves the cursor, so before returning a session's events the
sensor looks up the instance's records of those assets and checks for that session id
(``pipes_session_id`` metadata) and returns only the ones missing; the failure runs are deduplicated by
their run key. Heartbeats, malformed messages and replies of sessions that are not registered (an expired
session's late replies) are acked, the last two with a warning.
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
from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.client.resolution import resolve_project, topic_path
from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError, format_remote_traceback
from dagster_gcf_pipes.orchestrator.modes.detached_progress import CLOSED, FAILED, OPENED, SessionProgress
from dagster_gcf_pipes.orchestrator.modes.detached_registry import (
    DetachedRegistry,
    Owner,
    PendingSession,
    RegistryEntry,
    owner_key,
    registry_prefix,
)
from dagster_gcf_pipes.orchestrator.session.end import end_session
from dagster_gcf_pipes.orchestrator.session.message_reader import decode_reply
from dagster_gcf_pipes.orchestrator.session.pull import ack, nack, pull, subscription_path
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.protocol import Attr, ProtocolError, Reply
from dagster_gcf_pipes.shared.pubsub import publish, publisher_client, subscriber_client

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

#: The attribute of the sensor's probe messages on the reply topic (its value: the sensor's name).
PROBE_ATTRIBUTE = "dagster_pipes_probe"

AssetEvent = AssetMaterialization | AssetCheckEvaluation


def session_events(
    session: PendingSession, progress: SessionProgress
) -> tuple[list[AssetEvent], Mapping[str, Any] | None]:
    """The asset events one closed session reported, each materialization on every partition the run that
    started it targeted, and the exception it closed with (if any)."""
    summary = {
        "pipes_session_id": session.session_id,
        "pipes_log_lines": progress.log_lines,
        "pipes_log_tail": "\n".join(progress.log_tail),
    }
    events: list[AssetEvent] = []
    for message in progress.reported:
        params = message.get("params") or {}
        asset_key = AssetKey.from_escaped_user_string(params["asset_key"])
        if message.get("method") == "report_asset_materialization":
            tags = {"dagster/data_version": params["data_version"]} if params.get("data_version") else None
            metadata = {**metadata_map_from_external(params.get("metadata") or {}), **summary}
            events += [
                AssetMaterialization(asset_key=asset_key, metadata=metadata, tags=tags, partition=partition)
                for partition in session.partition_keys or (None,)
            ]
        else:
            events.append(AssetCheckEvaluation(
                asset_key=asset_key,
                check_name=params["check_name"],
                passed=params["passed"],
                severity=AssetCheckSeverity(params.get("severity", "ERROR")),
                metadata={
                    **metadata_map_from_external(params.get("metadata") or {}),
                    "pipes_session_id": session.session_id,
                },
            ))
    return events, (progress.closed or {}).get("exception")


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


def _owner(context: SensorEvaluationContext, name: str, subscription: str, timeout: float) -> Owner:
    """This sensor as the registry's claim names it: its Dagster instance (the run storage's id, which every
    SQL storage keeps), code location, repository and name."""
    origin = context.code_location_origin
    location = origin.location_name if origin is not None else "(none)"
    repository = context.repository_name or "(none)"
    storage_id = getattr(context.instance.run_storage, "get_run_storage_id", None)
    instance = storage_id() if storage_id is not None else "(unknown)"
    return Owner(
        key=f"{instance}/{location}/{repository}/{name}",
        description=(
            f"{name} (code location {location}, repository {repository}, Dagster instance with run storage "
            f"{instance}, subscription {subscription})"
        ),
        timeout=timeout,
    )


@dataclass
class _Replies:
    """One session's replies pulled by this tick, and their ack ids."""

    replies: list[Reply] = field(default_factory=list)
    ack_ids: list[str] = field(default_factory=list)


@dataclass
class _Tick:
    """What one tick decides: events to record, failure runs to request, sessions ended, messages to settle."""

    context: SensorEvaluationContext
    failure_op: str
    margin: float
    events: list[AssetEvent] = field(default_factory=list)
    failures: list[RunRequest] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    to_ack: list[str] = field(default_factory=list)
    to_nack: list[str] = field(default_factory=list)
    #: the latest publishTime among the messages pulled (epoch seconds): how far the subscription was read
    read_through: float = 0.0

    def fail(self, session: PendingSession, outcome: str, message: str) -> None:
        self.context.log.error(f"[pipes] {message}")
        config = {"session_id": session.session_id, "outcome": outcome, "message": message}
        self.failures.append(RunRequest(
            run_key=session.session_id,
            run_config={"ops": {self.failure_op: {"config": config}}},
            tags={SESSION_TAG: session.session_id, OUTCOME_TAG: outcome},
        ))
        self.ended.append(session.session_id)

    def closed(self, session: PendingSession, progress: SessionProgress) -> None:
        reported, exception = session_events(session, progress)
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

    def expire(self, session: PendingSession, invocation: str | None) -> None:
        budget = (
            f"detached_start_timeout={session.start_window:g}s + function_timeout={session.function_timeout:g}s + "
            f"expiry_margin_seconds={self.margin:g}s"
        )
        if invocation is not None:
            what = (
                f"started (invocation {invocation}) but never closed within {budget}: the function "
                "died or overran its timeout; check its logs"
            )
        else:
            what = (
                f"never started within {budget}: no reply arrived. Check that a function consumes "
                f"{session.trigger_topic}, that it is ACTIVE, and its logs; the trigger can no longer start the session"
            )
        self.fail(session, "expired", f"detached session {session.session_id} (started by {session.started_by}) {what}")


@dataclass
class _CompletionTick:
    """One tick's work on the subscription and the registry, in the order ``run`` gives."""

    tick: _Tick
    client: PipesPubSubClient
    registry: DetachedRegistry
    claim_check: ClaimCheck
    ended_before: set[str]
    log_tail_lines: int
    #: sessions whose replies were handed back (their entry changed under this tick): decided by a later tick
    deferred: set[str] = field(default_factory=set)

    @property
    def log(self) -> Any:
        return self.tick.context.log

    def sort(self, received: list[Any], pending: dict[str, RegistryEntry]) -> dict[str, _Replies]:
        """Each pulled message: acked at once, or kept for its session's progress."""
        sessions: dict[str, _Replies] = defaultdict(_Replies)
        unknown: set[str] = set()
        for message in received:
            attributes = dict(message.message.attributes)
            self.tick.read_through = max(self.tick.read_through, message.message.publish_time.timestamp())
            entry = pending.get(attributes.get(Attr.SESSION, ""))
            if PROBE_ATTRIBUTE in attributes or attributes.get(Attr.SESSION) in self.ended_before or (
                entry is not None and entry.status in (CLOSED, FAILED)  # its outcome is kept: nothing to read
            ):
                self.tick.to_ack.append(message.ack_id)
                continue
            reply = self._decode(message, attributes)
            if reply is None or reply.is_heartbeat:
                self.tick.to_ack.append(message.ack_id)
            elif reply.session_id not in pending:
                unknown.add(reply.session_id)
                self.tick.to_ack.append(message.ack_id)
            else:
                sessions[reply.session_id].replies.append(reply)
                sessions[reply.session_id].ack_ids.append(message.ack_id)
        for session_id in sorted(unknown):
            self.log.warning(
                f"[pipes] dropped the replies of detached session {session_id}: it is not pending (it expired "
                f"and was reported, or it was registered under another prefix than {self.client.prefix!r})"
            )
        return sessions

    def _decode(self, message: Any, attributes: Mapping[str, str]) -> Reply | None:
        try:
            return decode_reply(
                message.message.data, attributes, self.claim_check, self.client.signing_secret,
                bucket=self.client.bucket, prefix=self.client.prefix,
            )
        except ProtocolError as exc:
            self.log.warning(f"[pipes] dropped reply message {message.message.message_id}: {exc}")
            return None

    def fold(self, sessions: dict[str, _Replies], pending: dict[str, RegistryEntry]) -> dict[str, SessionProgress]:
        """Keep each session's new replies in its registry entry, then ack them; the progress of every session
        folded into."""
        folded = {}
        for session_id, replies in sessions.items():
            entry = pending[session_id]
            try:
                progress = self.registry.progress(entry)
                progress.fold(session_id, replies.replies, warn=self.log.warning, log_tail_lines=self.log_tail_lines)
                pending[session_id] = self.registry.save(entry, progress)
            except (gexc.PreconditionFailed, gexc.NotFound):
                self.log.warning(
                    f"[pipes] the registry entry of detached session {session_id} changed while this tick read it "
                    "(an earlier evaluation still running?): its replies are handed back for the next tick"
                )
                self.tick.to_nack.extend(replies.ack_ids)
                self.deferred.add(session_id)
                continue
            self.tick.to_ack.extend(replies.ack_ids)
            folded[session_id] = progress
        return folded

    def decide(self, pending: dict[str, RegistryEntry], folded: dict[str, SessionProgress]) -> bool:
        """End what can be ended; whether a session past its deadline waits for evidence (a probe is needed)."""
        waiting_for_evidence = False
        for session_id, entry in sorted(pending.items()):
            session = entry.session
            if session_id in self.ended_before | self.deferred:
                continue
            if entry.status in (CLOSED, FAILED):
                progress = folded.get(session_id) or self._progress(entry)
                if progress is None:
                    continue
                if progress.failure is not None:
                    self.tick.fail(session, "failed", f"detached session {session_id} cannot be reassembled: {progress.failure}")
                else:
                    self.tick.closed(session, progress)
            elif self.tick.read_through >= session.expires_at(self.tick.margin):
                progress = (folded.get(session_id) or self._progress(entry)) if entry.status == OPENED else None
                self.tick.expire(session, progress.invocation if progress is not None else None)
            elif time.time() >= session.expires_at(self.tick.margin):
                waiting_for_evidence = True
        return waiting_for_evidence

    def _progress(self, entry: RegistryEntry) -> SessionProgress | None:
        try:
            return self.registry.progress(entry)
        except (gexc.PreconditionFailed, gexc.NotFound):
            return None  # changed since the listing: the next tick sees it as it is

    def probe(self, topic: str, sensor_name: str) -> None:
        """Publish a message to the reply topic: pulled back, its publishTime shows the subscription was read
        up to it. A topic Dagster may not publish to leaves sessions past their deadline waiting: said loudly."""
        try:
            with publisher_client() as publisher:
                publish(publisher, topic, b"", {PROBE_ATTRIBUTE: sensor_name})
        except (gexc.PermissionDenied, gexc.NotFound) as exc:
            self.log.error(
                f"[pipes] could not publish the expiry probe to {topic} ({type(exc).__name__}: {exc}): sessions past "
                "their deadline expire only once a message published after it is pulled. Grant Dagster's service "
                f"account roles/pubsub.publisher on {topic.rsplit('/', 1)[-1]}"
            )

    def clean_up(self, pending: dict[str, RegistryEntry]) -> None:
        """The ack phase of the sessions ended by a tick Dagster kept: their objects and entries go."""
        for session_id in self.ended_before & pending.keys():
            end_session(
                self.registry.gcs, self.client.bucket, self.client.prefix, session_id,
                start_window=pending[session_id].session.start_window,
                reason="the completion sensor recorded the detached session",  # durable: a late trigger never runs
            )
            self.registry.remove(session_id)


def pipes_completion_sensor(
    *,
    subscription: str,
    name: str = "pipes_completion_sensor",
    max_messages_per_tick: int = 10_000,
    log_tail_lines: int = 20,
    minimum_interval_seconds: int = 30,
    expiry_margin_seconds: float = 300.0,
    pull_timeout_seconds: float = 5.0,
    owner_timeout_seconds: float | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
) -> SensorDefinition:
    """A sensor ending the detached sessions that reply to ``subscription`` (a durable subscription on the
    client's ``detached_reply_topic``): recorded, failed or expired (see the module's docstring). The
    ``pipes_pubsub`` resource (the client) provides the project, the bucket and prefix (the sessions'
    objects and the registry of pending sessions), the reply topic and the signing secret.

    One sensor per ``detached_reply_topic``: a tick claims the topic's registry for this sensor (its Dagster
    instance, code location and name) and refuses, naming both, while another sensor that claimed it has
    ticked within its ``owner_timeout_seconds`` (default: 600 s, or three intervals if longer); once the
    other has been silent that long, this one takes over. Failed and expired sessions are reported by runs of the job ``<name>_failed_sessions`` (the
    sensor's target, added to the code location with the sensor), keyed by the session id, which fail with
    the reason. ``max_messages_per_tick``: at most this many reply batches a tick (each holds up to a
    thousand Pipes messages); the rest wait for the next tick, and a session may span any number of ticks.
    ``expiry_margin_seconds`` is added to a session's start window and function timeout before it expires:
    clock skew between the orchestrator, the function and Pub/Sub, and the subscription's ack deadline (a
    reply handed to a pull that was abandoned comes back after it). ``pull_timeout_seconds``: how long a
    tick's first pull waits when nothing is waiting."""
    if owner_timeout_seconds is None:
        owner_timeout_seconds = max(600.0, 3.0 * minimum_interval_seconds)
    elif owner_timeout_seconds <= minimum_interval_seconds:
        raise ValueError(
            f"owner_timeout_seconds={owner_timeout_seconds:g} must be longer than minimum_interval_seconds="
            f"{minimum_interval_seconds} (and a tick's duration): another sensor takes over after it"
        )
    owner_timeout = owner_timeout_seconds
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
        topic = topic_path(project, client.detached_reply_topic)
        gcs = storage.Client(project=project)
        registry = DetachedRegistry(gcs, client.bucket, registry_prefix(client.prefix, topic))
        owner = _owner(context, name, path, owner_timeout)
        previous = registry.claim(owner_key(client.prefix, topic), owner, topic)
        if previous is not None:
            context.log.warning(f"[pipes] {name} took over the detached replies of {topic} from {previous.description}, "
                                f"silent for longer than {previous.timeout:g}s")
        ended_before = _load_cursor(context.cursor)
        work = _CompletionTick(
            _Tick(context, failure_op, expiry_margin_seconds), client, registry,
            ClaimCheck(GCSBlobStore(gcs, client.bucket), client.inline_threshold_bytes), set(ended_before), log_tail_lines,
        )
        tick = work.tick

        with subscriber_client() as subscriber:
            received = pull(
                subscriber, path, max_messages=max_messages_per_tick, timeout=pull_timeout_seconds,
                follow_up_timeout=min(1.0, pull_timeout_seconds),
            )
            pending = registry.pending(context.log.warning)  # after the pull: every reply pulled is of a session registered by now
            folded = work.fold(work.sort(received, pending), pending)
            ack(subscriber, path, tick.to_ack)
            nack(subscriber, path, tick.to_nack)
        if work.decide(pending, folded):
            work.probe(topic, name)
        work.clean_up(pending)

        cursor = json.dumps((ended_before + tick.ended)[-CURSOR_SESSIONS:])
        if not tick.events and not tick.failures and cursor == json.dumps(ended_before):
            return SkipReason(
                f"no detached session ended ({len(received)} messages pulled from {path}, {len(pending)} pending)"
            )
        return SensorResult(asset_events=tick.events, run_requests=tick.failures, cursor=cursor)

    return _completion_sensor
