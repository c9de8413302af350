"""A test function served by the Functions Framework in the integration tests: one handler, scenarios
chosen by the payload, so one server covers every round-trip case."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from dagster_gcf_pipes.function.clients import storage_client
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext
from dagster_gcf_pipes.function.entrypoint import pipes_function

LAKE_BUCKET = "data-lake"


def mark(kind: str, token: str) -> None:
    """Leave gs://data-lake/KIND/TOKEN for the test to see what the function did."""
    storage_client().bucket(LAKE_BUCKET).blob(f"{kind}/{token}").upload_from_string(kind)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@pipes_function
def main(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    started = time.time()
    scenario = payload.get("scenario", "echo")
    token = payload.get("token")
    pipes.log.info(f"scenario {scenario} starts")
    if token:
        mark("started", token)
    if scenario == "wait_for_cancel":
        deadline = time.monotonic() + float(payload.get("sleep", 60))
        while time.monotonic() < deadline:
            if pipes.is_cancelled:
                mark("cancel-observed", token)
                pipes.raise_if_cancelled()
            time.sleep(0.05)
    if scenario == "fail_once" and not storage_client().bucket(LAKE_BUCKET).blob(f"failed-once/{token}").exists():
        mark("failed-once", token)
        raise RuntimeError("failing the first attempt on purpose")
    if scenario == "raise":
        try:
            int("not a number")
        except ValueError as exc:
            raise RuntimeError("boom from the function") from exc
    for i in range(int(payload.get("log_lines", 0))):
        pipes.log.info(f"line {i}")
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    if payload.get("interval_token"):  # when this invocation ran, for the fan-out concurrency test
        interval = json.dumps({"start": started, "end": time.time()})
        storage_client().bucket(LAKE_BUCKET).blob(f"intervals/{payload['interval_token']}").upload_from_string(interval)
    if payload.get("reply_bytes"):
        pipes.report_custom_message("r" * int(payload["reply_bytes"]))
    pipes.report_asset_materialization(
        metadata={
            "n": {"raw_value": payload.get("n", 0), "type": "int"},
            "payload_sha256": {"raw_value": sha256_json(payload), "type": "text"},
            "extras_sha256": {"raw_value": sha256_json(pipes.extras), "type": "text"},
        }
    )


main_http = main.http  # the same handler behind an HTTP trigger (invocation="http")
