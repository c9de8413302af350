"""The session lease: the first execution to create ``PREFIX/SESSION/lease`` runs the session, every other
execution of the same trigger (a Pub/Sub redelivery, a push retry) finds it and returns without running.

The object is created with ``if_generation_match=0``: GCS creates it only if it does not exist, atomically.
"""

from __future__ import annotations

import json
import logging
import time

from google.api_core import exceptions as gexc
from google.cloud import storage

from shared.retry import transient_retry

_log = logging.getLogger("dagster_pipes_gcp.function")


@transient_retry()
def claim_lease(client: storage.Client, bucket: str, key: str, invocation_id: str) -> bool:
    """True if this invocation now holds the lease, False if another one claimed it first."""
    blob = client.bucket(bucket).blob(key)
    body = json.dumps({"invocation_id": invocation_id, "claimed_at": time.time()})
    try:
        blob.upload_from_string(body, if_generation_match=0)
    except gexc.PreconditionFailed:
        # A retried upload whose first attempt did land finds its own lease: that is still ours.
        if json.loads(blob.download_as_bytes()).get("invocation_id") == invocation_id:
            return True
        _log.info("lease gs://%s/%s is already held: this delivery is a duplicate and does not run", bucket, key)
        return False
    return True
