"""The GCS reply channel (the earlier design): dagster-pipes' own ``PipesGCSMessageWriter``, which uploads
the session's messages as JSON-lines chunks ``{key_prefix}/{n}.json`` every ``interval`` seconds."""

from __future__ import annotations

from typing import Any

from dagster_pipes import PipesGCSMessageWriter
from google.cloud import storage


class GCSChunkMessageWriter(PipesGCSMessageWriter):
    """Reports the invocation id in ``opened``, as ``PubSubMessageWriter`` does, so the step metadata names it."""

    def __init__(self, client: storage.Client, invocation_id: str, *, interval: float):
        super().__init__(client, interval=interval)
        self.invocation_id = invocation_id

    def get_opened_extras(self) -> dict[str, Any]:
        return {"invocation_id": self.invocation_id}
