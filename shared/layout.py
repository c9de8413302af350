"""Where a session's objects live in the bucket: everything of a session under one prefix, so one
prefix delete cleans it up; except its lease, which outlives the session as its tombstone (the durable end
of the session, see ``shared/lease.py``) and so lives under a prefix of its own, ``PREFIX/leases/``."""

from __future__ import annotations


def session_prefix(prefix: str, session_id: str) -> str:
    return f"{prefix.strip('/')}/{session_id}/" if prefix.strip("/") else f"{session_id}/"


def group_prefix(prefix: str, group: str) -> str:
    """Every session of a fan-out group: their ids start with the group's 16 hex digits (``new_session_id``)."""
    return session_prefix(prefix, group).rstrip("/")


def trigger_key(prefix: str, session_id: str) -> str:
    return session_prefix(prefix, session_id) + "trigger.json"


def context_key(prefix: str, session_id: str) -> str:
    return session_prefix(prefix, session_id) + "context.json"


def leases_prefix(prefix: str) -> str:
    """Every session's lease: held while a function runs the session, a tombstone once the session ended."""
    return f"{prefix.strip('/')}/leases/" if prefix.strip("/") else "leases/"


def lease_key(prefix: str, session_id: str) -> str:
    return leases_prefix(prefix) + session_id


def reply_key(prefix: str, session_id: str, invocation_id: str, seq: int) -> str:
    return session_prefix(prefix, session_id) + f"replies/{invocation_id}/{seq}.json"


def chunks_prefix(prefix: str, session_id: str) -> str:
    """Where the GCS reply channel's chunks go: ``{chunks_prefix}/{n}.json``, as dagster-pipes' GCS writer names them."""
    return session_prefix(prefix, session_id) + "chunks"

