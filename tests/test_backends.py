"""Model backends: settings, the HTTP client, and the orpheus / musicgen / llm / backend
namespaces, end to end.

Everything is real: the model simulator over loopback HTTP, a CAS in ``tmp_path``, Lua
through ``runtime.run_script``.  Generated MIDI is parsed back with mido and WAV with
``wave``, independently of the simulator's own helpers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import aiohttp
import mido
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from luanette import runtime
from luanette.backends import (
    BackendRejected,
    Backends,
    BackendUnavailable,
    UnknownBackend,
)
from luanette.cas import Cas
from luanette.settings import (
    DEFAULT_BACKENDS,
    Settings,
    SettingsError,
    load_settings,
    parse_settings,
)
from luanette.sim import run_models
from luanette.stdlib.models import model_namespaces
from luanette.telemetry import Telemetry, parent_context
from tests.test_sim_models import notes_of as sim_notes_of
from tests.waiting import TIMED, until

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
MODEL_BACKENDS = (
    "orpheus", "orpheus_bridge", "orpheus_loops", "orpheus_classifier", "orpheus_children",
    "orpheus_mono", "musicgen", "llm",
)


# ------------------------------------------------------------------------- helpers


def settings_for(url: str, *, extra: dict | None = None, **backend: object) -> Settings:
    """Every model backend pointed at ``url`` (fast retries unless overridden)."""
    raw: dict = {"backends": {n: {"url": url, "retry_backoff_s": 0.01, **backend} for n in MODEL_BACKENDS}}
    return parse_settings(_merge(raw, extra or {}), source="test")


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def phrase(pitches, *, tempo=100.0, step=480, tpb=480, channel=0, velocities=None) -> bytes:
    """An SMF with ``pitches`` as consecutive notes, built with mido directly."""
    mid = mido.MidiFile(type=1, ticks_per_beat=tpb)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo), time=0))
    for i, p in enumerate(pitches):
        v = velocities[i] if velocities else 90
        track.append(mido.Message("note_on", channel=channel, note=p, velocity=v, time=0))
        track.append(mido.Message("note_off", channel=channel, note=p, velocity=0, time=step))
    mid.save(file=(buf := io.BytesIO()))
    return buf.getvalue()


def notes_of(data: bytes) -> list[tuple[int, int, int]]:
    """(absolute tick, pitch, channel) of every sounding note, in order."""
    return sim_notes_of(mido.MidiFile(file=io.BytesIO(data)))


def tempo_of(data: bytes) -> float:
    mid = mido.MidiFile(file=io.BytesIO(data))
    return round(mido.tempo2bpm(next(m.tempo for t in mid.tracks for m in t if m.type == "set_tempo")), 1)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(code: str, namespaces, *, params=None, timeout: float = 10.0):
    outcome = await runtime.run_script(code, params, namespaces=namespaces,
                                       limits=runtime.Limits(timeout_s=timeout))
    return outcome.result


@pytest.fixture
def cas(tmp_path) -> Cas:
    return Cas(tmp_path / "cas")


@pytest.fixture
async def sim():
    async with run_models("all", retry_after=0.05) as s:
        yield s


@pytest.fixture
async def env(cas):
    """Factory: ``env(settings, telemetry=...)`` -> (namespaces, backends); every
    Backends is closed at teardown."""
    made: list[Backends] = []

    def make(settings: Settings, *, telemetry=None):
        backends = Backends(settings.backends, telemetry=telemetry)
        made.append(backends)
        return model_namespaces(backends, cas, settings.models), backends

    yield make
    for b in made:
        await b.aclose()


# ------------------------------------------------------------------------ settings


def test_defaults_without_a_file():
    s = load_settings(None)
    assert s == Settings()
    ports = {name: int(b.url.rsplit(":", 1)[1]) for name, b in s.backends.items()}
    assert ports["orpheus"] == 2000 and ports["orpheus_classifier"] == 2001
    assert ports["orpheus_bridge"] == 2002 and ports["orpheus_loops"] == 2003
    assert ports["musicgen"] == 2006 and ports["llm"] == 2020
    assert s.backends["llm"].kind == "openai" and s.backends["orpheus"].kind == "predict"
    o = s.backends["orpheus"]
    assert (o.concurrency, o.timeout_s, o.retries, o.retry_backoff_s) == (1, 300.0, 5, 0.5)
    r = s.models
    assert (r.orpheus.generate, r.orpheus.continue_, r.orpheus.bridge, r.orpheus.loops, r.orpheus.classify) == (
        "orpheus", "orpheus", "orpheus_bridge", "orpheus_loops", "orpheus_classifier")
    assert (r.musicgen.generate, r.llm.chat) == ("musicgen", "llm")


def test_full_file(tmp_path):
    path = tmp_path / "luanette.toml"
    path.write_text("""
[backends.orpheus]
url = "http://gpu-box:2000/"
concurrency = 2
timeout_s = 120
connect_timeout_s = 3
retries = 7
retry_backoff_s = 0.25
retry_max_backoff_s = 4.5
max_response_bytes = 1048576
headers = { X-Team = "music" }

[backends.tagger]
url = "https://tagger.example:8443/api"
kind = "predict"

[backends.hosted]
url = "https://llm.example/v1"
kind = "openai"
headers = { Authorization = "Bearer abc" }

[models.orpheus]
generate = "orpheus"
continue = "orpheus_mono"
bridge = "tagger"
variants = { base = "orpheus", fast = "tagger" }

[models.musicgen]
generate = "musicgen"

[models.llm]
chat = "hosted"
model = "qwen3"
""")
    s = load_settings(path)
    o = s.backends["orpheus"]
    assert o.url == "http://gpu-box:2000"  # trailing slash dropped
    assert (o.concurrency, o.timeout_s, o.connect_timeout_s, o.retries) == (2, 120.0, 3.0, 7)
    assert (o.retry_backoff_s, o.retry_max_backoff_s, o.max_response_bytes) == (0.25, 4.5, 1048576)
    assert o.headers == {"X-Team": "music"}
    assert s.backends["tagger"].url == "https://tagger.example:8443/api"
    assert s.backends["tagger"].concurrency == 1  # a new backend gets the defaults
    assert s.backends["hosted"].kind == "openai"
    assert s.backends["musicgen"] == DEFAULT_BACKENDS["musicgen"]  # untouched built-ins stay
    assert s.models.orpheus.continue_ == "orpheus_mono" and s.models.orpheus.bridge == "tagger"
    assert s.models.orpheus.variants == {"base": "orpheus", "fast": "tagger"}
    assert s.models.orpheus.loops == "orpheus_loops"  # unset keys keep their defaults
    assert (s.models.llm.chat, s.models.llm.model) == ("hosted", "qwen3")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[backends.orpheus]\nconcurency = 2', "f.toml: backends.orpheus.concurency: unknown key (known: url, kind,"),
        ('[backends.orpheus]\nconcurrency = "four"', "f.toml: backends.orpheus.concurrency: expected int, got str"),
        ('[backends.orpheus]\nconcurrency = 0', "f.toml: backends.orpheus.concurrency: expected int >= 1"),
        ('[backends.orpheus]\ntimeout_s = "soon"', "f.toml: backends.orpheus.timeout_s: expected float, got str"),
        ('[backends.orpheus]\nkind = "grpc"', "f.toml: backends.orpheus.kind: invalid enum value 'grpc'"),
        ('[backends.orpheus]\nurl = "ftp://x"', "f.toml: backends.orpheus.url: must be an http:// or https:// URL"),
        ('[backends.new_one]\nconcurrency = 2', "f.toml: backends.new_one.url: required"),
        ('[backends]\norpheus = 3', "f.toml: backends.orpheus: must be a table"),
        ('[server]\nbind = "x"', "f.toml: server: unknown section"),
        ('[models.orpheus]\nbridg = "x"', "f.toml: models.orpheus.bridg: unknown key"),
        ('[models.orpheus]\nbridge = "nope"', "f.toml: models.orpheus.bridge: no backend named 'nope'"),
        ('[models.llm]\nchat = "orpheus"', "f.toml: models.llm.chat: backend 'orpheus' has kind 'predict'"),
        ('[models.orpheus]\ncontinue = "llm"', "f.toml: models.orpheus.continue: backend 'llm' has kind 'openai'"),
        ('[models.orpheus.variants]\nfast = "nope"', "f.toml: models.orpheus.variants.fast: no backend named"),
    ],
)
def test_settings_errors_name_the_key(tmp_path, toml, expected):
    path = tmp_path / "f.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as exc:
        load_settings(path)
    message = str(exc.value).replace(str(tmp_path) + os.sep, "")
    assert message.startswith(expected), message


def test_settings_file_errors(tmp_path):
    with pytest.raises(SettingsError, match=r"no such config file"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[backends.orpheus\nurl = 1")
    with pytest.raises(SettingsError, match=r"bad\.toml: not valid TOML"):
        load_settings(bad)


def test_documented_examples_parse():
    """Every TOML block of docs/configuration.md is a valid config file."""
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 2
    import tomllib

    for block in blocks:
        parse_settings(tomllib.loads(block), source="docs/configuration.md")


# ------------------------------------------------------------------- orpheus, musicgen, llm


async def test_orpheus_generate_stores_midi_in_the_cas(sim, env, cas):
    ns, _ = env(settings_for(sim.url))
    r = await run("""
        return orpheus.generate{temperature = 1.1, top_p = 0.9, max_tokens = 60,
                                num_variations = 3, random_seed = 5, tags = {"a", "b"}}
    """, ns)
    assert r["task"] == "generate" and r["tags"] == ["a", "b"]
    assert len(r["variations"]) == 3 and r["hash"] == r["variations"][0]["hash"]
    assert len({v["hash"] for v in r["variations"]}) == 3  # distinct variations
    for v in r["variations"]:
        assert set(v) == {"hash", "mime_type", "size_bytes", "num_tokens"}
        data = cas.retrieve(v["hash"])
        assert cas.inspect(v["hash"]).mime_type == v["mime_type"] == "audio/midi"
        assert len(data) == v["size_bytes"]
        notes = notes_of(data)
        assert 0 < len(notes) <= 20 and v["num_tokens"] == 3 * len(notes)  # 60 tokens -> <= 20 notes
    (record,) = sim.stats.records
    assert record.path == "/predict"
    # not traced by the caller: a fresh trace, not sampled (flags without bit 0)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[02]", record.traceparent)
    assert record.body == {"task": "generate", "temperature": 1.1, "top_p": 0.9, "max_tokens": 60,
                           "num_variations": 3, "seed": 5}
    assert r["metadata"]["seed"] == 5 and r["metadata"]["simulated"] is True


async def test_orpheus_generate_seeded_sends_the_cas_midi(sim, env, cas):
    seed_midi = phrase([62, 64, 65, 67, 69, 71, 72, 74], tempo=93)
    h = cas.store(seed_midi, "audio/midi")
    ns, _ = env(settings_for(sim.url))
    r = await run("return orpheus.generate_seeded{seed = 'cas:' .. params.h, temperature = 0.8}", ns,
                  params={"h": h})
    (record,) = sim.stats.records
    assert record.body["task"] == "generate_seeded"
    assert base64.b64decode(record.body["midi_input"]) == seed_midi  # the exact CAS bytes
    out = cas.retrieve(r["hash"])
    assert tempo_of(out) == 93.0
    # the seed's first bar (4 quarter notes) comes back verbatim
    assert [(t, p) for t, p, _ in notes_of(out)][:4] == [(0, 62), (480, 64), (960, 65), (1440, 67)]


async def test_orpheus_continue_and_variants(sim, env, cas):
    h = cas.store(phrase([60, 62, 64, 65], tempo=111), "audio/midi")
    # the "children" variant's service answers at the /orpheus prefix
    ns, _ = env(settings_for(sim.url, extra={"backends": {"orpheus_children": {"url": sim.url_for("orpheus")}}}))
    r = await run("""
        local a = orpheus.continue{midi = params.h}
        local b = orpheus.continue{midi = {hash = params.h}, model = "children"}
        return {a = a, b = b}
    """, ns, params={"h": h})
    first, second = sim.stats.records
    assert (first.path, second.path) == ("/predict", "/orpheus/predict")
    assert first.body["task"] == second.body["task"] == "continue"
    for out in (r["a"], r["b"]):
        data = cas.retrieve(out["hash"])
        assert tempo_of(data) == 111.0 and notes_of(data)


async def test_orpheus_bridge_from_to(sim, env, cas):
    a = cas.store(phrase([60, 62, 64, 65, 67], tempo=104), "audio/midi")
    b = cas.store(phrase([72, 71, 69], tempo=140), "audio/midi")
    s = settings_for(sim.url, extra={"backends": {"orpheus_bridge": {"url": sim.url_for("orpheus")}}})
    ns, _ = env(s)
    r = await run("return orpheus.bridge{from = params.a, to = params.b, num_variations = 2}", ns,
                  params={"a": a, "b": b})
    (record,) = sim.stats.records
    assert record.path == "/orpheus/predict"  # routed to the orpheus_bridge backend
    assert record.body["task"] == "bridge"
    assert base64.b64decode(record.body["section_a"]) == cas.retrieve(a)
    assert base64.b64decode(record.body["section_b"]) == cas.retrieve(b)
    for v in r["variations"]:
        data = cas.retrieve(v["hash"])
        assert tempo_of(data) == 104.0  # section_a's tempo
        assert notes_of(data)[-1][1] == 72  # lands on section_b's first note


async def test_orpheus_loops_and_classify(sim, env, cas):
    human = cas.store(phrase([60, 64, 67, 72, 67, 64, 60, 62], step=470,
                             velocities=[61, 70, 82, 95, 77, 66, 88, 73]), "audio/midi")
    ns, _ = env(settings_for(sim.url))
    r = await run("""
        return {loops = orpheus.loops{temperature = 0.5}, seeded_loops = orpheus.loops{seed = params.h},
                class = orpheus.classify{midi = params.h}}
    """, ns, params={"h": human})
    drums = notes_of(cas.retrieve(r["loops"]["hash"]))
    assert drums and {c for _, _, c in drums} == {9} and {p for _, p, _ in drums} <= {36, 38, 42}
    assert tempo_of(cas.retrieve(r["seeded_loops"]["hash"])) == 100.0  # the seed sets the tempo
    c = r["class"]
    assert c["classification"]["is_human"] is True  # off-grid timing, varied velocities
    assert c["labels"][0] == "human" and abs(sum(c["scores"]) - 1) < 1e-6
    assert [rec.body["task"] for rec in sim.stats.records] == ["loops", "loops", "classify"]


async def test_musicgen_stores_wav(sim, env, cas):
    ns, _ = env(settings_for(sim.url))
    r = await run("return musicgen.generate{prompt = 'dusty lofi piano', duration = 1.5, top_k = 50, random_seed = 3}", ns)
    assert r["mime_type"] == "audio/wav" and cas.inspect(r["hash"]).mime_type == "audio/wav"
    data = cas.retrieve(r["hash"])
    assert len(data) == r["size_bytes"]
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 32000, 48000)
    assert (r["sample_rate"], r["duration"], r["channels"], r["num_samples"]) == (32000, 1.5, 1, 48000)
    (record,) = sim.stats.records
    assert record.body == {"prompt": "dusty lofi piano", "duration": 1.5, "top_k": 50, "seed": 3}
    assert record.kind == "musicgen"
    short = await run("return musicgen.generate('hum')", ns)
    assert short["mime_type"] == "audio/wav" and short["hash"] != r["hash"]


async def test_llm_chat(sim, env):
    s = settings_for(sim.url, extra={"models": {"llm": {"model": "house-model"}}})
    ns, _ = env(s)
    r = await run("""
        return llm.chat{messages = {{role = "system", content = "be brief"},
                                    {role = "user", content = "name three drum sounds please"}},
                        max_tokens = 50, temperature = 0.2}
    """, ns)
    assert r["content"] == '[sim-llm] 5 words; you said: "name three drum sounds please"'
    assert r["role"] == "assistant" and r["finish_reason"] == "stop"
    assert r["model"] == "house-model"  # the configured default model was sent
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    assert r["choices"][0]["message"]["content"] == r["content"]
    (record,) = sim.stats.records
    assert record.path == "/v1/chat/completions" and record.body["model"] == "house-model"
    # a base URL ending in /v1 (as OpenAI clients take it) and the string shorthand
    ns2, _ = env(settings_for(sim.url, extra={"backends": {"llm": {"url": sim.url + "/llm/v1"}}}))
    r2 = await run("return llm.chat('one two')", ns2)
    assert r2["content"].startswith("[sim-llm] 2 words") and sim.stats.records[-1].path == "/llm/v1/chat/completions"


async def test_backend_call_generic(sim, env, cas):
    midi = phrase([60, 62, 64, 65, 67])
    h = cas.store(midi, "audio/midi")
    ns, _ = env(settings_for(sim.url))
    r = await run("""
        local out = backend.call("orpheus", {task = "continue", midi_input = {cas_base64 = params.h}})
        local raw = backend.call("orpheus", {task = "generate", max_tokens = 9}, {raw = true})
        local health = backend.call("musicgen", nil, {path = "/health", method = "GET"})
        local routed = backend.call("orpheus", {task = "loops"}, "/orpheus/predict")
        return {out = out, raw = raw, health = health, routed = routed}
    """, ns, params={"h": h})
    # {cas_base64 = hash} went out as the object's base64
    assert base64.b64decode(sim.stats.records[0].body["midi_input"]) == midi
    # midi_base64 came back as midi = {hash, mime_type, size_bytes}, stored in the CAS
    v = r["out"]["variations"][0]
    assert "midi_base64" not in v and v["midi"]["mime_type"] == "audio/midi"
    assert notes_of(cas.retrieve(v["midi"]["hash"])) and v["num_tokens"] > 0
    # raw = true leaves the answer alone
    raw_midi = base64.b64decode(r["raw"]["variations"][0]["midi_base64"])
    assert raw_midi[:4] == b"MThd" and len(notes_of(raw_midi)) == 3
    assert r["health"]["status"] == "ok"
    assert sim.stats.records[-1].path == "/orpheus/predict" and r["routed"]["task"] == "loops"


# --------------------------------------------------------------------------- errors


ERR_SCRIPT = """
    local ok, err = pcall(%s)
    return {ok = ok, err = tostring(err)}
"""


async def test_argument_errors_are_invalid_params_or_not_found(sim, env, cas):
    not_midi = cas.store(b"just text", "text/plain")
    missing = "0" * 32
    ns, _ = env(settings_for(sim.url))
    cases = {
        "orpheus.generate, {max_tokens = 'many'}": "orpheus.generate: invalid_params: max_tokens must be an integer",
        "orpheus.generate, {temprature = 1}": "orpheus.generate: invalid_params: unknown field 'temprature' (did you mean 'temperature'?)",
        "orpheus.generate, {model = 'huge'}": "orpheus.generate: invalid_params: model: unknown Orpheus model 'huge'",
        "orpheus.continue, {}": "orpheus.continue: invalid_params: 'midi' is required",
        "orpheus.continue, {midi = 'xyz'}": "orpheus.continue: invalid_params: midi:",
        f"orpheus.continue, {{midi = '{not_midi}'}}": "orpheus.continue: invalid_params: midi: object",
        f"orpheus.bridge, {{from = '{missing}'}}": f"orpheus.bridge: not_found: from: no object {missing} in the CAS",
        "musicgen.generate, {duration = true}": "musicgen.generate: invalid_params: duration must be a number",
        "llm.chat, {messages = {}}": "llm.chat: invalid_params: messages must be a non-empty array",
        "backend.call, 'nope', {}": "backend.call: not_found: no backend named 'nope'",
        "backend.call, 'orpheus', {}, '../x'": "backend.call: invalid_params: path must be an absolute path",
        "backend.call, 'orpheus', 5": "backend.call: invalid_params: body must be a table",
    }
    for args, expected in cases.items():
        r = await run(ERR_SCRIPT % args, ns)
        assert r["ok"] is False and r["err"].startswith(expected), (args, r["err"])
    assert sim.stats.model_requests == 0  # none of these reached the service


async def test_service_rejection_is_invalid_params_and_not_retried(sim, env):
    ns, backends = env(settings_for(sim.url))
    r = await run(ERR_SCRIPT % "orpheus.generate, {temperature = 5}", ns)
    assert r["ok"] is False
    assert r["err"].startswith(f"orpheus.generate: invalid_params: orpheus at {sim.url}: rejected the request (HTTP 400")
    assert "temperature must be >= 0 and <= 2" in r["err"]
    assert sim.stats.model_requests == 1 and backends.stats("orpheus").retries == 0


@TIMED
async def test_unreachable_backend_is_pcallable_backend_unavailable(env, timed):
    port = closed_port()
    ns, backends = env(settings_for(f"http://127.0.0.1:{port}", retries=2))
    t = time.monotonic()
    r = await run(ERR_SCRIPT % "orpheus.generate, {}", ns)
    assert r == {"ok": False, "err": f"orpheus.generate: backend_unavailable: orpheus at http://127.0.0.1:{port}: "
                                     "connection refused (3 attempts)"}
    if timed:
        assert time.monotonic() - t < 2
    assert backends.stats("orpheus").requests == 3 and backends.stats("orpheus").failures == 1
    # uncaught, the job fails with the same message
    with pytest.raises(runtime.ScriptError) as exc:
        await run("return musicgen.generate{prompt = 'x'}", ns)
    assert exc.value.detail.kind == "lua_runtime"
    assert exc.value.detail.message.startswith("musicgen.generate: backend_unavailable: musicgen at ")


async def test_server_errors_are_retried_then_backend_unavailable(sim, env):
    sim.config.fail_rate, sim.config.fail_status = 1.0, 500
    ns, backends = env(settings_for(sim.url, retries=3))
    r = await run(ERR_SCRIPT % "llm.chat, 'hi'", ns)
    assert r["ok"] is False
    assert r["err"].startswith(f"llm.chat: backend_unavailable: llm at {sim.url}: HTTP 500: simulated llm failure")
    assert r["err"].endswith("(4 attempts)")
    assert sim.stats.failures_sent == 4 and backends.stats("llm").retries == 3


async def test_busy_burst_is_retried_and_succeeds(sim, env, cas):
    sim.config.busy_burst = 3
    ns, backends = env(settings_for(sim.url))
    r = await run("return orpheus.generate{}", ns)
    assert cas.exists(r["hash"])
    assert sim.stats.busy_sent == 3 and sim.stats.model_requests == 4
    assert [rec.status for rec in sim.stats.records] == [429, 429, 429, 200]
    st = backends.stats("orpheus")
    assert (st.busy, st.retries, st.ok, st.failures) == (3, 3, 1, 0)


async def test_retry_after_is_honoured(sim, env):
    sim.config.busy_burst, sim.config.retry_after = 1, 0.4
    ns, _ = env(settings_for(sim.url))  # backoff alone would be ~10 ms
    await run("return orpheus.generate{}", ns)
    first, second = sim.stats.records
    assert second.started - first.started >= 0.4


@TIMED
async def test_retries_give_up_at_the_deadline(sim, env, timed):
    sim.config.busy_every, sim.config.retry_after = 1, 0.5  # every request is busy
    ns, backends = env(settings_for(sim.url, retries=100))
    t = time.monotonic()
    r = await run(ERR_SCRIPT % "orpheus.generate, {}", ns, timeout=1.5)
    elapsed = time.monotonic() - t
    # the script got the error while it still had time to handle it, not a timeout
    assert r["ok"] is False
    assert r["err"].startswith(f"orpheus.generate: backend_unavailable: orpheus at {sim.url}: busy (HTTP 429")
    assert "the job deadline leaves no time for a retry" in r["err"]
    # at 0, 0.5 and 1.0 s at the earliest, so never more than 3 (and never 100); a slow
    # machine only stretches the gaps
    assert 1 <= sim.stats.model_requests <= 3
    assert backends.stats("orpheus").requests == sim.stats.model_requests
    if timed:
        assert elapsed < 1.5 and sim.stats.model_requests == 3


@TIMED
async def test_request_timeout_is_not_retried(sim, env, timed):
    sim.config.latency_ms = 2000
    ns, _ = env(settings_for(sim.url, timeout_s=0.3))
    t = time.monotonic()
    r = await run(ERR_SCRIPT % "orpheus.generate, {}", ns)
    if timed:
        assert time.monotonic() - t < 1.5
    assert r["err"] == f"orpheus.generate: backend_unavailable: orpheus at {sim.url}: no answer within 0.3 s"
    assert sim.stats.model_requests == 1


@TIMED
async def test_job_deadline_bounds_a_slow_request(sim, env, timed):
    sim.config.latency_ms = 60_000
    ns, _ = env(settings_for(sim.url))  # timeout_s = 300: the job deadline is what stops it
    t = time.monotonic()
    with pytest.raises(runtime.ScriptError) as exc:
        await run("return orpheus.generate{}", ns, timeout=0.5)
    assert exc.value.detail.kind == "timeout"
    if timed:
        assert time.monotonic() - t < 1.5


# ---------------------------------------------------------------- concurrency, tracing


async def test_concurrency_limit_is_respected(sim, env):
    sim.config.latency_ms = 200
    sim.config.hold_until = 3  # the first three are surely in flight together
    ns, backends = env(settings_for(sim.url, concurrency=3))
    t = time.monotonic()
    results = await asyncio.gather(*[run("return orpheus.generate{}.hash", ns) for _ in range(9)])
    assert len(results) == 9 and all(isinstance(h, str) for h in results)
    assert sim.stats.peak_in_flight == 3 and backends.stats("orpheus").peak_in_flight == 3
    assert time.monotonic() - t >= 0.6  # three rounds of three
    assert sim.stats.busy_sent == 0


async def test_each_call_is_a_span_whose_traceparent_is_sent(sim, env):
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(span_exporter=exporter)
    ns, _ = env(settings_for(sim.url), telemetry=telemetry)
    with telemetry.span("caller", parent=parent_context(TP)) as caller:
        await run("orpheus.generate{}; return llm.chat('x')", ns)
    calls = [s for s in exporter.get_finished_spans() if s.name == "luanette.backend.call"]
    assert [s.attributes["backend.name"] for s in calls] == ["orpheus", "llm"]
    assert all(s.parent.span_id == caller.get_span_context().span_id for s in calls)
    assert {s.context.trace_id for s in calls} == {int(TP.split("-")[1], 16)}
    # the header names the call's own span, so the service's spans hang under it
    assert sim.stats.traceparents == [
        f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}-01" for s in calls
    ]


async def test_backends_api_directly(sim):
    s = settings_for(sim.url)
    async with Backends(s.backends) as b:
        answer = await b.call("orpheus", "/predict", {"task": "loops"}, deadline=time.monotonic() + 5,
                              traceparent=TP)
        assert answer["task"] == "loops" and sim.stats.traceparents == [TP]
        health = await b.call("llm", "/health", None, deadline=None, method="GET")
        assert health["status"] == "ok"
        with pytest.raises(UnknownBackend):
            await b.call("nope", "/predict", {}, deadline=None)
        with pytest.raises(BackendRejected) as rejected:
            await b.call("orpheus", "/predict", {"task": "dance"}, deadline=None)
        assert rejected.value.status == 400 and rejected.value.code == "invalid_params"
        with pytest.raises(BackendUnavailable, match=r"orpheus at http://127\.0\.0\.1:\d+: POST /nowhere answered HTTP 404"):
            await b.call("orpheus", "/nowhere", {}, deadline=None)
    assert b.closed
    with pytest.raises(BackendUnavailable, match="shutting down"):
        await b.call("orpheus", "/predict", {}, deadline=None)


@TIMED
async def test_aclose_ends_calls_in_flight(sim, timed):
    sim.config.latency_ms = 60_000
    b = Backends(settings_for(sim.url).backends)
    call = asyncio.create_task(b.call("orpheus", "/predict", {}, deadline=time.monotonic() + 120))
    await until(lambda: sim.stats.in_flight, "the request reaching the service")
    t = time.monotonic()
    await b.aclose()
    with pytest.raises(BackendUnavailable, match="shutting down"):
        await call
    assert sim.stats.model_requests == 1  # no retry after close
    if timed:
        assert time.monotonic() - t < 0.5


# ----------------------------------------------------------------------------- scale


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@pytest.fixture
def sim_process(timed):
    """The simulator as its own process (``luanette-sim models``), as the GPU services
    are: its CPU time and threads are not the daemon's.  Yields its URL.

    Timed, each request takes 1 s there; otherwise the simulator holds the requests
    until all 1,000 are in flight together, so "concurrent" is checked, not timed."""
    switch = ["--latency-ms", "1000"] if timed else ["--hold-until", "1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "luanette.sim.cli", "models", "--kind", "all", "--port", "0", *switch],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the simulator did not start"
        line = proc.stdout.readline()
        assert line.startswith("listening "), line
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


class ThreadSampler:
    """Peak ``threading.active_count()`` while running, sampled every 5 ms on the loop."""

    def __init__(self) -> None:
        self.peak = threading.active_count()
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, threading.active_count())
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> ThreadSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self.peak = max(self.peak, threading.active_count())
        self._task.cancel()


async def _sim_stats(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/_sim/stats") as r:
        return await r.json()


# Far fewer threads than requests: a thread per waiting request would be 1,000.  The
# tight figure (20) depends on how the Lua pool grows on a busy machine, so it is timed.
FEW_THREADS = 100


@TIMED
async def test_scale_http_1000_concurrent_requests(sim_process, timed):
    """The HTTP side alone: 1,000 requests in flight together (timed: each takes 1 s on
    the service, < 3 s in all, < 20 threads)."""
    _raise_fd_limit(4096)
    s = parse_settings({"backends": {"orpheus": {"url": sim_process, "concurrency": 1000}}})
    async with Backends(s.backends) as b, ThreadSampler() as threads:
        t = time.perf_counter()
        answers = await asyncio.gather(*[
            b.call("orpheus", "/predict", {"task": "generate", "max_tokens": 3}, deadline=time.monotonic() + 100)
            for _ in range(1000)])
        wall = time.perf_counter() - t
    assert all(a["task"] == "generate" for a in answers)
    stats = await _sim_stats(sim_process)
    assert stats["peak_in_flight"] == 1000 and stats["statuses"] == {"200": 1000}
    assert threads.peak < FEW_THREADS, f"{threads.peak} threads"
    if timed:
        assert wall < 3.0, f"1,000 concurrent requests took {wall:.2f} s"
        assert threads.peak < 20, f"{threads.peak} threads"


@TIMED
async def test_scale_1000_jobs_each_waiting_1s(sim_process, cas, timed):
    """1,000 concurrent scripts, each waiting on one request, all in flight together
    (timed: each request takes 1 s, < 3 s wall, < 20 threads)."""
    _raise_fd_limit(4096)
    s = parse_settings({"backends": {"orpheus": {"url": sim_process, "concurrency": 1000}}})
    async with Backends(s.backends) as b:
        ns = model_namespaces(b, cas, s.models)
        code = 'return backend.call("orpheus", {task = "generate", max_tokens = 3}, {raw = true}).task'
        async with ThreadSampler() as threads:
            t = time.perf_counter()
            results = await asyncio.gather(*[run(code, ns, timeout=100) for _ in range(1000)])
            wall = time.perf_counter() - t
    assert results == ["generate"] * 1000
    stats = await _sim_stats(sim_process)
    assert stats["peak_in_flight"] == 1000 and stats["model_requests"] == 1000
    assert threads.peak < FEW_THREADS, f"{threads.peak} threads"
    if timed:
        assert wall < 3.0, f"1,000 jobs took {wall:.2f} s"
        assert threads.peak < 20, f"{threads.peak} threads"
