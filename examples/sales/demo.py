"""The demo: start the local stack, materialize the example asset through Dagster, print what Dagster
recorded (the function's log lines and the materialization's metadata), tear everything down.

    python -m examples.sales.demo
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, PreviewWarning, materialize

from dagster_gcf_pipes.local import LocalFunction, LocalStack

TRIGGER_TOPIC = "pipes-trigger"
FUNCTION_SOURCE = Path(__file__).parent / "function" / "main.py"


def main() -> int:
    warnings.filterwarnings("ignore", category=PreviewWarning)
    started = time.monotonic()
    print("starting the local stack (Pub/Sub emulator, fake-gcs-server, Functions Framework) ...", flush=True)
    with LocalStack(functions=[LocalFunction(FUNCTION_SOURCE, "main", TRIGGER_TOPIC)]) as stack, stack.activated():
        print(f"  up in {time.monotonic() - started:.1f}s: {stack.environment}", flush=True)
        from examples.sales.definitions import cloud_function_pipes_asset, pipes_pubsub_from_env

        with DagsterInstance.ephemeral() as instance:
            t0 = time.monotonic()
            result = materialize(
                [cloud_function_pipes_asset], resources={"pipes_pubsub": pipes_pubsub_from_env()}, instance=instance
            )
            elapsed = time.monotonic() - t0
            print(f"\nrun {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'} in {elapsed:.2f}s")
            print("\nlog lines recorded by Dagster:")
            for entry in instance.all_logs(result.run_id):
                if entry.dagster_event is None:
                    print(f"  {logging.getLevelName(entry.level):<7} {entry.user_message}")
            for event in result.get_asset_materialization_events():
                materialization = event.event_specific_data.materialization
                print(f"\nmaterialization of {materialization.asset_key.to_user_string()}:")
                for key, value in materialization.metadata.items():
                    print(f"  {key}: {value.value}")
            ok = result.success and any(e.event_type == DagsterEventType.ASSET_MATERIALIZATION for e in result.all_events)
    print(f"\nlocal stack stopped; demo took {time.monotonic() - started:.1f}s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
