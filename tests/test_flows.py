"""Flows (docs/plugins.md#flows) over the real socket: the review flow example against
the garden simulator, across a daemon restart; the TransitionResult variants; queries;
the ``flow_transition`` broadcast; ``flow.*`` in Lua; the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import zmq

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import decode_broadcast
from luanette.flows import FlowError, parse_definition
from luanette.settings import parse_settings
from tests.conftest import cli
from tests.test_jobs import store, subscribed

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "review_flow.lua"
AGENT = "00000000-0000-0000-0000-0000000000a1"

TOY = """
function define()
  return {
    id = "toy",
    initial = "a",
    states = {
      a = {on = {go = "b", jump = "%s"}, enter = "entered"},
      b = {on = {back = "a"}, guards = {back = "allowed"}, exit = "leaving"},
      %s
    },
    context = {count = 0},
  }
end
function entered(ctx, event) ctx:set_context("count", ctx:context().count + 1) end
function leaving(ctx, event) ctx:set_context("left_by", ctx:current_user()) end
function allowed(ctx, event) return event.please == true, "say please" end
"""


def toy(version: int) -> str:
    # version 1 has a state "c"; version 2 drops it (instances there are in an invalid state)
    return TOY % (("c", "c = {type = 'final'},") if version == 1 else ("b", ""))


async def ok(c: Client, request: t.Payload):
    reply = await c.request(request)
    assert isinstance(reply, t.Success), reply
    return reply.result


async def refused(c: Client, request: t.Payload) -> t.Error:
    reply = await c.request(request)
    assert isinstance(reply, t.Error), reply
    return reply


def plugins_with_example(tmp_path: Path) -> str:
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    (directory / "review_flow.lua").write_text(EXAMPLE.read_text())
    return str(directory)


async def resolved_region(c: Client, garden) -> str:
    """A latent region of the garden, resolved and waiting for approval."""
    # an eval's region edits reach the garden when it ends (session mode, the garden
    # then gives the region its real id): two evals
    await ok(c, t.LuaEval(code="""
        return garden.create_region{position = 0, duration = 8, behavior = "latent", content_id = "job_1"}
    """))
    (made,) = garden.state.regions()
    region = made["region_id"]
    await ok(c, t.LuaEval(code="""
        garden.latent_started(params.id, "job_1")
        garden.latent_resolved(params.id, {artifact_id = "art_1", content_hash = "h1", content_type = "midi"})
    """, params={"id": region}))
    return region


class Transitions:
    """The ``flow_transition`` broadcasts of a daemon."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def next(self) -> t.FlowTransition:
        while True:
            message = decode_broadcast(await asyncio.wait_for(self.sock.recv(), 30))
            if isinstance(message, t.FlowTransition):
                return message


@pytest.fixture
async def transitions(zctx):
    made = []

    async def make(running, c) -> Transitions:
        sock = zctx.socket(zmq.SUB)
        sock.connect(running.server.publisher.endpoint)
        await subscribed(sock, c)
        sock.setsockopt(zmq.SUBSCRIBE, b'{"type":"flow_transition"')
        made.append(sock)
        return Transitions(sock)

    yield make
    for sock in made:
        sock.close(0)


async def test_the_review_flow_runs_to_approved_across_a_restart(make_server, garden, tmp_path, transitions):
    settings = parse_settings({"garden": {"endpoint": garden.endpoint}})
    first = await make_server(settings=settings, plugins=plugins_with_example(tmp_path))
    async with Client(first.endpoint) as c:
        watch = await transitions(first, c)
        definition = await ok(c, t.FlowRegister(source="review_flow"))
        assert definition["id"] == "review_workflow" and definition["origin"] == "plugin:review_flow"
        assert definition["capabilities"] == ["garden.write"]
        region = await resolved_region(c, garden)
        assert [p["region_id"] for p in garden.state.pending()] == [region]

        started = await ok(c, t.FlowStart(definition="review_workflow", subject=region,
                                          context={"region_id": region}, user="alice"))  # fmt: skip
        assert started["current_state"] == "draft" and started["subject"] == region
        assert started["context"]["region_id"] == region and started["history"] == []
        begun = await watch.next()
        assert (begun.instance_id, begun.from_state, begun.to_state, begun.action) == (
            started["id"], None, "draft", "start"
        )
        instance = started["id"]
        submitted = await ok(c, t.FlowSend(instance=instance, action="submit", user="alice"))
        assert submitted == {"type": "success", "new_state": "pending_review", "from_state": "draft",
                             "action": "submit", "instance_id": instance, "final": False}  # fmt: skip
        moved = await watch.next()
        assert (moved.from_state, moved.to_state, moved.action, moved.user, moved.subject) == (
            "draft", "pending_review", "submit", "alice", region
        )
        # the guard: nobody approves their own submission
        own = await ok(c, t.FlowSend(instance=instance, action="approve", user="alice", data={"decided_by": AGENT}))
        assert own["type"] == "guard_failed" and own["guard"] == "canApprove"
        assert own["reason"] == "you cannot approve your own submission"
        assert (await ok(c, t.FlowGet(instance=instance)))["current_state"] == "pending_review"
    await first.stop()
    assert garden.state.region(region)["latent"]["status"] != "approved"

    # a new daemon on the same state directory, without the plugin: the flow lives in the database
    second = await make_server(settings=settings)
    async with Client(second.endpoint) as c:
        kept = await ok(c, t.FlowGet(instance=instance))
        assert kept["current_state"] == "pending_review" and kept["context"]["submitter"] == "alice"
        assert [h["action"] for h in kept["history"]] == ["submit"]
        approved = await ok(c, t.FlowSend(instance=instance, action="approve", user="bob",
                                          data={"decided_by": AGENT, "comment": "lovely"}))  # fmt: skip
        assert approved["type"] == "success" and approved["new_state"] == "approved" and approved["final"]
        done = await ok(c, t.FlowGet(instance=instance))
        assert done["final"] and done["context"]["approver"] == "bob"
        assert done["context"]["comments"] == [{"by": "bob", "text": "lovely"}]
        assert [(h["from"], h["to"], h["user"]) for h in done["history"]] == [
            ("draft", "pending_review", "alice"), ("pending_review", "approved", "bob"),
        ]  # fmt: skip
        assert done["history"][1]["data"] == {"decided_by": AGENT, "comment": "lovely"}
        # a final state has no way out
        stuck = await ok(c, t.FlowSend(instance=instance, action="reject", user="bob"))
        assert stuck == {"type": "invalid_action", "action": "reject", "current_state": "approved",
                         "instance_id": instance}  # fmt: skip
    latent = garden.state.region(region)["latent"]
    assert latent["status"] == "approved" and latent["decided_by"] == AGENT


async def test_transition_results_queries_and_errors(client):
    v1 = await store(client, toy(1))
    registered = await ok(client, t.FlowRegister(source=v1))
    assert registered["id"] == "toy" and registered["origin"] == f"script:{v1}"
    one = await ok(client, t.FlowStart(definition="toy", subject="s1"))
    two = await ok(client, t.FlowStart(definition="toy", subject="s2", context={"count": 10}))
    assert one["context"] == {"count": 1} and two["context"] == {"count": 11}  # the enter handler ran

    nope = await ok(client, t.FlowSend(instance=one["id"], action="fly"))
    assert nope == {"type": "invalid_action", "action": "fly", "current_state": "a", "instance_id": one["id"]}
    assert (await ok(client, t.FlowSend(instance=one["id"], action="go")))["new_state"] == "b"
    rude = await ok(client, t.FlowSend(instance=one["id"], action="back"))
    assert rude == {"type": "guard_failed", "guard": "allowed", "reason": "say please", "instance_id": one["id"]}
    polite = await ok(client, t.FlowSend(instance=one["id"], action="back", data={"please": True}))
    assert polite["type"] == "success" and polite["new_state"] == "a"
    back = await ok(client, t.FlowGet(instance=one["id"]))
    assert back["context"] == {"count": 2, "left_by": "local"} and back["transitions"] == 2

    assert (await ok(client, t.FlowSend(instance=two["id"], action="jump")))["new_state"] == "c"
    assert [i["id"] for i in await ok(client, t.FlowList(subject="s1"))] == [one["id"]]
    assert [i["id"] for i in await ok(client, t.FlowList(state="c"))] == [two["id"]]
    assert {i["id"] for i in await ok(client, t.FlowList(definition="toy"))} == {one["id"], two["id"]}
    assert await ok(client, t.FlowList(definition="toy", state="b")) == []
    assert [d["id"] for d in await ok(client, t.FlowList(definitions=True))] == ["toy"]

    # a new version of the definition without state c: the instance there is in an invalid state
    await ok(client, t.FlowRegister(source=await store(client, toy(2))))
    invalid = await ok(client, t.FlowSend(instance=two["id"], action="anything"))
    assert invalid == {"type": "invalid_state", "state": "c", "instance_id": two["id"]}

    assert (await refused(client, t.FlowSend(instance="nope", action="go"))).code == "not_found"
    assert (await refused(client, t.FlowStart(definition="nope"))).code == "not_found"
    assert (await refused(client, t.FlowRegister(source="no_such_plugin"))).code == "not_found"
    define = "function define() return {id = 'x', initial = 'a', states = {a = %s}} end"
    broken = await store(client, define % "{on = {go = 'z'}}")
    bad = await refused(client, t.FlowRegister(source=broken))
    assert bad.code == "flow_invalid" and "no state 'z'" in bad.message
    missing = await store(client, define % "{enter = 'nope'}")
    assert "no function nope" in (await refused(client, t.FlowRegister(source=missing))).message


async def test_a_failing_handler_changes_nothing(client):
    digest = await store(client, """
    function define()
      return {id = "fragile", initial = "a", states = {a = {on = {go = "b"}}, b = {enter = "boom"}}}
    end
    function boom(ctx) ctx:set_context("half", true) error("no luck") end
    """)
    await ok(client, t.FlowRegister(source=digest))
    instance = (await ok(client, t.FlowStart(definition="fragile")))["id"]
    failed = await refused(client, t.FlowSend(instance=instance, action="go"))
    assert failed.code == "flow_handler_failed" and "no luck" in failed.message
    after = await ok(client, t.FlowGet(instance=instance))
    assert after["current_state"] == "a" and after["context"] == {} and after["history"] == []


async def test_flows_from_lua(client):
    await ok(client, t.FlowRegister(source=await store(client, toy(1))))
    result = await ok(client, t.LuaEval(code="""
        local i = flow.start("toy", {count = 5}, "from-lua")
        local went = flow.send(i.id, "go")
        local ok, err = pcall(flow.send, "no-such-instance", "go")
        return {start = i, went = went, got = flow.get(i.id), listed = #flow.list{subject = "from-lua"},
                err = err, missing = flow.get("nope") == nil}
    """))
    out = result["result"]
    assert out["start"]["context"] == {"count": 6} and out["went"]["new_state"] == "b"
    assert out["got"]["current_state"] == "b" and out["got"]["history"][0]["user"] == "local"
    assert out["listed"] == 1 and out["missing"] is True
    assert "not_found" in out["err"]


async def test_only_an_admin_acts_as_someone_else(client):
    from luanette.auth import Caller
    from luanette.dispatch import Dispatcher

    class Ctx:
        caller = Caller(key="KEY", admin=False)

    assert Dispatcher._acting_user(None, Ctx()) == "KEY"  # type: ignore[arg-type]
    with pytest.raises(FlowError) as e:
        Dispatcher._acting_user("alice", Ctx())  # type: ignore[arg-type]
    assert e.value.code == "forbidden"


def test_definitions_are_checked():
    with pytest.raises(FlowError, match="initial state"):
        parse_definition({"id": "x", "initial": "nope", "states": {"a": {}}})
    with pytest.raises(FlowError, match="final state"):
        parse_definition({"id": "x", "initial": "a", "states": {"a": {"type": "final", "on": {"go": "a"}}}})
    with pytest.raises(FlowError, match="no such action"):
        parse_definition({"id": "x", "initial": "a", "states": {"a": {"guards": {"go": "g"}}}})
    with pytest.raises(FlowError, match="not a flow definition"):
        parse_definition({"id": "x", "initial": "a", "states": {"a": {"type": "weird"}}})
    parallel = parse_definition({"id": "x", "initial": "a", "states": {"a": {"type": "parallel"}}, "context": []})
    assert parallel.states["a"].type == "parallel" and parallel.context == {}


async def test_the_cli(server):
    async with Client(server.endpoint) as c:
        digest = await store(c, toy(1))
    endpoint = server.endpoint

    async def run(*args: str):
        done = await asyncio.to_thread(cli, endpoint, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert '"id": "toy"' in await run("flow", "register", digest)
    started = json.loads(await run("--json", "flow", "start", "toy", "--subject", "cli", "--context", '{"count": 1}'))
    instance = started["result"]["id"]
    assert await run("flow", "send", instance, "go") == "a --go--> b"
    guarded = json.loads(await run("flow", "send", instance, "back"))
    assert guarded["type"] == "guard_failed"
    assert await run("flow", "send", instance, "back", "--data", '{"please": true}') == "b --back--> a"
    assert json.loads(await run("flow", "get", instance))["transitions"] == 2
    assert await run("flow", "list", "--subject", "cli") == f"{instance}  toy  a  cli"
    assert json.loads(await run("flow", "list", "--definitions"))[0]["id"] == "toy"
