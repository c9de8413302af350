"""The conformance kit's function in Python (tests/conformance/test_kit.py): the same behaviours as
../node/index.js, chosen by the payload's ``case`` (several joined by ``+``). Marks under gs://LAKE/kit/ tell the kit what ran."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from dagster_gcf_pipes.function import CloudFunctionPipesContext, pipes_function, storage_client

LEVELS = ["debug", "info", "warning", "error", "critical"]


def blob(payload: dict[str, Any], kind: str) -> Any:
    return storage_client().bucket(payload["lake"]).blob(f"kit/{kind}/{payload['token']}")


def mark(payload: dict[str, Any], kind: str) -> None:
    blob(payload, kind).upload_from_string(kind)


def wait_for_go_or_cancel(pipes: CloudFunctionPipesContext, payload: dict[str, Any], seconds: float) -> bool:
    """Wait up to ``seconds`` for the kit's go mark, or until the session is cancelled; True if cancelled."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pipes.is_cancelled:
            return True
        if blob(payload, "go").exists():
            return False
        time.sleep(0.05)
    return pipes.is_cancelled


def fail_deep(token: str) -> None:
    try:
        json.loads("not json")
    except ValueError as cause:
        raise RuntimeError(f"kit failure {token}") from cause


def logs(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    for level in LEVELS:
        getattr(pipes.log, level)(f"{payload['tag']} {level}")


def checks(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    for check in payload["checks"]:
        pipes.report_asset_check(
            asset_key=pipes.asset_keys[0], check_name=check["name"], passed=check["passed"],
            severity=check["severity"], metadata=check["metadata"],
        )


def custom(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    for message in payload["messages"]:
        pipes.report_custom_message(message)


def extras(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    pipes.report_custom_message({"extras": pipes.extras, "region": pipes.get_extra("region")})


def claim_check(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    pad = payload["pad"]
    pipes.report_custom_message({"pad_sha256": hashlib.sha256(pad.encode()).hexdigest(), "pad_length": len(pad)})
    pipes.report_custom_message("r" * payload["reply_chars"])


def prints(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    print(f"{payload['tag']} stdout")
    print(f"{payload['tag']} stderr", file=sys.stderr)


def until_cancelled(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    """Wait for cancellation (or the go mark); once cancelled, write a line a moment later (after `closed` when
    the function's deadline cancelled the session: it must not reach the step), then stop."""
    if wait_for_go_or_cancel(pipes, payload, payload["seconds"]):
        mark(payload, "cancel-observed")
        time.sleep(0.3)
        try:
            pipes.log.info(f"{payload['tag']} after the end")
        finally:
            pipes.raise_if_cancelled()


CASES: dict[str, Callable[[CloudFunctionPipesContext, dict[str, Any]], None]] = {
    "logs": logs,
    "checks": checks,
    "custom": custom,
    "extras": extras,
    "error": lambda pipes, payload: fail_deep(payload["token"]),
    "claim_check": claim_check,
    "prints": prints,
    "wait": lambda pipes, payload: wait_for_go_or_cancel(pipes, payload, payload["seconds"]),
    "until_cancelled": until_cancelled,
}


@pipes_function
def main(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    names = payload["case"].split("+")  # several cases, run in order: "logs+checks"
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise ValueError(f"no such kit case: {unknown}")
    if payload.get("token"):
        storage_client().bucket(payload["lake"]).blob(f"kit/runs/{payload['token']}/{uuid.uuid4().hex}").upload_from_string("run")
        mark(payload, "started")
    for name in names:
        CASES[name](pipes, payload)
    for key in pipes.asset_keys if pipes.is_asset_step else []:
        pipes.report_asset_materialization(
            asset_key=key,
            data_version=f"{payload['case']}-{key}",
            metadata={
                "case": payload["case"],
                **({"partition": pipes.partition_key} if pipes.is_partition_step else {}),
                "rows": {"raw_value": 3, "type": "int"},
                "ratio": {"raw_value": 2.0, "type": "float"},
            },
        )


kit_http = main.http  # the same handler behind an HTTP trigger (invocation="http", the earlier design)
