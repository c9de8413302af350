"""Run one materialization in its own process so a test can terminate it as Dagster would (SIGINT, which
Dagster's run workers also map SIGTERM to). Prints one JSON line with what the run recorded.

    python -m tests.faults.cancel_run TOKEN
"""

from __future__ import annotations

import json
import sys

from dagster import DagsterEventType, DagsterInstance

from tests.integration.helpers import make_client, run_asset


def main(token: str) -> None:
    client = make_client(heartbeat_interval=0.2, heartbeat_timeout=5.0, cancel_timeout=10.0)
    outcome = run_asset(client, payload={"scenario": "wait_for_cancel", "token": token, "sleep": 60})
    failures = [e for e in outcome.result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    print(json.dumps({
        "success": outcome.result.success,
        "error": failures[0].event_specific_data.error.to_string() if failures else "",
        "logs": outcome.log_messages,
    }), flush=True)


if __name__ == "__main__":
    with DagsterInstance.ephemeral():
        main(sys.argv[1])
