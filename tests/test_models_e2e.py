"""A stored script calls model services (the simulator) from a job, through the daemon."""

from __future__ import annotations

import io
import wave

import mido
import pytest

from hooteproto.client import Client
from luanette.settings import parse_settings
from luanette.sim import run_models
from tests.test_jobs import run, store, wait_done

pytestmark = pytest.mark.timeout(90)


def settings_for(sim_url: str, **backend_overrides):
    backends = {
        name: {"url": f"{sim_url}/{family}"} | backend_overrides
        for name, family in [
            ("orpheus", "orpheus"), ("orpheus_bridge", "orpheus"), ("orpheus_loops", "orpheus"),
            ("orpheus_classifier", "orpheus"), ("musicgen", "musicgen"), ("llm", "llm"),
        ]
    }  # fmt: skip
    return parse_settings({"backends": backends})


async def test_job_generates_midi_and_audio_into_the_cas(make_server):
    async with run_models("all", seed=7) as sim:
        running = await make_server(settings=settings_for(sim.url))
        script = """
        function main(p)
          local midi_out = orpheus.generate{num_variations = 2, max_tokens = 256}
          local audio = musicgen.generate{prompt = "warm pad", duration = 1}
          local words = llm.chat{messages = {{role = "user", content = "name this tune"}}}
          return {midi = midi_out.variations, audio = audio, words = words.content}
        end
        """
        async with Client(running.endpoint) as c:
            digest = await store(c, script)
            done = await wait_done(c, (await run(c, digest))["job_id"])
        assert done["status"] == "complete", done
        cas = running.server.cas
        variations = done["result"]["midi"]
        assert len(variations) == 2 and variations[0]["hash"] != variations[1]["hash"]
        song = mido.MidiFile(file=io.BytesIO(cas.retrieve(variations[0]["hash"])))
        assert any(m.type == "note_on" for m in song.tracks[0])
        assert cas.inspect(variations[0]["hash"]).mime_type == "audio/midi"
        with wave.open(io.BytesIO(cas.retrieve(done["result"]["audio"]["hash"]))) as w:
            assert w.getframerate() == 32000 and w.getnframes() == 32000
        assert isinstance(done["result"]["words"], str) and done["result"]["words"]
        assert sim.stats.by_kind["orpheus"] >= 1 and sim.stats.by_kind["musicgen"] >= 1


async def test_unreachable_backend_is_a_catchable_backend_unavailable(make_server):
    from tests.conftest import free_port

    running = await make_server(settings=settings_for(f"http://127.0.0.1:{free_port()}", retries=1))
    script = """
    local ok, err = pcall(orpheus.generate, {})
    if ok then return "unexpected" end
    return err
    """
    async with Client(running.endpoint) as c:
        digest = await store(c, script)
        done = await wait_done(c, (await run(c, digest))["job_id"])
    assert done["status"] == "complete"
    assert "backend_unavailable" in done["result"]


async def test_backend_concurrency_holds_daemon_wide_across_worker_processes(make_server):
    # jobs on two worker processes; the backend takes one request at a time: the front
    # makes every backend request, so its limit holds whichever worker asks
    async with run_models("all", seed=3, latency_ms=150) as sim:
        running = await make_server(workers=2, settings=settings_for(sim.url, concurrency=1))
        script = 'return backend.call("orpheus", {task = "generate", max_tokens = 3}, {raw = true}).task'
        async with Client(running.endpoint) as c:
            digest = await store(c, script)
            jobs = [(await run(c, digest))["job_id"] for _ in range(6)]
            done = [await wait_done(c, job) for job in jobs]
        assert [d["result"] for d in done] == ["generate"] * 6
        assert sim.stats.peak_in_flight == 1
        # every request went through the front
        assert running.server.engine.stats.service_calls >= 6
