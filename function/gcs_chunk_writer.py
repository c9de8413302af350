"""The GCS reply channel (the earlier design): dagster-pipes' own ``PipesGCSMessageWriter``, which uploads
the session's messages as JSON-lines chunks ``{key_prefix}/{n}.json`` every ``interval`` seconds."""

from __future__ import annotations

from typing import Any

from dagster_pipes import PipesGCSMessageWriter
from google.cloud import storage

from dagster_gcf_pipes.function.message_writer import opened_extras


class GCSChunkMessageWriter(PipesGCSMessageWriter):
    """Reports the invocation (and trace) id in ``opened``, as ``PubSubMessageWriter`` does, for the step metadata."""

    def __init__(self, client: storage.Client, invocation_id: str, *, trace_id: str | None, interval: float):
        super().__init__(client, interval=interval)
        self._opened_extras = opened_extras(invocation_id, trace_id)

    def get_opened_extras(self) -> dict[str, Any]:
        return self._opened_extras
