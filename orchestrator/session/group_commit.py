"""Group commit: items added from many threads within a short window are written together, in one write, and
each caller returns only once the write that holds its item is done (or raises its error).

A fan-out's shards each record their session in the step's event log before publishing their trigger
(``reattach.SessionJournal``): a Dagster event a shard, the largest single share of a shard's orchestrator
CPU in the profile (docs/benchmarks.md). Shards start in waves (the first ``max_concurrency`` together, then
one as each ends), so waiting a fraction of a second lets one event carry many records without a record ever
being written after its trigger went out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class _Batch(Generic[Item]):
    items: list[Item] = field(default_factory=list)
    written: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class GroupCommit(Generic[Item]):
    """``add(item)`` blocks until ``write`` wrote a batch holding ``item``. The first item of a batch waits
    ``window`` seconds for others (its thread then writes the batch); a batch holds at most ``max_items``."""

    def __init__(self, write: Callable[[Sequence[Item]], None], *, window: float, max_items: int):
        self._write = write
        self._window = window
        self._max_items = max_items
        self._lock = threading.Lock()
        self._open: _Batch[Item] | None = None

    def add(self, item: Item) -> None:
        with self._lock:
            batch = self._open
            leads = batch is None
            if batch is None:
                batch = self._open = _Batch()
            batch.items.append(item)
            if len(batch.items) >= self._max_items:
                self._open = None  # full: the next item starts a new batch
        if leads:
            self._lead(batch)
        else:
            batch.written.wait()
        if batch.error is not None:
            raise batch.error

    def _lead(self, batch: _Batch[Item]) -> None:
        time.sleep(self._window)
        with self._lock:
            if self._open is batch:
                self._open = None
        try:
            self._write(batch.items)
        except BaseException as exc:  # every caller of the batch raises it: none of their items was written
            batch.error = exc
        finally:
            batch.written.set()
