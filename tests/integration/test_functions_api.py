"""``resolve_function`` through the real Cloud Functions v2 client against an in-process gRPC fake."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import functions_v2

from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubConfigError
from dagster_gcf_pipes.orchestrator.client.functions_api import DeployedFunction, derived_timeouts, resolve_function
from tests.fakes.function_service import FakeFunctionService

NAME = "projects/demo/locations/europe-west1/functions/pipes-worker"
TOPIC = "projects/demo/topics/pipes-trigger"
URL = "https://pipes-worker-abc123-ew.a.run.app"
PUBSUB_EVENT = "google.cloud.pubsub.topic.v1.messagePublished"
RetryPolicy = functions_v2.EventTrigger.RetryPolicy


def deployed(
    name: str = NAME,
    state: functions_v2.Function.State = functions_v2.Function.State.ACTIVE,
    topic: str | None = TOPIC,
    timeout_seconds: int = 540,
    event_type: str = PUBSUB_EVENT,
    retry_policy: functions_v2.EventTrigger.RetryPolicy = RetryPolicy.RETRY_POLICY_RETRY,
) -> functions_v2.Function:
    function = functions_v2.Function(
        name=name,
        state=state,
        service_config=functions_v2.ServiceConfig(timeout_seconds=timeout_seconds, uri=URL),
    )
    if topic is not None:
        function.event_trigger = functions_v2.EventTrigger(
            event_type=event_type, pubsub_topic=topic, retry_policy=retry_policy
        )
    return function


@pytest.fixture
def client(fake: FakeFunctionService) -> Iterator[functions_v2.FunctionServiceClient]:
    with fake.client() as real_client:
        yield real_client


def test_active_pubsub_function_resolves(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    fake.add(deployed())

    assert resolve_function(NAME, lambda: client) == DeployedFunction(
        name=NAME, trigger_topic=TOPIC, timeout_seconds=540.0, url=URL, state="ACTIVE"
    )


def test_unset_timeout_defaults_to_60_seconds(
    fake: FakeFunctionService, client: functions_v2.FunctionServiceClient
) -> None:
    fake.add(deployed(timeout_seconds=0))

    assert resolve_function(NAME, lambda: client).timeout_seconds == 60.0


def test_resolution_is_cached_per_name(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    fake.add(deployed())

    first = resolve_function(NAME, lambda: client)
    assert resolve_function(NAME, lambda: client) is first
    assert fake.calls == 1


@pytest.mark.parametrize("state", [functions_v2.Function.State.FAILED, functions_v2.Function.State.DEPLOYING])
def test_function_not_active_is_refused(
    fake: FakeFunctionService, client: functions_v2.FunctionServiceClient, state: functions_v2.Function.State
) -> None:
    fake.add(deployed(state=state))

    with pytest.raises(PipesPubSubConfigError, match=f"state {state.name}.*gcloud functions describe pipes-worker"):
        resolve_function(NAME, lambda: client)


def test_errors_are_not_cached(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    fake.add(deployed(state=functions_v2.Function.State.DEPLOYING))
    with pytest.raises(PipesPubSubConfigError):
        resolve_function(NAME, lambda: client)

    fake.add(deployed())
    assert resolve_function(NAME, lambda: client).state == "ACTIVE"
    assert fake.calls == 2


def test_http_triggered_function_is_refused(
    fake: FakeFunctionService, client: functions_v2.FunctionServiceClient
) -> None:
    fake.add(deployed(topic=None))

    with pytest.raises(PipesPubSubConfigError, match="--trigger-topic"):
        resolve_function(NAME, lambda: client)


def test_a_function_triggered_by_another_event_type_is_refused(
    fake: FakeFunctionService, client: functions_v2.FunctionServiceClient
) -> None:
    # Eventarc gives every trigger a Pub/Sub transport topic: a Cloud Storage trigger has one too, and a
    # trigger published there would reach the function as something other than a messagePublished event.
    fake.add(deployed(event_type="google.cloud.storage.object.v1.finalized"))

    with pytest.raises(PipesPubSubConfigError, match="google.cloud.storage.object.v1.finalized.*--trigger-topic"):
        resolve_function(NAME, lambda: client)


@pytest.mark.parametrize("policy", [RetryPolicy.RETRY_POLICY_DO_NOT_RETRY, RetryPolicy.RETRY_POLICY_UNSPECIFIED])
def test_a_trigger_without_retries_resolves_with_a_warning(
    fake: FakeFunctionService,
    client: functions_v2.FunctionServiceClient,
    caplog: pytest.LogCaptureFixture,
    policy: functions_v2.EventTrigger.RetryPolicy,
) -> None:
    fake.add(deployed(retry_policy=policy))

    with caplog.at_level(logging.WARNING):
        assert resolve_function(NAME, lambda: client).trigger_topic == TOPIC
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert policy.name in warning and "--retry" in warning


def test_a_trigger_with_retries_resolves_without_a_warning(
    fake: FakeFunctionService, client: functions_v2.FunctionServiceClient, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add(deployed())

    with caplog.at_level(logging.WARNING):
        resolve_function(NAME, lambda: client)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_missing_function_is_named(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    with pytest.raises(PipesPubSubConfigError, match=f"{NAME} does not exist.*--project demo") as raised:
        resolve_function(NAME, lambda: client)
    assert isinstance(raised.value.__cause__, gexc.NotFound)


def test_no_credentials_names_function_name_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real client, built where Application Default Credentials cannot be found (as on the local stack)."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
    with pytest.raises(PipesPubSubConfigError, match="needs Application Default Credentials") as raised:
        resolve_function(f"{NAME}-no-credentials")
    assert "set trigger_topic and function_timeout instead of function_name" in str(raised.value)


@pytest.mark.parametrize(
    "name",
    ["pipes-worker", "projects/demo/functions/pipes-worker", f"{NAME}/extra", "projects//locations/l/functions/f"],
)
def test_malformed_name_is_refused_before_any_call(
    fake: FakeFunctionService, client: functions_v2.FunctionServiceClient, name: str
) -> None:
    with pytest.raises(PipesPubSubConfigError, match="projects/PROJECT/locations/LOCATION/functions/NAME"):
        resolve_function(name, lambda: client)
    assert fake.calls == 0


def test_transient_failures_are_retried(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    fake.add(deployed())
    fake.fail_next(2, grpc.StatusCode.UNAVAILABLE)

    assert resolve_function(NAME, lambda: client).trigger_topic == TOPIC
    assert fake.calls == 3


def test_transient_retries_are_bounded(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    fake.add(deployed())
    fake.fail_next(10, grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(gexc.ServiceUnavailable):
        resolve_function(NAME, lambda: client)
    assert fake.calls == 5


def test_permission_denied_fails_at_once(fake: FakeFunctionService, client: functions_v2.FunctionServiceClient) -> None:
    fake.add(deployed())
    fake.fail_next(1, grpc.StatusCode.PERMISSION_DENIED)

    with pytest.raises(PipesPubSubConfigError, match="roles/cloudfunctions.viewer"):
        resolve_function(NAME, lambda: client)
    assert fake.calls == 1


def test_derived_timeouts() -> None:
    def timeouts(seconds: float) -> dict[str, float]:
        return derived_timeouts(DeployedFunction(NAME, TOPIC, seconds, URL, "ACTIVE"))

    assert timeouts(540.0) == {"function_timeout": 540.0, "heartbeat_timeout": 60.0}
    assert timeouts(30.0) == {"function_timeout": 30.0, "heartbeat_timeout": 30.0}
