"""The `context` namespace and the `args` global, over real sockets: lua_eval and jobs,
a job cancelled while it polls ``context.cancelled()``, a job a timeline trigger
started, the client's key under CURVE, and the hybrid logical clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import pytest
import zmq.auth

from hooteproto import types as t
from hooteproto.client import Client
from luanette.engine.api import Limits, RunContext
from luanette.runtime import ScriptError, run_script
from luanette.settings import parse_settings
from luanette.stdlib.clock import ClockNamespace
from luanette.stdlib.context import COUNTER_SPAN, ContextNamespace, HybridClock
from tests.test_auth import Keys, as_
from tests.test_jobs import run, status_of, store, until_running, wait_done
from tests.test_triggers import event
from tests.waiting import until

pytestmark = pytest.mark.timeout(90)

# Everything context knows, as a table; math.type tells integers from floats.
ALL = """
local function kind(v) return math.type(v) or type(v) end
local a, b, c = context.hlc_time(), context.hlc_time(), context.hlc_time()
return {
  cancelled = context.cancelled(),
  job_id = context.job_id(),
  script_hash = context.script_hash(),
  deadline = context.deadline(),
  deadline_kind = kind(context.deadline()),
  deadline_again = context.deadline(),
  remaining_ms = context.remaining_ms(),
  remaining_kind = kind(context.remaining_ms()),
  user = context.user(),
  creator = context.creator(),
  trigger = context.trigger(),
  hlc = {a, b, c},
  hlc_kind = kind(a),
  args_is_params = rawequal(args, params),
  args = args,
}
"""

JOB = """
function describe() return {name = "context_probe", params = {}} end
function main(p)
""" + ALL.replace("return {", "return {\n  job = job.id(),", 1) + "end\n"

POLL = """
function describe() return {name = "poll_cancel", params = {}} end
function main()
  local polls = 0
  while not context.cancelled() do
    polls = polls + 1
    if polls == 2 then progress.update(50, "polling") end
    clock.sleep(10)
  end
  clock.sleep(60000)  -- reached only when cancelled() said true: this wait ends at once
  return {polls = polls}
end
"""

TRIGGERED = """
function describe() return {name = "on_cue", params = {}} end
function main(p) return {trigger = context.trigger(), user = context.user(), creator = context.creator(),
  job = context.job_id(), args = args} end
"""

HLC = "return context.hlc_time()"


async def eval_result(c: Client, code: str, params: Any = None) -> Any:
    reply = await c.request(t.LuaEval(code=code, params=params))
    assert isinstance(reply, t.Success), reply
    return reply.result["result"]


def check_common(seen: dict[str, Any], before: float, after: float, timeout_s: float) -> None:
    """What every run's context says about time and the clock, whatever the run."""
    assert seen["cancelled"] is False
    # the run's deadline: its start (between before and after) plus its time limit
    assert seen["deadline_kind"] == "float" and seen["deadline"] == seen["deadline_again"]
    # (ordering, not elapsed time: the run started between before and after; 1 s for the
    # conversion from the monotonic clock to Unix time)
    assert before + timeout_s - 1 <= seen["deadline"] <= after + timeout_s + 1
    # never negative, never more than the limit (how much is left depends on the machine)
    assert seen["remaining_kind"] == "integer" and 0 <= seen["remaining_ms"] <= timeout_s * 1000
    a, b, c = seen["hlc"]
    assert seen["hlc_kind"] == "integer" and a < b < c
    # wall_ms * 1000 + counter: the millisecond is the wall clock's (or just ahead)
    assert before * 1000 - 1000 <= a // COUNTER_SPAN <= after * 1000 + 1000


# --- lua_eval -----------------------------------------------------------------------------


async def test_context_in_lua_eval(server, client):
    before = time.time()
    seen = await eval_result(client, ALL, {"x": [1, 2]})
    after = time.time()
    check_common(seen, before, after, server.server.config.script_timeout)
    assert seen.get("job_id") is None and seen.get("script_hash") is None
    assert seen.get("creator") is None and seen.get("trigger") is None
    assert seen["user"] == "local"  # no CURVE: nobody is authenticated
    assert seen["args_is_params"] is True and seen["args"] == {"x": [1, 2]}


async def test_args_is_params_and_nil_without_params(client):
    assert await eval_result(client, "return {args == nil, params == nil}") == [True, True]
    assert await eval_result(client, "return args[2]", ["a", "b"]) == "b"
    # the same table: a change through one name shows through the other
    assert await eval_result(client, "args.y = 2 return params.y", {"x": 1}) == 2
    assert await eval_result(client, "function main(p) return rawequal(p, args) end", {"x": 1}) is True


async def test_functions_take_no_arguments(client):
    reply = await client.request(t.LuaEval(code="return context.job_id('x')"))
    assert isinstance(reply, t.Error) and "context.job_id: wrong arguments" in reply.message


# --- jobs ---------------------------------------------------------------------------------


async def test_context_in_a_job(server, client):
    digest = await store(client, JOB, creator="ada")
    before = time.time()
    job_id = (await run(client, digest, {"take": 3}))["job_id"]
    done = await wait_done(client, job_id)
    after = time.time()
    assert done["status"] == "complete", done
    seen = done["result"]
    check_common(seen, before, after, server.server.config.script_timeout)
    assert seen["job_id"] == job_id == seen["job"] and seen["script_hash"] == digest
    assert seen["creator"] == "ada"  # what script_store was told
    assert seen["user"] == "local"  # who asked for the job
    assert seen.get("trigger") is None
    assert seen["args_is_params"] is True and seen["args"] == {"take": 3}


async def test_creator_is_nil_for_a_script_stored_without_one(client):
    digest = await store(client, JOB)
    done = await wait_done(client, (await run(client, digest))["job_id"])
    assert done["status"] == "complete" and done["result"].get("creator") is None
    assert done["result"]["user"] == "local"


async def test_cancelled_turns_true_while_a_job_polls_it(client):
    digest = await store(client, POLL)
    job_id = (await run(client, digest))["job_id"]
    await until_running(client, job_id)

    async def polling() -> bool:  # the loop ran: cancelled() said false at least twice
        info = (await client.request(t.JobStatusRequest(job_id=job_id))).result
        return (info.get("progress") or {}).get("message") == "polling"

    await until(polling, "the job polling context.cancelled()")
    assert await status_of(client, job_id) == "running"
    reply = await client.request(t.JobCancel(job_id=job_id))
    assert isinstance(reply, t.Success), reply
    done = await wait_done(client, job_id)
    assert done["status"] == "cancelled" and done["error"]["kind"] == "cancelled"
    assert done["result"] is None
    # it ended in its loop's sleep, at the hook, or (cancelled() said true) in the wait after it
    assert done["error"]["line"] in (5, 6, 7, 8, 9, 10)


class _Signal:
    """A namespace whose ``signal.polling()`` tells the test the script is in its loop
    (from the script's Lua thread) and ``signal.saw(n)`` records what it saw."""

    name = "signal"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.polling = asyncio.Event()
        self.seen: list[Any] = []

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        def polling() -> None:
            self.loop.call_soon_threadsafe(self.polling.set)

        def saw(value: Any) -> None:
            self.seen.append(value)

        return {"polling": polling, "saw": saw}


async def test_cancelled_is_what_the_script_reads_before_the_hook_stops_it():
    """The daemon's hook stops a cancelled script within 10,000 instructions, so over
    the socket a poll loop ends in its sleep or at the hook.  With a hook that fires
    rarely (every million instructions), the loop itself sees ``cancelled()`` turn true,
    goes on, and the run ends cancelled at its next wait."""
    from luanette.engine.api import CancelToken

    signal = _Signal(asyncio.get_running_loop())
    token = CancelToken()
    code = """
local polls = 0
while not context.cancelled() do
  polls = polls + 1
  if polls == 1 then signal.polling() end
end
signal.saw({context.cancelled(), polls > 0})
clock.sleep(60000)
"""
    running = asyncio.ensure_future(
        run_script(
            code,
            namespaces=[ContextNamespace(), ClockNamespace(), signal],
            limits=Limits(timeout_s=60, hook_interval=1_000_000),
            cancel=token,
        )
    )
    await asyncio.wait_for(signal.polling.wait(), 30)
    token.cancel("stop polling")
    with pytest.raises(ScriptError) as info:
        await asyncio.wait_for(running, 30)
    assert signal.seen == [[True, True]]
    detail = info.value.detail
    assert detail.kind == "cancelled" and detail.line == 8 and "clock.sleep" in detail.message


# --- triggers -----------------------------------------------------------------------------


async def test_trigger_shows_the_event_that_started_the_job(make_server):
    rules = [{"name": "cue", "event_type": "cue_point", "script": "on_cue", "params": {"at": "$position_beats"}}]
    running = await make_server(settings=parse_settings({"triggers": rules}))
    async with Client(running.endpoint) as c:
        digest = await store(c, TRIGGERED, creator="composer")
        metadata = {"kind": "drop", "section": {"name": "B", "bars": [1, 2]}}
        reply = await c.request(event("cue_point", metadata, position=48.5, tempo=96.0))
        assert isinstance(reply, t.Success) and reply.result["script_hash"] == digest, reply
        done = await wait_done(c, reply.result["job_id"])
        assert done["status"] == "complete", done
        assert done["result"] == {
            "trigger": {
                "event_type": "cue_point",
                "position_beats": 48.5,
                "tempo": 96.0,
                "metadata": metadata,
                "rule": "cue",
            },
            "user": "local",  # who sent the event
            "creator": "composer",
            "job": reply.result["job_id"],
            "args": {"at": 48.5},
        }
        # the same script run by hand: no trigger
        by_hand = await wait_done(c, (await run(c, digest))["job_id"])
        assert by_hand["result"].get("trigger") is None


async def test_metadata_lua_cannot_hold_is_left_out_of_the_trigger(make_server):
    rules = [{"name": "cue", "event_type": "cue_point", "script": "on_cue"}]
    running = await make_server(settings=parse_settings({"triggers": rules}))
    async with Client(running.endpoint) as c:
        await store(c, TRIGGERED)
        reply = await c.request(event("cue_point", {"stamp": msgspec.msgpack.Ext(5, b"\x01\x02")}))
        assert isinstance(reply, t.Success), reply
        done = await wait_done(c, reply.result["job_id"])
        assert done["status"] == "complete", done
        assert done["result"]["trigger"] == {
            "event_type": "cue_point", "position_beats": 32.0, "tempo": 120.0, "rule": "cue",
        }  # fmt: skip


# --- CURVE --------------------------------------------------------------------------------


async def test_user_is_the_clients_key_under_curve(make_server, tmp_path):
    keys = Keys(tmp_path / "keys")
    curved = await make_server(curve=str(keys.server))
    alice = zmq.auth.load_certificate(keys.client / "client.key")[0].decode()
    root = zmq.auth.load_certificate(keys.admin / "client.key")[0].decode()
    async with as_(keys.client, curved.endpoint) as c:
        await c.connected()
        assert await eval_result(c, "return context.user()") == alice
        digest = await store(c, JOB, creator="not-alice")  # a creator is only a claim
        done = await wait_done(c, (await run(c, digest))["job_id"])
        assert done["status"] == "complete", done
        assert done["result"]["user"] == alice and done["result"]["creator"] == "not-alice"
    async with as_(keys.admin, curved.endpoint) as c:  # the same script, asked for by another key
        await c.connected()
        assert await eval_result(c, "return context.user()") == root
        done = await wait_done(c, (await run(c, digest))["job_id"])
        assert done["result"]["user"] == root and done["result"]["creator"] == "not-alice"


# --- the hybrid logical clock ----------------------------------------------------------------


async def test_hlc_time_increases_across_runs_on_one_worker(make_server):
    running = await make_server(workers=1)
    async with Client(running.endpoint) as c:
        readings = [await eval_result(c, HLC) for _ in range(5)]
        in_one = await eval_result(c, "local r = {} for i = 1, 50 do r[i] = context.hlc_time() end return r")
        digest = await store(c, JOB)
        job = (await wait_done(c, (await run(c, digest))["job_id"]))["result"]["hlc"]
        after = await eval_result(c, HLC)
    sequence = [*readings, *in_one, *job, after]
    assert all(isinstance(v, int) for v in sequence)
    assert sequence == sorted(set(sequence)), "hlc_time went backwards or repeated"


async def test_hlc_time_is_strictly_increasing_in_concurrent_runs_of_one_worker(make_server):
    running = await make_server(workers=1)
    code = "local r = {} for i = 1, 200 do r[i] = context.hlc_time() end return r"
    async with Client(running.endpoint) as c:
        results = await asyncio.gather(*(eval_result(c, code) for _ in range(8)))
    everything = [v for r in results for v in r]
    for r in results:
        assert r == sorted(r) and len(set(r)) == len(r)
    assert len(set(everything)) == len(everything), "two readings were equal"


def test_the_clock_never_goes_backwards_when_the_wall_clock_does():
    wall = [5_000]
    clock = HybridClock(lambda: wall[0])
    first = clock.now()
    assert first == 5_000 * COUNTER_SPAN
    assert clock.now() == first + 1  # the same millisecond: the counter
    wall[0] = 4_000  # an NTP step back
    assert clock.now() == first + 2
    wall[0] = 6_000  # the wall clock ahead again: the counter starts over
    assert clock.now() == 6_000 * COUNTER_SPAN
    for _ in range(COUNTER_SPAN + 5):  # more readings than a millisecond holds
        clock.now()
    assert clock.now() // COUNTER_SPAN == 6_001  # borrowed the next millisecond
