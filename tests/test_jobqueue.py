"""luanette.jobqueue on its own: order, the bound, removal, hand-over and its signals."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from luanette.jobqueue import JobQueue, QueueFull

pytestmark = pytest.mark.timeout(30)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drained(q: JobQueue[str]) -> list[str]:
    return q.drain()


def test_higher_priority_first_fifo_within_one():
    q: JobQueue[str] = JobQueue(100)
    for name, priority in [("a", 0), ("b", -3), ("c", 5), ("d", 0), ("e", 5), ("f", -3), ("g", 10), ("h", -10)]:
        q.put(name, priority)
    assert drained(q) == ["g", "c", "e", "a", "d", "b", "f", "h"]
    assert len(q) == 0


async def test_get_serves_in_order():
    q: JobQueue[str] = JobQueue(10)
    q.put("low", -1)
    q.put("normal")
    q.put("high", 1)
    assert [await q.get() for _ in range(3)] == ["high", "normal", "low"]


def test_the_bound_refuses_past_maxsize():
    q: JobQueue[str] = JobQueue(2)
    q.put("a")
    q.put("b", 9)
    assert q.full()
    with pytest.raises(QueueFull):
        q.put("c", 10)  # a high priority does not get past the bound either
    assert len(q) == 2 and "c" not in q
    q2: JobQueue[str] = JobQueue(5)
    q2.put("x")
    with pytest.raises(ValueError, match="already queued"):
        q2.put("x")


def test_removing_an_entry_frees_its_place_and_it_is_never_served():
    q: JobQueue[str] = JobQueue(2)
    q.put("a")
    q.put("b", 3)
    assert q.remove("b") is True
    assert q.remove("b") is False  # not queued any more
    assert q.remove("never") is False
    assert len(q) == 1 and not q.full()
    q.put("c", -1)  # the removed one's place
    assert drained(q) == ["a", "c"]
    assert q.by_priority() == {}


def test_many_removals_do_not_keep_the_heap_growing():
    q: JobQueue[int] = JobQueue(10)
    for i in range(10_000):
        q.put(i, i % 5)
        assert q.remove(i)
    assert len(q) == 0
    assert len(q._heap) <= 64  # rebuilt without the removed entries


async def test_a_flood_of_low_never_delays_a_high():
    """With every job slot busy (no getter waiting) 1000 lows then one high are queued:
    the high is the next one taken."""
    q: JobQueue[str] = JobQueue(2000)
    for i in range(1000):
        q.put(f"low{i}", -5)
    q.put("high", 5)
    assert await q.get() == "high"
    assert await q.get() == "low0"  # and the lows keep their order
    rest = [await q.get() for _ in range(999)]
    assert rest == [f"low{i}" for i in range(1, 1000)]


async def test_an_item_put_while_a_getter_waits_is_handed_over_uncounted():
    q: JobQueue[str] = JobQueue(1)
    got: list[str] = []
    waiting = anyio.Event()

    async def getter() -> None:
        waiting.set()
        got.append(await q.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(getter)
        await waiting.wait()
        await anyio.wait_all_tasks_blocked()
        q.put("a")  # handed to the waiting getter: the queue stays empty
        assert len(q) == 0 and q.oldest_age() is None
        q.put("b")  # so there is room for one more
        assert len(q) == 1
    assert got == ["a"]
    assert drained(q) == ["b"]


async def test_an_item_handed_to_a_cancelled_getter_is_never_lost():
    """Cancelled after the hand-over, a getter either returns the item (anyio lets a task
    whose wait is over finish its step) or puts it back in its place."""
    q: JobQueue[str] = JobQueue(5)
    got: list[str] = []

    async def getter() -> None:
        got.append(await q.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(getter)
        await anyio.wait_all_tasks_blocked()
        q.put("a", 2)
        tg.cancel_scope.cancel()
    assert got + q.drain() == ["a"]

    task = asyncio.ensure_future(q.get())  # a plain asyncio cancel: the item goes back
    await anyio.wait_all_tasks_blocked()
    q.put("b", 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(q) == 1 and q.by_priority() == {2: 1}
    assert await q.get() == "b"


async def test_a_cancelled_getter_no_longer_waits():
    q: JobQueue[str] = JobQueue(5)
    with anyio.move_on_after(0.01):
        await q.get()
    q.put("a")  # not lost on the cancelled getter
    assert len(q) == 1 and await q.get() == "a"


def test_signals_depth_oldest_age_and_priorities():
    clock = Clock()
    q: JobQueue[str] = JobQueue(10, clock=clock)
    assert q.oldest_age() is None and q.by_priority() == {}
    q.put("a", 0)
    clock.now += 2
    q.put("b", 7)
    q.put("c", 0)
    clock.now += 1
    assert q.oldest_age() == 3.0  # "a" came first, whatever its priority
    assert q.by_priority() == {0: 2, 7: 1}
    assert drained(q) == ["b", "a", "c"]
    assert q.oldest_age() is None


async def test_the_oldest_age_follows_what_is_left():
    clock = Clock()
    q: JobQueue[str] = JobQueue(10, clock=clock)
    q.put("a", 0)
    clock.now += 5
    q.put("b", 1)
    clock.now += 1
    assert q.oldest_age() == 6.0
    assert q.remove("a")
    assert q.oldest_age() == 1.0 and len(q) == 1
    assert await q.get() == "b"
    assert q.oldest_age() is None
