"""The GCS reply channel (the earlier design) on the Dagster side: dagster's ``PipesBlobStoreMessageReader``
polling the chunks ``{key_prefix}/1.json``, ``2.json``, ... that dagster-pipes' GCS writer uploads.

What this adds to dagster's reader: the same wait-for-``closed`` and timeouts as the Pub/Sub reader (there
are no heartbeats on this channel, so only the startup and total timeouts apply), the invocation id and the
``closed`` params for the step's outcome, fan-out's ``[shard i]`` log prefix, and bounded retries of
transient GCS errors (dagster's polling thread would otherwise die on the first one).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster import PipesMessageHandler
from dagster._core.pipes.utils import PipesBlobStoreMessageReader
from dagster_pipes import PipesParams
from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.orchestrator.diagnostics.errors import ReplyStreamError
from dagster_gcf_pipes.orchestrator.session.message_reader import with_log_prefix
from dagster_gcf_pipes.orchestrator.session.wait import SessionWaiter
from dagster_gcf_pipes.shared.protocol import ReplyChannelParams
from dagster_gcf_pipes.shared.retry import transient_retry


class PipesGCSChunkMessageReader(SessionWaiter, PipesBlobStoreMessageReader):
    def __init__(
        self,
        *,
        gcs: storage.Client,
        channel_params: ReplyChannelParams,
        log: logging.Logger | Any | None = None,
        log_prefix: str = "",
    ):
        super().__init__(interval=channel_params.chunk_interval)
        self._bucket = gcs.bucket(channel_params.bucket)
        self._channel_params = channel_params
        self.session_id = channel_params.session_id
        self._log = log or logging.getLogger(__name__)
        self._log_prefix = log_prefix
        self._cond = threading.Condition()
        self._handler: PipesMessageHandler | None = None
        self._closed_params: Mapping[str, Any] | None = None
        self._failure: BaseException | None = None

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        self._handler = handler
        with super().read_messages(handler) as params:
            yield params

    @contextmanager
    def get_params(self) -> Iterator[PipesParams]:
        yield self._channel_params.to_params()

    def messages_are_readable(self, params: PipesParams) -> bool:
        return True

    def download_messages_chunk(self, index: int, params: PipesParams) -> str | None:
        key = f"{params['key_prefix']}/{index}.json"
        try:
            chunk = transient_retry()(self._download)(key)
        except Exception as exc:
            with self._cond:
                self._failure = exc
            raise
        if chunk is None:
            return None
        messages = []
        for line in chunk.splitlines():
            try:
                messages.append(json.loads(line))
            except ValueError:
                self._log.warning(f"[pipes] dropped a malformed line of gs://{self._bucket.name}/{key}: {line[:200]!r}")
        self._note_session_messages(messages)
        return "\n".join(json.dumps(with_log_prefix(m, self._log_prefix)) for m in messages)

    def _download(self, key: str) -> str | None:
        try:
            return self._bucket.blob(key).download_as_text()
        except gexc.NotFound:
            return None

    def _note_session_messages(self, messages: list[Mapping[str, Any]]) -> None:
        """Dagster's handler keeps no ``closed`` params: note them for the step's outcome."""
        for message in messages:
            if message.get("method") == "closed":
                self._closed_params = message.get("params") or {}

    def no_messages_debug_text(self) -> str:
        return (
            f"Attempted to read the replies of session {self.session_id} as GCS chunks under "
            f"gs://{self._channel_params.bucket}/{self._channel_params.key_prefix}/. Expected the function to be "
            "decorated with @pipes_function."
        )

    # ---------------------------------------------------------------- SessionWaiter
    @property
    def opened(self) -> bool:
        return self._handler is not None and self._handler.received_opened_message

    @property
    def closed(self) -> bool:
        return self._handler is not None and self._handler.received_closed_message

    @property
    def closed_params(self) -> Mapping[str, Any] | None:
        return self._closed_params

    @property
    def invocation_id(self) -> str | None:
        return self.opened_extras.get("invocation_id")

    def _raise_if_broken(self) -> None:
        if self._failure is not None:
            raise ReplyStreamError(
                f"session {self.session_id}: reading reply chunks from gs://{self._channel_params.bucket} failed: "
                f"{self._failure!r}; check that Cloud Storage is reachable"
            ) from self._failure
