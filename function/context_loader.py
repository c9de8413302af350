"""Loads the Pipes context the orchestrator's injector sent: inline (``data``) or a GCS object (``bucket``/``key``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster_pipes import (
    PipesContextData,
    PipesContextLoader,
    PipesDefaultContextLoader,
    PipesGCSContextLoader,
    PipesParams,
)
from google.cloud import storage


class PipesInlineOrGCSContextLoader(PipesContextLoader):
    def __init__(self, client: storage.Client):
        self._inline = PipesDefaultContextLoader()
        self._gcs = PipesGCSContextLoader(client)

    @contextmanager
    def load_context(self, params: PipesParams) -> Iterator[PipesContextData]:
        loader = self._gcs if "bucket" in params else self._inline
        with loader.load_context(params) as data:
            yield data
