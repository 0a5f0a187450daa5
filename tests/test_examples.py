"""Every script in examples/ runs end to end as a job, against the model simulator."""

from __future__ import annotations

import io
from pathlib import Path

import mido
import pytest

from hooteproto.client import Client
from luanette.sim import make_midi, run_models
from tests.test_jobs import run, store, wait_done
from tests.test_models_e2e import settings_for

pytestmark = pytest.mark.timeout(90)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
async def stack(make_server):
    async with run_models("all", seed=3) as sim:
        running = await make_server(settings=settings_for(sim.url))
        async with Client(running.endpoint) as c:
            yield running, c, sim


async def job(c, name: str, params=None) -> dict:
    digest = await store(c, (EXAMPLES / name).read_text())
    done = await wait_done(c, (await run(c, digest, params))["job_id"])
    assert done["status"] == "complete", done
    return done["result"]


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.lua")} == {
        "hello.lua", "midi_process.lua", "multi_variation.lua", "otel_example.lua", "transition.lua",
        # seed 002's garden.* scripts (transition.lua's garden side: tests/test_garden_flow.py)
        "start_playback.lua", "build_timeline.lua", "orchestrate_generation.lua", "query_regions.lua",
        # seed 003's scripting model (require from examples/modules, core.all, a reviewed session)
        "review_variations.lua",
    }  # fmt: skip
    assert {p.name for p in (EXAMPLES / "modules").glob("*.lua")} == {"variations.lua"}
    # seed 004's plugins (run by tests/test_plugins.py)
    assert {p.name for p in (EXAMPLES / "plugins").glob("*.lua")} == {
        "studio_hooks.lua",
        "generation_pipeline.lua",  # run by tests/test_pipelines.py
        "review_flow.lua",  # run by tests/test_flows.py
    }


async def test_hello(stack):
    _, c, _ = stack
    assert await job(c, "hello.lua") == "hello, world"
    assert await job(c, "hello.lua", {"name": "garden"}) == "hello, garden"


async def test_midi_process(stack):
    running, c, _ = stack
    source = running.server.cas.store(make_midi([(0, 60, 400, 90), (528, 64, 400, 90), (912, 67, 400, 90)]), "audio/midi")
    result = await job(c, "midi_process.lua", {"source": source, "semitones": 2, "grid": 1})
    song = mido.MidiFile(file=io.BytesIO(running.server.cas.retrieve(result["hash"])))
    starts, tick = [], 0
    for m in song.tracks[0]:
        tick += m.time
        if m.type == "note_on" and m.velocity:
            starts.append((tick, m.note))
    assert starts == [(0, 62), (480, 66), (960, 69)]  # transposed by 2, on the beat grid
    assert result["notes"] == 3


async def test_multi_variation(stack):
    running, c, sim = stack
    result = await job(c, "multi_variation.lua", {"count": 3})
    hashes = [v["hash"] for v in result["variations"]]
    assert result["failed"] == 0 and len(set(hashes)) == 3
    assert all(running.server.cas.exists(h) for h in hashes)
    assert sim.stats.by_task["generate"] == 3


async def test_transition(stack):
    running, c, sim = stack
    a = running.server.cas.store(make_midi([(0, 60, 480, 90), (480, 62, 480, 90)]), "audio/midi")
    b = running.server.cas.store(make_midi([(0, 67, 480, 90), (480, 69, 480, 90)]), "audio/midi")
    result = await job(c, "transition.lua", {"current_section": a, "next_section": b, "beats_available": 8})
    assert result["from_notes"] == 2 and result["to_notes"] == 2 and result["notes"] > 0
    assert running.server.cas.inspect(result["hash"]).mime_type == "audio/midi"
    assert sim.stats.by_task["bridge"] == 1


async def test_otel_example(make_server):
    from tests.test_telemetry import Traced

    traced = Traced()
    async with run_models("all", seed=3) as sim:
        running = await make_server(settings=settings_for(sim.url), telemetry=traced.telemetry)
        async with Client(running.endpoint) as c:
            result = await job(c, "otel_example.lua", {"keep_pitch_min": 60})
    assert 0 < result["kept"] <= result["notes"]
    song = mido.MidiFile(file=io.BytesIO(running.server.cas.retrieve(result["hash"])))
    assert all(m.note >= 60 for track in song.tracks for m in track if m.type in ("note_on", "note_off"))
    (execute,) = await traced.settle("luanette.script.execute")
    assert result["trace_id"] == f"{execute.context.trace_id:032x}"
    assert result["traceparent"].split("-")[2] == f"{execute.context.span_id:016x}"
    assert execute.attributes["script.name"] == "otel_example" and execute.attributes["music.temperature"] == 1.0
    assert [e.name for e in execute.events] == ["generate.start", "generate.done"]
    (call,) = traced.named("luanette.backend.call")
    assert call.parent.span_id == execute.context.span_id
    assert sim.stats.traceparents[0].split("-")[2] == f"{call.context.span_id:016x}"
    names = {
        metric.name
        for rm in traced.metrics.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert {"luanette.example.notes", "luanette.example.cpu_ms"} <= names


@pytest.fixture
async def garden_stack(make_server):
    from luanette.settings import parse_settings
    from luanette.sim.garden import GardenSimServer

    garden = GardenSimServer()
    await garden.start()
    try:
        running = await make_server(settings=parse_settings({"garden": {"endpoint": garden.endpoint}}))
        async with Client(running.endpoint) as c:
            yield c, garden
    finally:
        await garden.stop()


async def test_seed_002_garden_examples(garden_stack):
    c, garden = garden_stack
    status = await job(c, "start_playback.lua")
    assert status == {"playing": True, "position": 0.0, "tempo": 120.0}
    assert garden.state.transport()["state"] == "playing"

    regions = await job(c, "build_timeline.lua")
    (region,) = regions
    assert region["position"] == 16.0 and region["duration"] == 16.0 and not region["is_latent"]

    generated = await job(c, "orchestrate_generation.lua")
    assert generated["approved"] is True
    latent = garden.state.region(generated["region_id"])["latent"]
    assert latent["status"] == "approved" and latent["content_hash"] == "sha256:abc123..."
    assert latent["decided_by"] == "00000000-0000-0000-0000-000000000001"

    rows = await job(c, "query_regions.lua")
    assert [row["id"] for row in rows] == [generated["region_id"]]


async def test_review_variations(make_server):
    """require + core.all over orpheus variations + a session kept for review, then
    committed by a client: the garden sees the regions only after the commit."""
    from hooteproto import types as t
    from luanette.settings import parse_settings
    from luanette.sim.garden import GardenSimServer

    garden = GardenSimServer()
    await garden.start()
    try:
        async with run_models("all", seed=3) as sim:
            settings = parse_settings({
                "garden": {"endpoint": garden.endpoint},
                "backends": {"orpheus": {"url": sim.url, "concurrency": 4}},
            })
            running = await make_server(settings=settings, modules=str(EXAMPLES / "modules"))
            async with Client(running.endpoint) as c:
                digest = await store(c, (EXAMPLES / "review_variations.lua").read_text())
                done = await wait_done(c, (await run(c, digest, {"count": 3, "at": 4, "beats": 8}))["job_id"])
                assert done["status"] == "complete", done
                result = done["result"]
                made = result["variations"]
                assert len(made) == 3 and result["operations"] == 3
                assert all(v["notes"] > 0 for v in made)
                assert sim.stats.by_task["generate"] == 3
                assert garden.state.regions() == []  # held for review
                (session,) = (await c.request(t.SessionList(job_id=done["job_id"]))).result
                committed = await c.request(t.SessionCommit(session_id=session["session_id"]))
                assert isinstance(committed, t.Success), committed
        regions = sorted(garden.state.regions(), key=lambda r: r["position"])
        assert [r["position"] for r in regions] == [4.0, 12.0, 20.0]
        assert [r["artifact_id"] for r in regions] == [v["hash"] for v in made]
    finally:
        await garden.stop()
