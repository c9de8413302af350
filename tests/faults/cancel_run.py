"""Run one materialization in its own process so a test can terminate it as Dagster would (SIGINT, which
Dagster's run workers also map SIGTERM to). Prints one JSON line with what the run recorded.

    python -m tests.faults.cancel_run '{"client": {...}, "payload": {...}}'
    python -m tests.faults.cancel_run '{"client": {...}, "payloads": [{...}, ...]}'    (a fan-out: run_many)

``interrupt_run`` does it from a test: start the run, wait until ``ready()``, SIGINT, return the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from dagster import DagsterEventType, DagsterInstance, asset, materialize

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from tests import REPO_ROOT
from tests.integration.helpers import make_client, run_asset

DEFAULTS = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_timeout": 10.0}


def interrupt_run(environment: dict[str, str], spec: dict[str, Any], ready: Callable[[], bool], timeout: float = 60.0) -> dict[str, Any]:
    """Run ``spec`` in a child process, SIGINT it once ``ready()``, and return its report
    (``success``, ``error``, ``logs``)."""
    env = {**os.environ, **environment, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.cancel_run", json.dumps(spec)], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"the run was not ready to interrupt within {timeout}s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()
    assert stdout.strip(), stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _fan_out(client: PipesPubSubClient, payloads: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    @asset(name="pipes_fan_out_asset")
    def pipes_fan_out_asset(context, pipes_pubsub: PipesPubSubClient):
        return pipes_pubsub.run_many(context=context, payloads=payloads, max_concurrency=len(payloads)).get_materialize_result()

    with DagsterInstance.ephemeral() as instance:
        result = materialize([pipes_fan_out_asset], resources={"pipes_pubsub": client}, instance=instance, raise_on_error=False)
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    return result, logs


def main(spec: dict[str, Any]) -> None:
    client = make_client(**{**DEFAULTS, **spec.get("client", {})})
    if "payloads" in spec:
        result, logs = _fan_out(client, spec["payloads"])
    else:
        outcome = run_asset(client, payload=spec.get("payload", {}))
        result, logs = outcome.result, outcome.log_messages
    failures = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    print(json.dumps({
        "success": result.success,
        "error": failures[0].event_specific_data.error.to_string() if failures else "",
        "logs": logs,
    }), flush=True)


if __name__ == "__main__":
    with DagsterInstance.ephemeral():
        main(json.loads(sys.argv[1]))
