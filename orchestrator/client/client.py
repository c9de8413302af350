"""``PipesPubSubClient``, the public entry points: ``run`` (one function session), ``run_many`` (a fan-out
of sessions sharing one reply subscription) and ``run_detached`` (publish and return; the completion sensor
records the outcome).

Each call validates everything it can before publishing (``settings.py``), resolves the project, the
function and the topics once (``resolution.py``), finds what earlier attempts of the step left to re-attach
to (``reattach.py``), and runs each session through its lifecycle (``session_lifecycle.py``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    OpExecutionContext,
    PipesClient,
    PipesClientCompletedInvocation,
)
from dagster._core.definitions.asset_key import CoercibleToAssetKey
from dagster._core.pipes.context import build_external_execution_context_data
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR, PipesExtras, encode_env_var
from google.cloud import functions_v2, pubsub_v1

from dagster_gcf_pipes.orchestrator.session.context_injectors import PipesPubSubContextInjector
from dagster_gcf_pipes.orchestrator.modes.detached_registry import DetachedRegistry, PendingSession, registry_prefix
from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.modes.fanout import FanOutResult, run_fan_out
from dagster_gcf_pipes.orchestrator.session.reattach import (
    EarlierSession,
    SessionJournal,
    SessionKey,
    find_earlier_sessions,
    partition_key,
    payload_digest,
    step_key,
)
from dagster_gcf_pipes.orchestrator.session.reply_subscription import ReplyDemux, SubscriptionGone
from dagster_gcf_pipes.orchestrator.client.resolution import ResolvedCall, resolve_call, resolve_project
from dagster_gcf_pipes.orchestrator.client.session_lifecycle import FanOutStep, SessionLifecycle, SessionRun, recorded_topic
from dagster_gcf_pipes.orchestrator.session.pipes_session import StepContextData
from dagster_gcf_pipes.orchestrator.client.settings import PipesPubSubClientSettings, payload_problems
from dagster_gcf_pipes.orchestrator.diagnostics.tracing import traced_fan_out, traced_session
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.layout import context_key, session_prefix
from dagster_gcf_pipes.shared.protocol import REPLY_CHANNEL_PUBSUB, new_session_id
from dagster_gcf_pipes.shared.pubsub import subscriber_client
from dagster_gcf_pipes.shared.tracing import carried

#: how long a fan-out gathers its shards' progress records (trigger published, session opened) before writing
#: them as one engine event (``SessionJournal(coalesce=...)``)
PROGRESS_RECORD_SECONDS = 1.0
#: how long a fan-out shard's session record waits for others to be written with it (one engine event for
#: the shards that start together; ``SessionJournal(batch_sessions=...)``): added to each shard's start
SESSION_BATCH_SECONDS = 0.2


@dataclass(frozen=True)
class DetachedSession:
    """What ``run_detached`` started: record it as the step's metadata."""

    session_id: str
    trigger_message_id: str

    @property
    def metadata(self) -> dict[str, str]:
        return {"pipes_session_id": self.session_id, "pipes_trigger_message_id": self.trigger_message_id}



def within_capacity(context: OpExecutionContext | AssetExecutionContext, resolved: ResolvedCall, max_concurrency: int) -> int:
    """``max_concurrency``, lowered to the deployed function's capacity (when ``function_name`` says it): a
    shard above it is answered 429 by Cloud Run and retried by Eventarc after 10 s, then 20, 40 ... 600 s
    (https://cloud.google.com/eventarc/docs/retry-events), so it would start late or miss startup_timeout."""
    capacity = resolved.function_capacity
    if capacity is None or max_concurrency <= capacity:
        return max_concurrency
    context.log.warning(
        f"[pipes] fan-out: max_concurrency={max_concurrency} is above the capacity of the deployed function "
        f"({capacity} sessions at once: --max-instances x --concurrency); the shards above it would get HTTP 429 "
        f"and Eventarc would retry them after 10 s to 600 s, past startup_timeout. Running {capacity} at a time; "
        "raise the function's --max-instances (or --concurrency) to run more"
    )
    return capacity

class PipesPubSubClient(PipesPubSubClientSettings, PipesClient):
    """Trigger an event-driven Cloud Function over Pub/Sub and receive its Pipes messages over Pub/Sub.

    The function must be deployed with ``--trigger-topic`` = ``trigger_topic`` and decorated with
    ``@pipes_function``; it replies on ``reply_topic``. ``bucket`` holds what is too large for a Pub/Sub
    message (context, payloads, reply batches) and the per-session lease, all under ``prefix``.

    The earlier design stays available for migration: ``invocation="http"`` POSTs the trigger to
    ``function_url`` (the function's ``.http`` entry point) and ``reply_channel="gcs"`` exchanges the replies
    as JSON chunks in ``bucket`` polled every ``chunk_interval`` seconds; the two choices are independent.
    """

    def run(  # type: ignore[override]
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        payload: Mapping[str, Any] | None = None,
        extras: PipesExtras | None = None,
    ) -> PipesClientCompletedInvocation:
        """Run one function session; ``payload`` reaches the handler as its second argument."""
        payload = {} if payload is None else payload
        self.validate(payload)
        resolved = self._resolve(resolve_project(self.project))
        earlier = self._earlier_sessions(context, resolved)
        key = SessionKey(self._sessions.function_of(resolved), partition_key(context), payload_digest(payload))
        return self._run_session(context, resolved, payload, extras, earlier=earlier.get(key))

    @traced_fan_out
    def run_many(
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        payloads: Sequence[Mapping[str, Any]],
        max_concurrency: int = 10,
        shard_retries: int = 0,
        extras: PipesExtras | None = None,
    ) -> FanOutResult:
        """Fan out: one function session per payload (a shard), at most ``max_concurrency`` at once.

        Every shard is a full session with the guarantees of ``run()`` (dedupe, order, fencing, timeouts);
        on the Pub/Sub channel the shards share one reply subscription. A failed shard is retried
        ``shard_retries`` times, each time as a new session. Each shard's log lines reach the step prefixed
        ``[shard i]``. Waits for all shards; raises ``FanOutError`` listing every failed shard (with its remote
        traceback) once all have ended.
        """
        payloads = [dict(p) if isinstance(p, Mapping) else p for p in payloads]  # type: ignore[misc]
        problems = self.config_problems()
        if not payloads:
            problems.append("payloads is empty: pass one payload (a dict) per shard")
        if max_concurrency < 1:
            problems.append(f"max_concurrency={max_concurrency} must be at least 1")
        if shard_retries < 0:
            problems.append(f"shard_retries={shard_retries} must be 0 or more")
        problems += [f"shard {shard}: {problem}" for shard, p in enumerate(payloads) for problem in payload_problems(p)]
        if problems:
            raise PipesPubSubConfigError("; ".join(problems))
        resolved = self._resolve(resolve_project(self.project))
        max_concurrency = within_capacity(context, resolved, max_concurrency)
        interrupted = threading.Event()
        function, partition = self._sessions.function_of(resolved), partition_key(context)
        earlier = {
            key.shard: found for key, found in self._earlier_sessions(context, resolved).items()
            if key.shard >= 0 and key.function == function and key.partition_key == partition
        }
        journal = (
            SessionJournal(context, coalesce=PROGRESS_RECORD_SECONDS, batch_sessions=SESSION_BATCH_SECONDS)
            if self._sessions.reattaching(resolved) else None
        )
        fan_out = FanOutStep(StepContextData(), journal)
        with self._fan_out_replies(context, resolved, earlier, fan_out) as demux:

            def run_shard(shard: int, payload: Mapping[str, Any]) -> PipesClientCompletedInvocation:
                found = earlier.pop(shard, None)  # only a shard's first attempt in this step re-attaches
                if found is not None and found.record.payload_sha256 != payload_digest(payload):
                    found = None  # the shard's payload changed: the earlier session is not this one's
                return self._run_session(
                    context, resolved, payload, extras, log_prefix=f"[shard {shard}] ", interrupted=interrupted,
                    demux=demux, fan_out=fan_out, shard=shard, earlier=found,
                )

            return run_fan_out(
                carried(run_shard),  # the fan-out's trace, when tracing is on
                payloads,
                max_concurrency=max_concurrency,
                shard_retries=shard_retries,
                log=context.log,
                interrupted=interrupted,
            )

    @contextmanager
    def _fan_out_replies(
        self, context: OpExecutionContext | AssetExecutionContext, resolved: ResolvedCall,
        earlier: dict[int, EarlierSession], fan_out: FanOutStep,
    ) -> Iterator[ReplyDemux | None]:
        """On the Pub/Sub channel, one subscription and stream for all of a fan-out's shards: the earlier
        attempt's group, re-opened, when its shards re-attach (``earlier``, from which the shards of other
        groups are removed), else a new one."""
        if resolved.reply_channel != REPLY_CHANNEL_PUBSUB:
            yield None
            return
        journal = fan_out.journal
        group = max(earlier.values(), key=lambda e: e.record.triggered_at).record.group if earlier else ""
        for shard in [shard for shard, found in earlier.items() if found.record.group != group]:
            self._sessions.abandon(SessionRun(context, resolved, None, "", None, None, journal), earlier.pop(shard).record)
        with subscriber_client() as subscriber:
            demux = self._open_group(context, subscriber, resolved, group, earlier)
            try:
                context.log.info(f"[pipes] fan-out: every shard's replies arrive through {demux.subscription_path}")
                yield demux
            finally:
                demux.__exit__(None, None, None)
                if journal is not None:
                    journal.flush()
                    # kept until now: a later attempt may have replayed them
                    self._sessions.end_group(resolved.gcs, demux.group, demux.sessions,
                                             "its fan-out ended; the orchestrator stopped listening", fan_out)
                    journal.released(demux.subscription_paths, demux.sessions)

    def _open_group(
        self, context: OpExecutionContext | AssetExecutionContext, subscriber: pubsub_v1.SubscriberClient,
        resolved: ResolvedCall, group: str, earlier: dict[int, EarlierSession],
    ) -> ReplyDemux:
        """The group of the earlier attempt, replaying its subscriptions from the start, if they are still there;
        else a new group."""
        retain = self._sessions.reattaching(resolved)
        if group:
            expect = [found.record.session_id for found in earlier.values()]
            replay_from = max(earlier.values(), key=lambda e: len(e.record.subscriptions)).record.subscriptions
            topic = recorded_topic(resolved, next(iter(earlier.values())).record)
            demux = ReplyDemux(subscriber, topic=topic, group=group, log=context.log, retain=retain,
                               replay_from=replay_from, expect=expect, create_budget_seconds=self.preflight_timeout)
            try:
                return demux.__enter__()
            except SubscriptionGone as exc:
                context.log.warning(f"[pipes] fan-out: not re-attaching to the {len(earlier)} shard(s) of the earlier "
                                    f"attempt: {exc}; they run as new sessions")
                journal = SessionJournal(context)
                for found in earlier.values():
                    self._sessions.abandon(SessionRun(context, resolved, None, "", None, demux, journal), found.record)
                earlier.clear()
        group = secrets.token_hex(8)
        demux = ReplyDemux(subscriber, topic=resolved.reply_topic_of(group), group=group, log=context.log, retain=retain,
                           create_budget_seconds=self.preflight_timeout)
        return demux.__enter__()


    def _earlier_sessions(self, context: OpExecutionContext | AssetExecutionContext, resolved: ResolvedCall) -> dict[SessionKey, EarlierSession]:
        """The sessions earlier attempts of this step left unfinished, with a log line saying whether re-attach is on."""
        if not self.reattach:
            context.log.info("[pipes] reattach is off: this step starts new sessions, whatever an earlier attempt of "
                             "it left running")
            return {}
        if resolved.reply_channel != REPLY_CHANNEL_PUBSUB:
            context.log.info("[pipes] reattach is on but needs reply_channel='pubsub': this step starts new sessions")
            return {}
        chain, found = find_earlier_sessions(context)
        if found:
            context.log.info(
                f"[pipes] reattach is on: {len(found)} unfinished session(s) left by earlier attempts of step "
                f"{step_key(context)} in run(s) {', '.join(chain)}"
            )
        else:  # the usual case, a first attempt: not worth a line in the step's log
            context.log.debug(f"[pipes] reattach is on: no earlier attempt of step {step_key(context)} left a session")
        return found

    def run_detached(
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        payload: Mapping[str, Any] | None = None,
        asset_key: CoercibleToAssetKey | None = None,
        extras: PipesExtras | None = None,
    ) -> DetachedSession:
        """Publish the trigger and return at once: the function replies on ``detached_reply_topic``, where a
        durable subscription keeps its messages until ``pipes_completion_sensor`` records them.

        Use it from an op (not from the asset the function materializes: the sensor records that asset's
        materialization when the function reports it). ``asset_key`` names the asset the function
        materializes when its ``report_asset_materialization`` does not name one.
        """
        payload = {} if payload is None else payload
        self.validate(payload)
        if self.invocation != "pubsub":
            raise PipesPubSubConfigError(
                "run_detached needs invocation='pubsub': a detached session must not hang on an HTTP connection"
            )
        if not self.detached_reply_topic:
            raise PipesPubSubConfigError(
                "detached_reply_topic is not set: create a topic and a durable subscription for detached replies "
                "(gcloud pubsub topics create pipes-detached-replies; gcloud pubsub subscriptions create "
                "pipes-detached-completions --topic pipes-detached-replies) and set detached_reply_topic"
            )
        if self.detached_start_timeout <= 0:
            raise PipesPubSubConfigError(f"detached_start_timeout={self.detached_start_timeout:g} must be positive")
        resolved = self._resolve(resolve_project(self.project), detached=True)
        session_id = new_session_id()
        blob_store = GCSBlobStore(resolved.gcs, self.bucket)
        context_data = build_external_execution_context_data(context, extras)
        if asset_key is not None:
            context_data["asset_keys"] = [AssetKey.from_coercible(asset_key).to_user_string()]
        injector = PipesPubSubContextInjector(
            blob_store=blob_store, key=context_key(self.prefix, session_id), inline_threshold=self.inline_threshold_bytes
        )
        with injector.inject_context(context_data) as context_params:
            bootstrap = {
                DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_env_var(context_params),
                # nobody waits for a detached session to start: its own, longer start window
                DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_env_var(
                    replace(
                        self._sessions.session_params(resolved, session_id, resolved.reply_topic_of(session_id)),
                        start_window=self.detached_start_timeout,
                    ).to_params()
                ),
            }
        # registered before the trigger exists, so the completion sensor knows of every session that replies,
        # and reports the ones that never do
        registry = DetachedRegistry(resolved.gcs, self.bucket, registry_prefix(self.prefix, resolved.reply_topic_of(session_id)))
        registry.register(PendingSession(
            session_id=session_id,
            registered_at=time.time(),
            start_window=self.detached_start_timeout,
            function_timeout=resolved.function_timeout,
            trigger_topic=resolved.trigger_topic,
            run_id=context.run_id,
            step_key=context.op_execution_context.get_step_execution_context().step.key,
            # the sensor records the function's materializations on the run's partition(s)
            partition_keys=(
                tuple(context.partition_keys) if context.has_partition_key or context.has_partition_key_range else ()
            ),
        ))
        claim_check = ClaimCheck(blob_store, self.inline_threshold_bytes)
        try:
            sent = self._sessions.send_trigger(resolved, claim_check, session_id, payload, bootstrap)
        except BaseException:
            registry.remove(session_id)  # the step fails: nothing for the sensor to report
            blob_store.delete_prefix(session_prefix(self.prefix, session_id))
            raise
        message_id = sent.metadata["pipes_trigger_message_id"]
        context.log.info(
            f"[pipes] detached session {session_id}: trigger message {message_id} published to "
            f"{resolved.trigger_topic}; replies go to {self.detached_reply_topic}; it may start within "
            f"detached_start_timeout={self.detached_start_timeout:g}s"
        )
        return DetachedSession(session_id, message_id)

    def _resolve(self, project: str, *, detached: bool = False) -> ResolvedCall:
        return resolve_call(self, project, self._functions_client, detached=detached)

    def _functions_client(self) -> functions_v2.FunctionServiceClient:
        """The Cloud Functions API client (Application Default Credentials)."""
        return functions_v2.FunctionServiceClient()

    @property
    def _sessions(self) -> SessionLifecycle:
        return SessionLifecycle(self)

    @traced_session
    def _run_session(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        resolved: ResolvedCall,
        payload: Mapping[str, Any],
        extras: PipesExtras | None,
        **options: Any,
    ) -> PipesClientCompletedInvocation:
        """One session (``SessionLifecycle.run_session``), traced as a span of the step when tracing is on."""
        return self._sessions.run_session(context, resolved, payload, extras, **options)
