"""clock.*: a virtual clock per run and a real sleep that holds no thread."""

from __future__ import annotations

import asyncio
import threading
import time
import types

import anyio
import pytest

import luanette.stdlib.clock
from luanette.runtime import Limits, ScriptError, run_script
from luanette.stdlib.clock import ClockNamespace
from tests.waiting import until

CLOCK = [ClockNamespace()]


async def test_virtual_clock_starts_at_wall_time_and_moves_only_when_advanced():
    before = int(time.time() * 1000)
    result = (await run_script(
        "local a = clock.now() local b = clock.now() local c = clock.advance(1500) "
        "return {a = a, same = (a == b), advanced = c - a, now = clock.now() - a}",
        namespaces=CLOCK,
    )).result
    assert before <= result["a"] <= int(time.time() * 1000)
    assert result["same"] is True and result["advanced"] == 1500 and result["now"] == 1500


async def test_each_run_has_its_own_virtual_clock():
    first = (await run_script("clock.advance(10000) return clock.now()", namespaces=CLOCK)).result
    second = (await run_script("return clock.now()", namespaces=CLOCK)).result
    assert second < first  # the second run did not inherit the first one's advance


@pytest.mark.parametrize("call", ["clock.advance(-1)", "clock.sleep(-5)", "clock.advance('soon')", "clock.sleep({})"])
async def test_bad_arguments_are_lua_errors(call):
    with pytest.raises(ScriptError) as info:
        await run_script(call, namespaces=CLOCK)
    assert "clock." in info.value.detail.message and info.value.detail.kind == "lua_runtime"


async def test_many_sleeps_wait_together_holding_no_thread(monkeypatch):
    """clock.sleep waits on the event loop: 100 runs can all be asleep at once, and
    that costs no thread each.  The sleep here is a barrier (none ends before all 100
    are asleep), so "at once" is a fact, not a race against 300 ms."""
    asleep: list[float] = []
    all_asleep = asyncio.Event()

    async def barrier_sleep(seconds: float) -> None:
        asleep.append(seconds)
        if len(asleep) == 100:
            all_asleep.set()
        await all_asleep.wait()

    monkeypatch.setattr(luanette.stdlib.clock, "anyio", types.SimpleNamespace(sleep=barrier_sleep))
    threads: list[int] = []

    async def count_threads_once_all_sleep() -> None:
        await until(all_asleep.is_set, "100 runs asleep together")
        threads.append(threading.active_count())

    results: list[object] = []

    async def one() -> None:
        results.append((await run_script("clock.sleep(300) return true", namespaces=CLOCK,
                                         limits=Limits(timeout_s=60))).result)

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_threads_once_all_sleep)
        for _ in range(100):
            tg.start_soon(one)
    assert results == [True] * 100 and asleep == [0.3] * 100
    assert threads[0] < 50  # a thread per sleeping run would be 100 more


async def test_the_deadline_applies_to_a_sleep():
    with pytest.raises(ScriptError) as info:
        await run_script("clock.sleep(60000)", namespaces=CLOCK, limits=Limits(timeout_s=0.3))
    assert info.value.detail.kind == "timeout"


@pytest.mark.perf
async def test_many_sleeps_share_no_threads_and_the_deadline_applies():
    started = time.monotonic()
    peak = threading.active_count()

    async def one() -> None:
        await run_script("clock.sleep(300) return true", namespaces=CLOCK)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(one)
        await anyio.sleep(0.15)
        peak = max(peak, threading.active_count())
    assert time.monotonic() - started < 2.0  # 100 × 300 ms in parallel, not in series
    assert peak < 25  # waiting scripts hold no thread
    with pytest.raises(ScriptError) as info:
        await run_script("clock.sleep(5000)", namespaces=CLOCK, limits=Limits(timeout_s=0.3))
    assert info.value.detail.kind == "timeout"
