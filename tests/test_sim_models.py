"""The model simulator (``luanette-sim models``): real HTTP over loopback, no mocks.

MIDI answers are parsed back with mido and WAV answers with ``wave``, independently of
the simulator's own parsing helpers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
import wave

import aiohttp
import httpx
import mido
import pytest

from luanette.sim import make_midi, run_models, serve_in_thread
from luanette.sim.cli import build_parser
from tests.waiting import TIMED, until

# -- helpers --------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def midi_of(b64_text: str) -> mido.MidiFile:
    return mido.MidiFile(file=io.BytesIO(base64.b64decode(b64_text)))


def notes_of(mid: mido.MidiFile) -> list[tuple[int, int, int]]:
    """(absolute tick, pitch, channel) of every sounding note_on."""
    out, now = [], 0
    for msg in mido.merge_tracks(mid.tracks):
        now += msg.time
        if msg.type == "note_on" and msg.velocity > 0:
            out.append((now, msg.note, msg.channel))
    return out


def tempo_bpm_of(mid: mido.MidiFile) -> float:
    tempos = [m.tempo for t in mid.tracks for m in t if m.type == "set_tempo"]
    assert tempos, "no set_tempo meta event"
    return round(mido.tempo2bpm(tempos[0]), 1)


def phrase(pitches, *, tempo=97.0, start=0, step=480) -> bytes:
    """A MIDI file holding ``pitches`` as consecutive notes (built with mido directly)."""
    mid = mido.MidiFile(type=1, ticks_per_beat=96)  # another resolution on purpose
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo)))
    scale = 96 / 480
    first = True
    for p in pitches:
        track.append(mido.Message("note_on", note=p, velocity=90,
                                  time=int(start * scale) if first else 0))
        track.append(mido.Message("note_off", note=p, velocity=0, time=int(step * scale)))
        first = False
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


SEED_PHRASE = phrase([60, 62, 64, 65, 67, 65, 64, 62, 60, 64, 67, 72])  # 3 bars of C major


@pytest.fixture
async def sim():
    async with run_models("all") as server:
        yield server


@pytest.fixture
async def client(sim):
    async with httpx.AsyncClient(base_url=sim.url, timeout=30) as c:
        yield c


# -- health and routing -----------------------------------------------------------------


async def test_health(sim, client):
    r = await client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["kinds"] == ["orpheus", "musicgen", "llm"]
    assert "bridge" in body["tasks"]
    r = await client.get("/musicgen/health")
    assert r.json()["kind"] == "musicgen"
    assert sim.stats.requests["/health"] == 1
    assert sim.stats.model_requests == 0  # health is not a model request


async def test_single_kind_serves_only_its_routes():
    async with run_models("llm") as sim, httpx.AsyncClient(base_url=sim.url) as c:
        assert (await c.post("/predict", json={"task": "generate"})).status_code == 404
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert (await c.get("/health")).json()["kinds"] == ["llm"]
    async with run_models("orpheus") as sim, httpx.AsyncClient(base_url=sim.url) as c:
        # a fixed kind does not guess from the body: a musicgen body is an orpheus generate
        r = await c.post("/predict", json={"prompt": "rain", "duration": 1})
        assert r.status_code == 200 and r.json()["task"] == "generate"
        assert (await c.post("/orpheus/predict", json={})).status_code == 200
        assert (await c.post("/v1/chat/completions", json={})).status_code == 404


async def test_all_kind_routes_predict_by_body(client, sim):
    assert "audio_base64" in (await client.post("/predict", json={"prompt": "x", "duration": 0.1})).json()
    assert "variations" in (await client.post("/predict", json={})).json()
    assert "variations" in (await client.post("/orpheus/predict", json={"prompt": "x"})).json()
    assert "audio_base64" in (await client.post("/musicgen/predict", json={"duration": 0.1})).json()
    assert sim.stats.by_kind == {"musicgen": 2, "orpheus": 2}


# -- orpheus family ---------------------------------------------------------------------


async def test_generate_returns_distinct_valid_midi_variations(client):
    r = await client.post("/predict", json={"task": "generate", "num_variations": 3,
                                            "temperature": 1.0, "max_tokens": 1024})
    assert r.status_code == 200
    body = r.json()
    assert body["task"] == "generate"
    assert body["metadata"]["num_variations"] == 3
    assert len(body["variations"]) == 3
    raw = set()
    for v in body["variations"]:
        mid = midi_of(v["midi_base64"])
        notes = notes_of(mid)
        assert len(notes) >= 8, "a few bars of notes"
        assert v["num_tokens"] == 3 * len(notes)
        assert 80 <= tempo_bpm_of(mid) <= 140
        assert any(m.type == "time_signature" for m in mid.tracks[0])
        raw.add(v["midi_base64"])
    assert len(raw) == 3, "variations differ"


async def test_generation_is_deterministic_per_seed(client):
    req = {"task": "generate", "num_variations": 2, "seed": 42}
    a = (await client.post("/predict", json=req)).json()
    b = (await client.post("/predict", json=req)).json()
    c = (await client.post("/predict", json=req | {"seed": 43})).json()
    d = (await client.post("/predict", json=req | {"temperature": 0.2})).json()
    assert a["variations"] == b["variations"]
    assert a["variations"] != c["variations"]
    assert a["variations"] != d["variations"]
    async with run_models("orpheus", seed=5) as other, httpx.AsyncClient(base_url=other.url) as oc:
        e = (await oc.post("/predict", json=req)).json()
    assert e["variations"] != a["variations"], "the server seed changes output too"


async def test_max_tokens_caps_notes(client):
    body = (await client.post("/predict", json={"task": "generate", "max_tokens": 12})).json()
    v = body["variations"][0]
    assert len(notes_of(midi_of(v["midi_base64"]))) == 4
    assert v["num_tokens"] == 12


async def test_continue_derives_from_input(client):
    r = await client.post("/predict", json={"task": "continue", "midi_input": b64(SEED_PHRASE),
                                            "num_variations": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["task"] == "continue" and body["metadata"]["input_notes"] == 12
    for v in body["variations"]:
        mid = midi_of(v["midi_base64"])
        notes = notes_of(mid)
        assert notes, "continuation has notes"
        assert tempo_bpm_of(mid) == 97.0, "keeps the input tempo"
        # the input uses C D E F G: one step from its last note (72) is 67 or 74
        assert notes[0][1] in (67, 74), "starts a scale step from the last input note"
        assert {p % 12 for _, p, _ in notes} <= {0, 2, 4, 5, 7}, "stays in the input's scale"


async def test_generate_seeded_starts_with_the_seed(client):
    late = phrase([62, 64, 65, 67, 69], start=960)  # first note not at tick 0
    body = (await client.post("/predict", json={"task": "generate_seeded",
                                                "midi_input": b64(late)})).json()
    notes = notes_of(midi_of(body["variations"][0]["midi_base64"]))
    assert [p for _, p, _ in notes[:4]] == [62, 64, 65, 67], "the seed's first bar, verbatim"
    assert notes[0][0] == 0
    assert len(notes) > 4 and notes[-1][0] >= 4 * 480, "then new material"


async def test_bridge_walks_from_a_to_b(client):
    a = phrase([60, 64, 67], tempo=110)
    b = phrase([79, 77, 76], tempo=70)
    r = await client.post("/predict", json={"task": "bridge", "section_a": b64(a),
                                            "section_b": b64(b), "num_variations": 2})
    assert r.status_code == 200
    for v in r.json()["variations"]:
        mid = midi_of(v["midi_base64"])
        pitches = [p for _, p, _ in notes_of(mid)]
        # the scale is the pitch classes used (C E F G): one step around 67 is 64..72
        assert pitches[0] in (64, 67, 72), "starts next to section_a's last note"
        assert {p % 12 for p in pitches} <= {0, 4, 5, 7}
        assert pitches[-1] == 79, "lands on section_b's first note"
        assert tempo_bpm_of(mid) == 110.0
    # capped by max_tokens, the bridge still lands on section_b
    r = await client.post("/predict", json={"task": "bridge", "section_a": b64(a),
                                            "section_b": b64(b), "max_tokens": 6})
    v = r.json()["variations"][0]
    capped = notes_of(midi_of(v["midi_base64"]))
    assert len(capped) == 2 and v["num_tokens"] == 6 and capped[-1][1] == 79
    # no task + section_a means bridge; midi_input / midi_input_b are aliases
    r = await client.post("/predict", json={"section_a": b64(a)})
    assert r.json()["task"] == "bridge"
    r = await client.post("/predict", json={"task": "bridge", "midi_input": b64(a),
                                            "midi_input_b": b64(b)})
    assert [p for _, p, _ in notes_of(midi_of(r.json()["variations"][0]["midi_base64"]))][-1] == 79


async def test_loops_are_drums(client):
    body = (await client.post("/predict", json={"task": "loops", "num_variations": 2,
                                                "seed_midi": b64(SEED_PHRASE)})).json()
    assert body["task"] == "loops"
    for v in body["variations"]:
        mid = midi_of(v["midi_base64"])
        notes = notes_of(mid)
        assert {c for _, _, c in notes} == {9}, "GM drum channel"
        assert {36, 38, 42} <= {p for _, p, _ in notes}
        assert tempo_bpm_of(mid) == 97.0, "seed MIDI sets the tempo"
    assert (await client.post("/predict", json={"task": "loops"})).status_code == 200


async def test_classify_returns_labels_and_scores(client):
    quantized = b64(SEED_PHRASE)
    body = (await client.post("/predict", json={"task": "classify", "midi_input": quantized})).json()
    assert body["task"] == "classify" and "variations" not in body
    assert set(body["labels"]) == {"human", "ai"}
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert abs(sum(body["scores"]) - 1.0) < 1e-6
    c = body["classification"]
    assert c["is_human"] is False and c["confidence"] == max(body["scores"])
    assert body["num_tokens"] == 36
    # loose timing and varied velocities read as human
    loose = make_midi([(i * 480 + (i * 37) % 90, 60 + i % 7, 400, 50 + 7 * i) for i in range(10)])
    human = (await client.post("/predict", json={"task": "classify", "midi_input": b64(loose)})).json()
    assert human["classification"]["probabilities"]["human"] > c["probabilities"]["human"]
    assert human["labels"][0] == "human"


# -- musicgen and llm -------------------------------------------------------------------


async def test_musicgen_returns_a_wav_of_the_requested_duration(client):
    r = await client.post("/musicgen/predict", json={
        "prompt": "slow ambient pad", "duration": 2.5, "temperature": 1.0, "top_k": 250,
        "top_p": 0.0, "guidance_scale": 3.0, "do_sample": True})
    assert r.status_code == 200
    body = r.json()
    assert (body["sample_rate"], body["channels"], body["num_samples"]) == (32000, 1, 80000)
    assert body["duration"] == 2.5
    with wave.open(io.BytesIO(base64.b64decode(body["audio_base64"]))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 32000)
        assert w.getnframes() == 80000
        frames = w.readframes(w.getnframes())
    samples = memoryview(frames).cast("h")
    peak = max(abs(s) for s in samples)
    assert 0 < peak < 0.2 * 32767, "a quiet, non-silent sine"
    other = (await client.post("/musicgen/predict", json={"prompt": "fast drums", "duration": 2.5})).json()
    again = (await client.post("/musicgen/predict", json={"prompt": "slow ambient pad", "duration": 2.5})).json()
    assert again["audio_base64"] == body["audio_base64"]
    assert other["audio_base64"] != body["audio_base64"], "pitch depends on the prompt"


async def test_llm_chat_completion_shape(client):
    req = {"model": "qwen", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "write a bassline in D minor please"}]}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "qwen"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert "write a bassline in D minor please" in choice["message"]["content"]
    u = body["usage"]
    assert u["prompt_tokens"] == 9 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    again = (await client.post("/llm/v1/chat/completions", json=req)).json()
    assert again["choices"] == body["choices"] and again["id"] == body["id"]

    js = (await client.post("/v1/chat/completions", json=req | {
        "response_format": {"type": "json_object"}})).json()
    parsed = json.loads(js["choices"][0]["message"]["content"])
    assert parsed["words"] == 7 and parsed["summary"].startswith("write a bassline")

    short = (await client.post("/v1/chat/completions", json=req | {"max_tokens": 2})).json()
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 2
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "sim-llm"


# -- invalid input ------------------------------------------------------------------------

NO_NOTES = phrase([])

INVALID = [
    ("/predict", {"task": "continue", "midi_input": "%%% not base64"}, "midi_input", "base64"),
    ("/predict", {"task": "continue", "midi_input": b64(b"hello world")}, "midi_input", "MIDI"),
    ("/predict", {"task": "continue", "midi_input": b64(b"MThd\x00\x00\x00\x06\x00")},
     "midi_input", "MIDI"),
    ("/predict", {"task": "continue", "midi_input": b64(NO_NOTES)}, "midi_input", "no notes"),
    ("/predict", {"task": "continue"}, "midi_input", "required"),
    ("/predict", {"task": "generate_seeded", "midi_input": 12}, "midi_input", "base64 string"),
    ("/predict", {"task": "bridge", "section_b": b64(SEED_PHRASE)}, "section_a", "required"),
    ("/predict", {"task": "bridge", "section_a": b64(SEED_PHRASE), "section_b": "AAAA"},
     "section_b", "MIDI"),
    ("/predict", {"task": "classify"}, "midi_input", "required"),
    ("/predict", {"task": "remix"}, "task", "unknown task"),
    ("/predict", {"task": "generate", "temperature": "hot"}, "temperature", "number"),
    ("/predict", {"task": "generate", "top_p": 1.5}, "top_p", "<= 1"),
    ("/predict", {"task": "generate", "num_variations": 0}, "num_variations", "between 1 and 8"),
    ("/predict", {"task": "generate", "max_tokens": 2.5}, "max_tokens", "integer"),
    ("/musicgen/predict", {"prompt": "x", "duration": 0}, "duration", "> 0"),
    ("/musicgen/predict", {"prompt": "x", "duration": 31}, "duration", "<= 30"),
    ("/musicgen/predict", {"prompt": ["x"]}, "prompt", "string"),
    ("/musicgen/predict", {"do_sample": "yes"}, "do_sample", "true or false"),
]


@pytest.mark.parametrize("path,payload,field,words", INVALID,
                         ids=[f"{f}-{w}" for _, _, f, w in INVALID])
async def test_invalid_input_answers_400_with_a_json_error(sim, client, path, payload, field, words):
    r = await client.post(path, json=payload)
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "invalid_request"
    assert body["error"]["field"] == field
    assert words.lower() in body["error"]["message"].lower()
    assert body["detail"] == body["error"]["message"]
    assert sim.stats.bad_requests == 1 and sim.stats.statuses[400] == 1


async def test_invalid_bodies(client, sim):
    r = await client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = await client.post("/predict", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]
    for bad in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "user", "content": 5}]},
                {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}):
        r = await client.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400
        err = r.json()["error"]  # OpenAI error shape
        assert err["type"] == "invalid_request" and err["message"] and err["code"] == 400
    assert sim.stats.bad_requests == 6


# -- switches -------------------------------------------------------------------------------


async def test_latency_delays_model_requests_not_health():
    async with run_models("all", latency_ms=300) as sim, httpx.AsyncClient(base_url=sim.url, timeout=60) as c:
        for path, body in (("/predict", {"task": "generate"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            t = time.perf_counter()
            assert (await c.post(path, json=body)).status_code == 200
            assert time.perf_counter() - t >= 0.3
        # With an hour of latency, whatever still gets an answer was not delayed: health,
        # and invalid input (rejected before the simulated work).
        sim.config.latency_ms = 3_600_000
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/predict", json={"task": "nope"})).status_code == 400


@TIMED
async def test_latency_does_not_block_the_loop(timed):
    # hold_until: none is answered before all 20 are in, so they are surely in flight together
    async with run_models("orpheus", latency_ms=500, hold_until=0 if timed else 20) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=60) as c:
        t = time.perf_counter()
        rs = await asyncio.gather(*(c.post("/predict", json={"seed": i}) for i in range(20)))
        elapsed = time.perf_counter() - t
    assert all(r.status_code == 200 for r in rs)
    assert elapsed >= 0.5
    assert sim.stats.peak_in_flight == 20
    if timed:
        assert elapsed < 1.5


async def test_hold_until_lets_requests_go_once_that_many_wait():
    async with run_models("orpheus", hold_until=3) as sim, httpx.AsyncClient(base_url=sim.url, timeout=60) as c:
        first = [asyncio.create_task(c.post("/predict", json={"seed": i})) for i in range(2)]
        await until(lambda: sim.stats.in_flight == 2, "two requests held")
        assert not any(f.done() for f in first)
        assert (await c.get("/health")).status_code == 200  # not a model request: not held
        third = await c.post("/predict", json={"seed": 3})  # the third opens the barrier
        assert third.status_code == 200
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        assert (await c.post("/predict", json={})).status_code == 200  # open for good
        assert sim.stats.peak_in_flight == 3
        await c.post("/_sim/reset")  # ... until a reset closes it again
        held = asyncio.create_task(c.post("/predict", json={}))
        await until(lambda: sim.stats.in_flight == 1, "a request held again")
        assert not held.done()
        r = await c.post("/_sim/config", json={"hold_until": 1})  # (a switch like the others)
        assert r.status_code == 200 and r.json()["hold_until"] == 1
        assert (await c.post("/predict", json={})).status_code == 200
        assert (await held).status_code == 200


async def test_busy_burst_then_success():
    async with run_models("all", busy_burst=3, retry_after=2) as sim, \
            httpx.AsyncClient(base_url=sim.url) as c:
        statuses = []
        for _ in range(5):
            r = await c.post("/predict", json={"task": "generate"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "2"
                assert r.json()["error"]["type"] == "busy"
        assert statuses == [429, 429, 429, 200, 200]
        assert sim.stats.busy_sent == 3
        # OpenAI error shape on the llm route
        async with run_models("llm", busy_burst=1, retry_after=0.05) as llm:
            r = await c.post(f"{llm.url}/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429 and r.headers["Retry-After"] == "0.05"
            assert r.json()["error"]["type"] == "busy"


async def test_busy_every_nth():
    async with run_models("musicgen", busy_every=3) as sim, httpx.AsyncClient(base_url=sim.url) as c:
        statuses = [(await c.post("/predict", json={"duration": 0.05})).status_code for _ in range(7)]
    assert statuses == [200, 200, 429, 200, 200, 429, 200]
    assert sim.stats.statuses == {200: 5, 429: 2}


async def test_max_concurrency_answers_429_when_full():
    async with run_models("orpheus", latency_ms=400, max_concurrency=2) as sim, \
            httpx.AsyncClient(base_url=sim.url) as c:
        first = [asyncio.create_task(c.post("/predict", json={})) for _ in range(2)]
        while sim.stats.in_flight < 2:
            await asyncio.sleep(0.01)
        extra = await asyncio.gather(*(c.post("/predict", json={}) for _ in range(3)))
        assert [r.status_code for r in extra] == [429, 429, 429]
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        assert (await c.post("/predict", json={})).status_code == 200  # free again


async def test_fail_rate_is_seeded_and_uses_fail_status():
    async def run(seed: int) -> list[int]:
        async with run_models("orpheus", fail_rate=0.3, fail_status=503, seed=seed) as sim, \
                httpx.AsyncClient(base_url=sim.url) as c:
            out = [(await c.post("/predict", json={"max_tokens": 3})).status_code for _ in range(100)]
            assert sim.stats.failures_sent == out.count(503)
            return out

    a, b, other = await run(7), await run(7), await run(8)
    assert set(a) == {200, 503}
    assert 15 <= a.count(503) <= 45
    assert a == b, "same seed, same sequence"
    assert a != other
    async with run_models("all", fail_rate=1.0) as sim, httpx.AsyncClient(base_url=sim.url) as c:
        r = await c.post("/predict", json={})
        assert r.status_code == 500 and r.json()["error"]["type"] == "simulated_failure"
        assert (await c.get("/health")).status_code == 200, "health never fails"


async def test_switches_change_at_run_time(sim, client):
    sim.config.busy_burst = 1
    assert (await client.post("/predict", json={})).status_code == 429
    r = await client.post("/_sim/config", json={"busy_burst": 0, "fail_rate": 1.0, "fail_status": 502})
    assert r.status_code == 200 and r.json()["fail_status"] == 502
    assert (await client.post("/predict", json={})).status_code == 502
    r = await client.post("/_sim/config", json={"fail_rate": 2})
    assert r.status_code == 400 and "fail_rate" in r.json()["detail"]
    r = await client.post("/_sim/config", json={"kind": "llm"})
    assert r.status_code == 400
    stats = (await client.get("/_sim/stats")).json()
    assert stats["statuses"] == {"429": 1, "502": 1} and stats["busy_sent"] == 1
    assert (await client.post("/_sim/reset")).json()["model_requests"] == 0


async def test_stats_record_traceparent_and_bodies(sim, client):
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.post("/predict", json={"task": "generate", "seed": 1}, headers={"traceparent": tp})
    await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    first, second = sim.stats.records
    assert (first.traceparent, first.kind, first.task, first.status) == (tp, "orpheus", "generate", 200)
    assert first.body == {"task": "generate", "seed": 1}
    assert first.finished >= first.started
    assert (second.traceparent, second.kind) == (None, "llm")
    assert sim.stats.traceparents == [tp, None]
    assert sim.stats.by_task == {"generate": 1}


# -- scale ----------------------------------------------------------------------------------


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} file descriptors, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@TIMED
async def test_a_thousand_concurrent_slow_requests_finish_in_under_3s(timed):
    """1,000 requests in flight together (timed: each held 1 s by the simulator, answered
    in < 3 s in all; otherwise held until all 1,000 are in).

    The client is one aiohttp session with its connection limit raised. httpx (httpcore
    1.0.x) cannot drive this: its pool rescans every connection per request
    (O(N^2)) and one AsyncClient takes ~30 s for the same burst here, so it would
    measure the client, not the simulator."""
    _raise_fd_limit(4096)
    switches = {"latency_ms": 1000} if timed else {"hold_until": 1000}
    async with run_models("all", **switches) as sim:
        connector = aiohttp.TCPConnector(limit=0)  # no connection cap
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=100)) as session:

            async def one(i: int) -> tuple[int, dict]:
                body = {"task": "generate", "max_tokens": 96} if i % 2 else \
                    {"messages": [{"role": "user", "content": f"job {i % 10}"}]}
                path = "/predict" if i % 2 else "/v1/chat/completions"
                async with session.post(sim.url + path, json=body) as r:
                    return r.status, await r.json()

            t = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(1000)))
            elapsed = time.perf_counter() - t
    assert [s for s, _ in results] == [200] * 1000
    assert all(("variations" in b) if i % 2 else ("choices" in b) for i, (_, b) in enumerate(results))
    assert sim.stats.model_requests == 1000
    if timed:
        assert elapsed < 3.0, f"1,000 x 1 s requests took {elapsed:.2f} s"
        assert elapsed >= 1.0
        assert sim.stats.peak_in_flight >= 900, "requests were served concurrently"
    else:
        assert sim.stats.peak_in_flight == 1000


# -- threads and the command line -------------------------------------------------------------


def test_serve_in_thread_for_sync_callers():
    with serve_in_thread("musicgen", latency_ms=50) as sim:
        with httpx.Client(base_url=sim.url) as c:
            t = time.perf_counter()
            r = c.post("/predict", json={"prompt": "hum", "duration": 0.5})
            assert time.perf_counter() - t >= 0.05
        assert r.status_code == 200 and r.json()["num_samples"] == 16000
        assert sim.stats.by_kind == {"musicgen": 1}
        url = sim.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the simulator printed nothing in time"
    return proc.stdout.readline()


def test_cli_prints_url_and_serves():
    proc = subprocess.Popen(
        [sys.executable, "-m", "luanette.sim.cli", "models", "--kind", "orpheus", "--port", "0",
         "--default-task", "loops", "--busy-burst", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        line = _read_line(proc, 20)
        assert line.startswith("listening http://127.0.0.1:"), line
        url = line.split()[1]
        with httpx.Client(base_url=url, timeout=10) as c:
            health = c.get("/health").json()
            assert health["status"] == "ok" and health["kinds"] == ["orpheus"]
            assert c.post("/predict", json={}).status_code == 429  # --busy-burst 1
            r = c.post("/predict", json={})
            assert r.status_code == 200 and r.json()["task"] == "loops"  # --default-task
            assert c.get("/_sim/stats").json()["busy_sent"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_switches(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["models", "--fail-rate", "1.5"])
    assert exc.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # a subcommand is required
    proc = subprocess.run(
        [sys.executable, "-m", "luanette.sim.cli", "models", "--port", "0", "--fail-status", "200"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "fail_status" in proc.stderr


async def test_chat_streams_server_sent_events_that_add_up_to_the_plain_answer(client):
    body = {"messages": [{"role": "user", "content": "a quiet tune in d minor please"}]}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    r = await client.post("/v1/chat/completions",
                          json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in r.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    deltas = [c["delta"].get("content", "") for e in events for c in e["choices"]]
    assert sum(1 for d in deltas if d) > 3  # word by word
    assert "".join(deltas) == plain["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == plain["usage"] and events[-1]["choices"] == []
    assert any(c.get("finish_reason") == "stop" for e in events for c in e["choices"])
