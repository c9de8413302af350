"""A partitioned asset job that calls ``PipesPubSubClient`` (``run``, or ``run_many`` for a spec with
``payloads``), run on a persistent Dagster instance: the orchestrator process the re-attach tests SIGKILL,
and the re-execution from failure that follows it.

    python -m tests.faults.reattach_job DAGSTER_HOME '{"client": {...}, "payload": {...}}'

runs partition ``p1`` of the job in this process (the in-process executor: the step runs here, so killing
this process kills the step).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dagster import (
    DagsterInstance,
    Definitions,
    JobDefinition,
    JobExecutionResult,
    ReexecutionOptions,
    StaticPartitionsDefinition,
    asset,
    define_asset_job,
    execute_job,
    fs_io_manager,
    in_process_executor,
)
from dagster._core.definitions.reconstruct import build_reconstructable_job

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from tests.integration.helpers import make_client

PARTITION = "p1"
JOB_NAME = "reattach_job"


def make_job(spec_json: str) -> JobDefinition:
    spec: dict[str, Any] = json.loads(spec_json)

    @asset(partitions_def=StaticPartitionsDefinition([PARTITION, "p2"]))
    def reattached_asset(context, pipes_pubsub: PipesPubSubClient):  # no annotation: strings here (__future__)
        if "payloads" in spec:
            fan_out = pipes_pubsub.run_many(
                context=context, payloads=spec["payloads"], max_concurrency=spec.get("max_concurrency", 10)
            )
            return fan_out.get_materialize_result()
        return pipes_pubsub.run(context=context, payload=spec["payload"]).get_materialize_result()

    job = define_asset_job(JOB_NAME, executor_def=in_process_executor)
    # an io manager that persists, or a run killed before its step started cannot be re-executed
    resources = {"pipes_pubsub": make_client(**spec["client"]), "io_manager": fs_io_manager}
    defs = Definitions(assets=[reattached_asset], jobs=[job], resources=resources)
    return defs.resolve_job_def(JOB_NAME)


def run(instance: DagsterInstance, spec: dict[str, Any], parent_run_id: str | None = None) -> JobExecutionResult:
    """Run the job's partition, or re-execute ``parent_run_id`` from failure."""
    job = build_reconstructable_job(__name__, "make_job", reconstructable_args=(json.dumps(spec),))
    tags = {"dagster/partition": PARTITION}  # execute_job's re-execution does not copy the parent's tags; the UI does
    if parent_run_id is None:
        return execute_job(job, instance, tags=tags)
    return execute_job(job, instance, tags=tags, reexecution_options=ReexecutionOptions.from_failure(parent_run_id, instance))


def wait_at_barrier(folder: Path, parties: int, timeout: float = 120.0) -> None:
    """Start together with the other processes given the same folder: each leaves a file and waits for all
    ``parties`` of them, so processes meant to run at once do not drift apart by their start-up times."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {parties} processes reached {folder}")
        time.sleep(0.01)


if __name__ == "__main__":  # DAGSTER_HOME SPEC [PARENT_RUN_ID: re-execute it from failure] [BARRIER_FOLDER PARTIES]
    parent = sys.argv[3] if len(sys.argv) > 3 else None
    with DagsterInstance.from_config(sys.argv[1]) as instance:
        if len(sys.argv) > 5:
            wait_at_barrier(Path(sys.argv[4]), int(sys.argv[5]))
        with run(instance, json.loads(sys.argv[2]), parent) as result:
            print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
