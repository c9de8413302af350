"""``PipesPubSubClient``: runs a Cloud Function as a Dagster Pipes session over Pub/Sub.

``run()`` validates everything it can before publishing, opens a Pipes session (context injector + a
per-session reply subscription), publishes the trigger, waits for ``closed`` (or a timeout), deletes the
session's GCS objects, and fails the step with the remote traceback if the function raised.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import google.auth
import requests
from dagster import (
    AssetExecutionContext,
    AssetKey,
    ConfigurableResource,
    DagsterExecutionInterruptedError,
    OpExecutionContext,
    PipesClient,
    PipesClientCompletedInvocation,
    open_pipes_session,
)
from dagster._core.definitions.asset_key import CoercibleToAssetKey
from dagster._core.pipes.context import build_external_execution_context_data
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR, PipesExtras, encode_env_var
from google.api_core import exceptions as gexc
from google.cloud import functions_v2, pubsub_v1, storage
from pydantic import Field

from dagster_gcf_pipes.orchestrator.context_injectors import PipesPubSubContextInjector
from dagster_gcf_pipes.orchestrator.detached_registry import DetachedRegistry, PendingSession, registry_prefix
from dagster_gcf_pipes.orchestrator.errors import (
    CloudFunctionError,
    FunctionHeartbeatTimeout,
    FunctionStartupTimeout,
    FunctionTotalTimeout,
    GCPUnreachableError,
    PipesPubSubConfigError,
    PipesPubSubError,
    RunInterrupted,
)
from dagster_gcf_pipes.orchestrator.fanout import FanOutResult, run_fan_out
from dagster_gcf_pipes.orchestrator.functions_api import derived_timeouts, resolve_function
from dagster_gcf_pipes.orchestrator.gcs_chunk_reader import PipesGCSChunkMessageReader
from dagster_gcf_pipes.orchestrator.http_invocation import HttpInvocation, http_session
from dagster_gcf_pipes.orchestrator.message_reader import PipesPubSubMessageReader
from dagster_gcf_pipes.orchestrator.reattach import (
    EarlierSession,
    ReplayFilter,
    SessionJournal,
    SessionKey,
    SessionRecord,
    find_earlier_sessions,
    partition_key,
    payload_digest,
    probe,
    step_key,
)
from dagster_gcf_pipes.orchestrator.reply_subscription import ReplyDemux, SubscriptionGone, delete_subscription
from dagster_gcf_pipes.orchestrator.session_end import end_lease, end_session
from dagster_gcf_pipes.orchestrator.tracing import trace_metadata, traced_fan_out, traced_session, url_template_problems
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore, validate_threshold
from dagster_gcf_pipes.shared.layout import chunks_prefix, context_key, session_prefix, trigger_key
from dagster_gcf_pipes.shared.lease import read_lease
from dagster_gcf_pipes.shared.protocol import (
    DEFAULT_INLINE_THRESHOLD,
    REPLY_CHANNEL_GCS,
    REPLY_CHANNEL_PUBSUB,
    ProtocolError,
    ReplyChannelParams,
    Trigger,
    dumps,
    new_session_id,
)
from dagster_gcf_pipes.shared.pubsub import publish, publisher_client, subscriber_client
from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS, transient_retry
from dagster_gcf_pipes.shared.tracing import carried

#: the lease outlives the function's timeout by this much, so it never expires under a running attempt
LEASE_MARGIN_SECONDS = 60.0

#: without function_name, the longest an event-driven function may run (540 s, the gen2 maximum), so the session
#: lease outlives any deployment; gcloud's own default, when --timeout is not given, is 60 s
DEFAULT_FUNCTION_TIMEOUT = 540.0

#: a session is over at the latest startup_timeout + function_timeout + this after its trigger was sent: the
#: function closes it itself a little before its timeout, so this only covers the last replies' way here
SESSION_CAP_MARGIN_SECONDS = 10.0


def resolve_project(project: str | None) -> str:
    """The configured project, else ``GOOGLE_CLOUD_PROJECT``, else the project of Application Default Credentials."""
    if project:
        return project
    if os.environ.get("GOOGLE_CLOUD_PROJECT"):
        return os.environ["GOOGLE_CLOUD_PROJECT"]
    try:
        _, adc_project = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        adc_project = None
    if not adc_project:
        raise PipesPubSubConfigError(
            "no Google Cloud project: set `project` on PipesPubSubClient or the GOOGLE_CLOUD_PROJECT environment "
            "variable (or `gcloud config set project ...` for Application Default Credentials)"
        )
    return adc_project


def topic_path(project: str, topic: str) -> str:
    return topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"


#: Topics and buckets seen to exist, per process and endpoint. Checking them on every run would cost two admin
#: operations per session against Pub/Sub's per-project admin quota (see "Cost and quotas" in
#: docs/architecture.md). Only positive answers are kept: a missing resource is checked again on the next run,
#: and one deleted after its check fails the step at its first use (publish, create subscription).
_seen_to_exist: set[tuple[str, str]] = set()
_seen_lock = threading.Lock()


def clear_resource_cache() -> None:
    """Forget which topics and buckets were seen to exist (they are checked again on the next run)."""
    with _seen_lock:
        _seen_to_exist.clear()


def _topic_exists(publisher: pubsub_v1.PublisherClient, path: str) -> bool:
    try:
        publisher.get_topic(request={"topic": path}, retry=None, timeout=10)
    except gexc.NotFound:
        return False
    return True


def _bucket_exists(client: storage.Client, bucket: str) -> bool:
    try:
        return client.bucket(bucket).exists(timeout=10, retry=None)
    except gexc.Forbidden:
        return True  # object-level roles only: we cannot tell, and the first upload will say


def _payload_problems(payload: Any) -> list[str]:
    if not isinstance(payload, Mapping):
        return [f"payload must be a dict (a JSON object), got {type(payload).__name__}"]
    try:
        dumps(dict(payload), "payload")
    except ProtocolError as exc:
        return [str(exc)]
    return []


@dataclass(frozen=True)
class _Resolved:
    """What one ``run``/``run_many``/``run_detached`` call works out once and shares across its sessions:
    the project, the clients (all thread-safe), the trigger topic and the function's timeouts."""

    project: str
    publisher: pubsub_v1.PublisherClient
    gcs: storage.Client
    http: requests.Session | None
    trigger_topic: str  # projects/P/topics/T, or "" when invoked over HTTP
    reply_channel: str  # pubsub, or gcs; a detached session always replies over Pub/Sub
    reply_topics: tuple[str, ...]  # projects/P/topics/T the sessions reply to, one or more; () on the GCS channel
    function_timeout: float
    heartbeat_timeout: float
    total_timeout: float | None


    def reply_topic_of(self, owner: str) -> str:
        """The reply topic of ``owner`` (a session id, or a fan-out group): with several, the one its id hashes to."""
        return shard_of(self.reply_topics, owner) if self.reply_topics else ""


def _recorded_topic(resolved: _Resolved, record: SessionRecord) -> str:
    """The reply topic an earlier attempt's session replies on (records written before reply_topics existed
    do not name it: they had one)."""
    return record.reply_topic or resolved.reply_topic_of(record.group or record.session_id)


def shard_of(topics: Sequence[str], owner: str) -> str:
    """One of ``topics``, picked by a stable hash of ``owner`` (the same in every process and Python version,
    unlike ``hash()``): session ids are random, so sessions spread evenly over the topics."""
    return topics[int.from_bytes(hashlib.sha256(owner.encode()).digest()[:8], "big") % len(topics)]


@dataclass(frozen=True)
class _SentTrigger:
    """Where a session's trigger went, what to record of it, and (HTTP-invoked) the request in flight."""

    sent_to: str
    metadata: dict[str, str]
    http: HttpInvocation | None = None


@dataclass(frozen=True)
class SessionRun:
    """What one session of a ``run``/``run_many`` call is run with."""

    context: OpExecutionContext | AssetExecutionContext
    resolved: _Resolved
    extras: PipesExtras | None
    log_prefix: str
    interrupted: threading.Event | None
    demux: ReplyDemux | None
    journal: SessionJournal | None  # None: re-attach is off


class SessionDead(Exception):
    """A re-attached session shows no sign of life, or its subscription is gone: a new session is started."""


@dataclass(frozen=True)
class DetachedSession:
    """What ``run_detached`` started: record it as the step's metadata."""

    session_id: str
    trigger_message_id: str

    @property
    def metadata(self) -> dict[str, str]:
        return {"pipes_session_id": self.session_id, "pipes_trigger_message_id": self.trigger_message_id}


class PipesPubSubClient(ConfigurableResource, PipesClient):
    """Trigger an event-driven Cloud Function over Pub/Sub and receive its Pipes messages over Pub/Sub.

    The function must be deployed with ``--trigger-topic`` = ``trigger_topic`` and decorated with
    ``@pipes_function``; it replies on ``reply_topic``. ``bucket`` holds what is too large for a Pub/Sub
    message (context, payloads, reply batches) and the per-session lease, all under ``prefix``.

    The earlier design stays available for migration: ``invocation="http"`` POSTs the trigger to
    ``function_url`` (the function's ``.http`` entry point) and ``reply_channel="gcs"`` exchanges the replies
    as JSON chunks in ``bucket`` polled every ``chunk_interval`` seconds; the two choices are independent.
    """

    project: str | None = Field(default=None, description="GCP project; default GOOGLE_CLOUD_PROJECT, then ADC.")
    function_name: str | None = Field(
        default=None,
        description="projects/P/locations/L/functions/F: the trigger topic and timeouts are read from the deployed "
        "function (Cloud Functions API) instead of trigger_topic / function_timeout.",
    )
    trigger_topic: str | None = Field(
        default=None, description="Topic the function is triggered by (name or projects/P/topics/T); for invocation='pubsub'."
    )
    reply_topic: str | None = Field(
        default=None, description="Topic the function publishes its Pipes messages to; for reply_channel='pubsub'."
    )
    reply_topics: list[str] | None = Field(
        default=None,
        description="Several reply topics instead of reply_topic: each session (a fan-out: each group) replies on the "
        "one its id hashes to. Every reply is billed once per subscription open on its topic, so K topics divide "
        "that factor by K: for many concurrent independent runs (docs/architecture.md, Cost and quotas).",
    )
    invocation: Literal["pubsub", "http"] = Field(
        default="pubsub", description="How the function is triggered: a Pub/Sub message, or an HTTP POST to function_url."
    )
    function_url: str | None = Field(default=None, description="The function's HTTPS URL; for invocation='http'.")
    http_timeout: float = Field(
        default=600.0, description="Seconds to wait for the HTTP-invoked function's response; at least its timeout."
    )
    http_auth: Literal["id_token", "none"] = Field(
        default="id_token", description="Send an ID token for function_url from ADC ('none' for unauthenticated functions)."
    )
    reply_channel: Literal["pubsub", "gcs"] = Field(
        default="pubsub", description="How replies travel: Pub/Sub batches, or the earlier design's JSON chunks in GCS."
    )
    chunk_interval: float = Field(
        default=10.0, description="Seconds between the GCS channel's chunk uploads and polls; for reply_channel='gcs'."
    )
    bucket: str = Field(description="GCS bucket for claim-check objects and session leases (no gs://).")
    prefix: str = Field(default="dagster-pipes", description="Object prefix in `bucket` for session objects.")
    inline_threshold_bytes: int = Field(
        default=DEFAULT_INLINE_THRESHOLD, description="Bodies above this many bytes travel through GCS."
    )
    startup_timeout: float = Field(default=120.0, description="Seconds from trigger to `opened` before failing.")
    heartbeat_timeout: float = Field(default=60.0, description="Seconds of silence from a running function before failing.")
    heartbeat_interval: float = Field(default=10.0, description="Seconds between the function's idle heartbeats.")
    flush_interval: float = Field(
        default=0.0,
        description="Seconds a message may wait for more to join its batch (0: batches form while the previous publish is in flight).",
    )
    total_timeout: float | None = Field(default=None, description="Optional cap on the whole session, in seconds.")
    function_timeout: float | None = Field(
        default=None,
        description="The function's timeout in seconds (default: from function_name's deployment, else 540); "
        "the session lease lasts this long plus a margin.",
    )
    cancel_timeout: float = Field(
        default=30.0, description="Seconds a cancelled session gets to report `closed` before it is torn down."
    )
    signing_secret: str | None = Field(
        default=None,
        description="Shared secret for HMAC-signed replies (use EnvVar('DAGSTER_PIPES_SIGNING_SECRET')); off if unset.",
    )
    detached_reply_topic: str | None = Field(
        default=None,
        description="Topic detached sessions (run_detached) reply to; a durable subscription on it feeds the completion sensor.",
    )
    detached_start_timeout: float = Field(
        default=3600.0,
        description="Seconds from a detached trigger's publishTime within which the function may still start it "
        "(startup_timeout is for attached sessions, where a step waits). Eventarc retries a failed delivery with "
        "backoff from ~10 s to 600 s: keep this above the function outages to ride out. The completion sensor "
        "reports a session that has not closed by then plus function_timeout as expired.",
    )
    reattach: bool = Field(
        default=True,
        description="A step run again after its orchestrator died (re-execution, retry, resumed run) re-attaches to "
        "the sessions the earlier attempt left instead of triggering the function again; needs reply_channel='pubsub'. "
        "Reply subscriptions then keep acknowledged replies for a day.",
    )
    preflight_timeout: float = Field(
        default=30.0,
        description="Seconds to keep retrying while GCP is unreachable: the checks of topics and bucket, and the HTTP POST.",
    )
    trace_url_template: str | None = Field(
        default=None,
        description="A link to a session's trace, recorded as pipes_trace_url: {trace_id} and {project} are filled in, "
        "e.g. https://console.cloud.google.com/traces/list?tid={trace_id}&project={project} (Cloud Trace).",
    )

    def _validated(self, payload: Mapping[str, Any]) -> str:
        """Check configuration and input before anything is published; return the project."""
        problems = self._config_problems() + _payload_problems(payload)
        if problems:
            raise PipesPubSubConfigError("; ".join(problems))
        return resolve_project(self.project)

    def _config_problems(self) -> list[str]:
        problems = []
        try:
            validate_threshold(self.inline_threshold_bytes)
        except ValueError as exc:
            problems.append(str(exc))
        if self.bucket.startswith("gs://") or "/" in self.bucket:
            problems.append(f"bucket={self.bucket!r} must be a bare bucket name (no gs://, no path); use `prefix` for a path")
        if not 0 < self.heartbeat_interval * 2 <= self.heartbeat_timeout:
            problems.append(
                f"heartbeat_timeout={self.heartbeat_timeout:g} must be at least twice heartbeat_interval="
                f"{self.heartbeat_interval:g}, or a healthy but quiet function is taken for dead"
            )
        return problems + self._mode_problems() + url_template_problems(self.trace_url_template)

    def _mode_problems(self) -> list[str]:
        problems = []
        if self.invocation == "pubsub" and not (self.trigger_topic or self.function_name):
            problems.append(
                "trigger_topic is not set: name the topic the function is deployed with (--trigger-topic), or set "
                "function_name to read it from the deployment"
            )
        if self.invocation == "http":
            if self.function_name:
                problems.append(
                    "function_name resolves a Pub/Sub-triggered function; with invocation='http' set function_url instead"
                )
            if not self.function_url or not self.function_url.startswith(("https://", "http://")):
                problems.append(
                    f"function_url={self.function_url!r}: invocation='http' needs the function's URL "
                    "(gcloud functions describe F --region R --format='value(url)')"
                )
            if self.http_timeout < (self.function_timeout or DEFAULT_FUNCTION_TIMEOUT):
                problems.append(
                    f"http_timeout={self.http_timeout:g} is shorter than function_timeout="
                    f"{self.function_timeout or DEFAULT_FUNCTION_TIMEOUT:g}: "
                    "a long session would fail while the function still runs; raise http_timeout"
                )
        if self.reply_channel == REPLY_CHANNEL_PUBSUB:
            problems += self._reply_topic_problems()
        if self.reply_channel == REPLY_CHANNEL_GCS:
            if self.chunk_interval <= 0:
                problems.append(f"chunk_interval={self.chunk_interval:g} must be positive")
            if self.signing_secret:
                problems.append(
                    "signing_secret signs Pub/Sub replies; GCS chunks are guarded by the bucket's IAM: unset "
                    "signing_secret or use reply_channel='pubsub'"
                )
        return problems

    def _reply_topic_problems(self) -> list[str]:
        if self.reply_topic and self.reply_topics:
            return [
                "reply_topic and reply_topics are both set: set reply_topic for one reply topic, or list every "
                "topic (that one included) in reply_topics"
            ]
        if not (self.reply_topic or self.reply_topics):
            return ["reply_topic is not set: name the topic the function publishes its replies to"]
        topics = self.reply_topics or []
        repeated = sorted({topic for topic in topics if topics.count(topic) > 1})
        if repeated:
            return [f"reply_topics lists {', '.join(repeated)} more than once: list each topic once"]
        return []

    def _preflight(self, service: str, emulator_env_var: str, call: Any, *args: Any) -> Any:
        try:
            return transient_retry(max_seconds=self.preflight_timeout)(call)(*args)
        except TRANSIENT_ERRORS as exc:
            raise GCPUnreachableError(
                f"{service} did not answer within preflight_timeout={self.preflight_timeout:g}s ({exc}); check the "
                f"network path to {service} (or that the emulator at {emulator_env_var}="
                f"{os.environ.get(emulator_env_var, '(unset)')} is running)"
            ) from exc

    def _exists(self, service: str, emulator_env_var: str, check: Any, client: Any, name: str) -> bool:
        """``check(client, name)`` through ``_preflight``, made once per process for a resource that exists."""
        key = (os.environ.get(emulator_env_var, ""), name)  # the emulator's address, or "" for Google Cloud
        with _seen_lock:
            if key in _seen_to_exist:
                return True
        exists = bool(self._preflight(service, emulator_env_var, check, client, name))
        if exists:
            with _seen_lock:
                _seen_to_exist.add(key)
        return exists

    def _check_resources(self, resolved: _Resolved, topics: Mapping[str, str]) -> None:
        """``topics``: each topic the call uses, and the setting that names it."""
        publisher, gcs = resolved.publisher, resolved.gcs
        for path, setting in topics.items():
            if not self._exists("Pub/Sub", "PUBSUB_EMULATOR_HOST", _topic_exists, publisher, path):
                raise PipesPubSubConfigError(
                    f"{setting}: topic {path} does not exist; create it (gcloud pubsub topics create "
                    f"{path.rsplit('/', 1)[-1]} --project {path.split('/')[1]}) or fix {setting} / project"
                )
        if not self._exists("Cloud Storage", "STORAGE_EMULATOR_HOST", _bucket_exists, gcs, self.bucket):
            raise PipesPubSubConfigError(
                f"bucket: gs://{self.bucket} does not exist; create it (gcloud storage buckets create "
                f"gs://{self.bucket}) or fix `bucket`"
            )

    def run(  # type: ignore[override]
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        payload: Mapping[str, Any] | None = None,
        extras: PipesExtras | None = None,
    ) -> PipesClientCompletedInvocation:
        """Run one function session; ``payload`` reaches the handler as its second argument."""
        payload = {} if payload is None else payload
        project = self._validated(payload)
        resolved = self._resolve(project)
        earlier = self._earlier_sessions(context, resolved)
        key = SessionKey(self._function_of(resolved), partition_key(context), payload_digest(payload))
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
        ``shard_retries`` times, each time as a new session. Each shard's log lines reach the step prefixed ``[shard i]``. Waits for all shards; raises
        ``FanOutError`` listing every failed shard (with its remote traceback) once all have ended.
        """
        payloads = [dict(p) if isinstance(p, Mapping) else p for p in payloads]  # type: ignore[misc]
        problems = self._config_problems()
        if not payloads:
            problems.append("payloads is empty: pass one payload (a dict) per shard")
        if max_concurrency < 1:
            problems.append(f"max_concurrency={max_concurrency} must be at least 1")
        if shard_retries < 0:
            problems.append(f"shard_retries={shard_retries} must be 0 or more")
        problems += [f"shard {shard}: {problem}" for shard, p in enumerate(payloads) for problem in _payload_problems(p)]
        if problems:
            raise PipesPubSubConfigError("; ".join(problems))
        resolved = self._resolve(resolve_project(self.project))
        interrupted = threading.Event()
        function, partition = self._function_of(resolved), partition_key(context)
        earlier = {
            key.shard: found for key, found in self._earlier_sessions(context, resolved).items()
            if key.shard >= 0 and key.function == function and key.partition_key == partition
        }
        with self._fan_out_replies(context, resolved, earlier) as demux:

            def run_shard(shard: int, payload: Mapping[str, Any]) -> PipesClientCompletedInvocation:
                found = earlier.pop(shard, None)  # only a shard's first attempt in this step re-attaches
                if found is not None and found.record.payload_sha256 != payload_digest(payload):
                    found = None  # the shard's payload changed: the earlier session is not this one's
                return self._run_session(
                    context, resolved, payload, extras, log_prefix=f"[shard {shard}] ", interrupted=interrupted,
                    demux=demux, shard=shard, earlier=found,
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
        self, context: OpExecutionContext | AssetExecutionContext, resolved: _Resolved, earlier: dict[int, EarlierSession]
    ) -> Iterator[ReplyDemux | None]:
        """On the Pub/Sub channel, one subscription and stream for all of a fan-out's shards: the earlier
        attempt's group, re-opened, when its shards re-attach (``earlier``, from which the shards of other
        groups are removed), else a new one."""
        if resolved.reply_channel != REPLY_CHANNEL_PUBSUB:
            yield None
            return
        journal = SessionJournal(context) if self._reattaching(resolved) else None
        group = max(earlier.values(), key=lambda e: e.record.triggered_at).record.group if earlier else ""
        for shard in [shard for shard, found in earlier.items() if found.record.group != group]:
            self._abandon(SessionRun(context, resolved, None, "", None, None, journal), earlier.pop(shard).record)
        with subscriber_client() as subscriber:
            demux = self._open_group(context, subscriber, resolved, group, earlier)
            try:
                context.log.info(f"[pipes] fan-out: every shard's replies arrive through {demux.subscription_path}")
                yield demux
            finally:
                demux.__exit__(None, None, None)
                if journal is not None:
                    for session_id in demux.sessions:  # kept until now: a later attempt may have replayed them
                        end_session(resolved.gcs, self.bucket, self.prefix, session_id, start_window=self.startup_timeout,
                                    reason="its fan-out ended; the orchestrator stopped listening")
                    journal.released(demux.subscription_paths, demux.sessions)

    def _open_group(
        self, context: OpExecutionContext | AssetExecutionContext, subscriber: pubsub_v1.SubscriberClient,
        resolved: _Resolved, group: str, earlier: dict[int, EarlierSession],
    ) -> ReplyDemux:
        """The group of the earlier attempt, replaying its subscriptions from the start, if they are still there;
        else a new group."""
        retain = self._reattaching(resolved)
        if group:
            expect = [found.record.session_id for found in earlier.values()]
            replay_from = max(earlier.values(), key=lambda e: len(e.record.subscriptions)).record.subscriptions
            topic = _recorded_topic(resolved, next(iter(earlier.values())).record)
            demux = ReplyDemux(subscriber, topic=topic, group=group, log=context.log, retain=retain,
                               replay_from=replay_from, expect=expect)
            try:
                return demux.__enter__()
            except SubscriptionGone as exc:
                context.log.warning(f"[pipes] fan-out: not re-attaching to the {len(earlier)} shard(s) of the earlier "
                                    f"attempt: {exc}; they run as new sessions")
                journal = SessionJournal(context)
                for found in earlier.values():
                    self._abandon(SessionRun(context, resolved, None, "", None, demux, journal), found.record)
                earlier.clear()
        group = secrets.token_hex(8)
        demux = ReplyDemux(subscriber, topic=resolved.reply_topic_of(group), group=group, log=context.log, retain=retain)
        return demux.__enter__()

    def _resolve(self, project: str, *, detached: bool = False) -> _Resolved:
        """Resolve the function (if named), derive its timeouts, and check that every topic and the bucket exist."""
        deployed = resolve_function(self.function_name, self._functions_client) if self.function_name else None
        trigger_topic = ""
        if self.invocation == "pubsub":
            trigger_topic = topic_path(project, self.trigger_topic) if self.trigger_topic else ""
            if deployed is not None:
                if trigger_topic and trigger_topic != deployed.trigger_topic:
                    raise PipesPubSubConfigError(
                        f"trigger_topic {trigger_topic} is not the topic {self.function_name} is deployed with "
                        f"({deployed.trigger_topic}): remove trigger_topic (function_name supplies it) or fix it"
                    )
                trigger_topic = deployed.trigger_topic
        reply_channel = REPLY_CHANNEL_PUBSUB if detached else self.reply_channel
        reply_topics = self._reply_topics(project, detached) if reply_channel == REPLY_CHANNEL_PUBSUB else {}
        derived = derived_timeouts(deployed) if deployed is not None else {}
        http = http_session(self.function_url, self.http_auth) if self.invocation == "http" and self.function_url else None
        resolved = _Resolved(
            project=project,
            publisher=publisher_client(),
            gcs=storage.Client(project=project),
            http=http,
            trigger_topic=trigger_topic,
            reply_channel=reply_channel,
            reply_topics=tuple(reply_topics),
            function_timeout=self.function_timeout or derived.get("function_timeout", DEFAULT_FUNCTION_TIMEOUT),
            # a silence longer than the function's whole timeout cannot be a live function; never under 2 intervals
            heartbeat_timeout=max(
                min(self.heartbeat_timeout, derived.get("heartbeat_timeout", self.heartbeat_timeout)),
                2 * self.heartbeat_interval,
            ),
            total_timeout=self.total_timeout if self.total_timeout is not None else derived.get("total_timeout"),
        )
        topics = {trigger_topic: "trigger_topic", **reply_topics}
        self._check_resources(resolved, {path: setting for path, setting in topics.items() if path})
        return resolved

    def _reply_topics(self, project: str, detached: bool) -> dict[str, str]:
        """The path of each reply topic, and the setting that names it."""
        if detached:
            return {topic_path(project, self.detached_reply_topic or ""): "detached_reply_topic"}
        if self.reply_topics:
            return {topic_path(project, topic): "reply_topics" for topic in self.reply_topics}
        return {topic_path(project, self.reply_topic or ""): "reply_topic"}

    def _functions_client(self) -> functions_v2.FunctionServiceClient:
        """The Cloud Functions API client (Application Default Credentials)."""
        return functions_v2.FunctionServiceClient()

    @traced_session
    def _run_session(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        resolved: _Resolved,
        payload: Mapping[str, Any],
        extras: PipesExtras | None,
        *,
        log_prefix: str = "",
        interrupted: threading.Event | None = None,
        demux: ReplyDemux | None = None,
        shard: int = -1,
        earlier: EarlierSession | None = None,
    ) -> PipesClientCompletedInvocation:
        """One session: the earlier attempt's, re-attached, if it is still there; else a new one."""
        journal = SessionJournal(context) if self._reattaching(resolved) else None
        run = SessionRun(context, resolved, extras, log_prefix, interrupted, demux, journal)
        if earlier is not None:
            assert journal is not None
            invocation = self._reattach(run, earlier)
            if invocation is not None:
                return invocation
        key = SessionKey(self._function_of(resolved), partition_key(context), payload_digest(payload), shard)
        return self._session(run, new_session_id(demux.group if demux else ""), payload=payload, key=key)

    def _reattach(self, run: SessionRun, earlier: EarlierSession) -> PipesClientCompletedInvocation | None:
        """Read the earlier attempt's session instead of starting one; None when it is gone or dead (logged,
        and cleaned up: this attempt is the one that finishes it)."""
        record, log = earlier.record, run.context.log
        with nullcontext(None) if run.demux is not None else subscriber_client() as subscriber:
            found = probe(subscriber, run.resolved.gcs, bucket=self.bucket, prefix=self.prefix, record=record,
                          start_window=self.startup_timeout)
        if not found.attach:
            log.warning(f"{run.log_prefix}[pipes] not re-attaching to session {record.session_id} of run "
                        f"{record.run_id}: {found.state}; starting a new session")
            self._abandon(run, record)
            return None
        log.info(f"{run.log_prefix}[pipes] re-attaching to session {record.session_id} of run {record.run_id} "
                 f"({found.state}): no new trigger; its replies are read again from the start, and the "
                 f"{len(earlier.recorded)} line(s) the step wrote since are checked so none is written twice")
        try:
            return self._session(run, record.session_id, attach=earlier)
        except SessionDead as dead:
            log.warning(f"{run.log_prefix}[pipes] session {record.session_id} of run {record.run_id} is dead: "
                        f"{dead}; it is ended, and a new session starts")
            return None

    def _abandon(self, run: SessionRun, record: SessionRecord) -> None:
        """Finish an earlier attempt's session that will not be read: end it, delete its objects, and (unless
        it shares a fan-out group's) its subscription."""
        end_session(run.resolved.gcs, self.bucket, self.prefix, record.session_id, start_window=self.startup_timeout,
                    reason="abandoned by a later attempt of its step")
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
        blob_store = GCSBlobStore(resolved.gcs, self.bucket)
        claim_check = ClaimCheck(blob_store, self.inline_threshold_bytes)
        if demux is not None:
            reply_topic = demux.topic
        elif attach is not None:
            reply_topic = _recorded_topic(resolved, attach.record)
        else:
            reply_topic = resolved.reply_topic_of(session_id)
        channel_params = self._session_params(resolved, session_id, reply_topic)
        pubsub_replies = resolved.reply_channel == REPLY_CHANNEL_PUBSUB
        subscriber = subscriber_client() if pubsub_replies and demux is None else None
        reader: PipesPubSubMessageReader | PipesGCSChunkMessageReader
        if pubsub_replies:
            reader = PipesPubSubMessageReader(
                subscriber=subscriber,
                claim_check=claim_check,
                channel_params=channel_params,
                log=context.log,
                signing_secret=self.signing_secret,
                log_prefix=log_prefix,
                demux=demux,
                retain=journal is not None,
                replay=ReplayFilter(attach.recorded) if attach is not None else None,
                replay_from=attach.record.subscriptions if attach is not None and demux is None else (),
                known_invocation=attach.record.invocation_id or None if attach is not None else None,
                on_owner=(lambda invocation: journal.opened(session_id, invocation)) if journal is not None else None,
            )
        else:
            reader = PipesGCSChunkMessageReader(
                gcs=resolved.gcs, channel_params=channel_params, log=context.log, log_prefix=log_prefix
            )
        injector = PipesPubSubContextInjector(
            blob_store=blob_store, key=context_key(self.prefix, session_id), inline_threshold=self.inline_threshold_bytes
        )
        if journal is not None:
            # before the subscription exists and the trigger is published (a crash leaves nothing unrecorded), and
            # before any replayed line is written
            if attach is not None:
                journal.session(replace(attach.record, subscriptions=tuple(reader.subscription_paths)), reattached=True)
            else:
                assert key is not None
                journal.session(self._record(run, reader, session_id, key, reply_topic), reattached=False)
        started = time.monotonic()
        ended_because = "the session closed"
        try:
            with open_pipes_session(context=context, context_injector=injector, message_reader=reader, extras=run.extras) as session:
                if attach is None:
                    assert payload is not None
                    triggered_at = time.monotonic()
                    sent = self._send_trigger(resolved, claim_check, session_id, payload, session.get_bootstrap_env_vars())
                    context.log.info(f"{log_prefix}[pipes] session {session_id}: trigger sent to {sent.sent_to}")
                    if journal is not None and "pipes_trigger_message_id" in sent.metadata:
                        journal.triggered(session_id, sent.metadata["pipes_trigger_message_id"])
                    cap_at = triggered_at + self._session_cap(resolved)
                else:
                    record = attach.record
                    sent = _SentTrigger(record.function, {"pipes_trigger_message_id": record.trigger_message_id})
                    triggered_at = time.monotonic()  # startup and heartbeats count from re-attaching
                    since_trigger = time.time() - record.triggered_at
                    cap_at = triggered_at + max(self._session_cap(resolved) - since_trigger, self.startup_timeout)
                try:
                    reader.wait_for_close(
                        triggered_at=triggered_at,
                        sent_to=sent.sent_to,
                        startup_hint=self._startup_hint(sent.sent_to),
                        startup_timeout=self.startup_timeout,
                        heartbeat_timeout=resolved.heartbeat_timeout,
                        total_timeout=self._total_timeout(resolved),
                        stop=lambda: self._stop_waiting(session_id, sent, run.interrupted, cap_at, resolved),
                    )
                except (KeyboardInterrupt, DagsterExecutionInterruptedError, RunInterrupted):
                    ended_because = "the Dagster run was terminated"
                    self._cancel(context, reader, resolved.gcs, sent.sent_to, ended_because)
                    raise
                except (FunctionStartupTimeout, FunctionHeartbeatTimeout) as exc:
                    if attach is None:
                        raise
                    raise SessionDead(f"{type(exc).__name__}: {exc}") from exc
            # the GCS channel's last chunks are read as the session above closes
            if not reader.closed:
                raise PipesPubSubError(
                    f"session {session_id}: the function at {sent.sent_to} answered, but its `closed` message never "
                    f"arrived in gs://{self.bucket}/{channel_params.key_prefix}/; check the function's logs"
                )
        except SubscriptionGone as exc:
            ended_because = f"{ended_because}; its reply subscription is gone"
            raise SessionDead(str(exc)) from exc
        except Exception as exc:
            ended_because = f"{ended_because}; {type(exc).__name__}"
            raise
        finally:
            reason = f"{ended_because}; the orchestrator stopped listening"
            if demux is not None and journal is not None:
                # a fan-out group's replies are kept until the group ends: a later attempt may replay them
                end_lease(resolved.gcs, self.bucket, self.prefix, session_id, start_window=self.startup_timeout, reason=reason)
            else:
                # durable: a late or duplicate delivery of the trigger finds the session ended and does not run
                end_session(resolved.gcs, self.bucket, self.prefix, session_id, start_window=self.startup_timeout, reason=reason)
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
                **trace_metadata(reader.trace_id, self.trace_url_template, resolved.project),
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

    def _function_of(self, resolved: _Resolved) -> str:
        return resolved.trigger_topic or self.function_url or ""

    def _reattaching(self, resolved: _Resolved) -> bool:
        return self.reattach and resolved.reply_channel == REPLY_CHANNEL_PUBSUB

    def _earlier_sessions(self, context: OpExecutionContext | AssetExecutionContext, resolved: _Resolved) -> dict[SessionKey, EarlierSession]:
        """The sessions earlier attempts of this step left unfinished, with a log line saying whether re-attach is on."""
        if not self.reattach:
            context.log.info("[pipes] reattach is off: this step starts new sessions, whatever an earlier attempt of "
                             "it left running")
            return {}
        if resolved.reply_channel != REPLY_CHANNEL_PUBSUB:
            context.log.info("[pipes] reattach is on but needs reply_channel='pubsub': this step starts new sessions")
            return {}
        chain, found = find_earlier_sessions(context)
        context.log.info(
            f"[pipes] reattach is on: {len(found)} unfinished session(s) left by earlier attempts of step "
            f"{step_key(context)} in run(s) {', '.join(chain)}"
        )
        return found

    def _total_timeout(self, resolved: _Resolved) -> float | None:
        """The configured (or derived) total timeout, unless the session cap comes first (its error says why)."""
        total = resolved.total_timeout
        return total if total is not None and total <= self._session_cap(resolved) else None

    def _session_cap(self, resolved: _Resolved) -> float:
        """Every session is over by then, counted from sending the trigger: it starts within startup_timeout,
        the function closes it before function_timeout, and its last replies need a moment (on the GCS
        channel, up to two chunk intervals)."""
        margin = SESSION_CAP_MARGIN_SECONDS + (2 * self.chunk_interval if resolved.reply_channel == REPLY_CHANNEL_GCS else 0)
        return self.startup_timeout + resolved.function_timeout + margin

    def _stop_waiting(
        self, session_id: str, sent: _SentTrigger, interrupted: threading.Event | None, cap_at: float, resolved: _Resolved
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
        return sent.http.succeeded() and self.reply_channel == REPLY_CHANNEL_GCS

    def _startup_hint(self, sent_to: str) -> str:
        if self.invocation == "http":
            return f"Check the logs of the function serving {sent_to} for errors at start-up"
        return (
            f"Check that a function is deployed with --trigger-topic {sent_to} (or that a push subscription or pull "
            "worker consumes that topic), that it is ACTIVE, and its logs for errors at start-up"
        )

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
        project = self._validated(payload)
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
        resolved = self._resolve(project, detached=True)
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
                        self._session_params(resolved, session_id, resolved.reply_topic_of(session_id)),
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
        ))
        claim_check = ClaimCheck(blob_store, self.inline_threshold_bytes)
        try:
            sent = self._send_trigger(resolved, claim_check, session_id, payload, bootstrap)
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

    def _send_trigger(
        self,
        resolved: _Resolved,
        claim_check: ClaimCheck,
        session_id: str,
        payload: Mapping[str, Any],
        bootstrap_env_vars: Mapping[str, str],
    ) -> _SentTrigger:
        body, attributes = Trigger(session_id, payload, bootstrap_env_vars).encode()
        data, codec_attributes = claim_check.wrap(body, trigger_key(self.prefix, session_id))
        attributes = {**attributes, **codec_attributes}
        if resolved.http is not None and self.function_url:
            invocation = HttpInvocation(
                resolved.http, self.function_url, timeout=self.http_timeout, retry_seconds=self.preflight_timeout
            )
            invocation.start(data, attributes, session_id)
            return _SentTrigger(self.function_url, {"pipes_function_url": self.function_url}, invocation)
        message_id = publish(resolved.publisher, resolved.trigger_topic, data, attributes)
        return _SentTrigger(resolved.trigger_topic, {"pipes_trigger_message_id": message_id})

    def _session_params(self, resolved: _Resolved, session_id: str, reply_topic: str) -> ReplyChannelParams:
        return ReplyChannelParams(
            topic=reply_topic,
            session_id=session_id,
            bucket=self.bucket,
            prefix=self.prefix,
            channel=resolved.reply_channel,
            key_prefix=chunks_prefix(self.prefix, session_id),
            chunk_interval=self.chunk_interval,
            inline_threshold=self.inline_threshold_bytes,
            flush_interval=self.flush_interval,
            heartbeat_interval=self.heartbeat_interval,
            lease_seconds=resolved.function_timeout + LEASE_MARGIN_SECONDS,
            function_timeout=resolved.function_timeout,
            # counted by the function from the trigger's publishTime (Pub/Sub's clock, not ours): a delivery
            # after it finds nobody waiting for it
            start_window=self.startup_timeout,
            signed=bool(self.signing_secret),
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
        tombstone = end_lease(gcs, self.bucket, self.prefix, session_id, start_window=self.startup_timeout, reason=reason)
        if not reader.opened and not read_lease(tombstone).invocation_id:  # no function had claimed the session
            context.log.warning(
                f"[pipes] run terminated before the function started session {session_id}: the session is ended, so "
                "its trigger can no longer start it"
            )
            return
        context.log.warning(f"[pipes] run terminated: asked the function to cancel session {session_id}")
        give_up_at = time.monotonic() + self.cancel_timeout
        try:
            closed = reader.wait_for_close(
                triggered_at=time.monotonic(),
                sent_to=sent_to,
                startup_hint="Check the function's logs",
                startup_timeout=self.cancel_timeout,
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
                f"[pipes] session {session_id} did not report `closed` within cancel_timeout={self.cancel_timeout:g}s "
                "of the cancel request; its function may still run until its handler checks pipes.is_cancelled or "
                "reaches its timeout. Raise cancel_timeout to wait longer for a clean stop"
            )
