"""The Pipes context injector: the context travels inline in the trigger, or through GCS above the threshold.

The function's ``PipesInlineOrGCSContextLoader`` reads either form (``data`` inline, ``bucket``/``key`` on
GCS). The object is deleted with the rest of the session's objects when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import PipesContextInjector
from dagster_pipes import PipesContextData, PipesParams

from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.protocol import dumps


class PipesPubSubContextInjector(PipesContextInjector):
    def __init__(self, *, blob_store: GCSBlobStore, key: str, inline_threshold: int):
        self._blob_store = blob_store
        self._key = key
        self._inline_threshold = inline_threshold

    @contextmanager
    def inject_context(self, context_data: PipesContextData) -> Iterator[PipesParams]:
        body = dumps(context_data, "the Pipes context (check the extras you passed)")
        if len(body) <= self._inline_threshold:
            yield {"data": context_data}
        else:
            self._blob_store.put(self._key, body)
            yield {"bucket": self._blob_store.bucket, "key": self._key}

    def no_messages_debug_text(self) -> str:
        return (
            "Attempted to inject the context in the Pub/Sub trigger (inline, or as a GCS object above the "
            "threshold). Expected the function to be decorated with @pipes_function."
        )
