"""Process-wide Google clients, created on first use and reused by every invocation on a warm instance
(Google's advice for Cloud Functions; both clients are thread-safe). Credentials and endpoints come from the
environment the way every Google client library reads them: ADC in the cloud, ``PUBSUB_EMULATOR_HOST`` /
``STORAGE_EMULATOR_HOST`` locally."""

from __future__ import annotations

import functools
import os

from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.shared.claim_check import GCSBlobStore
from dagster_gcf_pipes.shared.tracing import publisher_options


@functools.lru_cache(maxsize=1)
def publisher() -> pubsub_v1.PublisherClient:
    # The writer batches Pipes messages itself and waits for each publish: the client's own batching
    # would only add latency.
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1), publisher_options=publisher_options()
    )


@functools.lru_cache(maxsize=1)
def storage_client() -> storage.Client:
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)


def blob_store(bucket: str) -> GCSBlobStore:
    return GCSBlobStore(storage_client(), bucket)
