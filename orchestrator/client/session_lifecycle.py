"""One session's lifecycle, new or re-attached: record it, open its reply subscription and Pipes session,
**start** it (publish the trigger, or POST it), **wait** for ``closed`` while the reader hands every reply to
Dagster, **cancel** it if the run is terminated, and **tear it down** (end it durably in its lease, delete
its subscription, record it released). The steps of dagster-aws's ``PipesBaseClient``, over Pub/Sub.

``PipesPubSubClient`` (``client.py``) calls ``run_session`` once per ``run()`` and once per fan-out shard;
``run_detached`` only uses ``send_trigger`` and ``session_params``.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from dagster import (
    AssetExecutionContext,
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    OpExecutionContext,
    PipesClientCompletedInvocation,
)
from dagster_pipes import PipesExtras
from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.session.attach_claim import take_attach_claim
from dagster_gcf_pipes.orchestrator.session.context_injectors import PipesPubSubContextInjector
from dagster_gcf_pipes.orchestrator.diagnostics.errors import (
    CloudFunctionError,
    FunctionHeartbeatTimeout,
    FunctionStartupTimeout,
    FunctionTotalTimeout,
    PipesPubSubConfigError,
    PipesPubSubError,
    RunInterrupted,
)
from dagster_gcf_pipes.orchestrator.earlier_design.gcs_chunk_reader import PipesGCSChunkMessageReader
from dagster_gcf_pipes.orchestrator.earlier_design.http_invocation import HttpInvocation
from dagster_gcf_pipes.orchestrator.session.message_reader import PipesPubSubMessageReader
from dagster_gcf_pipes.orchestrator.session.pipes_session import StepContextData, open_session
from dagster_gcf_pipes.orchestrator.session.reattach import (
    EarlierSession,
    ReplayFilter,
    SessionJournal,
    SessionKey,
    SessionRecord,
    partition_key,
    payload_digest,
    probe,
)
from dagster_gcf_pipes.orchestrator.session.reply_subscription import ReplyDemux, SubscriptionGone, delete_subscription
from dagster_gcf_pipes.orchestrator.client.resolution import ResolvedCall
from dagster_gcf_pipes.orchestrator.session.end import end_group, end_lease, end_session
from dagster_gcf_pipes.orchestrator.client.settings import PipesPubSubClientSettings
from dagster_gcf_pipes.orchestrator.diagnostics.tracing import trace_metadata
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.layout import chunks_prefix, context_key, trigger_key
from dagster_gcf_pipes.shared.lease import read_lease
from dagster_gcf_pipes.shared.protocol import (
    LEASE_ENDED_PARAM,
    REPLY_CHANNEL_GCS,
    REPLY_CHANNEL_PUBSUB,
    ReplyChannelParams,
    Trigger,
    new_session_id,
)
from dagster_gcf_pipes.shared.pubsub import publish, subscriber_client

#: the lease outlives the function's timeout by this much, so it never expires under a running attempt
LEASE_MARGIN_SECONDS = 60.0

#: a session is over at the latest startup_timeout + function_timeout + this after its trigger was sent: the
#: function closes it itself a little before its timeout, so this only covers the last replies' way here
SESSION_CAP_MARGIN_SECONDS = 10.0


@dataclass(frozen=True)
class SentTrigger:
    """Where a session's trigger went, what to record of it, and (HTTP-invoked) the request in flight."""

    sent_to: str
    metadata: dict[str, str]
    http: HttpInvocation | None = None


@dataclass
class FanOutStep:
    """What a fan-out's shards share besides their reply subscription: the step's Pipes context (built once),
    the journal (gathering its per-shard progress records) and the sessions whose leases are already ended."""

    context_data: StepContextData
    journal: SessionJournal | None  # None: re-attach is off
    ended: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SessionRun:
    """What one session of a ``run``/``run_many`` call is run with."""

    context: OpExecutionContext | AssetExecutionContext
    resolved: ResolvedCall
    extras: PipesExtras | None
    log_prefix: str
    interrupted: threading.Event | None
    demux: ReplyDemux | None
    journal: SessionJournal | None  # None: re-attach is off
    fan_out: FanOutStep | None = None


class SessionDead(Exception):
    """A re-attached session shows no sign of life, or its subscription is gone: a new session is started."""


def recorded_topic(resolved: ResolvedCall, record: SessionRecord) -> str:
    """The reply topic an earlier attempt's session replies on (records written before reply_topics existed
    do not name it: they had one)."""
    return record.reply_topic or resolved.reply_topic_of(record.group or record.session_id)



def run_is_over(instance: Any, run_id: str) -> bool:
    """Whether the Dagster run ``run_id`` has ended (or is unknown to this instance)."""
    found = instance.get_run_by_id(run_id)
    return found is None or found.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def publish_trigger(publisher: Any, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
    """Publish a trigger; a topic that does not exist or may not be published to is a configuration error
    (resolution does not check topics beforehand: see its docstring)."""
    try:
        return publish(publisher, topic, data, attributes)
    except gexc.NotFound as exc:
        raise PipesPubSubConfigError(
            f"trigger_topic: topic {topic} does not exist; create it (gcloud pubsub topics create "
            f"{topic.rsplit('/', 1)[-1]} --project {topic.split('/')[1]}) or fix trigger_topic / function_name / project"
        ) from exc
    except gexc.PermissionDenied as exc:
        raise PipesPubSubConfigError(
            f"trigger_topic: not allowed to publish to {topic}: grant Dagster's service account "
            f"roles/pubsub.publisher on it ({exc.message})"
        ) from exc

class SessionLifecycle:
    """The sessions of one client's calls, each from its start to its teardown."""

    def __init__(self, settings: PipesPubSubClientSettings):
        self.settings = settings

    def end(
        self, gcs: storage.Client, session_id: str, reason: str, known: storage.Blob | None = None,
        written_after: float | None = None,
    ) -> None:
        """The session is over: ended in its lease (a trigger delivered later finds it ended and does not run),
        its other objects deleted (``session_end.end_session``). ``known``: the lease as last read."""
        settings = self.settings
        end_session(gcs, settings.bucket, settings.prefix, session_id, start_window=settings.startup_timeout,
                    reason=reason, known=known, written_after=written_after)

    def end_lease(self, gcs: storage.Client, session_id: str, reason: str, known: storage.Blob | None = None) -> storage.Blob:
        """End the session in its lease only, and return the tombstone: its objects stay (a fan-out group's
        replies until the group ends; a cancelled session's until it closes)."""
        settings = self.settings
        return end_lease(gcs, settings.bucket, settings.prefix, session_id, start_window=settings.startup_timeout,
                         reason=reason, known=known)

    def end_group(self, gcs: storage.Client, group: str, session_ids: Sequence[str], reason: str, fan_out: FanOutStep) -> None:
        """A fan-out group is over (``session_end.end_group``): every session ended, their objects deleted."""
        settings = self.settings
        end_group(gcs, settings.bucket, settings.prefix, group, session_ids, start_window=settings.startup_timeout,
                  reason=reason, already_ended=fan_out.ended)

    def run_session(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        resolved: ResolvedCall,
        payload: Mapping[str, Any],
        extras: PipesExtras | None,
        *,
        log_prefix: str = "",
        interrupted: threading.Event | None = None,
        demux: ReplyDemux | None = None,
        fan_out: FanOutStep | None = None,
        shard: int = -1,
        earlier: EarlierSession | None = None,
    ) -> PipesClientCompletedInvocation:
        """One session: the earlier attempt's, re-attached, if it is still there; else a new one."""
        if fan_out is not None:
            journal = fan_out.journal
        else:
            journal = SessionJournal(context) if self.reattaching(resolved) else None
        run = SessionRun(context, resolved, extras, log_prefix, interrupted, demux, journal, fan_out)
        if earlier is not None:
            assert journal is not None
            invocation = self._reattach(run, earlier)
            if invocation is not None:
                return invocation
        key = SessionKey(self.function_of(resolved), partition_key(context), payload_digest(payload), shard)
        return self._session(run, new_session_id(demux.group if demux else ""), payload=payload, key=key)

    def _reattach(self, run: SessionRun, earlier: EarlierSession) -> PipesClientCompletedInvocation | None:
        """Read the earlier attempt's session instead of starting one; None when it is gone or dead (logged,
        and cleaned up: this attempt is the one that finishes it)."""
        record, log = earlier.record, run.context.log
        # one re-attaching attempt per session: another one still running makes this step fail, naming it
        take_attach_claim(
            run.resolved.gcs, self.settings.bucket, self.settings.prefix, record.session_id,
            run_id=run.context.run.run_id, until=record.triggered_at + self._session_cap(run.resolved),
            is_over=functools.partial(run_is_over, run.context.instance),
        )
        with nullcontext(None) if run.demux is not None else subscriber_client() as subscriber:
            found = probe(subscriber, run.resolved.gcs, bucket=self.settings.bucket, prefix=self.settings.prefix,
                          record=record, start_window=self.settings.startup_timeout)
        if not found.attach:
            log.warning(f"{run.log_prefix}[pipes] not re-attaching to session {record.session_id} of run "
                        f"{record.run_id}: {found.state}; starting a new session")
            self.abandon(run, record)
            return None
        if found.subscriptions is not None and found.subscriptions != record.subscriptions:
            missing = sorted(set(record.subscriptions) - set(found.subscriptions))
            log.info(f"{run.log_prefix}[pipes] session {record.session_id}: {', '.join(missing)} recorded by an earlier "
                     "attempt but never created; its first subscription holds every reply")
            record = earlier.record = replace(record, subscriptions=found.subscriptions)
        log.info(f"{run.log_prefix}[pipes] re-attaching to session {record.session_id} of run {record.run_id} "
                 f"({found.state}): no new trigger; its replies are read again from the start, and the "
                 f"{len(earlier.recorded)} line(s) the step wrote since are checked so none is written twice")
        try:
            return self._session(run, record.session_id, attach=earlier)
        except SessionDead as dead:
            log.warning(f"{run.log_prefix}[pipes] session {record.session_id} of run {record.run_id} is dead: "
                        f"{dead}; it is ended, and a new session starts")
            return None

    def abandon(self, run: SessionRun, record: SessionRecord) -> None:
        """Finish an earlier attempt's session that will not be read: end it, delete its objects, and (unless
        it shares a fan-out group's) its subscription."""
        self.end(run.resolved.gcs, record.session_id, "abandoned by a later attempt of its step")
        if run.demux is None:
            with subscriber_client() as subscriber:
                for subscription in record.subscriptions:
                    delete_subscription(subscriber, subscription, run.context.log)
            assert run.journal is not None
            run.journal.released(record.subscriptions, [record.session_id])

    def _session(
        self,
        run: SessionRun,
        session_id: str,
        *,
        payload: Mapping[str, Any] | None = None,
        key: SessionKey | None = None,
        attach: EarlierSession | None = None,
    ) -> PipesClientCompletedInvocation:
        """Run a new session (``payload``, ``key``), or read the earlier attempt's one (``attach``), to its end."""
        context, resolved, demux, journal, log_prefix = run.context, run.resolved, run.demux, run.journal, run.log_prefix
        blob_store = GCSBlobStore(resolved.gcs, self.settings.bucket)
        claim_check = ClaimCheck(blob_store, self.settings.inline_threshold_bytes)
        if demux is not None:
            reply_topic = demux.topic
        elif attach is not None:
            reply_topic = recorded_topic(resolved, attach.record)
        else:
            reply_topic = resolved.reply_topic_of(session_id)
        channel_params = self.session_params(resolved, session_id, reply_topic)
        pubsub_replies = resolved.reply_channel == REPLY_CHANNEL_PUBSUB
        subscriber = subscriber_client() if pubsub_replies and demux is None else None
        reader: PipesPubSubMessageReader | PipesGCSChunkMessageReader
        if pubsub_replies:
            reader = PipesPubSubMessageReader(
                subscriber=subscriber,
                claim_check=claim_check,
                gcs=resolved.gcs,
                channel_params=channel_params,
                log=context.log,
                signing_secret=self.settings.signing_secret,
                log_prefix=log_prefix,
                demux=demux,
                retain=journal is not None,
                replay=ReplayFilter(attach.recorded) if attach is not None else None,
                replay_from=attach.record.subscriptions if attach is not None and demux is None else (),
                known_invocation=attach.record.invocation_id or None if attach is not None else None,
                on_owner=(lambda invocation: journal.opened(session_id, invocation)) if journal is not None else None,
                create_budget_seconds=self.settings.preflight_timeout,
                quiet_opened=demux is not None,
            )
        else:
            reader = PipesGCSChunkMessageReader(
                gcs=resolved.gcs, channel_params=channel_params, log=context.log, log_prefix=log_prefix
            )
        injector = PipesPubSubContextInjector(
            blob_store=blob_store,
            key=context_key(self.settings.prefix, session_id),
            inline_threshold=self.settings.inline_threshold_bytes,
        )
        if journal is not None:
            # before the subscription exists and the trigger is published (a crash leaves nothing unrecorded), and
            # before any replayed line is written
            if attach is not None:
                journal.session(replace(attach.record, subscriptions=tuple(reader.subscription_paths)), reattached=True)
            else:
                assert key is not None
                journal.session(self._record(run, reader, session_id, key, reply_topic), reattached=False)
        started, started_at = time.monotonic(), time.time()
        ended_because = "the session closed"
        try:
            # the op context: Dagster's pipes code reads run_id from it, which AssetExecutionContext deprecates
            op_context = getattr(context, "op_execution_context", context)
            step_data = run.fan_out.context_data if run.fan_out is not None else StepContextData()
            with open_session(op_context, injector, reader, run.extras, step_data) as session:
                sent_to = self.function_of(resolved)  # until the trigger is sent (or re-attached to)
                try:
                    if attach is None:
                        assert payload is not None
                        triggered_at = time.monotonic()
                        sent = self.send_trigger(resolved, claim_check, session_id, payload, session.get_bootstrap_env_vars())
                        sent_to = sent.sent_to
                        if demux is None:  # a fan-out's shards are counted in its progress lines, not one line each
                            context.log.info(f"{log_prefix}[pipes] session {session_id}: trigger sent to {sent.sent_to}")
                        if journal is not None and "pipes_trigger_message_id" in sent.metadata:
                            journal.triggered(session_id, sent.metadata["pipes_trigger_message_id"], sent.sent_to)
                        cap_at = triggered_at + self._session_cap(resolved)
                    else:
                        record = attach.record
                        sent = SentTrigger(record.function, {"pipes_trigger_message_id": record.trigger_message_id})
                        sent_to = sent.sent_to
                        triggered_at = time.monotonic()  # startup and heartbeats count from re-attaching
                        since_trigger = time.time() - record.triggered_at
                        remaining = self._session_cap(resolved) - since_trigger
                        cap_at = triggered_at + max(remaining, self.settings.startup_timeout)
                    reader.wait_for_close(
                        triggered_at=triggered_at,
                        sent_to=sent.sent_to,
                        startup_hint=self._startup_hint(sent.sent_to),
                        startup_timeout=self.settings.startup_timeout,
                        heartbeat_timeout=resolved.heartbeat_timeout,
                        total_timeout=self._total_timeout(resolved),
                        stop=lambda: self._stop_waiting(session_id, sent, run.interrupted, cap_at, resolved),
                    )
                except (KeyboardInterrupt, DagsterExecutionInterruptedError, RunInterrupted):
                    # also while the trigger was being sent: the lease is ended first, so a trigger that went out
                    # (or goes out still) finds its session ended and never runs
                    ended_because = "the Dagster run was terminated"
                    self._cancel(context, reader, resolved.gcs, sent_to, ended_because)
                    raise
                except (FunctionStartupTimeout, FunctionHeartbeatTimeout) as exc:
                    if attach is None:
                        raise
                    raise SessionDead(f"{type(exc).__name__}: {exc}") from exc
            # the GCS channel's last chunks are read as the session above closes
            if not reader.closed:
                raise PipesPubSubError(
                    f"session {session_id}: the function at {sent.sent_to} answered, but its `closed` message never "
                    f"arrived in gs://{self.settings.bucket}/{channel_params.key_prefix}/; check the function's logs"
                )
        except SubscriptionGone as exc:
            ended_because = f"{ended_because}; its reply subscription is gone"
            raise SessionDead(str(exc)) from exc
        except Exception as exc:
            ended_because = f"{ended_because}; {type(exc).__name__}"
            raise
        finally:
            reason = f"{ended_because}; the orchestrator stopped listening"
            known = reader.lease_read if isinstance(reader, PipesPubSubMessageReader) else None
            # the function ended its lease before it sent `closed` (the tombstone is written)
            ended_by_function = (reader.closed_params or {}).get(LEASE_ENDED_PARAM) is True
            if demux is not None and journal is not None:
                # a fan-out group's replies are kept until the group ends: a later attempt may replay them
                if not ended_by_function:
                    self.end_lease(resolved.gcs, session_id, reason, known)
                if run.fan_out is not None:
                    run.fan_out.ended.add(session_id)
            else:
                # durable: a late or duplicate delivery of the trigger finds the session ended and does not run
                # (ended by the function: the lease is read for GCS's clock, which the sweep goes by)
                self.end(resolved.gcs, session_id, reason, None if ended_by_function else known,
                         written_after=started_at if attach is None else None)
            if journal is not None and demux is None and isinstance(reader, PipesPubSubMessageReader):
                journal.released(reader.subscription_paths, [session_id])
            if subscriber is not None:
                subscriber.close()

        exception = (reader.closed_params or {}).get("exception")
        if exception:
            raise CloudFunctionError(session_id, exception)
        return PipesClientCompletedInvocation(
            session,
            metadata={
                "pipes_session_id": session_id,
                **sent.metadata,
                "pipes_invocation_id": reader.invocation_id or "",
                **({"pipes_reply_topic": reply_topic} if reply_topic else {}),
                **trace_metadata(reader.trace_id, self.settings.trace_url_template, resolved.project),
                **({"pipes_reattached_from_run": attach.record.run_id} if attach is not None else {}),
                "pipes_session_seconds": round(time.monotonic() - started, 3),
            },
        )

    def _record(self, run: SessionRun, reader: Any, session_id: str, key: SessionKey, reply_topic: str) -> SessionRecord:
        return SessionRecord(
            session_id=session_id,
            subscriptions=tuple(reader.subscription_paths),
            function=key.function,
            partition_key=key.partition_key,
            payload_sha256=key.payload_sha256,
            shard=key.shard,
            group=run.demux.group if run.demux is not None else "",
            reply_topic=reply_topic,
            triggered_at=time.time(),
        )

    def function_of(self, resolved: ResolvedCall) -> str:
        return resolved.trigger_topic or self.settings.function_url or ""

    def reattaching(self, resolved: ResolvedCall) -> bool:
        return self.settings.reattach and resolved.reply_channel == REPLY_CHANNEL_PUBSUB

    def _total_timeout(self, resolved: ResolvedCall) -> float | None:
        """The configured total timeout, unless the session cap comes first (its error says why)."""
        total = self.settings.total_timeout
        return total if total is not None and total <= self._session_cap(resolved) else None

    def _session_cap(self, resolved: ResolvedCall) -> float:
        """Every session is over by then, counted from sending the trigger: it starts within startup_timeout,
        the function closes it before function_timeout, and its last replies need a moment (on the GCS
        channel, up to two chunk intervals)."""
        chunks = 2 * self.settings.chunk_interval if resolved.reply_channel == REPLY_CHANNEL_GCS else 0
        margin = SESSION_CAP_MARGIN_SECONDS + chunks
        return self.settings.startup_timeout + resolved.function_timeout + margin

    def _stop_waiting(
        self, session_id: str, sent: SentTrigger, interrupted: threading.Event | None, cap_at: float, resolved: ResolvedCall
    ) -> bool:
        if interrupted is not None and interrupted.is_set():
            raise RunInterrupted(f"session {session_id}: the step was interrupted")
        if time.monotonic() > cap_at:
            raise FunctionTotalTimeout(
                f"session {session_id} did not close within startup_timeout + function_timeout + margin "
                f"({self._session_cap(resolved):g}s; function_timeout={resolved.function_timeout:g}s): the function ran "
                "past its timeout. Cloud Functions (2nd gen) does not stop a function at its timeout, and this one "
                "did not close the session itself: check that it runs this release of the integration, that "
                "function_timeout matches its deployed --timeout (or set function_name), and its logs"
            )
        if sent.http is None:
            return False
        # raises once the POST failed; on the GCS channel a 200 ends the wait, as in the earlier design
        return sent.http.succeeded() and self.settings.reply_channel == REPLY_CHANNEL_GCS

    def _startup_hint(self, sent_to: str) -> str:
        if self.settings.invocation == "http":
            return f"Check the logs of the function serving {sent_to} for errors at start-up"
        return (
            f"Check that a function is deployed with --trigger-topic {sent_to} (or that a push subscription or pull "
            "worker consumes that topic), that it is ACTIVE, and its logs for errors at start-up"
        )


    def send_trigger(
        self,
        resolved: ResolvedCall,
        claim_check: ClaimCheck,
        session_id: str,
        payload: Mapping[str, Any],
        bootstrap_env_vars: Mapping[str, str],
    ) -> SentTrigger:
        body, attributes = Trigger(session_id, payload, bootstrap_env_vars).encode()
        data, codec_attributes = claim_check.wrap(body, trigger_key(self.settings.prefix, session_id))
        attributes = {**attributes, **codec_attributes}
        if resolved.http is not None and self.settings.function_url:
            invocation = HttpInvocation(
                resolved.http,
                self.settings.function_url,
                timeout=self.settings.http_timeout,
                retry_seconds=self.settings.preflight_timeout,
            )
            invocation.start(data, attributes, session_id)
            url = self.settings.function_url
            return SentTrigger(url, {"pipes_function_url": url}, invocation)
        message_id = publish_trigger(resolved.publisher, resolved.trigger_topic, data, attributes)
        return SentTrigger(resolved.trigger_topic, {"pipes_trigger_message_id": message_id})

    def session_params(self, resolved: ResolvedCall, session_id: str, reply_topic: str) -> ReplyChannelParams:
        return ReplyChannelParams(
            topic=reply_topic,
            session_id=session_id,
            bucket=self.settings.bucket,
            prefix=self.settings.prefix,
            channel=resolved.reply_channel,
            key_prefix=chunks_prefix(self.settings.prefix, session_id),
            chunk_interval=self.settings.chunk_interval,
            inline_threshold=self.settings.inline_threshold_bytes,
            flush_interval=self.settings.flush_interval,
            heartbeat_interval=self.settings.heartbeat_interval,
            lease_seconds=resolved.function_timeout + LEASE_MARGIN_SECONDS,
            function_timeout=resolved.function_timeout,
            # counted by the function from the trigger's publishTime (Pub/Sub's clock, not ours): a delivery
            # after it finds nobody waiting for it
            start_window=self.settings.startup_timeout,
            signed=bool(self.settings.signing_secret),
            # with start_window, the trigger's own deadline: a re-publish (a fresh publishTime) cannot move it
            issued_at=time.time(),
            owner_token=secrets.token_hex(16),
        )

    def _cancel(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        reader: PipesPubSubMessageReader | PipesGCSChunkMessageReader,
        gcs: storage.Client,
        sent_to: str,
        reason: str,
    ) -> None:
        """The run was terminated: end the session in its lease at once (a function that has not started never
        will; a running one sees it within a second and is cancelled) and give a running function
        ``cancel_timeout`` seconds to report ``closed`` before the session is torn down."""
        session_id = reader.session_id
        tombstone = self.end_lease(gcs, session_id, reason)
        if not reader.opened and not read_lease(tombstone).invocation_id:  # no function had claimed the session
            context.log.warning(
                f"[pipes] run terminated before the function started session {session_id}: the session is ended, so "
                "its trigger can no longer start it"
            )
            return
        context.log.warning(f"[pipes] run terminated: asked the function to cancel session {session_id}")
        give_up_at = time.monotonic() + self.settings.cancel_timeout
        try:
            closed = reader.wait_for_close(
                triggered_at=time.monotonic(),
                sent_to=sent_to,
                startup_hint="Check the function's logs",
                startup_timeout=self.settings.cancel_timeout,
                heartbeat_timeout=float("inf"),  # bounded by cancel_timeout below
                stop=lambda: time.monotonic() > give_up_at,
            )
        except PipesPubSubError as exc:
            context.log.warning(f"[pipes] session {session_id}: could not wait for it to close after cancellation: {exc}")
            return
        if closed:
            context.log.warning(f"[pipes] session {session_id} closed after cancellation")
        else:
            context.log.warning(
                f"[pipes] session {session_id} did not report `closed` within "
                f"cancel_timeout={self.settings.cancel_timeout:g}s "
                "of the cancel request; its function may still run until its handler checks pipes.is_cancelled or "
                "reaches its timeout. Raise cancel_timeout to wait longer for a clean stop"
            )
