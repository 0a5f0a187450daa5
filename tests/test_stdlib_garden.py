"""garden.*: every function from real Lua scripts, against the real garden simulator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from luanette.garden import GardenClient, GardenSettings
from luanette.runtime import Limits, ScriptError, run_script
from luanette.sim.garden import GardenSimServer
from luanette.stdlib.garden import GardenNamespace, garden_namespace
from tests.conftest import free_port
from tests.waiting import TIMED

pytestmark = pytest.mark.timeout(90)

AGENT = "00000000-0000-0000-0000-000000000001"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def run(namespace: GardenNamespace, code: str, params: Any = None, **kwargs: Any) -> Any:
    return (await run_script(code, params, namespaces=[namespace], **kwargs)).result


async def failure(namespace: GardenNamespace, code: str, **kwargs: Any) -> str:
    with pytest.raises(ScriptError) as info:
        await run_script(code, namespaces=[namespace], **kwargs)
    assert info.value.detail.kind == "lua_runtime", info.value.detail
    return info.value.detail.message


# ------------------------------------------------------------------------ transport


async def test_transport_functions(garden, gclient):
    ns = garden_namespace(gclient)
    result = await run(ns, """
        local r = {}
        r.tempo = garden.set_tempo(96)
        r.seek = garden.seek(16.5)
        r.play = garden.play()
        r.playing = garden.status()
        r.pause = garden.pause()
        r.paused = garden.status()
        r.stop = garden.stop()
        r.stopped = garden.status()
        return r
    """)
    assert [result[k] for k in ("tempo", "seek", "play", "pause", "stop")] == [True] * 5
    assert result["playing"] == {"playing": True, "position": 16.5, "tempo": 96.0}
    assert result["paused"] == {"playing": False, "position": 16.5, "tempo": 96.0}
    assert result["stopped"] == {"playing": False, "position": 0.0, "tempo": 96.0}
    assert garden.state.transport()["state"] == "stopped"


# -------------------------------------------------------------------------- regions


async def test_region_functions(garden, gclient):
    ns = garden_namespace(gclient)
    result = await run(ns, """
        -- seed 002 "Create and Manage Regions", checked
        local region_id = garden.create_region({
            position = 0, duration = 16, behavior = "play_content", content_id = "artifact_abc123"
        })
        local out = {created = "Created region: " .. region_id}
        garden.move_region(region_id, 16)
        local latent = garden.create_region{position = 4, duration = 8, behavior = "latent", content_id = "job_1"}
        out.all = garden.get_regions()
        out.from_10 = garden.get_regions(10)
        out.window = garden.get_regions(0, 8)
        out.until_4 = garden.get_regions(nil, 4)
        garden.delete_region(out.window[1])   -- a region table works as a region_id
        out.after_delete = garden.get_regions()
        out.ids = {region_id, latent}
        return out
    """)
    moved, latent = result["ids"]
    assert result["created"] == f"Created region: {moved}"
    assert result["all"] == [
        {"region_id": moved, "position": 16.0, "duration": 16.0, "is_latent": False, "artifact_id": "artifact_abc123"},
        {"region_id": latent, "position": 4.0, "duration": 8.0, "is_latent": True},
    ]
    assert [r["region_id"] for r in result["from_10"]] == [moved]
    assert [r["region_id"] for r in result["window"]] == [latent]
    assert result["until_4"] == []  # an empty array, not an object
    assert [r["region_id"] for r in result["after_delete"]] == [moved]
    assert [r["region_id"] for r in garden.state.regions()] == [moved]
    assert garden.state.regions()[0]["behavior_body"] == {"artifact_id": "artifact_abc123"}


# ----------------------------------------------------------------- latent lifecycle


SEED_002_LATENT_WORKFLOW = """
-- seed 002 "Latent Region Workflow", as written there
local region_id = garden.create_region({
    position = 0,
    duration = 8,
    behavior = "latent",
    content_id = "job_orpheus_001"
})

garden.latent_started(region_id, "job_orpheus_001")

for progress = 0.1, 1.0, 0.1 do
    garden.latent_progress(region_id, progress)
end

garden.latent_resolved(region_id, {
    artifact_id = "artifact_generated_xyz",
    content_hash = "sha256:abc123...",
    content_type = "audio"
})

local pending = garden.get_pending()
if #pending > 0 then
    print("Pending approval: " .. pending[1].artifact_id)
    local my_agent_id = "00000000-0000-0000-0000-000000000001"
    garden.approve(pending[1].region_id, my_agent_id)
end
return {region_id = region_id, pending = pending, after = garden.get_pending()}
"""


async def test_seed_002_latent_workflow_created_started_progress_resolved_pending_approved(garden, gclient):
    result = await run(garden_namespace(gclient), SEED_002_LATENT_WORKFLOW)
    region_id = result["region_id"]
    (pending,) = result["pending"]
    assert pending["region_id"] == region_id and pending["artifact_id"] == "artifact_generated_xyz"
    assert pending["content_hash"] == "sha256:abc123..." and pending["content_type"] == "audio"
    assert pending["resolved_at"].endswith("Z")
    assert result["after"] == []
    region = garden.state.region(region_id)
    assert region["latent"]["status"] == "approved" and region["latent"]["decided_by"] == AGENT
    assert region["playable"] and region["plays"] == "sha256:abc123..."
    kinds = [type(m.content).__name__ for m in garden.received]
    assert kinds[:3] == ["CreateRegion", "UpdateLatentStarted", "UpdateLatentProgress"]
    assert kinds.count("UpdateLatentProgress") == 10
    assert kinds[-4:] == ["UpdateLatentResolved", "GetPendingApprovals", "ApproveLatent", "GetPendingApprovals"]


async def test_reject_and_failed_paths(garden, gclient):
    result = await run(garden_namespace(gclient), """
        local a = garden.create_region{position = 0, duration = 4, behavior = "latent", content_id = "job_a"}
        garden.latent_started(a, "job_a")
        garden.latent_resolved(a, {artifact_id = "art", content_hash = "h", content_type = "midi"})
        local b = garden.create_region{position = 4, duration = 4, behavior = "latent", content_id = "job_b"}
        garden.latent_started(b, "job_b")
        garden.latent_failed(b, "the model ran out of memory")
        return {a = a, b = b, rejected = garden.reject(a, params.agent, "too busy"), pending = garden.get_pending()}
    """, {"agent": AGENT})
    assert result["rejected"] is True and result["pending"] == []
    a, b = garden.state.region(result["a"])["latent"], garden.state.region(result["b"])["latent"]
    assert (a["status"], a["reason"], a["content_type"]) == ("rejected", "too busy", "midi")
    assert (b["status"], b["error"]) == ("failed", "the model ran out of memory")


async def test_garden_refusal_is_a_catchable_garden_error(garden, gclient):
    result = await run(garden_namespace(gclient), """
        local id = garden.create_region{position = 0, duration = 4, behavior = "play_content", content_id = "x"}
        local ok, err = pcall(garden.latent_started, id, "job")
        local ok2, err2 = pcall(garden.delete_region, "00000000-0000-0000-0000-0000000000ff")
        return {ok = ok, err = err, ok2 = ok2, err2 = err2}
    """)
    assert result["ok"] is False and result["err"].startswith("garden.latent_started: garden_error: ")
    assert "is not latent" in result["err"]
    assert result["ok2"] is False
    assert result["err2"] == "garden.delete_region: garden_error: region 00000000-0000-0000-0000-0000000000ff not found"


# ----------------------------------------------------------------- argument errors

BAD_CALLS = [
    ("garden.seek(-1)", "garden.seek: invalid_params: beat must be"),
    ("garden.seek('soon')", "garden.seek: invalid_params: beat must be a number, got string"),
    # non-finite numbers never leave Lua: the runtime's argument conversion refuses them
    ("garden.seek(0/0)", "garden.seek: argument #1 is NaN"),
    ("garden.seek(math.huge)", "garden.seek: argument #1 is infinite"),
    ("garden.create_region{position = 0, duration = math.huge, behavior = 'latent', content_id = 'x'}",
     "garden.create_region: argument #1"),
    ("garden.set_tempo(0)", "garden.set_tempo: invalid_params: bpm must be greater than 0"),
    ("garden.set_tempo(-120)", "garden.set_tempo: invalid_params: bpm must be greater than 0"),
    ("garden.create_region{position = 0, duration = 4, behavior = 'loop', content_id = 'x'}",
     "garden.create_region: invalid_params: opts.behavior must be one of 'play_content', 'latent', got 'loop'"),
    ("garden.create_region{position = -1, duration = 4, behavior = 'latent', content_id = 'x'}",
     "garden.create_region: invalid_params: opts.position must be a number of beats >= 0"),
    ("garden.create_region{position = 0, duration = -4, behavior = 'latent', content_id = 'x'}",
     "garden.create_region: invalid_params: opts.duration must be a number of beats >= 0"),
    ("garden.create_region{position = 0, duration = 4, behavior = 'latent'}",
     "garden.create_region: invalid_params: opts.content_id is required"),
    ("garden.create_region{position = 0, duration = 4, behaviour = 'latent', content_id = 'x'}",
     "garden.create_region: invalid_params: opts: unknown field 'behaviour' (did you mean 'behavior'?)"),
    ("garden.create_region('latent')", "garden.create_region: invalid_params: opts must be a table"),
    ("garden.delete_region('not-a-uuid')", "garden.delete_region: invalid_params: region_id must be a UUID like"),
    ("garden.delete_region()", "garden.delete_region: invalid_params: region_id must be a UUID string, got nil"),
    ("garden.move_region(params.id, -2)", "garden.move_region: invalid_params: position must be"),
    ("garden.get_regions(8, 4)", "garden.get_regions: invalid_params: end_beat (4) must not be before start_beat (8)"),
    ("garden.get_regions(-1)", "garden.get_regions: invalid_params: start_beat must be"),
    ("garden.latent_started(params.id, '')", "garden.latent_started: invalid_params: job_id must not be empty"),
    ("garden.latent_progress(params.id, 1.5)", "garden.latent_progress: invalid_params: progress must be within 0..1, got 1.5"),
    ("garden.latent_progress(params.id, -0.1)", "garden.latent_progress: invalid_params: progress must be within 0..1"),
    ("garden.latent_progress(params.id, 0/0)", "garden.latent_progress: argument #2 is NaN"),
    ("garden.latent_resolved(params.id, {artifact_id = 'a', content_hash = 'h', content_type = 'video'})",
     "garden.latent_resolved: invalid_params: opts.content_type must be one of 'audio', 'midi', 'control'"),
    ("garden.latent_resolved(params.id, {artifact_id = 'a', content_type = 'audio'})",
     "garden.latent_resolved: invalid_params: opts.content_hash is required"),
    ("garden.latent_failed(params.id, 42)", "garden.latent_failed: invalid_params: error must be a string, got number"),
    ("garden.approve(params.id, 'me')", "garden.approve: invalid_params: decided_by must be a UUID like"),
    ("garden.reject('x', params.agent)", "garden.reject: invalid_params: region_id must be a UUID like"),
    ("garden.reject(params.id, params.agent, {})", "garden.reject: invalid_params: reason must be a string, got table"),
    ("garden.status(1)", "garden.status: wrong arguments"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "expected"), BAD_CALLS, ids=[c for c, _ in BAD_CALLS])
async def test_bad_arguments_name_the_argument_and_send_nothing(garden, gclient, call, expected):
    params = {"id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "agent": AGENT}
    with pytest.raises(ScriptError) as info:
        await run_script(call, params, namespaces=[garden_namespace(gclient)])
    assert info.value.detail.message.startswith(expected), info.value.detail.message
    assert garden.received == []


async def test_query_is_not_supported():
    message = await failure(garden_namespace(None), "garden.query('query { Region { id @output } }', {})")
    assert message.startswith("garden.query: not_supported: ")
    assert "garden.get_regions" in message


# ------------------------------------------------------------------- availability


async def test_no_garden_configured_is_a_catchable_garden_unavailable():
    for ns in (garden_namespace(None), garden_namespace(GardenClient(GardenSettings()))):
        result = await run(ns, "local ok, err = pcall(garden.play) return {ok, err}")
        assert result[0] is False
        assert result[1] == "garden.play: garden_unavailable: no garden configured (set [garden] endpoint in the config)"


@TIMED
async def test_garden_down_is_garden_unavailable_quickly_and_pcall_able(timed):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with GardenClient(GardenSettings(endpoint=endpoint, timeout_s=60.0)) as client:
        started = time.monotonic()
        result = await run(garden_namespace(client), """
            local ok, err = pcall(garden.play)
            return {ok = ok, err = err, found = string.find(err, "garden_unavailable", 1, true) ~= nil}
        """)
        elapsed = time.monotonic() - started
    assert result["ok"] is False and result["found"] is True
    # "cannot reach": the connect wait (0.5 s) ended it, not the reply timeout ("no reply")
    assert result["err"].startswith(f"garden.play: garden_unavailable: cannot reach {endpoint}")
    if timed:
        assert elapsed < 1.5


@TIMED
async def test_slow_garden_is_garden_unavailable_after_the_timeout(garden, timed):
    garden.latency_ms = 1000 if timed else 3_600_000
    async with GardenClient(GardenSettings(endpoint=garden.endpoint, timeout_s=0.3)) as client:
        started = time.monotonic()
        message = await failure(garden_namespace(client), "garden.status()")
        assert message == f"garden.status: garden_unavailable: no reply from {garden.endpoint} within 0.3 s"
        if timed:
            assert time.monotonic() - started < 0.9


@TIMED
async def test_the_job_deadline_bounds_a_garden_call(garden, timed):
    garden.unresponsive = True
    async with GardenClient(GardenSettings(endpoint=garden.endpoint, timeout_s=60.0)) as client:
        started = time.monotonic()
        with pytest.raises(ScriptError) as info:
            await run_script("garden.play()", namespaces=[garden_namespace(client)], limits=Limits(timeout_s=0.4))
        assert info.value.detail.kind == "timeout"  # the job's deadline, not the garden's 60 s
        if timed:
            assert time.monotonic() - started < 1.5
        # the deadline, not the garden, ended the call: the socket is kept
        garden.unresponsive = False
        assert await run(garden_namespace(client), "return garden.play()") is True
        assert client.stats.sockets == 1


async def test_simulator_restarted_on_the_same_port_works_again(garden, gclient):
    ns = garden_namespace(gclient)
    assert await run(ns, "return garden.set_tempo(100)") is True
    endpoint = garden.endpoint
    await garden.stop()
    down = await run(ns, "local ok, err = pcall(garden.status) return err")
    assert "garden_unavailable" in down
    async with GardenSimServer(endpoint) as again:
        assert await run(ns, "return garden.status()") == {"playing": False, "position": 0.0, "tempo": 120.0}
        assert len(again.received) == 1


# ------------------------------------------------------------ tracing, concurrency


async def test_traceparent_callable_is_sent_in_metadata(garden, gclient):
    calls = []

    def traceparent() -> str:
        calls.append(1)
        return TRACEPARENT

    await run(garden_namespace(gclient, traceparent), "garden.play() garden.status()")
    assert [m.metadata for m in garden.received] == [{"traceparent": TRACEPARENT}] * 2
    assert len(calls) == 2


async def test_many_scripts_at_once_each_get_their_own_answers(garden, gclient):
    ns = garden_namespace(gclient)
    code = """
        local id = garden.create_region{position = params.i, duration = 1, behavior = "latent",
                                        content_id = "job_" .. params.i}
        local found
        for _, r in ipairs(garden.get_regions(params.i, params.i + 0.5)) do
            if r.region_id == id then found = r end
        end
        return {id = id, position = found.position}
    """
    results = await asyncio.gather(*[run(ns, code, {"i": i}) for i in range(50)])
    assert [r["position"] for r in results] == [float(i) for i in range(50)]
    for i, r in enumerate(results):
        assert garden.state.region(r["id"])["behavior_body"] == {"job_id": f"job_{i}"}
    assert gclient.stats.late_replies == 0 and gclient.stats.unavailable == 0
