"""Cooperative cancellation and on_shutdown(reason) (issue 11 item 6, seed 003).

A cancel first fails the script's waits with "cancelled: <reason>" (catchable: the
script may clean up) and stops it hard only after ``Limits.cancel_grace_s``; the run
ends as cancelled either way.  A global ``on_shutdown(reason)`` runs after main however
it ended, with a time limit of its own; its failure is logged, never the outcome.
No test here bounds wall-clock time: waits are on events and polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.engine.api import CancelToken, Limits, RunContext, ScriptError
from luanette.engine.lua import run_script
from luanette.scripts import declared_shutdown_timeout
from luanette.stdlib.clock import ClockNamespace
from tests.test_garden_flow import stack  # noqa: F401  (fixture)
from tests.test_jobs import store, wait_done
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)


class Notes:
    """Namespace `notes`: ``notes.set(key, value)`` records a value; ``notes.waiting()``
    (async) waits until released, and tells the test it is waiting."""

    name = "notes"

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.waiting = asyncio.Event()

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        def set(key: str, value: Any = None) -> None:  # noqa: A001
            self.values[key] = value

        async def wait() -> None:
            self.waiting.set()
            await asyncio.Event().wait()

        return {"set": set, "wait": wait}


async def outcome(code: str, notes: Notes, cancel_when_waiting: bool = False, **kwargs: Any) -> Any:
    """Run ``code`` with `notes` and `clock`; with ``cancel_when_waiting``, cancel it once
    it waits in notes.wait().  The result, or the ScriptError's detail."""
    token = kwargs.pop("cancel", None) or CancelToken()

    async def canceller() -> None:
        await notes.waiting.wait()
        token.cancel("by the test")

    task = asyncio.create_task(canceller()) if cancel_when_waiting else None
    try:
        return (await run_script(code, namespaces=[notes, ClockNamespace()], cancel=token, **kwargs)).result
    except ScriptError as e:
        return e.detail
    finally:
        if task is not None:
            task.cancel()


@pytest.mark.parametrize(
    ("main", "reason", "kind"),
    [
        ("return 1", "completed", None),
        ("error('boom')", "error", "lua_runtime"),
        ("return function() end", "error", "result_not_serializable"),
        ("while true do end", "timeout", "timeout"),
        ("notes.wait()", "timeout", "timeout"),
    ],
)
async def test_each_reason_reaches_on_shutdown(main: str, reason: str, kind: str | None) -> None:
    notes = Notes()
    code = f"""
        function main() {main} end
        function on_shutdown(reason) notes.set("reason", reason) notes.set("seen", params.x) end
    """
    got = await outcome(code, notes, params={"x": 7}, limits=Limits(timeout_s=0.3))
    assert notes.values == {"reason": reason, "seen": 7}
    assert (got == 1) if kind is None else (got.kind == kind)


async def test_a_chunk_without_main_has_on_shutdown_too() -> None:
    notes = Notes()
    got = await outcome("function on_shutdown(r) notes.set('reason', r) end return 5", notes)
    assert got == 5 and notes.values == {"reason": "completed"}


async def test_on_shutdown_runs_after_a_hard_cancel() -> None:
    notes = Notes()
    code = "function main() notes.wait() end function on_shutdown(r) clock.sleep(1) notes.set('reason', r) end"
    got = await outcome(code, notes, cancel_when_waiting=True)  # grace 0: stopped at once
    assert got.kind == "cancelled" and notes.values == {"reason": "cancelled"}


async def test_on_shutdown_runs_after_a_timeout_with_its_own_deadline() -> None:
    notes = Notes()
    code = """
        function main() while true do end end
        function on_shutdown(r) core.sleep(50) clock.sleep(50) notes.set('reason', r) end
    """
    got = await outcome(code, notes, limits=Limits(timeout_s=0.2))
    assert got.kind == "timeout" and notes.values == {"reason": "timeout"}


@pytest.mark.parametrize("body", ["while true do end", "notes.wait()", "while true do pcall(core.sleep, 1) end"])
async def test_a_runaway_on_shutdown_is_stopped_and_the_outcome_stays(body: str) -> None:
    notes = Notes()
    logs: list[tuple[str, str, Any]] = []
    code = f"function main() return 'ok' end function on_shutdown(r) notes.set('began', r) {body} end"
    got = await outcome(
        code, notes, limits=Limits(shutdown_timeout_s=0.2), log_sink=lambda *line: logs.append(line)
    )
    assert got == "ok" and notes.values == {"began": "completed"}
    (line,) = [line for line in logs if line[2] and "on_shutdown_error" in line[2]]
    assert line[0] == "error" and line[2]["on_shutdown_error"]["kind"] == "timeout"


async def test_on_shutdown_cannot_catch_its_own_limit() -> None:
    notes = Notes()
    code = """
        function main() error('main failed') end
        function on_shutdown(r)
          while true do pcall(function() while true do end end) notes.set('caught', true) end
        end
    """
    got = await outcome(code, notes, limits=Limits(shutdown_timeout_s=0.2))
    assert got.kind == "lua_runtime" and got.message == "main failed" and "caught" not in notes.values


async def test_an_error_in_on_shutdown_is_logged_not_the_outcome() -> None:
    notes = Notes()
    logs: list[tuple[str, str, Any]] = []
    code = "function main() return 3 end function on_shutdown(r) error('cleanup broke') end"
    got = await outcome(code, notes, log_sink=lambda *line: logs.append(line))
    assert got == 3
    (line,) = logs
    assert line[2]["on_shutdown_error"]["kind"] == "lua_runtime"
    assert line[2]["on_shutdown_error"]["message"] == "cleanup broke"


@pytest.mark.parametrize("wait", ["clock.sleep(600000)", "core.sleep(600000)", "core.await(core.spawn(notes.wait))"])
async def test_a_cancelled_wait_raises_a_catchable_error(wait: str) -> None:
    notes = Notes()
    code = f"""
        function main()
          core.spawn(function() notes.set("spawned", true) end)
          local waiting = core.spawn(function() core.sleep(5) notes.wait() end)
          local ok, err = pcall(function() {wait} end)
          notes.set("caught", err)
          return "ignored"
        end
        function on_shutdown(r) notes.set("reason", r) end
    """
    # notes.wait is reached in every variant (the spawned task), which cancels the run
    got = await outcome(code, notes, cancel_when_waiting=True, limits=Limits(cancel_grace_s=30))
    assert got.kind == "cancelled" and "by the test" in got.message
    assert "cancelled: by the test" in notes.values["caught"]
    assert notes.values["reason"] == "cancelled"


async def test_a_script_ignoring_the_cancel_is_stopped_after_the_grace() -> None:
    notes = Notes()
    code = """
        function main()
          pcall(notes.wait)
          notes.set("caught", true)
          while true do pcall(core.sleep, 10) end
        end
        function on_shutdown(r) notes.set("reason", r) end
    """
    got = await outcome(code, notes, cancel_when_waiting=True, limits=Limits(cancel_grace_s=0.3))
    assert got.kind == "cancelled"
    assert notes.values == {"caught": True, "reason": "cancelled"}


async def test_a_second_cancel_stops_the_grace_and_on_shutdown_at_once() -> None:
    notes = Notes()
    token = CancelToken()
    code = """
        function main() pcall(notes.wait) notes.set("caught", true) while true do end end
        function on_shutdown(r) notes.set("reason", r) while true do end end
    """

    async def again() -> None:
        await until(lambda: "caught" in notes.values, "the cancel caught")
        token.cancel("twice")
        await until(lambda: "reason" in notes.values, "on_shutdown")
        token.cancel("three times")

    task = asyncio.create_task(again())
    got = await outcome(
        code, notes, cancel_when_waiting=True, cancel=token,
        limits=Limits(cancel_grace_s=600, shutdown_timeout_s=60, timeout_s=600),
    )  # fmt: skip
    await task
    assert got.kind == "cancelled" and notes.values == {"caught": True, "reason": "cancelled"}


def test_shutdown_timeout_is_validated() -> None:
    assert declared_shutdown_timeout({}) is None
    assert declared_shutdown_timeout({"shutdown_timeout": 10}) == 10.0
    for bad in (0, -1, 61, "5", True):
        with pytest.raises(ValueError, match="shutdown_timeout"):
            declared_shutdown_timeout({"shutdown_timeout": bad})


# --- through the daemon --------------------------------------------------------------

COOPERATIVE = """
function describe() return {name = "cooperative", shutdown_timeout = 2} end
function main()
  local ok, err = pcall(clock.sleep, 600000)
  log.info("caught: " .. tostring(err))
  while true do end
end
function on_shutdown(reason) log.info("shutdown: " .. reason) end
"""


async def test_job_cancel_is_cooperative_then_hard(make_server) -> None:
    running = await make_server(cancel_grace=0.3)
    async with Client(running.endpoint) as c:
        reply = await c.request(t.ScriptStore(content="function describe() return {shutdown_timeout = 0} end"))
        assert isinstance(reply, t.Error) and "shutdown_timeout" in reply.message
        digest = await store(c, COOPERATIVE)
        assert running.server.store.get_script(digest).shutdown_timeout == 2.0
        job = (await c.request(t.JobExecute(script_hash=digest, params=None))).result["job_id"]

        async def sleeping() -> bool:
            reply = await c.request(t.JobStatusRequest(job_id=job))
            return reply.result["status"] == "running"

        await until(sleeping, "the job running")
        await asyncio.sleep(0.1)  # (into its clock.sleep; an earlier cancel is caught all the same)
        await c.request(t.JobCancel(job_id=job))
        done = await wait_done(c, job)
    assert done["status"] == "cancelled", done


async def test_cancelling_a_transition_marks_its_region_failed(stack) -> None:  # noqa: F811
    from luanette.sim import make_midi
    from luanette.sim.garden import send_timeline_event

    running, garden, models = stack
    models.config.latency_ms = 600_000  # the bridge call waits until cancelled
    cas = running.server.cas
    a = cas.store(make_midi([(0, 60, 480, 90)]), "audio/midi")
    reply = await send_timeline_event(
        running.endpoint, "generate_transition", 8.0, 120.0, {"from": a, "to": a, "beats": 4}
    )
    job = reply.result["job_id"]
    await until(lambda: models.stats.by_task["bridge"] == 1, "the bridge call")
    async with Client(running.endpoint) as c:
        await c.request(t.JobCancel(job_id=job))
        done = await wait_done(c, job)
    assert done["status"] == "cancelled", done
    (region,) = garden.state.regions()
    assert region["latent"]["status"] == "failed" and "cancelled" in region["latent"]["error"]


async def test_on_shutdown_past_the_deadline_does_not_cost_the_worker(make_server) -> None:
    running = await make_server(script_timeout=0.3)
    code = """
        function main() while true do end end
        function on_shutdown(reason) clock.sleep(1500) log.info("shut down after " .. reason) end
    """
    async with Client(running.endpoint) as c:
        reply = await c.request(t.LuaEval(code=code), timeout=30)
        assert isinstance(reply, t.Error) and reply.details["kind"] == "timeout", reply
        assert "worker process was replaced" not in reply.message
    assert running.server.engine.stats.workers_quarantined == 0



async def test_describe_does_not_run_on_shutdown() -> None:
    from luanette.scripts import _DESCRIBE

    notes = Notes()
    source = """
        function describe() return {name = "quiet"} end
        function on_shutdown(reason) notes.set("ran", reason) end
        function main() return 1 end
    """
    got = await outcome(_DESCRIBE, notes, params={"source": source})
    assert got == {"found": True, "value": {"name": "quiet"}} and notes.values == {}
