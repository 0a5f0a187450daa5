"""Plugins and hooks (docs/plugins.md) over the real socket, against the model simulator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
import zmq

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import decode_broadcast
from luanette.sim import run_models
from tests.conftest import cli
from tests.test_jobs import run, store, subscribed, wait_done
from tests.test_models_e2e import settings_for

pytestmark = pytest.mark.timeout(120)


def plugin_dir(tmp_path: Path, **files: str) -> str:
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.lua").write_text(text)
    return str(directory)


class Events:
    """The ``custom_event`` broadcasts of a daemon, read from its PUB socket."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def next(self, name: str | None = None) -> t.CustomEvent:
        while True:
            message = decode_broadcast(await asyncio.wait_for(self.sock.recv(), 30))
            if isinstance(message, t.CustomEvent) and (name is None or message.name == name):
                return message

    async def take(self, count: int, name: str) -> list[t.CustomEvent]:
        return [await self.next(name) for _ in range(count)]


@pytest.fixture
async def events(zctx):
    """Factory: ``await events(running, client)`` -> Events, subscribed for sure."""
    made = []

    async def make(running, c) -> Events:
        sock = zctx.socket(zmq.SUB)
        sock.connect(running.server.publisher.endpoint)
        await subscribed(sock, c)
        sock.setsockopt(zmq.SUBSCRIBE, b'{"type":"custom_event"')
        made.append(sock)
        return Events(sock)

    yield make
    for sock in made:
        sock.close(0)


GUARD = """
local P = {}
function P.describe() return {name = "guard"} end
function P.init(ctx)
  ctx:on("job:before_execute", P.veto, {pattern = "forbidden*", priority = ctx.priority.FIRST})
  ctx:on("job:before_execute", P.double, {pattern = "doubler"})
end
function P.veto(event, ctx) return {type = "cancel", reason = "no forbidden scripts here"} end
function P.double(event, ctx)
  return {type = "continue_modified", payload = {x = event.payload.x * 2}}
end
return P
"""


async def test_before_execute_vetoes_one_job_and_modifies_anothers_params(make_server, tmp_path):
    running = await make_server(plugins=plugin_dir(tmp_path, guard=GUARD))
    async with Client(running.endpoint) as c:
        forbidden = await store(c, 'function describe() return {name = "forbidden_one"} end return 1')
        reply = await c.request(t.JobExecute(script_hash=forbidden, params=None))
        assert isinstance(reply, t.Error) and reply.code == "cancelled_by_hook", reply
        assert "no forbidden scripts here" in reply.message and reply.details["plugin"] == "guard"
        doubler = await store(c, 'function describe() return {name = "doubler"} end return params.x')
        done = await wait_done(c, (await run(c, doubler, {"x": 21}))["job_id"])
        assert done["result"] == 42
        other = await store(c, 'function describe() return {name = "other"} end return params.x')
        assert (await wait_done(c, (await run(c, other, {"x": 21}))["job_id"]))["result"] == 21


WATCHER = """
function describe() return {name = "watcher"} end
function init(ctx)
  ctx:on("tool:after", saw, {pattern = "orpheus.*"})
  ctx:on("tool:before", refuse_big, {pattern = "orpheus.generate"})
end
function saw(event, ctx)
  ctx:emit("tool_seen", {name = event.name, variations = #event.result.variations,
                         tokens = event.args[1].max_tokens})
end
function refuse_big(event, ctx)
  if event.args[1].max_tokens > 1000 then return {type = "cancel", reason = "too many tokens"} end
  local args = event.args
  args[1].max_tokens = args[1].max_tokens + 1
  return {type = "continue_modified", payload = args}
end
"""

CALLS_MODELS = """
local made = {}
for i = 1, 3 do made[i] = orpheus.generate{max_tokens = 100 * i} end
llm.chat{messages = {{role = "user", content = "hi"}}}
local ok, err = pcall(orpheus.generate, {max_tokens = 5000})
return {count = #made, refused = not ok and err or "not refused"}
"""


async def test_tool_hooks_see_every_orpheus_call_and_may_change_or_cancel_it(make_server, tmp_path, events):
    async with run_models("all", seed=5) as sim:
        running = await make_server(settings=settings_for(sim.url), plugins=plugin_dir(tmp_path, watcher=WATCHER))
        async with Client(running.endpoint) as c:
            seen = await events(running, c)
            digest = await store(c, CALLS_MODELS)
            done = await wait_done(c, (await run(c, digest))["job_id"])
            assert done["status"] == "complete", done
            assert done["result"]["count"] == 3
            assert "cancelled_by_hook: too many tokens" in done["result"]["refused"]
            got = await seen.take(3, "custom:tool_seen")
        # every orpheus call, none of llm's (the pattern), each with the args tool:before changed
        assert sorted(e.payload["tokens"] for e in got) == [101, 201, 301]
        assert all(e.payload["name"] == "orpheus.generate" and e.subject == "watcher" for e in got)
        assert all(e.payload["variations"] >= 1 for e in got)


async def test_no_tool_hooks_without_a_subscriber(make_server, tmp_path):
    running = await make_server(plugins=plugin_dir(tmp_path, guard=GUARD))
    assert running.server.plugins.tool_events() == []


ORDER_A = """
local A = {}
function A.describe() return {name = "a"} end
function A.init(ctx)
  ctx:on("custom:ping", A.late, {priority = 50})
  ctx:on("custom:ping", A.early, {priority = -50})
  ctx:on("custom:ping", A.filtered, {pattern = "nobody"})
end
function A.late(e, ctx) ctx:emit("order", {who = "a.late"}) end
function A.early(e, ctx) ctx:emit("order", {who = "a.early"}) end
function A.filtered(e, ctx) ctx:emit("order", {who = "a.filtered"}) end
return A
"""

ORDER_B = """
local B = {}
function B.describe() return {name = "b"} end
function B.init(ctx)
  ctx:on("custom:ping", B.normal)
  ctx:on("custom:ping", B.first, {priority = ctx.priority.FIRST, once = true})
end
function B.normal(e, ctx) ctx:emit("order", {who = "b.normal"}) end
function B.first(e, ctx) ctx:emit("order", {who = "b.first"}) end
return B
"""


async def test_priority_order_pattern_and_once(make_server, tmp_path, events):
    running = await make_server(plugins=plugin_dir(tmp_path, a=ORDER_A, b=ORDER_B))
    async with Client(running.endpoint) as c:
        seen = await events(running, c)
        digest = await store(c, 'hooks.emit("ping", {n = params.n}) return "sent"')
        await wait_done(c, (await run(c, digest, {"n": 1}))["job_id"])
        first = [e.payload["who"] for e in await seen.take(4, "custom:order")]
        assert first == ["b.first", "a.early", "b.normal", "a.late"]
        await wait_done(c, (await run(c, digest, {"n": 2}))["job_id"])
        second = [e.payload["who"] for e in await seen.take(3, "custom:order")]
        assert second == ["a.early", "b.normal", "a.late"]  # once: b.first is gone


SKIPPED = """
function describe() return {name = "flaky"} end
function init(ctx)
  ctx:on("job:before_execute", function(e) error("boom") end, {priority = -20})
  ctx:on("job:before_execute", function(e) while true do end end, {priority = -10})
  ctx:on("job:before_execute", function(e) return {type = "continue_modified", payload = {x = 5}} end)
end
"""


async def test_a_failing_and_a_slow_handler_are_skipped(make_server, tmp_path):
    running = await make_server(plugins=plugin_dir(tmp_path, flaky=SKIPPED), hook_timeout=0.3)
    async with Client(running.endpoint) as c:
        digest = await store(c, "return params.x")
        done = await wait_done(c, (await run(c, digest, {"x": 1}))["job_id"])
        assert done["result"] == 5
    subs = running.server.plugins.plugins["flaky"].subscriptions
    assert [(s.failed, s.delivered) for s in subs] == [(1, 0), (1, 0), (0, 1)]


async def test_plugins_that_fail_to_load_are_listed_and_the_daemon_serves(make_server, tmp_path):
    directory = plugin_dir(
        tmp_path,
        broken="function init(ctx) ctx:on(",
        raises='function describe() return {name = "raises"} end function init(ctx) error("no luck") end',
        unknown='function init(ctx) ctx:on("note:saved", function() end) end',
        greedy='function describe() return {name = "greedy", capabilities = {"teleport"}} end function init() end',
        fine=GUARD,
    )
    running = await make_server(plugins=directory)
    async with Client(running.endpoint) as c:
        listed = (await c.request(t.PluginList())).result
        states = {p["name"]: (p["state"], (p["error"] or {}).get("message", "")) for p in listed}
        assert states["guard"] == ("loaded", "")
        assert states["broken"][0] == "failed" and "broken.lua" in states["broken"][1]
        assert states["raises"][0] == "failed" and "no luck" in states["raises"][1]
        assert states["unknown"][0] == "failed" and "note:saved" in states["unknown"][1]
        assert states["greedy"][0] == "failed" and "teleport" in states["greedy"][1]
        read = await c.request(t.ReadResource(uri="lua://plugins"))
        assert json.loads(read.result["contents"][0]["text"]) == listed
        assert (await c.request(t.LuaEval(code="return 1 + 1"))).result["result"] == 2


STATEFUL = """
local count = 0
function describe() return {name = "counter"} end
function init(ctx) count = count + 1; ctx:on("custom:tick", tick) end
function tick(e, ctx)
  count = count + 1
  leaked = (leaked or 0) + 1
  ctx:emit("counted", {count = count, leaked = leaked})
end
"""


async def test_no_state_survives_between_hook_runs(make_server, tmp_path, events):
    running = await make_server(plugins=plugin_dir(tmp_path, counter=STATEFUL))
    async with Client(running.endpoint) as c:
        seen = await events(running, c)
        digest = await store(c, 'for i = 1, 3 do hooks.emit("tick") end return true')
        await wait_done(c, (await run(c, digest))["job_id"])
        got = await seen.take(3, "custom:counted")
    assert [e.payload for e in got] == [{"count": 2, "leaked": 1}] * 3


LOOP = """
function describe() return {name = "echo", tags = {"plugin"}} end
function init(ctx) ctx:on("custom:*", echo) end
function echo(e, ctx) ctx:emit("again", {}) end
"""


async def test_emit_recursion_is_bounded(make_server, tmp_path, events):
    running = await make_server(plugins=plugin_dir(tmp_path, echo=LOOP))
    async with Client(running.endpoint) as c:
        seen = await events(running, c)
        digest = await store(c, 'hooks.emit("start") return true')
        await wait_done(c, (await run(c, digest))["job_id"])
        await seen.next("custom:start")
        # the depth bound ends the chain: the handler re-fires itself a bounded number of times
        agains = await seen.take(4, "custom:again")
    assert len(agains) == 4
    subs = running.server.plugins.plugins["echo"].subscriptions
    from tests.waiting import until

    await until(lambda: subs[0].delivered == 5, "the bounded chain of deliveries")


VETO_ALL = """
function describe() return {name = "veto_all", tags = {"plugin"}} end
function init(ctx) ctx:on("job:before_execute", function() return {type = "cancel", reason = "closed"} end) end
function cleanup(ctx) ctx:emit("cleaned", {}) end
"""


async def test_load_unload_reload_through_the_cli(make_server, tmp_path, events):
    running = await make_server()
    async with Client(running.endpoint) as c:
        seen = await events(running, c)
        plugin = await store(c, VETO_ALL)
        plain = await store(c, "return 'ran'")
        not_a_plugin = await asyncio.to_thread(cli, running.endpoint, "plugin", "load", plain)
        assert not_a_plugin.returncode != 0 and "not a stored script tagged 'plugin'" in not_a_plugin.stderr
        loaded = await asyncio.to_thread(cli, running.endpoint, "plugin", "load", plugin)
        assert loaded.returncode == 0 and "veto_all  loaded" in loaded.stdout, loaded
        listed = await asyncio.to_thread(cli, running.endpoint, "plugin", "list")
        assert f"veto_all  loaded  script:{plugin}  [job:before_execute]" in listed.stdout
        refused = await c.request(t.JobExecute(script_hash=plain, params=None))
        assert isinstance(refused, t.Error) and refused.code == "cancelled_by_hook"
        reloaded = await asyncio.to_thread(cli, running.endpoint, "plugin", "reload", "veto_all")
        assert reloaded.returncode == 0 and "veto_all  loaded" in reloaded.stdout
        await seen.next("custom:cleaned")  # the reload ran cleanup once
        unloaded = await asyncio.to_thread(cli, running.endpoint, "plugin", "unload", "veto_all")
        assert unloaded.returncode == 0 and "unloaded veto_all" in unloaded.stdout
        await seen.next("custom:cleaned")
        done = await wait_done(c, (await run(c, plain))["job_id"])
        assert done["result"] == "ran"
        gone = await asyncio.to_thread(cli, running.endpoint, "plugin", "unload", "veto_all")
        assert gone.returncode != 0 and "not_found" in gone.stderr + gone.stdout


async def test_job_lifecycle_events(make_server, tmp_path, events):
    lifecycle = """
    function describe() return {name = "life"} end
    function init(ctx)
      for _, name in ipairs({"job:started", "job:completed", "job:failed"}) do ctx:on(name, tell) end
    end
    function tell(e, ctx)
      ctx:emit("life", {type = e.type, job = e.job_id, result = e.result, failed = e.error ~= nil})
    end
    """
    running = await make_server(plugins=plugin_dir(tmp_path, life=lifecycle))
    async with Client(running.endpoint) as c:
        seen = await events(running, c)
        ok = await store(c, "return 7")
        job = (await run(c, ok))["job_id"]
        await wait_done(c, job)
        got = [e.payload for e in await seen.take(2, "custom:life")]
        assert got == [{"type": "job:started", "job": job, "failed": False},
                       {"type": "job:completed", "job": job, "result": 7, "failed": False}]
        bad = await store(c, "error('nope')")
        job = (await run(c, bad))["job_id"]
        await wait_done(c, job)
        got = [e.payload for e in await seen.take(2, "custom:life")]
        assert got[1] == {"type": "job:failed", "job": job, "failed": True}


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"


async def test_the_studio_hooks_example(make_server, events):
    async with run_models("all", seed=9) as sim:
        running = await make_server(settings=settings_for(sim.url), plugins=str(EXAMPLES))
        async with Client(running.endpoint) as c:
            seen = await events(running, c)
            digest = await store(c, """
            function main(p)
              local out = orpheus.generate{max_tokens = p.max_tokens}
              return {stamped = p.requested_at ~= nil, variations = #out.variations}
            end
            """)
            refused = await c.request(t.JobExecute(script_hash=digest, params={"max_tokens": 9999}))
            assert isinstance(refused, t.Error) and refused.code == "cancelled_by_hook"
            assert "max_tokens above 4096" in refused.message
            done = await wait_done(c, (await run(c, digest, {"max_tokens": 128}))["job_id"])
            assert done["status"] == "complete", done
            assert done["result"]["stamped"] is True
            event = await seen.next("custom:generation_completed")
        assert event.subject == "studio_hooks"
        assert event.payload == {"tool": "orpheus.generate", "count": done["result"]["variations"]}


async def test_stored_script_and_timeline_events_reach_plugins(make_server, tmp_path, events):
    watcher = """
    function describe() return {name = "notes"} end
    function init(ctx)
      ctx:on("script:stored", function(e, ctx) ctx:emit("stored", {name = e.name, hash = e.hash}) end,
             {pattern = "wanted*"})
      ctx:on("garden:timeline_event", function(e, ctx)
        ctx:emit("timeline", {type = e.event_type, at = e.position_beats})
      end)
    end
    """
    running = await make_server(plugins=plugin_dir(tmp_path, notes=watcher))
    async with Client(running.endpoint) as c:
        seen = await events(running, c)
        await store(c, 'function describe() return {name = "unwanted"} end return 1')
        digest = await store(c, 'function describe() return {name = "wanted_one"} end return 1')
        got = await seen.next("custom:stored")
        assert got.payload == {"name": "wanted_one", "hash": digest}
        # metadata Lua cannot hold is left out, as for triggers
        metadata = {"stamp": msgspec.msgpack.Ext(5, b"x")}
        reply = await c.request(t.TimelineEvent(event_type=t.TimelineEventType.CUE_POINT, position_beats=8.0,
                                                tempo=120.0, metadata=metadata))
        assert isinstance(reply, t.Success), reply
        assert (await seen.next("custom:timeline")).payload == {"type": "cue_point", "at": 8.0}


async def test_a_stored_plugin_loaded_by_request_is_loaded_again_after_a_restart(make_server):
    first = await make_server()
    async with Client(first.endpoint) as c:
        plugin = await store(c, VETO_ALL)
        plain = await store(c, "return 'ran'")
        assert isinstance(await c.request(t.PluginLoad(plugin=plugin)), t.Success)
    await first.stop()

    again = await make_server()  # the same state directory (tmp_path)
    async with Client(again.endpoint) as c:
        (listed,) = (await c.request(t.PluginList())).result
        assert (listed["name"], listed["state"]) == ("veto_all", "loaded")
        refused = await c.request(t.JobExecute(script_hash=plain, params=None))
        assert isinstance(refused, t.Error) and refused.code == "cancelled_by_hook"
        assert isinstance(await c.request(t.PluginUnload(name="veto_all")), t.Success)
    await again.stop()

    third = await make_server()  # unloaded: not loaded at start-up any more
    async with Client(third.endpoint) as c:
        assert (await c.request(t.PluginList())).result == []
        done = await wait_done(c, (await run(c, plain))["job_id"])
        assert done["result"] == "ran"
