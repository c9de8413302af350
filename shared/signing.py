"""Optional authenticity of reply batches: an HMAC-SHA256 over the body and the protocol attributes.

With a shared secret configured on both sides, the function signs every reply (over the body *before* the
claim-check, so a GCS object cannot be swapped under a valid pointer) and the reader drops anything unsigned
or badly signed. Off by default: Pub/Sub IAM already decides who may publish to the reply topic; signing
adds a check that the publisher also holds the session's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

from dagster_gcf_pipes.shared.protocol import Attr

#: where the function (and, by convention, the orchestrator's EnvVar) finds the shared secret
SECRET_ENV_VAR = "DAGSTER_PIPES_SIGNING_SECRET"

#: attributes that are not covered: the signature itself and the claim-check encoding (transport detail)
_UNSIGNED = {Attr.SIGNATURE, Attr.BODY}
#: nor what the client library adds after signing (its trace context, when tracing is on)
_UNSIGNED_PREFIX = "googclient_"


def _canonical(body: bytes, attributes: Mapping[str, str]) -> bytes:
    signed = {k: v for k, v in attributes.items() if k not in _UNSIGNED and not k.startswith(_UNSIGNED_PREFIX)}
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode() + b"\n" + body


def signature(secret: str, body: bytes, attributes: Mapping[str, str]) -> str:
    return hmac.new(secret.encode(), _canonical(body, attributes), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, attributes: Mapping[str, str]) -> dict[str, str]:
    """``attributes`` plus the signature attribute."""
    return {**attributes, Attr.SIGNATURE: signature(secret, body, attributes)}


def is_authentic(secret: str, body: bytes, attributes: Mapping[str, str]) -> bool:
    claimed = attributes.get(Attr.SIGNATURE)
    return claimed is not None and hmac.compare_digest(claimed, signature(secret, body, attributes))
