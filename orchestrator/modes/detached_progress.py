"""What the completion sensor keeps of one detached session between its ticks.

The sensor acks a reply as soon as what it says is kept here (in the session's registry entry, see
``detached_registry``), instead of handing it back to Pub/Sub until the session's ``closed`` arrives: so the
subscription drains whatever its backlog, a session may span any number of ticks and batches, and a reply
need never be pulled twice. What is kept is only what the session's end needs: the reassembler's place in
the stream (the invocation that opened the session, the next ``seq``, and the batches that arrived ahead of
a gap), the number of log lines and the last few of them, the materializations and check results in the
order the function reported them, and the ``closed`` message. Folding the same reply in twice changes
nothing: the reassembler drops a ``seq`` it has released or holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dagster_gcf_pipes.orchestrator.session.reassembly import ReassemblyError, SessionReassembler
from dagster_gcf_pipes.shared.protocol import Reply

#: The Pipes methods whose messages the session's end turns into asset events.
REPORTED_METHODS = ("report_asset_materialization", "report_asset_check")

#: A session's state as the registry entry's metadata shows it (one listing reads every session's).
OPENED, CLOSED, FAILED = "opened", "closed", "failed"


@dataclass
class SessionProgress:
    invocation: str | None = None
    next_seq: int = 0
    #: batches received ahead of a gap, or before ``opened`` (then of any invocation)
    waiting: list[Reply] = field(default_factory=list)
    log_lines: int = 0
    log_tail: list[str] = field(default_factory=list)
    reported: list[Mapping[str, Any]] = field(default_factory=list)
    #: the params of ``closed`` once it was released in order
    closed: Mapping[str, Any] | None = None
    #: why the replies cannot be put back in order
    failure: str | None = None

    @property
    def status(self) -> str:
        if self.failure is not None:
            return FAILED
        if self.closed is not None:
            return CLOSED
        return OPENED if self.invocation is not None else ""

    def fold(
        self, session_id: str, replies: Iterable[Reply], *, warn: Callable[[str], None], log_tail_lines: int
    ) -> None:
        """Take the replies of one tick (any order, duplicates included); a session that ended takes no more."""
        if self.status in (CLOSED, FAILED):
            return
        reassembler = SessionReassembler(session_id, warn, accepted_invocation=self.invocation, next_seq=self.next_seq)
        offered = [*self.waiting, *(reply for reply in replies if not reply.is_heartbeat)]
        try:
            for reply in offered:
                for message in reassembler.offer(reply):
                    self._take(message, log_tail_lines)
        except ReassemblyError as exc:
            self.failure, self.waiting = str(exc), []
            return
        self.invocation, self.next_seq = reassembler.accepted_invocation, reassembler.next_seq
        self.waiting = _still_waiting(offered, reassembler.accepted_invocation, reassembler.next_seq)

    def _take(self, message: Mapping[str, Any], log_tail_lines: int) -> None:
        method = message.get("method")
        params = message.get("params") or {}
        if method == "log":
            self.log_lines += 1
            self.log_tail = [*self.log_tail, str(params.get("message", ""))][-log_tail_lines:] if log_tail_lines else []
        elif method in REPORTED_METHODS:
            self.reported.append(message)
        elif method == "closed":
            self.closed = params

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SessionProgress:
        """An entry's content; empty for an entry nothing was folded into yet."""
        if not data:
            return cls()
        fields = json.loads(data)
        fields["waiting"] = [Reply(**reply) for reply in fields.get("waiting", [])]
        return cls(**fields)


def _still_waiting(offered: Sequence[Reply], invocation: str | None, next_seq: int) -> list[Reply]:
    """What the reassembler holds after taking ``offered``: before ``opened``, every batch (each once); after it,
    the opening invocation's batches from ``next_seq`` on (the other invocations' are fenced off)."""
    held: dict[tuple[str, int | None], Reply] = {}
    for reply in offered:
        if invocation is None or (reply.invocation_id == invocation and (reply.seq or 0) >= next_seq):
            held.setdefault((reply.invocation_id, reply.seq), reply)
    return list(held.values())
