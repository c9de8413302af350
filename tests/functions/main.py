"""A test function served by the Functions Framework in the integration tests: one handler, scenarios
chosen by the payload, so one server covers every round-trip case."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
import uuid
from typing import Any

from dagster_gcf_pipes.function.clients import storage_client
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext
from dagster_gcf_pipes.function.entrypoint import pipes_function

LAKE_BUCKET = "data-lake"

# a library that set its logging up at import time: its handler holds the sys.stderr of that moment
CHATTY_LIBRARY = logging.getLogger("tests.functions.chatty_library")
CHATTY_LIBRARY.addHandler(logging.StreamHandler(sys.stderr))
CHATTY_LIBRARY.propagate = False


def mark(kind: str, token: str) -> None:
    """Leave gs://data-lake/KIND/TOKEN for the test to see what the function did."""
    storage_client().bucket(LAKE_BUCKET).blob(f"{kind}/{token}").upload_from_string(kind)


def wait_for_mark(kind: str, token: str, timeout: float = 60.0) -> None:
    blob = storage_client().bucket(LAKE_BUCKET).blob(f"{kind}/{token}")
    deadline = time.monotonic() + timeout
    while not blob.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gs://{LAKE_BUCKET}/{kind}/{token} did not appear within {timeout:g}s")
        time.sleep(0.05)


def print_lines(payload: dict[str, Any]) -> None:
    """The prints scenario: ``prints`` lines tagged ``tag`` to stdout and to stderr, a library's warning
    through logging (to stderr), a line of the library's own JSON log, a line from a thread it starts, and
    a last line without its newline.
    With ``peer`` (the token of another session), printing starts once both have started and the session
    ends once both have printed, so the two print while both are running on this one process. With
    ``print_until`` (another session's token), lines go out without a pause until that session started,
    then ``prints`` more: the other session's start happens while this one prints."""
    tag, peer, until = payload["tag"], payload.get("peer"), payload.get("print_until")
    if peer:
        wait_for_mark("started", peer)
    printed = 0
    while until and not storage_client().bucket(LAKE_BUCKET).blob(f"started/{until}").exists():
        for i in range(printed, printed + 50):
            print_pair(tag, i)
        printed += 50
        time.sleep(0.01)
    for i in range(printed, printed + int(payload["prints"])):
        print_pair(tag, i)
        if peer and i % 20 == 0:
            time.sleep(0.01)  # let the peer's lines interleave with these
    printer = threading.Thread(target=print, args=(f"{tag} from a thread",))  # context variables stay behind
    printer.start()
    printer.join()
    logging.getLogger("some.library").warning(f"{tag} library warning")  # logging's last resort: sys.stderr
    CHATTY_LIBRARY.warning(f"{tag} handler made at import")
    logging.getLogger("dagster_gcf_pipes.tests").info(f"{tag} structured line")
    sys.stdout.write(f"{tag} last line without newline")
    if peer:
        mark("printed", payload["token"])
        wait_for_mark("printed", peer)


def print_pair(tag: str, i: int) -> None:
    print(f"{tag} out {i}")
    print(f"{tag} err {i}", file=sys.stderr)


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
        mark("runs", f"{token}/{uuid.uuid4().hex}")  # one object per run of the handler, to count them
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
    if scenario == "print":
        print_lines(payload)
    if scenario == "raise":
        try:
            int("not a number")
        except ValueError as exc:
            raise RuntimeError("boom from the function") from exc
    for i in range(int(payload.get("log_lines", 0))):
        pipes.log.info(f"line {i}")
        time.sleep(float(payload.get("line_interval", 0)))  # numbered lines spread over time, for the re-attach tests
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    if payload.get("interval_token"):  # when this invocation ran, for the fan-out concurrency test
        interval = json.dumps({"start": started, "end": time.time()})
        storage_client().bucket(LAKE_BUCKET).blob(f"intervals/{payload['interval_token']}").upload_from_string(interval)
    if payload.get("reply_bytes"):
        pipes.report_custom_message("r" * int(payload["reply_bytes"]))
    for message in payload.get("custom_messages", []):
        pipes.report_custom_message(message)
    for reported in payload.get("checks", []):  # {"name", "passed", optional "severity" and "metadata"}
        pipes.report_asset_check(
            check_name=reported["name"],
            passed=bool(reported["passed"]),
            severity=reported.get("severity", "ERROR"),
            metadata=reported.get("metadata"),
        )
    pipes.report_asset_materialization(
        metadata={
            "n": {"raw_value": payload.get("n", 0), "type": "int"},
            "payload_sha256": {"raw_value": sha256_json(payload), "type": "text"},
            "extras_sha256": {"raw_value": sha256_json(pipes.extras), "type": "text"},
        }
    )
    if token:
        mark("finished", token)  # the handler is done; `closed` follows


main_http = main.http  # the same handler behind an HTTP trigger (invocation="http")
