"""The chaos soak's function (``bench/soak.py``), served by the Functions Framework: numbered log lines, so
the soak can count what Dagster recorded, an optional sleep spread over them (a slow function), an optional
reply of ``reply_bytes`` (above the inline threshold: a claim-check object), and one
marker object per run of the handler, so the soak can count how often each session ran (the lease must keep
it to one). Only the function side is imported here."""

from __future__ import annotations

import time
import uuid
from typing import Any

from dagster_gcf_pipes.function.clients import storage_client
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext
from dagster_gcf_pipes.function.entrypoint import pipes_function

#: gs://MARKER_BUCKET/MARKER_PREFIX/TOKEN/RUN: one object per run of the handler
MARKER_BUCKET = "data-lake"
MARKER_PREFIX = "soak-runs"


def log_line(i: int, lines: int) -> str:
    """The text of line ``i`` of ``lines``; ``bench/soak.py`` parses it back."""
    return f"soak line {i} of {lines}"


@pipes_function
def main(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    token, lines, sleep = str(payload["token"]), int(payload["lines"]), float(payload.get("sleep", 0.0))
    storage_client().bucket(MARKER_BUCKET).blob(f"{MARKER_PREFIX}/{token}/{uuid.uuid4().hex}").upload_from_string(b"")
    for i in range(lines):
        pipes.log.info(log_line(i, lines))
        if sleep:
            time.sleep(sleep / lines)
    metadata = {"lines": {"raw_value": lines, "type": "int"}}
    if payload.get("reply_bytes"):  # a reply too large for a Pub/Sub message: it travels through GCS
        metadata["blob"] = {"raw_value": "r" * int(payload["reply_bytes"]), "type": "text"}
    pipes.report_asset_materialization(metadata=metadata)
