"""Run a one-asset Dagster job that calls PipesPubSubClient, in an ephemeral instance, and keep what it saw."""


from dataclasses import dataclass, field
from typing import Any

from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, ExecuteInProcessResult, asset, materialize
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.shared.lease import read_lease
from tests.conftest import PAYLOAD_BUCKET, REPLY_TOPIC, TEST_TOPIC


def make_client(**overrides: Any) -> PipesPubSubClient:
    settings: dict[str, Any] = {
        "trigger_topic": TEST_TOPIC,
        "reply_topic": REPLY_TOPIC,
        "bucket": PAYLOAD_BUCKET,
        "startup_timeout": 30.0,
        "heartbeat_timeout": 20.0,
        "heartbeat_interval": 2.0,
    }
    return PipesPubSubClient(**{**settings, **overrides})




@dataclass
class Outcome:
    """What one run recorded, read out of its (thread-bound, in-memory) instance before it is closed."""

    result: ExecuteInProcessResult
    log_messages: list[str]
    custom_messages: list[Any] = field(default_factory=list)
    #: when Dagster recorded each log line and each step event (event log timestamps)
    logged_at: dict[str, float] = field(default_factory=dict)
    step_events_at: dict[DagsterEventType, float] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        (event,) = self.result.get_asset_materialization_events()
        return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}

    @property
    def failure_message(self) -> str:
        failures = [e for e in self.result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
        assert failures, "expected the step to fail"
        return failures[0].event_specific_data.error.to_string()


def run_asset(client: PipesPubSubClient, payload: Any = None, extras: Any = None) -> Outcome:
    custom: list[Any] = []

    @asset(name="pipes_test_asset")
    def pipes_test_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        invocation = pipes_pubsub.run(context=context, payload=payload, extras=extras)
        custom.extend(invocation.get_custom_messages())
        return invocation.get_materialize_result()

    with DagsterInstance.ephemeral() as instance:
        result = materialize([pipes_test_asset], resources={"pipes_pubsub": client}, instance=instance, raise_on_error=False)
        entries = instance.all_logs(result.run_id)
    logs = [e for e in entries if e.dagster_event is None]
    step_events = {e.dagster_event.event_type: e.timestamp for e in entries if e.dagster_event is not None}
    return Outcome(result, [e.user_message for e in logs], custom, {e.user_message: e.timestamp for e in logs}, step_events)


def session_subscriptions(project: str) -> list[str]:
    """Per-session reply subscriptions that still exist."""
    with pubsub_v1.SubscriberClient() as subscriber:
        names = [s.name for s in subscriber.list_subscriptions(request={"project": f"projects/{project}"})]
    return [n for n in names if "/dagster-pipes-" in n]


def session_objects(project: str, prefix: str = "dagster-pipes/") -> list[str]:
    """Objects the client's sessions left in the payload bucket (claim-checks, context, leases), except the
    tombstones of ended sessions (ended leases, swept once their start window has passed) and the completion
    sensors' claims on their reply topics (``detached-owner/``, which belong to no session)."""
    blobs = storage.Client(project=project).list_blobs(PAYLOAD_BUCKET, prefix=prefix)
    return [
        b.name for b in blobs
        if (not read_lease(b).ended or "/leases/" not in f"/{b.name}") and "/detached-owner/" not in f"/{b.name}"
    ]
