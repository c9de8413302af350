"""The settings of ``PipesPubSubClient`` and their validation: everything a call checks before it
publishes anything, so bad configuration fails the step with every problem named and nothing sent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from dagster import ConfigurableResource
from pydantic import Field

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.diagnostics.tracing import url_template_problems
from dagster_gcf_pipes.shared.claim_check import validate_threshold
from dagster_gcf_pipes.shared.protocol import (
    DEFAULT_INLINE_THRESHOLD,
    REPLY_CHANNEL_GCS,
    REPLY_CHANNEL_PUBSUB,
    ProtocolError,
    dumps,
)

#: without function_name, the longest an event-driven function may run (540 s, the gen2 maximum), so the session
#: lease outlives any deployment; gcloud's own default, when --timeout is not given, is 60 s
DEFAULT_FUNCTION_TIMEOUT = 540.0


def payload_problems(payload: Any) -> list[str]:
    if not isinstance(payload, Mapping):
        return [f"payload must be a dict (a JSON object), got {type(payload).__name__}"]
    keys = _non_string_keys(payload)
    if keys:
        # json.dumps would turn them into strings silently: the handler would not get the keys it was given
        return [
            f"payload has the key {keys[0]!r} ({type(keys[0]).__name__}): JSON object keys are strings; pass only "
            "dicts with string keys (e.g. str(key))"
        ]
    try:
        dumps(dict(payload), "payload")
    except ProtocolError as exc:
        return [str(exc)]
    return []


def _non_string_keys(value: Any) -> list[Any]:
    """Every key anywhere in ``value`` that is not a string."""
    if isinstance(value, Mapping):
        return [key for key in value if not isinstance(key, str)] + [
            key for item in value.values() for key in _non_string_keys(item)
        ]
    if isinstance(value, list | tuple):
        return [key for item in value for key in _non_string_keys(item)]
    return []


class PipesPubSubClientSettings(ConfigurableResource):
    """What ``PipesPubSubClient`` is configured with (its fields), and their validation."""

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
        "that factor by K: for many concurrent independent runs (docs/architecture.md, Cost and quotas). Like every "
        "topic, each is not checked up front (GetTopic is an admin operation): a session whose topic is missing fails "
        "before its trigger is published, naming it.",
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
        "Reply subscriptions then keep acknowledged replies for 20 h (billed as retained storage).",
    )
    preflight_timeout: float = Field(
        default=30.0,
        description="Seconds to keep retrying while GCP is unreachable: the bucket's check, creating the reply "
        "subscription, and the HTTP POST.",
    )
    trace_url_template: str | None = Field(
        default=None,
        description="A link to a session's trace, recorded as pipes_trace_url: {trace_id} and {project} are filled in, "
        "e.g. https://console.cloud.google.com/traces/list?tid={trace_id}&project={project} (Cloud Trace).",
    )


    def validate(self, payload: Mapping[str, Any]) -> None:
        """Check the settings and the payload before anything is published."""
        problems = self.config_problems() + payload_problems(payload)
        if problems:
            raise PipesPubSubConfigError("; ".join(problems))

    def config_problems(self) -> list[str]:
        """Every problem of the settings, each naming its fix (empty: the settings are usable)."""
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
            return [(
                "reply_topic and reply_topics are both set: set reply_topic for one reply topic, or list every "
                "topic (that one included) in reply_topics"
            )]
        if not (self.reply_topic or self.reply_topics):
            return [
                "reply_topic is not set: name the topic the function publishes its replies to (or several, in "
                "reply_topics)"
            ]
        topics = self.reply_topics or []
        repeated = sorted({topic for topic in topics if topics.count(topic) > 1})
        if repeated:
            return [f"reply_topics lists {', '.join(repeated)} more than once: list each topic once"]
        return []

