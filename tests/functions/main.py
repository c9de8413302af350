"""A test function served by the Functions Framework in the integration tests: one handler, scenarios
chosen by the payload, so one server covers every round-trip case."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from dagster_pipes import PipesContext

from function.entrypoint import pipes_function


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@pipes_function
def main(pipes: PipesContext, payload: dict[str, Any]) -> None:
    scenario = payload.get("scenario", "echo")
    pipes.log.info(f"scenario {scenario} starts")
    if scenario == "raise":
        try:
            int("not a number")
        except ValueError as exc:
            raise RuntimeError("boom from the function") from exc
    for i in range(int(payload.get("log_lines", 0))):
        pipes.log.info(f"line {i}")
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    if payload.get("reply_bytes"):
        pipes.report_custom_message("r" * int(payload["reply_bytes"]))
    pipes.report_asset_materialization(
        metadata={
            "n": {"raw_value": payload.get("n", 0), "type": "int"},
            "payload_sha256": {"raw_value": sha256_json(payload), "type": "text"},
            "extras_sha256": {"raw_value": sha256_json(pipes.extras), "type": "text"},
        }
    )
