"""core.*: tasks of one run (spawn, await, all, all_settled, race, sleep, timeout) whose
I/O waits are outstanding at once.

Overlap is checked by what ran together (peak in-flight counts, the order the branches
saw), never by a wall-clock bound, except in the ``timed`` variant (``pytest -m perf``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.runtime import CancelToken, Limits, RunContext, ScriptError, run_script
from luanette.sim import run_models
from luanette.stdlib.clock import ClockNamespace
from tests.test_isolation import eval_reply
from tests.test_jobs import run, store, wait_done
from tests.test_models_e2e import settings_for
from tests.waiting import TIMED, until

pytestmark = pytest.mark.timeout(60)


class Probe:
    """Lua global `t`: an async sleep that counts what is in flight, what ended and what
    was cancelled, and a sync marker for side effects."""

    name = "t"

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.marks: list[Any] = []

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        async def sleep(ms: float, value: Any = None) -> Any:
            self.started += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(ms / 1000)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.in_flight -= 1
            self.finished += 1
            return value

        async def echo(value: Any) -> Any:
            return value

        def mark(value: Any) -> None:
            self.marks.append(value)

        return {"sleep": sleep, "echo": echo, "mark": mark}


async def result_of(code: str, probe: Probe | None = None, **kwargs: Any) -> Any:
    namespaces = [probe or Probe(), ClockNamespace()]
    return (await run_script(code, namespaces=namespaces, **kwargs)).result


async def failure_of(code: str, probe: Probe | None = None, **kwargs: Any) -> Any:
    with pytest.raises(ScriptError) as info:
        await run_script(code, namespaces=[probe or Probe(), ClockNamespace()], **kwargs)
    return info.value.detail


# ---------------------------------------------------------------------- overlapping


@TIMED
async def test_three_sleeps_through_all_overlap(timed: bool) -> None:
    probe = Probe()
    began = time.monotonic()
    result = await result_of(
        """
        local started = 0
        local function branch(n)
          return function()
            started = started + 1
            t.sleep(300)
            return {n = n, saw_started = started}
          end
        end
        return core.all{branch(1), branch(2), branch(3)}
        """,
        probe,
    )
    elapsed = time.monotonic() - began
    assert [r["n"] for r in result] == [1, 2, 3]
    # every branch was waiting before any woke: the three waits were outstanding at once
    assert [r["saw_started"] for r in result] == [3, 3, 3]
    assert probe.peak == 3 and probe.finished == 3
    if timed:
        assert elapsed < 0.6, elapsed


async def test_core_sleep_and_clock_sleep_overlap() -> None:
    result = await result_of(
        """
        local order = {}
        core.all{
          function() core.sleep(300) order[#order + 1] = "core" end,
          function() clock.sleep(200) order[#order + 1] = "clock" end,
          function() t.sleep(100) order[#order + 1] = "t" end,
        }
        return order
        """
    )
    assert result == ["t", "clock", "core"]


async def test_results_come_in_list_order_not_completion_order() -> None:
    result = await result_of(
        """
        local h = core.spawn(function() return t.sleep(10, "spawned") end)
        return core.all{
          function() return t.sleep(60, "slow") end,
          h,
          function() return t.sleep(1, "fast") end,
          function() return 42 end,
        }
        """
    )
    assert result == ["slow", "spawned", "fast", 42]


async def test_all_of_nothing_is_empty() -> None:
    assert await result_of("return #core.all{}") == 0


# ------------------------------------------------------------------------ errors


async def test_first_error_cancels_the_other_branches() -> None:
    probe = Probe()
    result = await result_of(
        """
        local ok, err = pcall(core.all, {
          function() t.sleep(5000) t.mark("a") end,
          function() t.sleep(1) error("branch failed") end,
          function() t.sleep(5000) t.mark("c") end,
        })
        return {ok, err}
        """,
        probe,
    )
    assert result[0] is False and result[1].endswith("branch failed")
    assert probe.cancelled == 2 and probe.in_flight == 0
    assert probe.marks == []  # the side effects after the cancelled sleeps never happen


async def test_an_uncaught_branch_error_fails_the_run_with_the_task_stack() -> None:
    probe = Probe()
    detail = await failure_of(
        """
        local function fetch(n)
          t.sleep(1)
          error("fetch " .. n .. " failed")
        end
        function main()
          local h = core.spawn(fetch, 7)
          local value = core.await(h)  -- (not a tail call: main stays on the stack)
          return value
        end
        """,
        probe,
    )
    assert detail.kind == "lua_runtime"
    assert detail.message == "fetch 7 failed"
    assert detail.line == 4
    assert [(frame.function, frame.line) for frame in detail.stack] == [("fetch", 4), ("main", 8)]


async def test_a_global_function_spawned_by_all_is_named_in_the_stack() -> None:
    detail = await failure_of(
        """
        function worker() t.sleep(1) local x = nil; return x.field end
        core.all{function() t.sleep(1000) end, worker}
        """
    )
    assert detail.kind == "lua_runtime"
    assert detail.stack[0].function == "worker" and detail.stack[0].line == 2


async def test_all_settled_returns_every_outcome() -> None:
    result = await result_of(
        """
        local r = core.all_settled{
          function() return t.sleep(20, "late") end,
          function() t.sleep(1) error({message = "nope"}) end,
          function() return "now" end,
        }
        return {r[1].ok, r[1].value, r[2].ok, r[2].error.message, r[3].ok, r[3].value}
        """
    )
    assert result == [True, "late", False, "nope", True, "now"]


# ------------------------------------------------------------------ race, timeout


async def test_race_returns_the_first_and_cancels_the_rest() -> None:
    probe = Probe()
    result = await result_of(
        """
        local first = core.race{
          function() t.sleep(5000) t.mark("slow") return "slow" end,
          function() return t.sleep(5, "fast") end,
          function() t.sleep(5000) t.mark("slower") return "slower" end,
        }
        return first
        """,
        probe,
    )
    assert result == "fast"
    assert probe.cancelled == 2 and probe.marks == []


async def test_timeout_in_a_race_raises_a_timeout_error() -> None:
    probe = Probe()
    result = await result_of(
        """
        local ok, err = pcall(core.race, {function() return t.sleep(5000, "late") end, core.timeout(20)})
        local quick = core.race{function() return t.sleep(1, "quick") end, core.timeout(5000)}
        return {ok, err, quick}
        """,
        probe,
    )
    assert result == [False, "core.timeout: timeout after 20 ms", "quick"]
    assert probe.cancelled == 1


async def test_sleep_returns_so_await_of_it_works_and_checks_its_argument() -> None:
    result = await result_of(
        """
        local v = core.await(core.sleep(5))
        local ok, err = pcall(core.sleep, -1)
        local ok2, err2 = pcall(core.timeout, "x")
        return {v == nil, ok, err, ok2, err2}
        """
    )
    assert result[:2] == [True, False]
    assert "bad argument #1 to 'sleep'" in result[2]
    assert result[3] is False and "bad argument #1 to 'timeout'" in result[4]


# ------------------------------------------------------------- await and handles


async def test_await_of_a_plain_value_returns_it() -> None:
    result = await result_of(
        """
        local a = core.await(t.echo("read"))
        local b, c = core.await(1, 2)
        local plain = {}
        return {a, b, c, rawequal(core.await(plain), plain), core.await(nil) == nil}
        """
    )
    assert result == ["read", 1, 2, True, True]


async def test_await_returns_every_result_and_twice() -> None:
    result = await result_of(
        """
        local h = core.spawn(function(a, b) t.sleep(1) return a, b, a + b end, 2, 3)
        local x, y, z = core.await(h)
        return {x, y, z, (core.await(h))}
        """
    )
    assert result == [2, 3, 5, 2]


async def test_nested_spawns() -> None:
    probe = Probe()
    result = await result_of(
        """
        local function leaf(n) return t.sleep(50, n) end
        local function node(n)
          local a, b = core.spawn(leaf, n * 10 + 1), core.spawn(leaf, n * 10 + 2)
          return core.await(a) + core.await(b)
        end
        local r = core.all{function() return node(1) end, function() return node(2) end}
        return {r[1], r[2]}
        """,
        probe,
    )
    assert result == [23, 43]
    assert probe.peak == 4


async def test_a_handle_is_not_forgeable_and_its_coroutine_is_not_the_scripts() -> None:
    result = await result_of(
        """
        local co
        local h = core.spawn(function() co = coroutine.running() t.sleep(50) return 1 end)
        core.sleep(1)
        local resumed = {pcall(coroutine.resume, co, true, "forged")}
        local closed = {pcall(coroutine.close, co)}
        local meta = getmetatable(h)
        local set_ok = pcall(setmetatable, h, {})
        local fake = setmetatable({}, {__metatable = "core.task"})
        return {resumed[1], resumed[2], closed[1], meta, set_ok, rawequal(core.await(fake), fake),
          core.await(h), type(h), (tostring(h):match("^core.task"))}
        """
    )
    assert result[0] is False and "cannot resume the coroutine of a core task" in result[1]
    assert result[2] is False
    assert result[3:] == ["core.task", False, True, 1, "table", "core.task"]


async def test_script_coroutines_still_work_inside_tasks() -> None:
    result = await result_of(
        """
        local gen = coroutine.wrap(function()
          for i = 1, 3 do coroutine.yield(t.sleep(1, i)) end
        end)
        local r = core.all{function() return gen() + gen() + gen() end}
        local ok, err = pcall(coroutine.yield, 1)
        return {r[1], ok, err}
        """
    )
    assert result == [6, False, "attempt to yield from outside a coroutine"]


async def test_await_inside_a_c_call_is_a_c_boundary_error() -> None:
    result = await result_of(
        """
        local h = core.spawn(function() return t.sleep(5, 1) end)
        local ok, err = pcall(table.sort, {3, 1, 2}, function(a, b) core.await(h) return a < b end)
        return {ok, err}
        """
    )
    assert result[0] is False
    assert "attempt to yield across a C-call boundary: core.await waits for other tasks" in result[1]


async def test_waiting_on_each_other_is_a_deadlock_error() -> None:
    detail = await failure_of(
        """
        local a
        local b = core.spawn(function() core.sleep(1) return core.await(a) end)
        a = core.spawn(function() return core.await(b) end)
        return core.await(a)
        """
    )
    assert detail.kind == "lua_runtime" and "deadlock" in detail.message


async def test_tasks_left_running_when_the_script_ends_are_cancelled() -> None:
    probe = Probe()
    assert await result_of("core.spawn(function() t.sleep(5000) t.mark('x') end) core.sleep(1) return 1", probe) == 1
    assert probe.cancelled == 1 and probe.marks == []


async def test_no_namespace_may_be_called_core() -> None:
    class Core:
        name = "core"

        def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
            return {}

    with pytest.raises(ValueError, match="core"):
        await run_script("return 1", namespaces=[Core()])


# -------------------------------------------------------------- cancel, deadline


async def test_cancel_with_several_branches_waiting_ends_the_run_as_cancelled() -> None:
    probe = Probe()
    token = CancelToken()
    running = asyncio.ensure_future(
        run_script(
            "core.all{function() t.sleep(60000) end, function() t.sleep(60000) end, function() t.sleep(60000) end}",
            namespaces=[probe],
            cancel=token,
        )
    )
    await until(lambda: probe.in_flight == 3, "three branches waiting")
    token.cancel()
    with pytest.raises(ScriptError) as info:
        await running
    assert info.value.detail.kind == "cancelled"
    assert "while waiting for t.sleep" in info.value.detail.message
    assert probe.cancelled == 3 and probe.in_flight == 0


async def test_deadline_with_several_branches_waiting_is_a_timeout() -> None:
    probe = Probe()
    detail = await failure_of(
        "core.all{function() t.sleep(60000) end, function() core.sleep(60000) end}",
        probe,
        limits=Limits(timeout_s=0.3),
    )
    assert detail.kind == "timeout"
    assert probe.cancelled == 1 and probe.in_flight == 0


async def test_a_busy_loop_in_a_spawned_task_is_stopped_by_the_deadline() -> None:
    detail = await failure_of(
        "core.spawn(function() while true do end end) core.sleep(60000)",
        limits=Limits(timeout_s=0.3),
    )
    assert detail.kind == "timeout"


# ---------------------------------------------------------------- over the socket


async def test_all_over_the_socket(client: Client) -> None:
    reply = await eval_reply(
        client,
        """
        local started = 0
        local function branch() started = started + 1 clock.sleep(300) return started end
        return core.all{branch, branch, branch}
        """,
    )
    assert isinstance(reply, t.Success), reply
    assert reply.result["result"] == [3, 3, 3]


async def test_model_calls_overlap_in_a_job(make_server) -> None:
    async with run_models("all", seed=5, latency_ms=300) as sim:
        running = await make_server(settings=settings_for(sim.url, concurrency=3))
        script = """
        local function ask() return llm.chat{messages = {{role = "user", content = "hi"}}}.content end
        local r = core.all{ask, ask, ask}
        return #r
        """
        async with Client(running.endpoint) as c:
            digest = await store(c, script)
            done = await wait_done(c, (await run(c, digest))["job_id"])
        assert done["status"] == "complete", done
        assert done["result"] == 3
        assert sim.stats.peak_in_flight == 3


async def test_a_run_may_start_only_so_many_tasks(client):
    from hooteproto import types as t

    code = """
      local ok, err = pcall(function() for i = 1, 20000 do core.spawn(function() end) end end)
      return err
    """
    reply = await client.request(t.LuaEval(code=code), timeout=60)
    assert "too_many_tasks" in reply.result["result"] and "10000" in reply.result["result"]
    uncaught = await client.request(t.LuaEval(code="for i = 1, 20000 do core.spawn(function() end) end"))
    assert uncaught.details["kind"] == "too_many_tasks"
