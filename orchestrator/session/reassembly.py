"""Turns one session's replies, as Pub/Sub delivers them (at least once, in any order), back into the exact
stream of Pipes messages the function wrote: each message once, in order.

* dedupe: a batch whose ``seq`` was already released or is already buffered is dropped;
* reorder: a batch ahead of the next expected ``seq`` waits (bounded) until the gap fills;
* fencing: the first invocation whose ``seq`` 0 (the batch holding ``opened``) arrives owns the session;
  every other invocation's replies are dropped with a warning naming both invocation ids and the two
  things such replies can be (a second execution, or a forgery).

Pure logic with no I/O, shared by the attached reader and anything else that reassembles sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster_gcf_pipes.shared.protocol import Reply

PipesMessage = Mapping[str, Any]


class ReassemblyError(Exception):
    """The stream cannot be put back in order (a gap that never fills within the buffer bound)."""


@dataclass
class SessionReassembler:
    session_id: str
    warn: Callable[[str], None]
    max_buffered_batches: int = 10_000
    accepted_invocation: str | None = None
    next_seq: int = 0
    duplicates_dropped: int = 0
    closed: bool = False
    closed_params: Mapping[str, Any] | None = None
    _pending: dict[int, Reply] = field(default_factory=dict)
    _early: dict[str, dict[int, Reply]] = field(default_factory=dict)
    _fenced: set[str] = field(default_factory=set)

    @property
    def opened(self) -> bool:
        return self.accepted_invocation is not None

    def counts_as_alive(self, reply: Reply) -> bool:
        """Whether ``reply`` shows the session's function is alive (for the heartbeat timeout)."""
        return self.accepted_invocation in (None, reply.invocation_id)

    def already_taken(self, invocation_id: str | None, seq: int | None) -> bool:
        """Whether a reply of ``invocation_id`` with ``seq`` (read from its attributes) would be dropped as a
        duplicate or fenced whatever its body: the reader then skips it before fetching a claim-check or
        checking a signature (a redelivered large batch costs no download)."""
        if invocation_id is None or seq is None:
            return False
        if invocation_id in self._fenced:
            return True
        if invocation_id == self.accepted_invocation:
            return seq < self.next_seq or seq in self._pending
        return seq in self._early.get(invocation_id, {})

    def offer(self, reply: Reply) -> Sequence[PipesMessage]:
        """Take one reply of this session; return the Pipes messages that are now next in order."""
        if reply.session_id != self.session_id:
            raise ValueError(f"reply of session {reply.session_id} offered to session {self.session_id}")
        if reply.is_heartbeat:
            return ()
        if self.accepted_invocation is None:
            if reply.seq == 0 and reply.messages and reply.messages[0].get("method") == "opened":
                self.accepted_invocation = reply.invocation_id
                self._pending = self._early.pop(reply.invocation_id, {})
                self._fence_all(self._early)
                self._early.clear()
            else:
                self._buffer(self._early.setdefault(reply.invocation_id, {}), reply)
                return ()
        elif reply.invocation_id != self.accepted_invocation:
            self._fence_all({reply.invocation_id: {}})
            return ()
        if reply.seq < self.next_seq:
            self.duplicates_dropped += 1
            return ()
        self._buffer(self._pending, reply)
        return self._release()

    def _buffer(self, buffer: dict[int, Reply], reply: Reply) -> None:
        if reply.seq in buffer:
            self.duplicates_dropped += 1
            return
        if len(buffer) >= self.max_buffered_batches:
            raise ReassemblyError(
                f"session {self.session_id}: {len(buffer)} batches buffered behind a gap at seq {self.next_seq} "
                f"of invocation {reply.invocation_id}; the missing batch never arrived"
            )
        buffer[reply.seq] = reply

    def _release(self) -> list[PipesMessage]:
        released: list[PipesMessage] = []
        while self.next_seq in self._pending:
            batch = self._pending.pop(self.next_seq)
            self.next_seq += 1
            for message in batch.messages:
                if self.closed:
                    self.warn(f"session {self.session_id}: dropped a {message.get('method')!r} message sent after 'closed'")
                    continue
                released.append(message)
                if message.get("method") == "closed":
                    self.closed = True
                    self.closed_params = message.get("params") or {}
        return released

    def _fence_all(self, invocations: Mapping[str, Any]) -> None:
        for invocation_id in invocations:
            if invocation_id not in self._fenced:
                self._fenced.add(invocation_id)
                self.warn(
                    f"session {self.session_id}: dropping replies of invocation {invocation_id}; the session belongs "
                    f"to invocation {self.accepted_invocation}, which sent 'opened' first. Replies that name this "
                    "session but come from another invocation are either a second execution of the trigger (a lease "
                    "taken over after it expired: the function ran past function_timeout) or forged by someone "
                    "who can publish to the reply topic (set signing_secret to reject those)"
                )
