"""Claim-check codec: a message body travels inline below a threshold, else as a ``gs://`` pointer.

Pub/Sub caps a message at 10 MB, and pulling messages above 4 MiB needs special channel options, so large
bodies go to GCS and the message carries only the object's URL. The ``dagster_pipes_body`` attribute says
which: ``inline`` or ``claim``. Both sides use the same codec; it never decides where the object lives,
the caller passes the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.protocol import DEFAULT_INLINE_THRESHOLD, PUBSUB_MAX_MESSAGE_BYTES, Attr, ProtocolError
from dagster_gcf_pipes.shared.retry import transient_retry

INLINE = "inline"
CLAIM = "claim"

#: Head-room for attributes and framing under Pub/Sub's 10 MB message limit.
MAX_INLINE_THRESHOLD = PUBSUB_MAX_MESSAGE_BYTES - 64_000


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` and return its URL."""

    def get(self, url: str) -> bytes:
        """Return the bytes at ``url``; raise ``ProtocolError`` if there is no such object."""


def parse_gs_url(url: str) -> tuple[str, str]:
    if not url.startswith("gs://") or "/" not in url[5:]:
        raise ProtocolError(f"claim-check pointer is not a gs://BUCKET/KEY URL: {url[:200]!r}")
    bucket, key = url[5:].split("/", 1)
    return bucket, key


@dataclass
class GCSBlobStore:
    """A ``BlobStore`` on one GCS bucket, with transient errors retried."""

    client: storage.Client
    bucket: str

    @transient_retry()
    def put(self, key: str, data: bytes) -> str:
        self.client.bucket(self.bucket).blob(key).upload_from_string(data, content_type="application/json")
        return f"gs://{self.bucket}/{key}"

    @transient_retry()
    def get(self, url: str) -> bytes:
        bucket, key = parse_gs_url(url)
        try:
            return self.client.bucket(bucket).blob(key).download_as_bytes()
        except gexc.NotFound as exc:
            raise ProtocolError(f"claim-check object {url} does not exist (deleted, or never written)") from exc

    @transient_retry()
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        blobs = list(self.client.list_blobs(self.bucket, prefix=prefix))
        for blob in blobs:
            try:
                blob.delete()
            except gexc.NotFound:
                pass
        return len(blobs)


def validate_threshold(threshold: int) -> int:
    if not 0 <= threshold <= MAX_INLINE_THRESHOLD:
        raise ValueError(
            f"inline_threshold_bytes={threshold} is outside 0..{MAX_INLINE_THRESHOLD}: Pub/Sub rejects messages "
            f"over {PUBSUB_MAX_MESSAGE_BYTES} bytes; set it to at most {MAX_INLINE_THRESHOLD} (default "
            f"{DEFAULT_INLINE_THRESHOLD}), and bodies above it go through GCS"
        )
    return threshold


@dataclass
class ClaimCheck:
    store: BlobStore
    threshold: int = DEFAULT_INLINE_THRESHOLD

    def __post_init__(self) -> None:
        validate_threshold(self.threshold)

    def wrap(self, body: bytes, key: str) -> tuple[bytes, dict[str, str]]:
        """Return the message data and the codec attribute for ``body``; bodies over the threshold go to ``key``."""
        if len(body) <= self.threshold:
            return body, {Attr.BODY: INLINE}
        return self.store.put(key, body).encode("utf-8"), {Attr.BODY: CLAIM}

    def unwrap(self, data: bytes, attributes: Mapping[str, str]) -> bytes:
        encoding = attributes.get(Attr.BODY, INLINE)
        if encoding == INLINE:
            return data
        if encoding == CLAIM:
            try:
                url = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError("claim-check pointer is not UTF-8") from exc
            parse_gs_url(url)
            return self.store.get(url)
        raise ProtocolError(f"unknown {Attr.BODY!r} attribute {encoding!r} (expected {INLINE!r} or {CLAIM!r})")
