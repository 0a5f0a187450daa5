"""Group commit: the job-state writes of one event-loop turn share one transaction.

Every job used to cost three commits (created, running, finished), each a WAL append and
a lock round trip on the front's one core. Now a write is queued, the queue is written
in one transaction at the start of the next loop turn, and each writer awaits its own
result. A writer only goes on (replies, publishes a state change) after the commit, so
nothing is announced that a crash could still take back.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from luanette.store import Store, WriteOp

T = TypeVar("T")


class GroupCommit:
    """Batches :class:`Store` writes made on one event loop. Use from that loop only."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queued: list[tuple[WriteOp[Any], asyncio.Future[Any]]] = []
        self.batches = 0
        self.writes = 0

    async def write(self, op: WriteOp[T]) -> T:
        """Queue ``op`` for the next group; return its result once that group has
        committed (or raise what the op or the commit raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((op, future))
        # A writer cancelled while it waits cancels only its future: the write is queued
        # and goes ahead with its group (the job store's conditions keep that safe).
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        self.batches += 1
        self.writes += len(queued)
        try:
            results = self._store.write_batch([op for op, _ in queued])
        except Exception as e:
            for _, future in queued:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(queued, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
