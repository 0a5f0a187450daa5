"""Seed 001's Chaosgarden -> Luanette flow, end to end on real sockets and real HTTP:
the garden simulator sends ``generate_transition`` with two CAS hashes, the trigger
starts ``examples/transition.lua``, which reads both sections, calls orpheus bridge on
the model simulator, stores the result and walks a latent region through started ->
progress -> resolved, leaving it pending approval in the garden."""

from __future__ import annotations

from pathlib import Path

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.settings import parse_settings
from luanette.sim import make_midi, run_models
from luanette.sim.garden import GardenSimServer, send_timeline_event
from tests.test_jobs import wait_done
from tests.test_models_e2e import settings_for

pytestmark = pytest.mark.timeout(60)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DECIDER = "5b5a3c2e-8f39-4c47-9a52-2c2a1d4f0e11"


@pytest.fixture
async def stack(make_server):
    garden = GardenSimServer()
    await garden.start()
    try:
        async with run_models("all", seed=5) as models:
            # short retry backoff: a failing backend is reported in well under the script's
            # time limit even on a loaded machine (5 retries at the default 0.5 s doubling
            # took ~4 of its 5 s)
            raw = msgspec_dict(settings_for(models.url, retry_backoff_s=0.05))
            raw["garden"] = {"endpoint": garden.endpoint, "timeout_s": 5.0}
            raw["triggers"] = [{
                "name": "transition",
                "event_type": "generate_transition",
                "script_file": str(EXAMPLES / "transition.lua"),
                "params": {
                    "current_section": "$metadata.from", "next_section": "$metadata.to",
                    "beats_available": "$metadata.beats", "position": "$position_beats", "tempo": "$tempo",
                },
            }]  # fmt: skip
            running = await make_server(settings=parse_settings(raw))
            await running.server.load_trigger_scripts()
            yield running, garden, models
    finally:
        await garden.stop()


def msgspec_dict(settings) -> dict:
    import msgspec

    return {"backends": {n: msgspec.to_builtins(b) for n, b in settings.backends.items()}}


async def fire_transition(running, garden) -> tuple[dict, str, str]:
    cas = running.server.cas
    a = cas.store(make_midi([(0, 60, 480, 90), (480, 62, 480, 90)]), "audio/midi")
    b = cas.store(make_midi([(0, 67, 480, 90), (480, 69, 480, 90)]), "audio/midi")
    reply = await send_timeline_event(
        running.endpoint, "generate_transition", 32.0, 118.0, {"from": a, "to": b, "beats": 8}
    )
    assert isinstance(reply, t.Success), reply
    assert reply.result["rule"] == "transition"
    async with Client(running.endpoint) as c:
        done = await wait_done(c, reply.result["job_id"])
    assert done["status"] == "complete", done
    return done, a, b


async def test_a_transition_marker_ends_as_a_region_pending_approval(stack):
    running, garden, models = stack
    done, _, _ = await fire_transition(running, garden)
    result = done["result"]
    assert models.stats.by_task["bridge"] == 1
    assert running.server.cas.inspect(result["hash"]).mime_type == "audio/midi"
    assert result["from_notes"] == 2 and result["to_notes"] == 2 and result["notes"] > 0

    region = garden.state.region(result["region_id"])
    assert region["position"] == 32.0 and region["duration"] == 8
    latent = region["latent"]
    assert latent["status"] == "resolved" and latent["job_id"] == done["job_id"]
    assert latent["content_hash"] == result["hash"] and latent["content_type"] == "midi"
    (pending,) = garden.state.pending()
    assert pending["region_id"] == result["region_id"] and pending["content_hash"] == result["hash"]

    # the lifecycle, in the order the garden saw it
    kinds = [type(r).__name__ for r in garden.state.history]
    assert kinds == ["CreateRegion", "UpdateLatentStarted", "UpdateLatentProgress", "UpdateLatentProgress",
                     "UpdateLatentProgress", "UpdateLatentResolved"]  # fmt: skip
    progress = [r.progress for r in garden.state.history if type(r).__name__ == "UpdateLatentProgress"]
    assert progress == sorted(progress) and all(0 < p < 1 for p in progress)
    # every garden request carried the job's trace on
    traceparents = {m.metadata.get("traceparent", "").split("-")[1] for m in garden.received}
    assert len(traceparents) == 1 and "" not in traceparents


async def test_the_pending_transition_is_approved_from_a_script(stack):
    running, garden, _ = stack
    done, _, _ = await fire_transition(running, garden)
    region_id = done["result"]["region_id"]
    async with Client(running.endpoint) as c:
        reply = await c.request(t.LuaEval(code=f"""
            local pending = garden.get_pending()
            assert(#pending == 1 and pending[1].region_id == "{region_id}")
            garden.approve(pending[1].region_id, "{DECIDER}")
            return {{left = #garden.get_pending(), regions = garden.get_regions(0, 64)}}
        """))  # fmt: skip
    assert isinstance(reply, t.Success), reply
    assert reply.result["result"]["left"] == 0
    region = garden.state.region(region_id)
    assert region["latent"]["status"] == "approved" and region["latent"]["decided_by"] == DECIDER
    assert region["playable"] and region["plays"] == done["result"]["hash"]
    assert [r["region_id"] for r in reply.result["result"]["regions"]] == [region_id]


async def test_a_failed_bridge_marks_the_region_failed(stack):
    running, garden, models = stack
    models.config.fail_rate = 1.0
    cas = running.server.cas
    a = cas.store(make_midi([(0, 60, 480, 90)]), "audio/midi")
    reply = await send_timeline_event(running.endpoint, "generate_transition", 8.0, 120.0, {"from": a, "to": a, "beats": 4})
    async with Client(running.endpoint) as c:
        done = await wait_done(c, reply.result["job_id"])
    assert done["status"] == "failed" and "backend_unavailable" in done["error"]["message"]
    (region,) = garden.state.regions()
    assert region["latent"]["status"] == "failed" and "backend_unavailable" in region["latent"]["error"]
    assert garden.state.pending() == []
