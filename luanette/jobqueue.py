"""The queue of pending jobs: bounded, by priority, FIFO within a priority.

Jobs wait here between ``job_execute`` and a free worker. A higher priority is served
first, whatever came before it (a flood of low-priority jobs never delays a high one
by more than the jobs already running); jobs of one priority are served in the order
they came. Priority only orders the queue: a running job is never preempted.

The queue lives on one event loop and is used from its tasks only (no locks). Getting
is the one thing that waits: a worker with nothing to do waits in :meth:`JobQueue.get`,
and an item put while a worker waits is handed to it at once, never counted as queued
(as an unbuffered channel would), so a free worker leaves the bound untouched.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T", bound=Hashable)


class QueueFull(Exception):
    """:meth:`JobQueue.put` on a queue that holds ``maxsize`` items."""


class _Entry(Generic[T]):
    """One queued item, with what orders it and when it came."""

    __slots__ = ("item", "priority", "seq", "at", "removed")

    def __init__(self, item: T, priority: int, seq: int, at: float) -> None:
        self.item = item
        self.priority = priority
        self.seq = seq
        self.at = at
        self.removed = False


class _Waiter(Generic[T]):
    """A getter waiting for an item; :meth:`JobQueue.put` hands it one."""

    __slots__ = ("event", "entry")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.entry: _Entry[T] | None = None


class JobQueue(Generic[T]):
    """A bounded priority queue: higher ``priority`` first, FIFO within one.

    :meth:`put` never waits (a full queue raises :class:`QueueFull`; the caller answers
    ``busy``); :meth:`get` waits for an item; :meth:`remove` takes a queued item out (a
    cancelled job), so that it no longer counts against the bound. Items are compared by
    identity-or-equality as dict keys, so each item may be queued once at a time.

    ``clock`` (seconds, monotonic) times how long items have waited (:meth:`oldest_age`).
    """

    # Removed entries stay in the heap until they reach its top; past this many times
    # the live ones (and a few), the heap is rebuilt without them.
    _COMPACT_FACTOR = 2
    _COMPACT_MIN = 64

    def __init__(self, maxsize: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._heap: list[tuple[int, int, _Entry[T]]] = []  # (-priority, seq, entry)
        self._entries: OrderedDict[T, _Entry[T]] = OrderedDict()  # queued, oldest first
        self._by_priority: dict[int, int] = {}
        self._waiters: deque[_Waiter[T]] = deque()
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Items queued (not counting any handed to a waiting getter)."""
        return len(self._entries)

    def __contains__(self, item: object) -> bool:
        return item in self._entries

    def full(self) -> bool:
        return len(self._entries) >= self.maxsize

    def put(self, item: T, priority: int = 0) -> None:
        """Queue ``item`` (or hand it to a waiting getter). Raises :class:`QueueFull`
        when ``maxsize`` items are queued, and ValueError when ``item`` is already."""
        if item in self._entries:
            raise ValueError("the item is already queued")
        entry = _Entry(item, priority, next(self._seq), self._clock())
        while self._waiters:  # (only when nothing is queued: a getter waits on an empty queue)
            waiter = self._waiters.popleft()
            if not waiter.event.is_set():
                waiter.entry = entry
                waiter.event.set()
                return
        if self.full():
            raise QueueFull(f"{self.maxsize} items are queued")
        self._push(entry)

    async def get(self) -> T:
        """The next item: the highest priority, the oldest of that priority; waits while
        the queue is empty. A getter cancelled after it was handed an item puts it back
        in its place."""
        while self._entries:
            entry = self._pop()
            if entry is not None:
                return entry.item
        waiter: _Waiter[T] = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.entry is not None:  # handed one, but not taking it: back in its place
                self._push(waiter.entry, waking=True)
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        assert waiter.entry is not None
        return waiter.entry.item

    def remove(self, item: T) -> bool:
        """Take ``item`` out of the queue (it will never be got); False when it is not
        queued (never was, already got, or removed)."""
        entry = self._entries.pop(item, None)
        if entry is None:
            return False
        entry.removed = True
        self._forget(entry)
        if len(self._heap) > max(self._COMPACT_MIN, self._COMPACT_FACTOR * len(self._entries)):
            self._heap = [h for h in self._heap if not h[2].removed]
            heapq.heapify(self._heap)
        return True

    def drain(self) -> list[T]:
        """Empty the queue, returning its items (highest priority first)."""
        items = []
        while self._entries:
            entry = self._pop()
            if entry is not None:
                items.append(entry.item)
        return items

    # --- signals (cheap: O(1) and O(distinct priorities)) -----------------------------

    def oldest_age(self) -> float | None:
        """Seconds the longest-queued item has waited; None when nothing is queued."""
        if not self._entries:
            return None
        oldest = next(iter(self._entries.values()))
        return max(0.0, self._clock() - oldest.at)

    def by_priority(self) -> dict[int, int]:
        """How many items are queued at each priority (only priorities with some)."""
        return dict(self._by_priority)

    # --- inside ------------------------------------------------------------------------

    def _push(self, entry: _Entry[T], *, waking: bool = False) -> None:
        if waking:
            # an item given back by a cancelled getter: another waiting getter takes it
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.event.is_set():
                    waiter.entry = entry
                    waiter.event.set()
                    return
        entry.removed = False
        heapq.heappush(self._heap, (-entry.priority, entry.seq, entry))
        self._entries[entry.item] = entry
        # (an older item given back keeps its place in the age order too)
        if waking and len(self._entries) > 1 and entry.seq < next(iter(self._entries.values())).seq:
            self._entries.move_to_end(entry.item, last=False)
        self._by_priority[entry.priority] = self._by_priority.get(entry.priority, 0) + 1

    def _pop(self) -> _Entry[T] | None:
        """The top entry, or None when the heap's top was a removed one (dropped)."""
        _, _, entry = heapq.heappop(self._heap)
        if entry.removed:
            return None
        del self._entries[entry.item]
        self._forget(entry)
        return entry

    def _forget(self, entry: _Entry[T]) -> None:
        left = self._by_priority[entry.priority] - 1
        if left:
            self._by_priority[entry.priority] = left
        else:
            del self._by_priority[entry.priority]
