"""Re-attaching a step to the session an earlier attempt of it started, instead of running the function again.

A function outlives the process that triggered it. When that process dies (SIGKILL, OOM, node loss) and
the step runs again (a re-execution from failure, a run retry, run monitoring resuming the run), the new
attempt finds the earlier attempt's session and reads it instead of publishing a new trigger:

- **record** (``SessionJournal``): each session is written into the step's event log as structured engine
  events: ``session`` (id, reply subscription, function, partition key, shard, payload digest) after its
  reply subscription exists and *before* its trigger is published, so no crash can leave a published
  trigger unrecorded; ``triggered`` (the trigger's message id); ``opened`` (the invocation that owns it);
  ``released`` once an attempt finished with it (its subscription deleted). A re-attaching attempt writes
  ``session`` again before it reads anything.
- **find** (``find_earlier_sessions``): the records of the same step key in this run (a resumed run, a step
  retry) and up the ``parent_run_id`` chain (re-executions), oldest first. For each (function, partition,
  shard, payload) the latest session recorded is the candidate, unless it was released.
- **replay**: the session's reply subscription retains acknowledged messages, so the new attempt seeks it
  back to its start and receives everything the function sent again. Materializations, checks and custom
  messages are only written by Dagster when the step returns, so replaying them is what recovers them.
  Log lines were written as they arrived: ``ReplayFilter`` leaves out exactly those the earlier attempts
  wrote (below).
- **decide** (``probe``): no subscription → start a new session; no lease → the function never claimed the
  trigger: end the session in its lease (so the queued trigger can never start it) and start a new one;
  otherwise re-attach. A re-attached session that shows no sign of life (no ``opened`` within
  ``startup_timeout``, no reply within ``heartbeat_timeout`` after the replay) is dead: it is ended and a
  new session starts, with the reason logged.

Which lines the earlier attempts wrote: every line a session makes Dagster write (the function's log lines,
Dagster's own line on ``opened``, its engine event on a ``closed`` with an exception) is written in the
order the messages are handed, and only after the session's first record. So the lines recorded are a
prefix of the replayed session's lines, found in order among the step's event log entries after that
record; the first replayed line not found there, and every line after it, is new.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dagster import AssetExecutionContext, DagsterEventType, OpExecutionContext
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.events.log import EventLogEntry
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.session.group_commit import GroupCommit
from dagster_gcf_pipes.shared.layout import lease_key
from dagster_gcf_pipes.shared.lease import read_lease, tombstone, write_lease
from dagster_gcf_pipes.shared.retry import transient_retry

#: the metadata entry that marks this module's engine events; its value is the record's kind
RECORD_KEY = "pipes_reattach_record"
SESSION, TRIGGERED, OPENED, RELEASED = "session", "triggered", "opened", "released"
#: a fan-out's SESSION records, written together (``SessionJournal(batch_sessions=...)``)
SESSIONS = "sessions"
#: the most session records one ``sessions`` event holds
MAX_SESSIONS_A_RECORD = 100
#: a fan-out's TRIGGERED and OPENED records, many sessions to one engine event (``SessionJournal(coalesce=...)``)
PROGRESS = "progress"

#: what Dagster's PipesMessageHandler writes for an ``opened``, and for a ``closed`` with an exception
OPENED_LINE = "[pipes] external process successfully opened dagster pipes."
CLOSED_WITH_EXCEPTION_LINE = "[pipes] external process pipes closed with exception"

#: the reason an attempt writes into the lease of a session whose function never claimed it
NEVER_STARTED = "never started; ended by a later attempt of its step"

#: how far up the parent_run_id chain to look (a re-execution of a re-execution of ...)
MAX_ANCESTORS = 20

Context = OpExecutionContext | AssetExecutionContext


def step_context(context: Context) -> Any:
    return getattr(context, "op_execution_context", context).get_step_execution_context()


def step_key(context: Context) -> str:
    return step_context(context).step.key


def partition_key(context: Context) -> str:
    return context.partition_key if context.has_partition_key else ""


def payload_digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class SessionKey:
    """What makes a later attempt's call the same call: a session is re-attached only to an identical one."""

    function: str
    partition_key: str
    payload_sha256: str
    shard: int = -1  # the shard index in a fan-out, -1 for run()


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    #: the reply subscriptions that hold its replies (a fan-out group's, shared by its shards): the first
    #: attempt's, and one more for each attempt that re-attached
    subscriptions: tuple[str, ...]
    function: str  # the trigger topic, or the function's URL
    partition_key: str
    payload_sha256: str
    shard: int
    group: str  # the fan-out group's session-id prefix, or ""
    triggered_at: float  # wall clock when the session was first recorded (just before its trigger)
    run_id: str = ""  # the run that recorded it first
    reply_topic: str = ""  # projects/P/topics/T its replies are published to (one of reply_topics)
    trigger_message_id: str = ""
    invocation_id: str = ""  # the invocation that sent `opened`, once recorded

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.function, self.partition_key, self.payload_sha256, self.shard)

    def metadata(self) -> dict[str, Any]:
        values = {name: value for name, value in asdict(self).items() if name not in ("run_id", "invocation_id")}
        return {f"pipes_{name}": value for name, value in {**values, "subscriptions": json.dumps(self.subscriptions)}.items()}

    @classmethod
    def from_metadata(cls, values: Mapping[str, Any], run_id: str) -> SessionRecord:
        """The record, checked: ``CorruptRecord`` if a field is missing or of the wrong type, or if a
        subscription it names is not one of its own session's (or group's) reply subscriptions, which a
        re-execution would otherwise drain and delete."""
        known = {f.name for f in fields(cls)}
        kwargs = {name[len("pipes_"):]: value for name, value in values.items() if name[len("pipes_"):] in known}
        try:
            record = cls(**{**kwargs, "subscriptions": tuple(json.loads(kwargs["subscriptions"])), "run_id": run_id})
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(f"unreadable ({exc!r})") from exc
        record._check()
        return record

    def _check(self) -> None:
        texts = ("session_id", "function", "partition_key", "payload_sha256", "group", "reply_topic", "trigger_message_id")
        wrong = [name for name in texts if not isinstance(getattr(self, name), str)]
        wrong += [name for name in ("shard",) if not isinstance(self.shard, int) or isinstance(self.shard, bool)]
        wrong += [name for name in ("triggered_at",) if not isinstance(self.triggered_at, (int, float))]
        if wrong:
            raise CorruptRecord(f"fields of the wrong type: {', '.join(wrong)}")
        if not _SESSION_ID.fullmatch(self.session_id) or (self.group and not self.session_id.startswith(self.group)):
            raise CorruptRecord(f"session id {self.session_id!r} is not a session id (of group {self.group!r})")
        owner = f"group-{self.group}" if self.group else self.session_id
        mine = re.compile(rf"projects/[^/]+/subscriptions/dagster-pipes-{re.escape(owner)}(-[0-9a-f]{{8}})?")
        foreign = [s for s in self.subscriptions if not isinstance(s, str) or not mine.fullmatch(s)]
        if not self.subscriptions or foreign:
            raise CorruptRecord(f"it names subscriptions that are not its reply subscriptions: {foreign or '(none)'}")


class CorruptRecord(ValueError):
    """A session record in the event log that cannot be the library's: skipped (and said), never acted on."""


_SESSION_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class EarlierSession:
    """A session an earlier attempt of this step left unreleased, and the step's lines written since."""

    record: SessionRecord
    #: the text of every log line and engine event of the step since the session's first record, in order
    recorded: list[str] = field(default_factory=list)


class SessionJournal:
    """Writes this step's session records into its event log (engine events, from any thread).

    A session's record is written alone, before its trigger is published. ``coalesce`` (seconds, a fan-out's
    journal): the records that only spare a later attempt work (which trigger message, which invocation
    opened) are gathered and written as one ``progress`` event when the oldest waited ``coalesce`` seconds and
    at ``flush()``: one Dagster event per second instead of two per shard. One lost in a crash costs a
    re-attaching attempt a lease read, never a guarantee. ``batch_sessions`` (seconds, a fan-out's journal):
    session records that arrive together are written as one ``sessions`` event (``group_commit.py``); each
    ``session()`` still returns only once its record is written."""

    def __init__(self, context: Context, *, coalesce: float | None = None, batch_sessions: float | None = None):
        self._context = context
        self._coalesce = coalesce
        self._session_batches = (
            GroupCommit(self._write_sessions, window=batch_sessions, max_items=MAX_SESSIONS_A_RECORD)
            if batch_sessions is not None else None
        )
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, str]] = {TRIGGERED: {}, OPENED: {}}
        self._oldest_pending = 0.0

    def _write(self, kind: str, message: str, metadata: Mapping[str, Any]) -> None:
        DagsterEvent.engine_event(
            step_context(self._context), message, EngineEventData(metadata={RECORD_KEY: kind, **metadata})
        )

    def session(self, record: SessionRecord, *, reattached: bool) -> None:
        """Record the session; returns once the record is in the event log (its trigger may go out then)."""
        if self._session_batches is not None and not reattached:
            self._session_batches.add(record)
            return
        what = "re-attaching to" if reattached else "recorded"
        self._write(SESSION, f"[pipes] {what} session {record.session_id} (replies kept in {', '.join(record.subscriptions)})",
                    record.metadata())

    def _write_sessions(self, records: Sequence[SessionRecord]) -> None:
        listed = sorted(r.shard for r in records)
        shards = ", ".join(map(str, listed[:10])) + (", ..." if len(listed) > 10 else "")
        subscriptions = sorted({s for r in records for s in r.subscriptions})
        self._write(SESSIONS, f"[pipes] recorded {len(records)} session(s) of shards {shards} (replies kept in "
                    f"{', '.join(subscriptions)})", {"pipes_sessions": json.dumps([r.metadata() for r in records])})

    def triggered(self, session_id: str, message_id: str, topic: str) -> None:
        if self._coalesce is None:
            self._write(TRIGGERED, f"[pipes] session {session_id}: trigger message {message_id} published to {topic}",
                        {"pipes_session_id": session_id, "pipes_trigger_message_id": message_id})
        else:
            self._gather(TRIGGERED, session_id, message_id)

    def opened(self, session_id: str, invocation_id: str) -> None:
        if self._coalesce is None:
            self._write(OPENED, f"[pipes] session {session_id}: opened by invocation {invocation_id}",
                        {"pipes_session_id": session_id, "pipes_invocation_id": invocation_id})
        else:
            self._gather(OPENED, session_id, invocation_id)

    def _gather(self, kind: str, session_id: str, value: str) -> None:
        assert self._coalesce is not None
        with self._lock:
            if not any(self._pending.values()):
                self._oldest_pending = time.monotonic()
            self._pending[kind][session_id] = value
            due = time.monotonic() - self._oldest_pending >= self._coalesce
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what was gathered (nothing if nothing was)."""
        with self._lock:
            triggered, opened = self._pending[TRIGGERED], self._pending[OPENED]
            if not triggered and not opened:
                return
            self._pending = {TRIGGERED: {}, OPENED: {}}
        self._write(PROGRESS, f"[pipes] {len(triggered)} trigger(s) published, {len(opened)} session(s) opened",
                    {"pipes_triggered": json.dumps(triggered), "pipes_opened": json.dumps(opened)})

    def released(self, subscriptions: Sequence[str], session_ids: Iterable[str]) -> None:
        ids = sorted(session_ids)
        self._write(RELEASED, f"[pipes] released {len(ids)} session(s); deleted {', '.join(subscriptions)}",
                    {"pipes_subscriptions": json.dumps(list(subscriptions)), "pipes_session_ids": json.dumps(ids)})


def _run_chain(instance: Any, run_id: str) -> list[str]:
    """This run and its ancestors (``parent_run_id``), oldest first."""
    chain = [run_id]
    run = instance.get_run_by_id(run_id)
    while run is not None and run.parent_run_id and len(chain) <= MAX_ANCESTORS:
        chain.append(run.parent_run_id)
        run = instance.get_run_by_id(run.parent_run_id)
    return chain[::-1]


def _record_of(entry: EventLogEntry) -> tuple[str, Mapping[str, Any]] | None:
    event = entry.dagster_event
    if event is None or event.event_type != DagsterEventType.ENGINE_EVENT:
        return None
    metadata = getattr(event.event_specific_data, "metadata", None) or {}
    kind = metadata.get(RECORD_KEY)
    if kind is None:
        return None
    return kind.value, {name: value.value for name, value in metadata.items()}


def _line_of(entry: EventLogEntry) -> str | None:
    """The text of a line a session can make Dagster write: a log line, or an engine event's message."""
    if entry.dagster_event is None:
        return entry.user_message
    if entry.dagster_event.event_type == DagsterEventType.ENGINE_EVENT:
        return entry.dagster_event.message or ""
    return None


def find_earlier_sessions(context: Context) -> tuple[list[str], dict[SessionKey, EarlierSession]]:
    """The runs searched (oldest first) and, per key, the latest session recorded for this step in them,
    unless it was released. Recorded lines run from the session's first record to the end of the chain."""
    instance, key = context.instance, step_key(context)
    chain = _run_chain(instance, context.run.run_id)
    records: dict[str, SessionRecord] = {}
    first_seen: dict[str, int] = {}
    latest: dict[SessionKey, str] = {}
    released: set[str] = set()
    lines: list[tuple[int, str]] = []
    for run_id in chain:
        for entry in instance.all_logs(run_id):
            if entry.step_key != key:
                continue
            index = len(lines)
            found = _record_of(entry)
            if found is None:
                line = _line_of(entry)
                if line is not None:
                    lines.append((index, line))
                continue
            kind, values = found
            lines.append((index, ""))  # a record is no line of a session, but it orders them
            session_id = str(values.get("pipes_session_id", ""))
            if kind in (SESSION, SESSIONS):
                for session_values in [values] if kind == SESSION else _listed_records(values.get("pipes_sessions")):
                    try:
                        record = SessionRecord.from_metadata(session_values, run_id)
                    except CorruptRecord as exc:
                        context.log.warning(
                            f"[pipes] ignoring a session record of step {key} in run {run_id}: {exc}; it was not "
                            "written by this library as it is now (edited, or corrupt): its session is not re-attached to"
                        )
                        continue
                    earlier = records.get(record.session_id)
                    if earlier is not None:  # re-attached: keep what the first attempts learned
                        record = _merge(record, earlier)
                    records[record.session_id] = record
                    first_seen.setdefault(record.session_id, index)
                    latest.pop(record.key, None)
                    latest[record.key] = record.session_id
            elif kind == TRIGGERED and session_id in records:
                records[session_id] = _merge(records[session_id], trigger_message_id=str(values.get("pipes_trigger_message_id", "")))
            elif kind == OPENED and session_id in records:
                records[session_id] = _merge(records[session_id], invocation_id=str(values.get("pipes_invocation_id", "")))
            elif kind == PROGRESS:
                for field_name, entry in (("trigger_message_id", "pipes_triggered"), ("invocation_id", "pipes_opened")):
                    for gathered_id, value in _string_map(values.get(entry, "{}")).items():
                        if gathered_id in records:
                            records[gathered_id] = _merge(records[gathered_id], **{field_name: value})
            elif kind == RELEASED:
                released.update(_session_ids(values.get("pipes_session_ids", "[]")))
    found_sessions = {
        session_key: EarlierSession(
            records[session_id], [text for index, text in lines if index > first_seen[session_id] and text]
        )
        for session_key, session_id in latest.items()
        if session_id not in released
    }
    return chain, found_sessions


def _json_of(listed: Any) -> Any:
    """The JSON a record's metadata value holds; None for one that does not parse."""
    try:
        return json.loads(str(listed))
    except ValueError:
        return None


def _listed_records(listed: Any) -> list[Mapping[str, Any]]:
    """The session records a ``sessions`` event holds; a list that does not parse is one corrupt record."""
    found = _json_of(listed)
    if not isinstance(found, list):
        return [{}]
    return [values if isinstance(values, dict) else {} for values in found]


def _string_map(listed: Any) -> dict[str, str]:
    """The session-to-value map a ``progress`` record holds; empty for one that does not parse."""
    found = _json_of(listed)
    return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(found, dict) else {}


def _session_ids(listed: Any) -> list[str]:
    """The session ids a ``released`` record lists; none from one that does not parse."""
    found = _json_of(listed)
    return [i for i in found if isinstance(i, str)] if isinstance(found, list) else []


def _merge(record: SessionRecord, earlier: SessionRecord | None = None, **changes: str) -> SessionRecord:
    if earlier is not None:
        changes = {
            "run_id": earlier.run_id,
            "triggered_at": earlier.triggered_at,
            "trigger_message_id": record.trigger_message_id or earlier.trigger_message_id,
            "invocation_id": record.invocation_id or earlier.invocation_id,
            **changes,
        }
    return SessionRecord(**{**asdict(record), **changes})


class ReplayFilter:
    """Decides, for each line a replayed session makes Dagster write, whether an earlier attempt already wrote
    it: the lines written are a prefix of the session's lines, found in order among ``recorded`` (other
    lines of the step may sit between them). Once one is not found, no later one was written either."""

    def __init__(self, recorded: Sequence[str]):
        self._recorded = list(recorded)
        self._next = 0
        self._caught_up = not self._recorded
        self.skipped = 0

    def already_recorded(self, line: str) -> bool:
        if self._caught_up:
            return False
        try:
            found = self._recorded.index(line, self._next)
        except ValueError:
            self._caught_up = True
            return False
        self._next = found + 1
        self.skipped += 1
        return True


@dataclass(frozen=True)
class Probe:
    attach: bool
    state: str  # what was found, for the log line
    #: the record's subscriptions that exist (None: not looked at, a fan-out group's)
    subscriptions: tuple[str, ...] | None = None


@transient_retry()
def probe(
    subscriber: pubsub_v1.SubscriberClient | None, gcs: storage.Client, *, bucket: str, prefix: str,
    record: SessionRecord, start_window: float,
) -> Probe:
    """Whether the earlier session can be re-attached, judged by its subscription (unless ``subscriber`` is
    None: a fan-out group's, re-opened already) and its lease."""
    present: list[str] = []
    for index, subscription in enumerate(record.subscriptions if subscriber is not None else ()):
        try:
            subscriber.get_subscription(request={"subscription": subscription}, retry=None, timeout=10)
        except gexc.NotFound:
            if index == 0:
                return Probe(False, f"its reply subscription {subscription} is gone (deleted, or expired)")
            # a later attempt's, recorded but never created (killed in between, or its create failed): the first
            # one, made before the trigger and kept until the session is released, holds every reply anyway
            continue
        present.append(subscription)
    found = tuple(present) if subscriber is not None else None
    blob = gcs.bucket(bucket).blob(lease_key(prefix, record.session_id))
    held = gcs.bucket(bucket).get_blob(blob.name)
    if held is None:
        ended = tombstone(NEVER_STARTED, start_window)
        try:
            write_lease(blob, ended, generation=0)
        except gexc.PreconditionFailed:
            return Probe(True, "its function claimed it just now", found)
        return Probe(False, "its function had not started it; it is ended now, so its trigger can never start it")
    lease = read_lease(held)
    if lease.ended and lease.reason == NEVER_STARTED:
        # written by this probe (a retry after the answer to its write was lost) or by another attempt's: either
        # way no function ever ran the session, and there is nothing to collect
        return Probe(False, "its function had not started it; it is ended, so its trigger can never start it")
    if lease.ended:
        return Probe(True, f"its lease is ended ({lease.reason}): collecting what it sent", found)
    if lease.expires_at < time.time():
        return Probe(True, f"its lease of invocation {lease.invocation_id} expired: collecting what it sent", found)
    return Probe(True, f"invocation {lease.invocation_id} holds its lease", found)
