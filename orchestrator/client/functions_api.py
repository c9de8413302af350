"""Resolve a deployed Cloud Function (2nd gen) through the Cloud Functions v2 API.

The user names the function; its trigger topic and timeout are read from its deployment rather than
configured a second time, so the topic Dagster publishes to and the timeouts it waits with cannot drift
from what is actually deployed. A function that cannot serve Pipes sessions (not found, not ACTIVE, not
Pub/Sub-triggered) is refused up front with the command that shows or fixes the problem.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import google.auth.exceptions
from google.api_core import exceptions as gexc
from google.cloud import functions_v2

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.shared.retry import transient_retry

DEFAULT_FUNCTION_TIMEOUT = 60.0  # Cloud Functions' own default when service_config.timeout_seconds is unset
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
#: Cloud Run functions' default --max-instances when the deployment sets none
DEFAULT_MAX_INSTANCES = 100
MAX_ATTEMPTS = 5
CALL_TIMEOUT = 10.0  # per GetFunction attempt, so a hung call becomes a retried DeadlineExceeded
PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"

_log = logging.getLogger(__name__)

_NAME = re.compile(r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/functions/(?P<function>[^/]+)")


@dataclass(frozen=True)
class DeployedFunction:
    name: str  # projects/P/locations/L/functions/F
    trigger_topic: str  # projects/P/topics/T
    timeout_seconds: float
    url: str  # may be "" (not yet assigned)
    state: str
    #: how many sessions it runs at once: max instances x each one's request concurrency (Cloud Run's defaults
    #: when unset: 100 instances, 1 request each). Above it Cloud Run answers 429 and Eventarc backs off 10-600 s.
    capacity: int = DEFAULT_MAX_INSTANCES


_cache: dict[str, DeployedFunction] = {}
_cache_lock = threading.Lock()


def resolve_function(
    name: str,
    client_factory: Callable[[], functions_v2.FunctionServiceClient] = functions_v2.FunctionServiceClient,
    *,
    retry_seconds: float = 30.0,
) -> DeployedFunction:
    """Look up ``name`` once per process; transient API errors are retried, permanent ones raise
    ``PipesPubSubConfigError`` naming the fix. Only successful resolutions are cached, and the client is
    built (``client_factory``) only on a cache miss."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise PipesPubSubConfigError(
            f"Cloud Function name {name!r} is not of the form projects/PROJECT/locations/LOCATION/functions/NAME"
        )
    with _cache_lock:
        if name in _cache:
            return _cache[name]

    project, location = match["project"], match["location"]
    try:
        api = client_factory()
        get = transient_retry(max_seconds=retry_seconds, max_attempts=MAX_ATTEMPTS)(api.get_function)
        # retry=None: the GAPIC layer must not retry under tenacity, or the budgets multiply
        function = get(name=name, retry=None, timeout=CALL_TIMEOUT)
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise PipesPubSubConfigError(
            f"function_name={name}: reading the deployment from the Cloud Functions API needs Application Default "
            f"Credentials ({e}); run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS. "
            "Where that API is out of reach (the local stack has no emulator of it), set trigger_topic and "
            "function_timeout instead of function_name"
        ) from e
    except gexc.NotFound as e:
        raise PipesPubSubConfigError(
            f"Cloud Function {name} does not exist (gcloud functions list --v2 --project {project})"
        ) from e
    except gexc.PermissionDenied as e:
        raise PipesPubSubConfigError(
            f"permission denied reading Cloud Function {name}: grant the account running Dagster "
            f"roles/cloudfunctions.viewer on project {project}"
        ) from e

    state = function.state.name
    describe = f"gcloud functions describe {match['function']} --region {location} --project {project}"
    if state != "ACTIVE":
        raise PipesPubSubConfigError(
            f"Cloud Function {name} is in state {state}; it must be deployed successfully (ACTIVE) first ({describe})"
        )
    trigger = function.event_trigger
    if trigger.event_type != PUBSUB_EVENT_TYPE or not trigger.pubsub_topic:
        kind = f"its trigger's event type is {trigger.event_type}" if trigger.event_type else "it has no event trigger (HTTP)"
        raise PipesPubSubConfigError(
            f"Cloud Function {name} is not triggered by Pub/Sub messages ({kind}); it must be deployed with "
            f"--trigger-topic, which gives it event type {PUBSUB_EVENT_TYPE} ({describe})"
        )
    if trigger.retry_policy != functions_v2.EventTrigger.RetryPolicy.RETRY_POLICY_RETRY:
        _log.warning(
            f"Cloud Function {name} is deployed without retries ({trigger.retry_policy.name}): a trigger whose "
            "delivery fails before the session starts is dropped and the step fails at its startup timeout; "
            "redeploy with --retry (the session lease makes redeliveries safe)"
        )
    resolved = DeployedFunction(
        name=name,
        trigger_topic=trigger.pubsub_topic,
        timeout_seconds=float(function.service_config.timeout_seconds or DEFAULT_FUNCTION_TIMEOUT),
        url=function.service_config.uri or function.url,
        state=state,
        capacity=(function.service_config.max_instance_count or DEFAULT_MAX_INSTANCES)
        * max(1, function.service_config.max_instance_request_concurrency or 1),
    )
    with _cache_lock:
        _cache[name] = resolved
    return resolved


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def derived_timeouts(function: DeployedFunction) -> dict[str, float]:
    """Session timeouts that follow from the function's own timeout.

    At ``timeout_seconds`` the platform answers the caller with an error; a 2nd gen function is not killed
    ("the function instance might be throttled, but it continues operating until it exits on its own":
    https://cloud.google.com/functions/docs/configuring/timeout), so the function's session closes itself
    just before it, counted from when its delivery arrived; the client bounds every session at
    startup_timeout + function_timeout + a margin from the trigger, which allows for a delivery that Eventarc
    retried late. A heartbeat gap longer than the function's whole timeout cannot be a live function, so
    the heartbeat timeout is capped by it.
    """
    timeout = function.timeout_seconds
    return {"function_timeout": timeout, "heartbeat_timeout": min(DEFAULT_HEARTBEAT_TIMEOUT, timeout)}
