"""The session lease: the first execution to create ``PREFIX/SESSION/lease`` runs the session; every other
execution of the same trigger (a Pub/Sub redelivery, a push retry while it runs) finds it and returns
without running.

The object is created with ``if_generation_match=0``, so GCS creates it only if it does not exist,
atomically. It records when it expires (``lease_seconds`` after the claim, derived by the orchestrator from
the function's timeout): a lease left by an attempt that crashed can be taken over after that, with
``if_generation_match`` set to the stale lease's generation so that only one retry wins.
"""

from __future__ import annotations

import json
import logging
import time

from google.api_core import exceptions as gexc
from google.cloud import storage

from dagster_gcf_pipes.shared.retry import transient_retry

_log = logging.getLogger("dagster_pipes_gcp.function")


@transient_retry()
def claim_lease(client: storage.Client, bucket: str, key: str, invocation_id: str, lease_seconds: float) -> bool:
    """True if this invocation now holds the lease, False if a live one is held by another invocation."""
    now = time.time()
    body = json.dumps({"invocation_id": invocation_id, "claimed_at": now, "expires_at": now + lease_seconds})
    try:
        client.bucket(bucket).blob(key).upload_from_string(body, if_generation_match=0)
        return True
    except gexc.PreconditionFailed:
        pass
    held = client.bucket(bucket).get_blob(key)
    if held is None:  # released between our two calls: the session is over
        return False
    lease = json.loads(held.download_as_bytes(if_generation_match=held.generation))
    if lease.get("invocation_id") == invocation_id:
        return True  # a retried upload whose first attempt landed: that lease is ours
    if lease.get("expires_at", float("inf")) > now:
        _log.info("lease gs://%s/%s is held by invocation %s: this delivery is a duplicate and does not run",
                  bucket, key, lease.get("invocation_id"))
        return False
    try:
        held.upload_from_string(body, if_generation_match=held.generation)
    except gexc.PreconditionFailed:
        return False  # another retry took the stale lease first
    _log.warning("lease gs://%s/%s of invocation %s expired; invocation %s takes the session over",
                 bucket, key, lease.get("invocation_id"), invocation_id)
    return True
