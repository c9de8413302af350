"""What one ``run``/``run_many``/``run_detached`` call works out before its first session: the project, the
deployed function (``function_name``), the topics (``reply_topics`` included) and the clients, with the
bucket checked to exist (once per process when it does).

Topics are not checked with GetTopic: that is an administrative operation, charged to the caller's
project's admin quota (https://cloud.google.com/pubsub/quotas) and slower and less reliable than data
operations, and Dagster's default executor runs each step in a process of its own, so a per-process cache
rarely saves one. A missing reply topic fails the session's CreateSubscription, and a missing trigger topic
its publish, each with a ``PipesPubSubConfigError`` naming the setting, before anything reaches a function.
A detached session creates no subscription, so its reply topic is still checked."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google.auth
import requests
from google.api_core import exceptions as gexc
from google.cloud import functions_v2, pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.diagnostics.errors import GCPUnreachableError, PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.client.functions_api import derived_timeouts, resolve_function
from dagster_gcf_pipes.orchestrator.earlier_design.http_invocation import http_session
from dagster_gcf_pipes.orchestrator.client.settings import DEFAULT_FUNCTION_TIMEOUT, PipesPubSubClientSettings
from dagster_gcf_pipes.shared.protocol import REPLY_CHANNEL_PUBSUB
from dagster_gcf_pipes.shared.pubsub import publisher_client
from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS, transient_retry


#: the two ways past Google's DefaultCredentialsError, which names neither the local stack nor its variables
NO_CREDENTIALS_HINT = (
    "on Google Cloud, run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS); on the "
    "local stack, run Dagster under `gcf-pipes dev`, or export the PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST and "
    "GOOGLE_CLOUD_PROJECT that `gcf-pipes up` prints (in tests: the gcf_pipes fixture's client)"
)


def resolve_project(project: str | None) -> str:
    """The configured project, else ``GOOGLE_CLOUD_PROJECT``, else the project of Application Default Credentials."""
    if project:
        return project
    if os.environ.get("GOOGLE_CLOUD_PROJECT"):
        return os.environ["GOOGLE_CLOUD_PROJECT"]
    try:
        _, adc_project = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        raise PipesPubSubConfigError(
            f"no Google Cloud project, and no Application Default Credentials to take one from: {NO_CREDENTIALS_HINT}"
        ) from None
    if not adc_project:
        raise PipesPubSubConfigError(
            "no Google Cloud project: set `project` on PipesPubSubClient or the GOOGLE_CLOUD_PROJECT environment "
            "variable (or `gcloud config set project ...` for Application Default Credentials)"
        )
    return adc_project


def topic_path(project: str, topic: str) -> str:
    return topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"


#: The bucket (and a detached reply topic) seen to exist, per process and endpoint. Only positive answers are
#: kept: a missing resource is checked again on the next run, and one deleted after its check fails the step at
#: its first use (publish, create subscription).
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


@dataclass(frozen=True)
class ResolvedCall:
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
    #: sessions the deployed function runs at once (max instances x concurrency), when read from function_name
    function_capacity: int | None = None


    def reply_topic_of(self, owner: str) -> str:
        """The reply topic of ``owner`` (a session id, or a fan-out group): with several, the one its id hashes to."""
        return shard_of(self.reply_topics, owner) if self.reply_topics else ""


def shard_of(topics: Sequence[str], owner: str) -> str:
    """One of ``topics``, picked by a stable hash of ``owner`` (the same in every process and Python version,
    unlike ``hash()``): session ids are random, so sessions spread evenly over the topics."""
    return topics[int.from_bytes(hashlib.sha256(owner.encode()).digest()[:8], "big") % len(topics)]


def resolve_call(
    settings: PipesPubSubClientSettings,
    project: str,
    functions_client: Callable[[], functions_v2.FunctionServiceClient],
    *,
    detached: bool = False,
) -> ResolvedCall:
    """Resolve the function (if named), derive its timeouts, and check that every topic and the bucket exist."""
    deployed = resolve_function(settings.function_name, functions_client) if settings.function_name else None
    trigger_topic = ""
    if settings.invocation == "pubsub":
        trigger_topic = topic_path(project, settings.trigger_topic) if settings.trigger_topic else ""
        if deployed is not None:
            if trigger_topic and trigger_topic != deployed.trigger_topic:
                raise PipesPubSubConfigError(
                    f"trigger_topic {trigger_topic} is not the topic {settings.function_name} is deployed with "
                    f"({deployed.trigger_topic}): remove trigger_topic (function_name supplies it) or fix it"
                )
            trigger_topic = deployed.trigger_topic
    reply_channel = REPLY_CHANNEL_PUBSUB if detached else settings.reply_channel
    reply_topics = _reply_topics(settings, project, detached) if reply_channel == REPLY_CHANNEL_PUBSUB else {}
    derived = derived_timeouts(deployed) if deployed is not None else {}
    http = http_session(settings.function_url, settings.http_auth) if settings.invocation == "http" and settings.function_url else None
    try:
        publisher, gcs = publisher_client(), storage.Client(project=project)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise PipesPubSubConfigError(f"no credentials for Pub/Sub and Cloud Storage ({exc}): {NO_CREDENTIALS_HINT}") from exc
    resolved = ResolvedCall(
        project=project,
        publisher=publisher,
        gcs=gcs,
        http=http,
        trigger_topic=trigger_topic,
        reply_channel=reply_channel,
        reply_topics=tuple(reply_topics),
        function_timeout=settings.function_timeout or derived.get("function_timeout", DEFAULT_FUNCTION_TIMEOUT),
        # a silence longer than the function's whole timeout cannot be a live function; never under 2 intervals
        function_capacity=deployed.capacity if deployed is not None else None,
        heartbeat_timeout=max(
            min(settings.heartbeat_timeout, derived.get("heartbeat_timeout", settings.heartbeat_timeout)),
            2 * settings.heartbeat_interval,
        ),
    )
    # a detached session's replies meet no subscription of the step's: check that their topic exists
    _check_resources(settings, resolved, reply_topics if detached else {})
    return resolved

def _reply_topics(settings: PipesPubSubClientSettings, project: str, detached: bool) -> dict[str, str]:
    """The path of each reply topic, and the setting that names it."""
    if detached:
        return {topic_path(project, settings.detached_reply_topic or ""): "detached_reply_topic"}
    if settings.reply_topics:
        return {topic_path(project, topic): "reply_topics" for topic in settings.reply_topics}
    return {topic_path(project, settings.reply_topic or ""): "reply_topic"}


def _preflight(settings: PipesPubSubClientSettings, service: str, emulator_env_var: str, call: Any, *args: Any) -> Any:
    try:
        return transient_retry(max_seconds=settings.preflight_timeout, max_attempts=None)(call)(*args)
    except TRANSIENT_ERRORS as exc:
        raise GCPUnreachableError(
            f"{service} did not answer within preflight_timeout={settings.preflight_timeout:g}s ({exc}); check the "
            f"network path to {service} (or that the emulator at {emulator_env_var}="
            f"{os.environ.get(emulator_env_var, '(unset)')} is running)"
        ) from exc

def _exists(settings: PipesPubSubClientSettings, service: str, emulator_env_var: str, check: Any, client: Any, name: str) -> bool:
    """``check(client, name)`` through ``_preflight``, made once per process for a resource that exists."""
    key = (os.environ.get(emulator_env_var, ""), name)  # the emulator's address, or "" for Google Cloud
    with _seen_lock:
        if key in _seen_to_exist:
            return True
    exists = bool(_preflight(settings, service, emulator_env_var, check, client, name))
    if exists:
        with _seen_lock:
            _seen_to_exist.add(key)
    return exists

def _check_resources(settings: PipesPubSubClientSettings, resolved: ResolvedCall, topics: Mapping[str, str]) -> None:
    """``topics``: each topic the call uses, and the setting that names it."""
    publisher, gcs = resolved.publisher, resolved.gcs
    for path, setting in topics.items():
        if not _exists(settings, "Pub/Sub", "PUBSUB_EMULATOR_HOST", _topic_exists, publisher, path):
            raise PipesPubSubConfigError(
                f"{setting}: topic {path} does not exist; create it (gcloud pubsub topics create "
                f"{path.rsplit('/', 1)[-1]} --project {path.split('/')[1]}) or fix {setting} / project"
            )
    if not _exists(settings, "Cloud Storage", "STORAGE_EMULATOR_HOST", _bucket_exists, gcs, settings.bucket):
        raise PipesPubSubConfigError(
            f"bucket: gs://{settings.bucket} does not exist; create it (gcloud storage buckets create "
            f"gs://{settings.bucket}) or fix `bucket`"
        )
