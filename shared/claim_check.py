"""Claim-check codec: a message body travels inline below a threshold, else as a ``gs://`` pointer.

Pub/Sub caps a message at 10 MB, and a subscriber on a default gRPC channel receives at most 4 MiB, so large
bodies go to GCS and the message carries only the object's URL. The ``dagster_pipes_body`` attribute says
which: ``inline`` or ``claim``. Both sides use the same codec; it never decides where the object lives,
the caller passes the key.

Reading a pointer is guarded, because a pointer arrives in a message anyone with publish rights may have
written: ``unwrap(..., within=...)`` refuses a pointer outside the given ``gs://BUCKET/PREFIX/`` (a reply's
pointer must stay inside its own session's folder), and no object above ``MAX_CLAIM_BYTES`` is downloaded
(its size is read from the object's metadata first).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.protocol import DEFAULT_INLINE_THRESHOLD, PUBSUB_MAX_MESSAGE_BYTES, Attr, ProtocolError
from dagster_gcf_pipes.shared.retry import transient_retry

INLINE = "inline"
CLAIM = "claim"

#: gRPC's default receive limit: what a subscriber whose channel was opened without options accepts (the
#: client library's emulator mode, other tools, older releases of this library).
DEFAULT_GRPC_RECEIVE_BYTES = 4 * 1024 * 1024

#: The largest inline body: under every receive path's limit with 64 KiB of head-room for attributes and
#: framing. Above it a body goes through GCS, which costs one object per message and nothing else.
MAX_INLINE_THRESHOLD = min(PUBSUB_MAX_MESSAGE_BYTES, DEFAULT_GRPC_RECEIVE_BYTES) - 64 * 1024

#: The largest claim-check object either side writes or reads: a reader never downloads more than this for
#: one message, whoever wrote the pointer.
MAX_CLAIM_BYTES = 64 * 1024 * 1024


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` and return its URL."""

    def get(self, url: str, max_bytes: int) -> bytes:
        """Return the bytes at ``url``; raise ``ProtocolError`` if there is no such object or it is larger
        than ``max_bytes``."""


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
    def get(self, url: str, max_bytes: int = MAX_CLAIM_BYTES) -> bytes:
        """The object's size is checked (metadata) before anything is downloaded, and the download is pinned
        to the generation that was checked, so a bigger object swapped in between is never read."""
        bucket, key = parse_gs_url(url)
        blob = self.client.bucket(bucket).get_blob(key)
        if blob is None:
            raise ProtocolError(f"claim-check object {url} does not exist (deleted, or never written)")
        if blob.size is None or blob.size > max_bytes:
            raise ProtocolError(
                f"claim-check object {url} is {blob.size} bytes, above the {max_bytes}-byte cap: not downloaded"
            )
        try:
            return blob.download_as_bytes(if_generation_match=blob.generation)
        except gexc.NotFound as exc:
            raise ProtocolError(f"claim-check object {url} was deleted while being read") from exc
        except gexc.PreconditionFailed as exc:
            raise ProtocolError(f"claim-check object {url} was replaced while being read") from exc

    @transient_retry()
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``, a page of the listing at a time; returns how many."""
        deleted = 0
        for blob in list_objects(self.client, self.bucket, prefix):
            try:
                blob.delete()
            except gexc.NotFound:
                pass
            deleted += 1
        return deleted


#: the most objects a page of a listing holds: Cloud Storage's own limit ("maxResults ... or 1,000 items,
#: whichever is smaller", https://cloud.google.com/storage/docs/json_api/v1/objects/list), asked for
#: explicitly, since fake-gcs-server answers a listing without maxResults in one page of every object
LIST_PAGE_SIZE = 1000


def list_objects(client: storage.Client, bucket: str, prefix: str) -> Iterator[storage.Blob]:
    """The objects under ``prefix``, fetched a page of ``LIST_PAGE_SIZE`` at a time (never all at once)."""
    return iter(client.list_blobs(bucket, prefix=prefix, page_size=LIST_PAGE_SIZE))


def validate_threshold(threshold: int) -> int:
    if not 0 <= threshold <= MAX_INLINE_THRESHOLD:
        raise ValueError(
            f"inline_threshold_bytes={threshold} is outside 0..{MAX_INLINE_THRESHOLD}: a larger inline message "
            f"cannot be received by a subscriber on a default gRPC channel ({DEFAULT_GRPC_RECEIVE_BYTES} bytes) and "
            f"Pub/Sub rejects messages over {PUBSUB_MAX_MESSAGE_BYTES} bytes; set it to at most "
            f"{MAX_INLINE_THRESHOLD} (default {DEFAULT_INLINE_THRESHOLD}): bodies above it go through GCS"
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
        if len(body) > MAX_CLAIM_BYTES:
            raise ProtocolError(
                f"a message body of {len(body)} bytes is above the {MAX_CLAIM_BYTES}-byte claim-check cap, which "
                "no reader downloads: send less at once (write large data to your own storage and report where)"
            )
        return self.store.put(key, body).encode("utf-8"), {Attr.BODY: CLAIM}

    def unwrap(self, data: bytes, attributes: Mapping[str, str], within: str | None = None) -> bytes:
        """The body ``data`` carries. ``within`` (``gs://BUCKET/PREFIX/``): refuse a pointer outside it."""
        encoding = attributes.get(Attr.BODY, INLINE)
        if encoding == INLINE:
            return data
        if encoding == CLAIM:
            try:
                url = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError("claim-check pointer is not UTF-8") from exc
            parse_gs_url(url)
            if within is not None and not _is_inside(url, within):
                raise ProtocolError(f"claim-check pointer {url[:200]!r} is outside {within}: not fetched")
            return self.store.get(url, MAX_CLAIM_BYTES)
        raise ProtocolError(f"unknown {Attr.BODY!r} attribute {encoding!r} (expected {INLINE!r} or {CLAIM!r})")


def _is_inside(url: str, folder: str) -> bool:
    """Whether ``url`` names an object under ``folder`` (no ``..`` or empty segments to climb out by)."""
    rest = url[len(folder):]
    return url.startswith(folder) and folder.endswith("/") and all(part not in ("", ".", "..") for part in rest.split("/"))
