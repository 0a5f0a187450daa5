"""clock.*: a virtual clock per run and a real sleep that holds no thread."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from luanette.runtime import Limits, ScriptError, run_script
from luanette.stdlib.clock import ClockNamespace

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
