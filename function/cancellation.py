"""Cooperative cancellation: the orchestrator writes ``PREFIX/SESSION/cancel`` when the Dagster run is
terminated; a watcher thread looks for it every ``interval`` seconds and sets an event that the handler's
Pipes context exposes (``pipes.is_cancelled`` / ``pipes.raise_if_cancelled()``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from google.cloud import storage

from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS

_log = logging.getLogger("dagster_pipes_gcp.function")


@contextmanager
def watch_for_cancellation(client: storage.Client, bucket: str, key: str, interval: float) -> Iterator[threading.Event]:
    cancelled = threading.Event()
    stop = threading.Event()
    blob = client.bucket(bucket).blob(key)

    def poll() -> None:
        while not stop.wait(interval):
            try:
                if blob.exists():
                    _log.warning("cancellation requested through gs://%s/%s", bucket, key)
                    cancelled.set()
                    return
            except TRANSIENT_ERRORS as exc:  # a missed poll is retried at the next interval
                _log.warning("could not check gs://%s/%s for cancellation: %s", bucket, key, exc)

    thread = threading.Thread(target=poll, name="pipes-cancel-watch", daemon=True)
    thread.start()
    try:
        yield cancelled
    finally:
        stop.set()
        thread.join()
