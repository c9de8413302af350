"""The kit's fixtures: each implementation served on the session's local stack (through its
production-semantics layer), and a ``Kit`` that runs one of its cases from a real Dagster run."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from dagster import AssetCheckSpec, AssetSpec, DagsterInstance, StaticPartitionsDefinition, materialize, multi_asset
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.local.local_stack import LocalStack, ManagedProcess
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from tests import REPO_ROOT
from tests.conformance.implementations import IMPLEMENTATIONS, Implementation
from tests.conftest import LAKE_BUCKET
from tests.faults.test_process_faults import lake_object_exists, wait_for_object
from tests.integration.helpers import Outcome, make_client


@dataclass
class KitOutcome(Outcome):
    #: each log line the step recorded -> its level (logging's numbers)
    log_levels: dict[str, int] = field(default_factory=dict)


@dataclass
class Kit:
    """One implementation served on its own trigger topic; ``run`` makes a Dagster run of one kit case."""

    stack: LocalStack
    implementation: Implementation
    topic: str
    server: ManagedProcess

    def client(self, **overrides: Any) -> PipesPubSubClient:
        return make_client(**{"trigger_topic": self.topic, **overrides})

    @staticmethod
    def payload(case: str, **fields: Any) -> dict[str, Any]:
        """A kit case's payload, with a fresh ``token`` (the name of its marks) and a ``tag`` (what its lines
        start with) unless given."""
        return {"case": case, "lake": LAKE_BUCKET, "token": uuid.uuid4().hex, "tag": f"kit-{case}", **fields}

    def run(
        self,
        payload: dict[str, Any],
        *,
        client: PipesPubSubClient | None = None,
        assets: Sequence[str] = ("out",),
        partition: str | None = None,
        checks: Sequence[str] = (),
        extras: dict[str, Any] | None = None,
    ) -> KitOutcome:
        """Materialize a multi-asset of ``assets`` (keys made unique to this run, the checks on the first) whose
        step runs ``payload`` through the function, in an ephemeral instance."""
        unique = uuid.uuid4().hex[:8]
        keys = [f"kit_{unique}_{name}" for name in assets]
        custom: list[Any] = []

        @multi_asset(
            name=f"kit_{unique}",
            specs=[AssetSpec(key) for key in keys],
            check_specs=[AssetCheckSpec(name, asset=keys[0]) for name in checks],
            partitions_def=StaticPartitionsDefinition([partition]) if partition else None,
        )
        def kit_step(context, pipes_pubsub: PipesPubSubClient):  # type: ignore[no-untyped-def]
            invocation = pipes_pubsub.run(context=context, payload=payload, extras=extras)
            custom.extend(invocation.get_custom_messages())
            yield from invocation.get_results()

        with DagsterInstance.ephemeral() as instance:
            result = materialize(
                [kit_step], resources={"pipes_pubsub": client or self.client()}, instance=instance,
                partition_key=partition, raise_on_error=False,
            )
            entries = instance.all_logs(result.run_id)
        logs = [e for e in entries if e.dagster_event is None]
        return KitOutcome(
            result, [e.user_message for e in logs], custom, {e.user_message: e.timestamp for e in logs},
            {e.dagster_event.event_type: e.timestamp for e in entries if e.dagster_event is not None},
            {e.user_message: e.level for e in logs},
        )

    # ------------------------------------------------------------------------------------------ marks

    def marked(self, kind: str, token: str) -> bool:
        return lake_object_exists(self.stack.project, f"kit/{kind}/{token}")

    def wait_for_mark(self, kind: str, token: str, timeout: float = 15.0) -> None:
        wait_for_object(self.stack.project, f"kit/{kind}/{token}", timeout)

    def mark(self, kind: str, token: str) -> None:
        storage.Client(project=self.stack.project).bucket(LAKE_BUCKET).blob(f"kit/{kind}/{token}").upload_from_string(kind)

    def handler_runs(self, token: str) -> int:
        return len(list(storage.Client(project=self.stack.project).list_blobs(LAKE_BUCKET, prefix=f"kit/runs/{token}/")))

    def wait_for_function_log(self, *parts: str, timeout: float = 15.0) -> str:
        """The first line of the function's log holding every one of ``parts``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.server.log_path.read_text(errors="replace").splitlines():
                if all(part in line for part in parts):
                    return line
            assert time.monotonic() < deadline, f"no line with {parts} in {self.server.log_path} within {timeout:g}s"
            time.sleep(0.05)


def serve(stack: LocalStack, implementation: Implementation) -> tuple[str, ManagedProcess]:
    """``implementation`` on a trigger topic of its own."""
    if implementation.name == "nodejs" and not (REPO_ROOT / "node" / "dist" / "index.js").exists():
        pytest.fail("the Node.js function side is not built: run `make -C node build` (make test does)")
    topic = f"kit-{implementation.name}-{uuid.uuid4().hex[:8]}"
    return topic, stack.add_function(implementation.local_function(topic))


def unserve(stack: LocalStack, topic: str) -> None:
    """Stop the function of ``topic`` (its dispatcher with it) and delete its trigger subscription."""
    stack.servers.pop(f"function-{topic}").stop()
    stack.servers.pop(f"dispatcher-{topic}", None)
    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.delete_subscription(request={"subscription": stack.trigger_subscription(topic)})


@pytest.fixture(scope="module", params=IMPLEMENTATIONS, ids=lambda implementation: implementation.name)
def implementation(request: pytest.FixtureRequest) -> Implementation:
    return request.param


@pytest.fixture(scope="module")
def kit(stack: LocalStack, implementation: Implementation) -> Iterator[Kit]:
    topic, server = serve(stack, implementation)
    yield Kit(stack, implementation, topic, server)
    unserve(stack, topic)


@pytest.fixture
def own_kit(stack: LocalStack, implementation: Implementation) -> Iterator[Kit]:
    """The implementation on a server of the test's own, which it may kill."""
    topic, server = serve(stack, implementation)
    yield Kit(stack, implementation, topic, server)
    unserve(stack, topic)
