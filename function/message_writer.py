"""The Pipes message writer that publishes a function's messages to the reply topic.

Messages are buffered and published as numbered batches (one Pub/Sub message per batch) by a background
flusher: a batch leaves when it reaches ``max_batch_messages`` or ``max_batch_bytes``, or ``flush_interval``
after its first message (0 by default: at once, so a batch is whatever was written while the previous
publish was in flight: one message when the function is quiet, up to the limits when it is chatty). While
nothing is written a heartbeat goes out every ``heartbeat_interval`` so the orchestrator can tell a quiet
function from a dead one. ``closed`` is always the last batch (a message written after it is dropped), and
closing blocks until every batch is acknowledged by Pub/Sub, so the function never returns with messages in
flight.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster_pipes import PipesMessage, PipesMessageWriter, PipesMessageWriterChannel, PipesParams
from google.cloud import pubsub_v1

from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.layout import reply_key
from dagster_gcf_pipes.shared.protocol import OWNER_TOKEN_EXTRA, Reply, ReplyChannelParams
from dagster_gcf_pipes.shared.pubsub import publish
from dagster_gcf_pipes.shared.signing import sign
from dagster_gcf_pipes.shared.tracing import carried

_log = logging.getLogger(__name__)


def opened_extras(invocation_id: str, trace_id: str | None, owner_token: str = "") -> dict[str, Any]:
    """What a writer reports in ``opened``: the invocation that owns the session, the request's trace, and
    the trigger's owner token (the orchestrator then accepts the invocation without reading the lease)."""
    return {
        "invocation_id": invocation_id,
        **({"trace_id": trace_id} if trace_id else {}),
        **({OWNER_TOKEN_EXTRA: owner_token} if owner_token else {}),
    }


class PubSubMessageWriter(PipesMessageWriter["PubSubMessageWriterChannel"]):
    """Opens a ``PubSubMessageWriterChannel`` per Pipes session; clients are shared and thread-safe."""

    def __init__(
        self,
        publisher: pubsub_v1.PublisherClient,
        blob_store_factory: Callable[[str], GCSBlobStore],
        invocation_id: str | None = None,
        signing_secret: str | None = None,
        trace_id: str | None = None,
    ):
        self._publisher = publisher
        self._blob_store_factory = blob_store_factory
        self._signing_secret = signing_secret
        self.invocation_id = invocation_id or uuid.uuid4().hex
        self._trace_id = trace_id
        self._opened_extras = opened_extras(self.invocation_id, trace_id)

    @contextmanager
    def open(self, params: PipesParams) -> Iterator[PubSubMessageWriterChannel]:
        settings = ReplyChannelParams.from_params(params)
        self._opened_extras = opened_extras(self.invocation_id, self._trace_id, settings.owner_token)
        channel = PubSubMessageWriterChannel(
            publisher=self._publisher,
            blob_store=self._blob_store_factory(settings.bucket),
            settings=settings,
            invocation_id=self.invocation_id,
            signing_secret=self._signing_secret,
        )
        with channel.flushing():
            yield channel

    def get_opened_extras(self) -> dict[str, Any]:
        return self._opened_extras


class PubSubMessageWriterChannel(PipesMessageWriterChannel):
    def __init__(
        self,
        *,
        publisher: pubsub_v1.PublisherClient,
        blob_store: GCSBlobStore,
        settings: ReplyChannelParams,
        invocation_id: str,
        signing_secret: str | None = None,
    ):
        self._publisher = publisher
        self._signing_secret = signing_secret
        self._settings = settings
        self._claim_check = ClaimCheck(blob_store, settings.inline_threshold)
        self._invocation_id = invocation_id
        self._cond = threading.Condition()
        self._buffer: list[bytes] = []
        self._buffer_bytes = 0
        self._first_buffered_at: float | None = None
        self._last_sent_at = time.monotonic()
        self._closing = False
        self._seq = 0
        self._error: BaseException | None = None
        self.batches_sent = 0

    # -- called by the Pipes context, from the business code's thread(s)
    def write_message(self, message: PipesMessage) -> None:
        encoded = json.dumps(message, separators=(",", ":")).encode("utf-8")
        with self._cond:
            if self._error is not None:
                raise RuntimeError("the Pipes reply channel failed earlier; see the first error") from self._error
            if self._closing:  # `closed` is written (the deadline closed the session under a running handler)
                _log.debug("dropping a Pipes %r message written after `closed`", message["method"])
                return
            self._buffer.append(encoded)
            self._buffer_bytes += len(encoded) + 1
            was_empty = self._first_buffered_at is None
            if was_empty:
                self._first_buffered_at = time.monotonic()
            if message["method"] == "closed":
                self._closing = True
            if was_empty or self._closing or self._batch_full():
                self._cond.notify()  # the flusher may be waiting for a heartbeat: the deadline changed

    def _batch_full(self) -> bool:
        s = self._settings
        return len(self._buffer) >= s.max_batch_messages or self._buffer_bytes >= s.max_batch_bytes

    @contextmanager
    def flushing(self) -> Iterator[None]:
        # publishes in the trace of whoever opened the channel (the handler's span), when tracing is on
        thread = threading.Thread(target=carried(self._flush_loop), name="pipes-pubsub-writer", daemon=True)
        thread.start()
        try:
            yield
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify()
            thread.join()
            if self._error is not None:
                raise RuntimeError(
                    f"could not publish Pipes messages to {self._settings.topic}: {self._error}"
                ) from self._error

    # -- the flusher thread
    def _flush_loop(self) -> None:
        s = self._settings
        try:
            while True:
                with self._cond:
                    while True:
                        now = time.monotonic()
                        if self._buffer and (
                            self._closing or self._batch_full() or now - self._first_buffered_at >= s.flush_interval
                        ):
                            batch, self._buffer, self._buffer_bytes = self._take_batch()
                            break
                        if self._closing and not self._buffer:
                            return
                        if not self._buffer and now - self._last_sent_at >= s.heartbeat_interval:
                            batch = None
                            break
                        deadline = (
                            self._first_buffered_at + s.flush_interval
                            if self._buffer
                            else self._last_sent_at + s.heartbeat_interval
                        )
                        self._cond.wait(timeout=max(deadline - now, 0.001))
                if batch is None:
                    self._publish_heartbeat()
                else:
                    self._publish_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the writer at close
            _log.exception("publishing Pipes replies to %s failed", s.topic)
            with self._cond:
                self._error = exc

    def _take_batch(self) -> tuple[list[bytes], list[bytes], int]:
        """Cut at most one batch's worth off the buffer; the rest stays for the next round."""
        s = self._settings
        count, size = 0, 0
        for item in self._buffer:
            if count and (count >= s.max_batch_messages or size + len(item) + 1 > s.max_batch_bytes):
                break
            count += 1
            size += len(item) + 1
        batch, rest = self._buffer[:count], self._buffer[count:]
        self._first_buffered_at = time.monotonic() if rest else None
        return batch, rest, sum(len(i) + 1 for i in rest)

    def _publish_batch(self, encoded_messages: list[bytes]) -> None:
        s = self._settings
        body = b"[" + b",".join(encoded_messages) + b"]"
        seq = self._seq
        attributes = self._signed(body, Reply(s.session_id, self._invocation_id, seq=seq).attributes())
        data, codec_attributes = self._claim_check.wrap(body, reply_key(s.prefix, s.session_id, self._invocation_id, seq))
        self._send(data, {**attributes, **codec_attributes})
        self._seq += 1

    def _publish_heartbeat(self) -> None:
        body, attributes = Reply(self._settings.session_id, self._invocation_id, seq=None).encode()
        self._send(body, self._signed(body, attributes))

    def _signed(self, body: bytes, attributes: dict[str, str]) -> dict[str, str]:
        return sign(self._signing_secret, body, attributes) if self._signing_secret else attributes

    def _send(self, data: bytes, attributes: Mapping[str, str]) -> None:
        publish(self._publisher, self._settings.topic, data, attributes, timeout=self._settings.publish_timeout)
        self.batches_sent += 1
        self._last_sent_at = time.monotonic()
