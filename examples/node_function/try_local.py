"""Materialize the Node.js example function from Dagster on the local stack, by hand (not a test).

    make -C node build          # the function side; the stack runs `npm ci` here if node_modules is missing
    .venv/bin/python examples/node_function/try_local.py

Starts the local stack (the Pub/Sub emulator behind its production-semantics layer, fake-gcs-server),
which serves ``index.js`` in Google's Node.js Functions Framework (``LocalFunction`` reads the runtime from
the ``.js`` source) and delivers the trigger topic to it with its dispatcher (Eventarc's binary CloudEvents),
and runs a few Dagster materializations through ``PipesPubSubClient``: what each one recorded is printed, and
the function's log is kept in the stack's folder.
"""

import concurrent.futures
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, asset, materialize
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.local import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.session.end import end_lease
from dagster_gcf_pipes.shared.lease import read_lease

HERE = Path(__file__).resolve().parent
TRIGGER_TOPIC = "node-trigger"
SECRET = "node-signing-secret"
DAGSTER_SECRET_ENV = "DAGSTER_PIPES_SIGNING_SECRET"


def client(**overrides: Any) -> PipesPubSubClient:
    settings: dict[str, Any] = {
        "trigger_topic": TRIGGER_TOPIC, "reply_topic": "pipes-replies", "bucket": "pipes-payloads",
        "startup_timeout": 30.0, "heartbeat_timeout": 20.0, "heartbeat_interval": 2.0,
    }
    return PipesPubSubClient(**{**settings, **overrides})


def run(name: str, payload: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Materialize one asset with ``payload``; what Dagster recorded."""
    custom: list[Any] = []

    @asset(name="node_sales")
    def node_sales(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        invocation = pipes_pubsub.run(context=context, payload=payload)
        custom.extend(invocation.get_custom_messages())
        return invocation.get_materialize_result()

    printed = io.StringIO()
    started = time.monotonic()
    with DagsterInstance.ephemeral() as instance, contextlib.redirect_stdout(printed):
        result = materialize([node_sales], resources={"pipes_pubsub": client(**overrides)}, instance=instance,
                             raise_on_error=False)
        logs = [e.message for e in instance.all_logs(result.run_id) if e.dagster_event is None and e.message]
    outcome: dict[str, Any] = {
        "scenario": name, "success": result.success, "seconds": round(time.monotonic() - started, 1),
        "logs": [line for line in logs if not line.startswith("[pipes] ")][:8],
        "printed": [line for line in printed.getvalue().splitlines() if "printed by" in line],
        "custom_messages": custom,
    }
    if result.success:
        (event,) = result.get_asset_materialization_events()
        outcome["metadata"] = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    else:
        failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
        outcome["failure"] = failure.event_specific_data.error.to_string()[-2500:]
    return outcome


def end_the_running_session(reason: str) -> str:
    """End the lease of the session running now, as the orchestrator does when its run is terminated."""
    gcs = storage.Client()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for blob in gcs.list_blobs("pipes-payloads", prefix="dagster-pipes/leases/"):
            if not read_lease(blob).ended:
                session = blob.name.rsplit("/", 1)[1]
                end_lease(gcs, "pipes-payloads", "dagster-pipes", session, start_window=120, reason=reason)
                return session
        time.sleep(0.2)
    raise TimeoutError("no session started")


def run_and_cancel(name: str, payload: dict[str, Any], after: float) -> dict[str, Any]:
    """``run``, its session ended ``after`` seconds after it started."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, name, payload)
        time.sleep(after)
        end_the_running_session("the run was terminated (by try_local.py)")
        return outcome.result()


def tap(stack: LocalStack) -> str:
    """A pull subscription on the trigger topic: the triggers Dagster publishes, to publish one again."""
    path = f"projects/{stack.project}/subscriptions/node-trigger-tap"
    topic = f"projects/{stack.project}/topics/{TRIGGER_TOPIC}"
    with stack.activated(), pubsub_v1.SubscriberClient() as subscriber:
        subscriber.create_subscription(request={"name": path, "topic": topic})
    return path


def redeliver_last_trigger(stack: LocalStack, tap_path: str) -> str:
    """Publish the last trigger again, bytes and attributes, as a duplicate delivery would bring it."""
    with stack.activated(), pubsub_v1.SubscriberClient() as subscriber, pubsub_v1.PublisherClient() as publisher:
        received = subscriber.pull(request={"subscription": tap_path, "max_messages": 10}, timeout=10).received_messages
        subscriber.acknowledge(request={"subscription": tap_path, "ack_ids": [r.ack_id for r in received]})
        last = received[-1].message
        topic = f"projects/{stack.project}/topics/{TRIGGER_TOPIC}"
        publisher.publish(topic, last.data, **dict(last.attributes)).result()
        return last.attributes["dagster_pipes_session"]


def main() -> None:
    if not (HERE.parent.parent / "node/dist/index.js").exists():
        sys.exit("build the function side first: make -C node build")
    function = LocalFunction(HERE / "index.js", "main", TRIGGER_TOPIC, env={DAGSTER_SECRET_ENV: SECRET})
    stack = LocalStack(functions=[function], topics=("pipes-replies", TRIGGER_TOPIC))
    with stack, stack.activated():
        log_path = stack.server_of(function).log_path
        tap_path = tap(stack)
        outcomes = [
            run("materialize", {"dl_bucket": "gs://data-lake", "rows": 5}),
            run("handler throws", {"fail": "on purpose"}),
            run("claim-checked replies and signed", {"rows": 3, "padding": "x" * 5000},
                inline_threshold_bytes=200, signing_secret=SECRET),
            run("function timeout (15 s) while the handler works for 60 s", {"rows": 1, "work_seconds": 60},
                function_timeout=15.0),
            run("12 s of quiet work under a 5 s heartbeat timeout", {"rows": 1, "work_seconds": 12},
                heartbeat_interval=1.0, heartbeat_timeout=5.0),
            run_and_cancel("the lease ended 4 s into 30 s of work", {"rows": 1, "work_seconds": 30}, after=4.0),
        ]
        session = redeliver_last_trigger(stack, tap_path)
        time.sleep(3)
        for outcome in outcomes:
            print("\n== " + outcome.pop("scenario"))
            for key, value in outcome.items():
                print(f"  {key}: {value}")
        with stack.activated():
            objects = [b.name for b in storage.Client().list_blobs("pipes-payloads")]
            lake = [b.name for b in storage.Client().list_blobs("data-lake")]
        print(f"\n== pipes-payloads after the runs: {objects}\n== data-lake: {lake}")
        print(f"\n== the function's log ({log_path}), the redelivered session {session}:")
        print("\n".join(line for line in log_path.read_text().splitlines() if session in line or "dropping" in line))


if __name__ == "__main__":
    main()
