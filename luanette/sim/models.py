"""Model-service simulator: real HTTP on loopback, real MIDI and WAV, no GPU.

Stands in for the GPU model services of the hootenanny stack (DESIGN "Model backends
(HTTP)") in tests, examples and the compose file. Built on aiohttp: one asyncio server,
so a thousand requests each sleeping ``latency_ms`` cost a thousand coroutines, not a
thousand threads.

Kinds and routes
================

``kind`` is ``orpheus``, ``musicgen``, ``llm`` (one model family per process, like the
real stack) or ``all`` (every route on one port, for tests). Each kind's routes are
served at the root *and* under ``/<kind>``, so a backend URL may be either
``http://127.0.0.1:P`` or ``http://127.0.0.1:P/orpheus``:

=============================  =========================================================
``GET  /health``               ``{status: "ok", service, version, kind, kinds, tasks}``
``POST /predict``              orpheus or musicgen (kind ``all``: orpheus if the body
                               has ``task`` or no ``prompt``, otherwise musicgen)
``POST /<kind>/predict``       the named family (``orpheus`` / ``musicgen``)
``POST /v1/chat/completions``  llm, OpenAI-compatible (also ``/llm/v1/chat/completions``)
``GET  /v1/models``            llm model list
``GET  /_sim/stats``           the :class:`SimStats` snapshot as JSON
``GET|POST /_sim/config``      read / change the switches at run time (partial JSON)
``POST /_sim/reset``           zero the stats and request counter
=============================  =========================================================

Orpheus family (``POST /predict``)
----------------------------------

Request (every field optional unless noted; wrong types or ranges answer 400)::

    {task: "generate" | "generate_seeded" | "continue" | "bridge" | "loops" | "classify"
           (default: the server's default task, normally "generate"; "bridge" when the
           body has section_a and no task),
     temperature: 0..2 (1.0), top_p: 0..1 (0.95), max_tokens: 1..8192 (1024),
     num_variations: 1..8 (1),
     seed: int (optional; mixed into the server seed),
     midi_input: base64 SMF   -- required by generate_seeded, continue, classify;
                                 optional seed for loops (alias seed_midi);
                                 alias of section_a for bridge
     section_a: base64 SMF    -- bridge: required (or midi_input)
     section_b: base64 SMF    -- bridge: optional target (alias midi_input_b)}

Response for generate, generate_seeded, continue, bridge, loops::

    {task, variations: [{midi_base64, num_tokens}, ...num_variations],
     metadata: {model: "sim-orpheus", task, seed, temperature, top_p, max_tokens,
                num_variations, tempo_bpm, input_notes, simulated: true}}

Each variation is a type-0 Standard MIDI File, 480 ticks per beat, with track name,
tempo, 4/4 time signature and program change, monophonic notes on channel 0 (drums on
channel 9 for ``loops``). ``num_tokens`` is 3 per note (the note count is capped at
``max_tokens // 3``, minimum 1). Output is a pure function of (server seed, request
seed, task, params, input MIDI bytes): the same request gives the same bytes, the
variations of one request differ from each other.

* ``generate``: 4 bars of melody in a random key/mode and tempo; higher temperature
  means wider leaps.
* ``generate_seeded``: the input's first bar verbatim, then new material to fill 4 bars
  in the input's tempo and scale (pitch classes it uses).
* ``continue``: 2 bars of new material only (not the prompt), starting one scale step
  from the input's last note, in its tempo and scale, reusing its note lengths.
* ``bridge``: 2 bars of new material from section_a's last note; with section_b it
  walks toward and ends exactly on section_b's first note, in section_a's tempo.
* ``loops``: 2 bars of drums (kick 36, snare 38, closed hat 42, channel 9); the seed
  MIDI, if given, sets the tempo.

``classify`` answers instead (human vs AI, a heuristic on timing grid and velocities)::

    {task: "classify",
     classification: {is_human: bool, confidence: 0.5..1, probabilities: {human, ai}},
     labels: ["human", "ai"] sorted by score descending, scores: [...same order],
     num_tokens, metadata}

MusicGen (``POST /predict``)
----------------------------

Request: ``{prompt: str ("" = unconditional), duration: 0 < s <= 30 (10.0),
temperature: >= 0 (1.0), top_k: int >= 0 (250), top_p: 0..1 (0.0),
guidance_scale: >= 0 (3.0), do_sample: bool (true), seed: int}``.

Response: ``{audio_base64, sample_rate: 32000, duration, num_samples, channels: 1}``:
a mono 16-bit PCM WAV of a quiet sine (amplitude ~0.1) whose pitch depends on the
prompt; ``num_samples = round(duration * 32000)``.

LLM (``POST /v1/chat/completions``)
-----------------------------------

Request: OpenAI chat completion: ``{model, messages: [{role, content}], max_tokens,
temperature, response_format: {type: "json_object"}?, stream, stream_options}``.
With ``stream: true`` the same answer comes as server-sent events
(``text/event-stream``), as OpenAI sends them: a first ``chat.completion.chunk`` with
the role, one per word (``delta.content``, the word and its following space), one with
``finish_reason``, then (with ``stream_options: {include_usage: true}``) one with
``usage`` and no choices, then ``data: [DONE]``.  Response::

    {id: "chatcmpl-sim-...", object: "chat.completion", created, model,
     choices: [{index: 0, message: {role: "assistant", content}, finish_reason}],
     usage: {prompt_tokens, completion_tokens, total_tokens}}

``content`` deterministically echoes a summary of the last user message:
``[sim-llm] 7 words; you said: "..."`` or, with ``response_format`` json_object,
``{"summary": ..., "words": n, "model": ...}``. Tokens are whitespace-separated
words; ``max_tokens`` truncates with ``finish_reason: "length"``.

Errors and switches
-------------------

``/predict`` errors look like FastAPI's (what the real services send) plus a
structured part: ``{detail: msg, error: {type, message, field}}``; the LLM routes use
OpenAI's ``{error: {message, type, param, code}}``. Types: ``invalid_request`` (400),
``busy`` (429, with a ``Retry-After`` header), ``simulated_failure`` (``fail_status``).

Every model request (``/predict``, chat completions; not ``/health``) is numbered from
1 in arrival order and then, in this order:

1. answered 429 at once if ``n <= busy_burst``, or ``busy_every`` and
   ``n % busy_every == 0``, or ``max_concurrency`` and more than that many model
   requests are in flight;
2. answered 400 at once if the body is invalid;
3. drawn for failure (``random.Random(seed)``, one draw per request reaching this
   point, so a run is reproducible for a given arrival order);
4. held, with ``hold_until`` = N, until N model requests are held at once: then all of
   them go on, and later ones are not held until ``/_sim/reset`` (a barrier that makes
   "these N requests were in flight together" a fact a test can rely on, not a race);
5. delayed by ``latency_ms`` (``asyncio.sleep``, never blocks the loop);
6. answered ``fail_status`` if drawn, otherwise 200.

In-process use
--------------

::

    async with run_models("all", latency_ms=50, busy_burst=2) as sim:
        sim.url                 # "http://127.0.0.1:43121"
        sim.stats.requests      # Counter by path; busy_sent, peak_in_flight, records...
        sim.config.busy_every = 3   # switches may change while running

:func:`serve_in_thread` does the same from synchronous code (own thread and loop).
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import random
import sys
import time
import wave
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import mido
from aiohttp import web

from luanette.sim.threaded import in_thread

__all__ = [
    "KINDS",
    "ORPHEUS_TASKS",
    "SimConfig",
    "SimStats",
    "RequestRecord",
    "SimServer",
    "run_models",
    "serve_in_thread",
    "build_app",
    "make_midi",
    "read_midi_notes",
    "make_wav",
]

VERSION = "0.1.0"
KINDS = ("orpheus", "musicgen", "llm")
ORPHEUS_TASKS = ("generate", "generate_seeded", "continue", "bridge", "loops", "classify")
TICKS_PER_BEAT = 480
BAR = 4 * TICKS_PER_BEAT
SAMPLE_RATE = 32000
MAX_BODY = 64 * 1024 * 1024

# A note: (start tick, pitch, duration ticks, velocity), ticks at TICKS_PER_BEAT.
Note = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------
# Configuration and statistics
# ---------------------------------------------------------------------------------


@dataclass
class SimConfig:
    """The switches. Read on every request, so they may be changed while serving."""

    kind: str = "all"
    latency_ms: float = 0.0
    hold_until: int = 0
    busy_every: int = 0
    busy_burst: int = 0
    max_concurrency: int = 0
    retry_after: float = 1.0
    fail_rate: float = 0.0
    fail_status: int = 500
    seed: int = 0
    default_task: str = "generate"
    llm_model: str = "sim-llm"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.kind not in (*KINDS, "all"):
            raise ValueError(f"kind must be one of {', '.join((*KINDS, 'all'))}, not {self.kind!r}")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        for name in ("hold_until", "busy_every", "busy_burst", "max_concurrency"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if not 400 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP error status (400-599)")
        if self.default_task not in ORPHEUS_TASKS:
            raise ValueError(f"default_task must be one of {', '.join(ORPHEUS_TASKS)}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS if self.kind == "all" else (self.kind,)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RequestRecord:
    """One request as the simulator saw it (kept for the last ``SimStats.keep``)."""

    method: str
    path: str
    kind: str | None
    task: str | None
    traceparent: str | None
    body: Any
    started: float
    status: int = 0
    finished: float | None = None


@dataclass
class SimStats:
    """Counters shared by the handlers; plain attributes, safe to read from tests."""

    keep: int = 10_000
    requests: Counter = field(default_factory=Counter)  # by path, every request
    by_kind: Counter = field(default_factory=Counter)  # model requests by family
    by_task: Counter = field(default_factory=Counter)  # orpheus requests by task
    statuses: Counter = field(default_factory=Counter)  # model responses by status
    model_requests: int = 0
    busy_sent: int = 0
    failures_sent: int = 0
    bad_requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    records: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.records = deque(self.records, maxlen=self.keep)

    def reset(self) -> None:
        for c in (self.requests, self.by_kind, self.by_task, self.statuses):
            c.clear()
        self.model_requests = self.busy_sent = self.failures_sent = self.bad_requests = 0
        self.peak_in_flight = self.in_flight
        self.records.clear()

    @property
    def traceparents(self) -> list[str | None]:
        """The ``traceparent`` header of each recorded model request, in order."""
        return [r.traceparent for r in self.records]

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "by_kind": dict(self.by_kind),
            "by_task": dict(self.by_task),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "model_requests": self.model_requests,
            "busy_sent": self.busy_sent,
            "failures_sent": self.failures_sent,
            "bad_requests": self.bad_requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }


class SimError(Exception):
    """An error answer: HTTP status, error type, message, offending field."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field


def _bad(message: str, field: str | None = None) -> SimError:
    return SimError(400, "invalid_request", message, field)


# ---------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float | None = None,
            *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"{name} must be a number, got {json.dumps(v)[:40]}", name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        lo_s = f"> {lo:g}" if lo_open else f">= {lo:g}"
        rng = f"{lo_s}" + (f" and <= {hi:g}" if hi is not None else "")
        raise _bad(f"{name} must be {rng}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, default: int, lo: int, hi: int | None = None) -> int:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be an integer, got {json.dumps(v)[:40]}", name)
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"{name} must be between {lo} and {hi}, got {v}" if hi is not None
                   else f"{name} must be >= {lo}, got {v}", name)
    return v


def _boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false, got {json.dumps(v)[:40]}", name)
    return v


def _string(body: dict, name: str, default: str) -> str:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(f"{name} must be a string, got {json.dumps(v)[:40]}", name)
    return v


def _seed_of(*parts: Any) -> int:
    """A 64-bit seed from anything repr-able (stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


# ---------------------------------------------------------------------------------
# MIDI
# ---------------------------------------------------------------------------------

MODES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "pentatonic": (0, 2, 4, 7, 9),
}
PROGRAMS = (0, 4, 11, 24, 40, 73, 80, 88)  # piano, e-piano, vibes, guitar, violin, flute, leads/pads


def make_midi(notes: list[Note] | None = None, *, tempo_bpm: float = 120.0, program: int = 0,
              channel: int = 0, name: str = "luanette-sim") -> bytes:
    """A type-0 Standard MIDI File (480 tpb) holding ``notes`` ((start, pitch, dur, vel)
    in ticks). With no notes: a C-major scale in quarter notes. Also handy in tests
    for building ``midi_input``."""
    if notes is None:
        notes = [(i * TICKS_PER_BEAT, p, TICKS_PER_BEAT, 80)
                 for i, p in enumerate((60, 62, 64, 65, 67, 69, 71, 72))]
    mid = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("track_name", name=name, time=0))
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm), time=0))
    track.append(mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0))
    if channel != 9:
        track.append(mido.Message("program_change", channel=channel, program=program, time=0))
    events: list[tuple[int, int, mido.Message]] = []
    for start, pitch, dur, vel in notes:
        # note_off sorts before note_on at the same tick so repeated pitches re-strike
        events.append((start, 1, mido.Message("note_on", channel=channel, note=pitch, velocity=vel)))
        events.append((start + dur, 0, mido.Message("note_off", channel=channel, note=pitch, velocity=0)))
    events.sort(key=lambda e: (e[0], e[1], e[2].note))
    now = 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


@dataclass
class MidiSummary:
    notes: list[Note]  # sorted by start, ticks rescaled to TICKS_PER_BEAT
    tempo_bpm: float


def read_midi_notes(data: bytes) -> MidiSummary:
    """Parse an SMF; raise ValueError with a readable reason if it is not one."""
    if data[:4] != b"MThd":
        raise ValueError("not a Standard MIDI File (no MThd header)")
    try:
        mid = mido.MidiFile(file=io.BytesIO(data))
    except Exception as e:  # mido raises OSError, EOFError, ValueError, KeyError...
        raise ValueError(f"unreadable MIDI: {type(e).__name__}: {e}") from None
    if mid.type == 2:
        raise ValueError("type 2 (asynchronous) MIDI files are not supported")
    tpb = mid.ticks_per_beat or TICKS_PER_BEAT
    scale = TICKS_PER_BEAT / tpb
    tempo = None
    now = 0
    open_notes: dict[tuple[int, int], tuple[int, int]] = {}
    notes: list[Note] = []
    for msg in mido.merge_tracks(mid.tracks):
        now += msg.time
        if msg.type == "set_tempo" and tempo is None:
            tempo = msg.tempo
        elif msg.type == "note_on" and msg.velocity > 0:
            open_notes[(msg.channel, msg.note)] = (now, msg.velocity)
        elif msg.type in ("note_off", "note_on"):
            started = open_notes.pop((msg.channel, msg.note), None)
            if started is not None:
                s, v = started
                notes.append((round(s * scale), msg.note, max(1, round((now - s) * scale)), v))
    for (_, pitch), (s, v) in open_notes.items():  # never released: end at the last tick
        notes.append((round(s * scale), pitch, max(1, round((now - s) * scale)), v))
    notes.sort()
    return MidiSummary(notes, round(mido.tempo2bpm(tempo or 500000), 3))


def _pick(body: dict, *names: str) -> tuple[str, Any]:
    """(name, value) of the first of ``names`` present in ``body``, else (names[0], None)."""
    for n in names:
        if body.get(n) is not None:
            return n, body[n]
    return names[0], None


def _decode_midi(name: str, value: Any, *, required: bool) -> MidiSummary | None:
    """``value`` (the field ``name``) base64-decoded and parsed; SimError 400 if bad."""
    if value is None:
        if required:
            raise _bad(f"{name} (base64-encoded MIDI) is required for this task", name)
        return None
    if not isinstance(value, str):
        raise _bad(f"{name} must be a base64 string", name)
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{name} is not valid base64: {e}", name) from None
    try:
        summary = read_midi_notes(data)
    except ValueError as e:
        raise _bad(f"{name} is not valid MIDI: {e}", name) from None
    if not summary.notes:
        raise _bad(f"{name} contains no notes", name)
    return summary


def _scale_pitches(pcs: set[int], lo: int = 36, hi: int = 96) -> list[int]:
    return [p for p in range(lo, hi + 1) if p % 12 in pcs]


def _scale_of(notes: list[Note]) -> set[int]:
    pcs = {p % 12 for _, p, _, _ in notes}
    if len(pcs) < 3:  # too few to be a scale: major on the first note
        root = notes[0][1] % 12
        pcs |= {(root + i) % 12 for i in MODES["major"]}
    return pcs


def _nearest(pitches: list[int], p: int) -> int:
    return min(range(len(pitches)), key=lambda i: (abs(pitches[i] - p), pitches[i]))


def _rhythm(rng: random.Random, ticks: int, lengths: list[int]) -> list[int]:
    out, total = [], 0
    while total < ticks:
        d = min(rng.choice(lengths), ticks - total)
        out.append(d)
        total += d
    return out


def _melody(rng: random.Random, pitches: list[int], start_idx: int, durations: list[int],
            temperature: float, top_p: float, start_tick: int = 0) -> list[Note]:
    leap = 1 + round(temperature * 2)
    rest_p = (1.0 - top_p) * 0.5
    notes, tick, idx = [], start_tick, start_idx
    for i, d in enumerate(durations):
        if i and rng.random() < rest_p:
            tick += d
            continue
        notes.append((tick, pitches[idx], d, rng.randint(64, 100)))
        idx = max(0, min(len(pitches) - 1, idx + rng.randint(-leap, leap)))
        tick += d
    return notes


def _cap(notes: list[Note], max_tokens: int) -> list[Note]:
    return notes[: max(1, max_tokens // 3)]


@dataclass(frozen=True)
class _OrpheusParams:
    task: str
    temperature: float
    top_p: float
    max_tokens: int
    num_variations: int
    seed: int


def _orpheus_variation(p: _OrpheusParams, i: int, a: MidiSummary | None,
                       b: MidiSummary | None) -> tuple[bytes, int, float]:
    rng = random.Random(_seed_of(p, i, a and a.notes, b and b.notes))
    lengths = [240, 480, 480, 960] if p.temperature < 1.2 else [120, 240, 480, 720, 960]
    tempo: float
    if p.task == "generate":
        root, mode = rng.randrange(12), rng.choice(list(MODES))
        pitches = _scale_pitches({(root + s) % 12 for s in MODES[mode]}, 48, 84)
        tempo = rng.randrange(80, 141)
        notes = _melody(rng, pitches, rng.randrange(len(pitches) // 3, 2 * len(pitches) // 3),
                        _rhythm(rng, 4 * BAR, lengths), p.temperature, p.top_p)
        return _finish(notes, p, tempo, rng.choice(PROGRAMS))
    if p.task == "loops":
        tempo = a.tempo_bpm if a else rng.randrange(90, 131)
        notes = []
        sixteenth = TICKS_PER_BEAT // 4
        for step in range(32):  # 2 bars of 16ths
            t = step * sixteenth
            if step % 8 == 0 or (step % 8 == 6 and rng.random() < 0.5):
                notes.append((t, 36, sixteenth, rng.randint(100, 120)))
            if step % 8 == 4 or (step % 4 == 3 and rng.random() < 0.1 * p.temperature):
                notes.append((t, 38, sixteenth, rng.randint(90, 115)))
            if step % 2 == 0 or rng.random() < 0.3 * p.temperature:
                notes.append((t, 42, sixteenth // 2, rng.randint(50, 90)))
        notes.sort()
        return _finish(notes, p, tempo, 0, channel=9)
    assert a is not None
    pitches = _scale_pitches(_scale_of(a.notes + (b.notes if b else [])))
    in_lengths = sorted({d for _, _, d, _ in a.notes if d >= 60}) or lengths
    if p.task == "generate_seeded":
        t0 = a.notes[0][0]  # the input's first bar (from its first note), moved to tick 0
        head = [(s - t0, pitch, d, v) for s, pitch, d, v in a.notes if s < t0 + BAR]
        start = _nearest(pitches, head[-1][1])
        notes = head + _melody(rng, pitches, start, _rhythm(rng, 3 * BAR, in_lengths),
                               p.temperature, p.top_p, BAR)
        return _finish(notes, p, a.tempo_bpm, 0)
    last = _nearest(pitches, a.notes[-1][1])
    if p.task == "continue":
        step = rng.choice((-1, 1))
        start = max(0, min(len(pitches) - 1, last + step))
        notes = _melody(rng, pitches, start, _rhythm(rng, 2 * BAR, in_lengths), p.temperature, p.top_p)
        return _finish(notes, p, a.tempo_bpm, 0)
    # bridge: walk from A's last note toward B's first (landing on it), or wander
    durations = _rhythm(rng, 2 * BAR, in_lengths)
    if b is None:
        notes = _melody(rng, pitches, last, durations, p.temperature, p.top_p)
        return _finish(notes, p, a.tempo_bpm, 0)
    target = _nearest(pitches, b.notes[0][1])
    k = len(durations)
    notes, tick = [], 0
    for j, d in enumerate(durations):
        frac = (j + 1) / k
        idx = round(last + (target - last) * frac)
        if 0 < j < k - 1:  # wander in between; start next to A, land on B
            idx += rng.randint(-1, 1)
        idx = max(0, min(len(pitches) - 1, idx))
        notes.append((tick, pitches[idx], d, rng.randint(64, 100)))
        tick += d
    if len(notes) > max(1, p.max_tokens // 3):  # keep the landing note when capping
        notes = notes[: max(1, p.max_tokens // 3) - 1] + [notes[-1]]
        notes[-1] = (notes[-2][0] + notes[-2][2] if len(notes) > 1 else 0, *notes[-1][1:])
    return _finish(notes, p, a.tempo_bpm, 0)


def _finish(notes: list[Note], p: _OrpheusParams, tempo: float, program: int,
            channel: int = 0) -> tuple[bytes, int, float]:
    notes = _cap(notes, p.max_tokens)
    data = make_midi(notes, tempo_bpm=tempo, program=program, channel=channel,
                     name=f"luanette-sim {p.task}")
    return data, 3 * len(notes), float(tempo)


@functools.lru_cache(maxsize=256)
def _orpheus_cached(p: _OrpheusParams, a_field: tuple[str, Any, bool],
                    b_field: tuple[str, Any, bool]) -> dict:
    # keyed on the raw base64 strings: a thousand identical requests cost one generation
    # (lru_cache does not keep exceptions, so invalid input is re-checked every time)
    a = _decode_midi(*a_field[:2], required=a_field[2])
    b = _decode_midi(*b_field[:2], required=b_field[2])
    if p.task == "classify":
        assert a is not None
        grid = TICKS_PER_BEAT // 4
        off_grid = sum(1 for s, *_ in a.notes if s % grid) / len(a.notes)
        vels = {v for *_, v in a.notes}
        human = min(0.99, 0.1 + 0.7 * off_grid + (0.19 if len(vels) > 6 else 0.0))
        human = round(human, 4)
        ai = round(1 - human, 4)
        labels = sorted((("human", human), ("ai", ai)), key=lambda kv: -kv[1])
        return {
            "task": "classify",
            "classification": {"is_human": human > 0.5, "confidence": max(human, ai),
                               "probabilities": {"human": human, "ai": ai}},
            "labels": [k for k, _ in labels],
            "scores": [v for _, v in labels],
            "num_tokens": 3 * len(a.notes),
            "metadata": {"model": "sim-orpheus", "task": "classify", "seed": p.seed,
                         "input_notes": len(a.notes), "simulated": True},
        }
    variations, tempo = [], 120.0
    for i in range(p.num_variations):
        data, tokens, tempo = _orpheus_variation(p, i, a, b)
        variations.append({"midi_base64": base64.b64encode(data).decode(), "num_tokens": tokens})
    return {
        "task": p.task,
        "variations": variations,
        "metadata": {"model": "sim-orpheus", "task": p.task, "seed": p.seed,
                     "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
                     "num_variations": p.num_variations, "tempo_bpm": tempo,
                     "input_notes": len(a.notes) if a else 0, "simulated": True},
    }


def orpheus_predict(body: dict, *, server_seed: int = 0, default_task: str = "generate") -> dict:
    """The orpheus-family ``/predict`` answer for ``body``; raises SimError (400)."""
    task = body.get("task")
    if task is None:
        task = "bridge" if body.get("section_a") is not None else default_task
    if task not in ORPHEUS_TASKS:
        raise _bad(f"unknown task {json.dumps(task)[:40]}; expected one of {', '.join(ORPHEUS_TASKS)}",
                   "task")
    p = _OrpheusParams(
        task=task,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        max_tokens=_integer(body, "max_tokens", 1024, 1, 8192),
        num_variations=_integer(body, "num_variations", 1, 1, 8),
        seed=_integer(body, "seed", 0, -(2**63), 2**63 - 1) ^ server_seed,
    )
    a_field: tuple[str, Any, bool] = ("midi_input", None, False)
    b_field: tuple[str, Any, bool] = ("midi_input_b", None, False)
    if task in ("generate_seeded", "continue", "classify"):
        a_field = (*_pick(body, "midi_input"), True)
    elif task == "bridge":
        a_field = (*_pick(body, "section_a", "midi_input"), True)
        b_field = (*_pick(body, "section_b", "midi_input_b"), False)
    elif task == "loops":
        a_field = (*_pick(body, "seed_midi", "midi_input"), False)
    for name, value, _ in (a_field, b_field):  # checked here: the cache key must be hashable
        if value is not None and not isinstance(value, str):
            raise _bad(f"{name} must be a base64 string", name)
    return _orpheus_cached(p, a_field, b_field)


# ---------------------------------------------------------------------------------
# WAV
# ---------------------------------------------------------------------------------


def make_wav(duration: float, *, frequency_hint: float = 440.0, sample_rate: int = SAMPLE_RATE,
             amplitude: float = 0.1) -> tuple[bytes, int]:
    """Mono 16-bit WAV of a quiet sine; returns (bytes, num_samples). The frequency is
    rounded so one period is a whole number of samples, which makes tiling exact and
    keeps a 30 s file cheap to build."""
    num_samples = round(duration * sample_rate)
    period = max(2, round(sample_rate / frequency_hint))
    amp = int(32767 * amplitude)
    one = array.array("h", (round(amp * math.sin(2 * math.pi * i / period)) for i in range(period)))
    if sys.byteorder == "big":
        one.byteswap()
    reps, rest = divmod(num_samples, period)
    pcm = one.tobytes() * reps + one.tobytes()[: 2 * rest]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue(), num_samples


@functools.lru_cache(maxsize=32)
def _musicgen_cached(prompt: str, num_samples: int, seed: int) -> str:
    rng = random.Random(_seed_of(prompt, seed))
    freq = 110.0 * 2 ** (3 * rng.random())  # 110..880 Hz, from the prompt
    data, _ = make_wav(num_samples / SAMPLE_RATE, frequency_hint=freq)
    return base64.b64encode(data).decode()


def musicgen_predict(body: dict, *, server_seed: int = 0) -> dict:
    prompt = _string(body, "prompt", "")
    duration = _number(body, "duration", 10.0, 0.0, 30.0, lo_open=True)
    _number(body, "temperature", 1.0, 0.0)
    _integer(body, "top_k", 250, 0)
    _number(body, "top_p", 0.0, 0.0, 1.0)
    _number(body, "guidance_scale", 3.0, 0.0)
    _boolean(body, "do_sample", True)
    seed = _integer(body, "seed", 0, -(2**63), 2**63 - 1) ^ server_seed
    num_samples = max(1, round(duration * SAMPLE_RATE))
    return {
        "audio_base64": _musicgen_cached(prompt, num_samples, seed),
        "sample_rate": SAMPLE_RATE,
        "duration": num_samples / SAMPLE_RATE,
        "num_samples": num_samples,
        "channels": 1,
    }


# ---------------------------------------------------------------------------------
# LLM (OpenAI chat completions)
# ---------------------------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")


def _text_of(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content parts must be {{type: \"text\", text: str}}",
                           "messages")
            parts.append(part["text"])
        return " ".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def llm_complete(body: dict, *, default_model: str = "sim-llm") -> dict:
    model = _string(body, "model", default_model) or default_model
    if not isinstance(body.get("stream", False), bool):
        raise _bad("stream must be a boolean", "stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content}", "messages")
    texts: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}] must be an object with role one of {', '.join(ROLES)}",
                       "messages")
        texts.append((m["role"], _text_of(m.get("content"), i)))
    max_tokens = _integer(body, "max_tokens", 0, 1) if body.get("max_tokens") is not None else None
    _number(body, "temperature", 1.0, 0.0, 2.0)
    fmt = body.get("response_format")
    json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")

    last_user = next((t for r, t in reversed(texts) if r == "user"), texts[-1][1])
    words = last_user.split()
    summary = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    if json_mode:
        content = json.dumps({"summary": summary, "words": len(words), "model": model})
        finish = "stop"
    else:
        content = f'[sim-llm] {len(words)} words; you said: "{summary}"'
        out = content.split(" ")
        finish = "stop"
        if max_tokens is not None and len(out) > max_tokens:
            content, finish = " ".join(out[:max_tokens]), "length"
    prompt_tokens = sum(len(t.split()) for _, t in texts)
    completion_tokens = len(content.split())
    digest = hashlib.sha256(json.dumps([model, texts]).encode()).hexdigest()[:24]
    return {
        "id": f"chatcmpl-sim-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def stream_events(result: dict, body: dict) -> list[dict]:
    """The ``chat.completion.chunk`` events that stream ``result`` (an
    :func:`llm_complete` answer) as OpenAI would: role, one delta per word, the finish
    reason, and the usage when ``stream_options.include_usage`` asks for it."""
    base = {"id": result["id"], "object": "chat.completion.chunk", "created": result["created"],
            "model": result["model"]}
    choice = result["choices"][0]
    words = choice["message"]["content"].split(" ")
    pieces = [w + " " for w in words[:-1]] + [words[-1]]
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
               for p in pieces if p]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append({**base, "choices": [], "usage": result["usage"]})
    return events


async def _stream_answer(request: web.Request, result: dict, body: dict) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for event in stream_events(result, body):
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


# ---------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class _Handlers:
    def __init__(self, config: SimConfig, stats: SimStats) -> None:
        self.config = config
        self.stats = stats
        self.rng = random.Random(config.seed)
        self._rng_seed = config.seed
        self.held = 0  # model requests waiting at the hold_until barrier
        self.released = asyncio.Event()  # the barrier opened (until /_sim/reset)

    # -- helpers ---------------------------------------------------------------

    def _error(self, api: str, e: SimError) -> web.Response:
        payload: dict[str, Any]
        if api == "openai":
            payload = {"error": {"message": e.message, "type": e.type, "param": e.field,
                                 "code": e.status}}
        else:
            payload = {"detail": e.message,
                       "error": {"type": e.type, "message": e.message, "field": e.field}}
        headers = {"Retry-After": _retry_after(self.config.retry_after)} if e.status == 429 else None
        return web.json_response(payload, status=e.status, headers=headers)

    def _resolve_kind(self, fixed: str | None, body: Any) -> str:
        if fixed is not None:
            return fixed
        if isinstance(body, dict) and body.get("task") is None and body.get("prompt") is not None:
            return "musicgen"
        return "orpheus"

    async def _model_call(self, request: web.Request, fixed_kind: str | None, api: str) -> web.StreamResponse:
        cfg, st = self.config, self.stats
        if cfg.seed != self._rng_seed:  # seed changed at run time: restart the draws
            self.rng, self._rng_seed = random.Random(cfg.seed), cfg.seed
        st.requests[request.path] += 1
        st.model_requests += 1
        n = st.model_requests
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        record = RequestRecord(request.method, request.path, None, None,
                               request.headers.get("traceparent"), None, time.monotonic())
        st.records.append(record)
        try:
            body: Any = None
            parse_error: SimError | None = None
            try:
                body = await request.json()
            except Exception as e:  # JSONDecodeError, UnicodeDecodeError, content errors
                parse_error = _bad(f"request body is not valid JSON: {e}")
            if parse_error is None and not isinstance(body, dict):
                parse_error = _bad("request body must be a JSON object")
            record.body = body
            kind = self._resolve_kind(fixed_kind, body)
            record.kind = kind
            st.by_kind[kind] += 1
            if kind == "orpheus" and isinstance(body, dict):
                record.task = body.get("task") or (
                    "bridge" if body.get("section_a") is not None else cfg.default_task)
                st.by_task[str(record.task)] += 1

            busy = ((cfg.busy_burst and n <= cfg.busy_burst)
                    or (cfg.busy_every and n % cfg.busy_every == 0)
                    or (cfg.max_concurrency and st.in_flight > cfg.max_concurrency))
            if busy:
                st.busy_sent += 1
                raise SimError(429, "busy", f"simulated {kind} service is busy, retry later")
            if parse_error is not None:
                raise parse_error
            try:
                if kind == "orpheus":
                    result = orpheus_predict(body, server_seed=cfg.seed, default_task=cfg.default_task)
                elif kind == "musicgen":
                    result = musicgen_predict(body, server_seed=cfg.seed)
                else:
                    result = llm_complete(body, default_model=cfg.llm_model)
            except SimError:
                st.bad_requests += 1
                raise
            fail = cfg.fail_rate > 0 and self.rng.random() < cfg.fail_rate
            if cfg.hold_until and not self.released.is_set():
                self.held += 1
                if self.held >= cfg.hold_until:
                    self.released.set()
                try:
                    await self.released.wait()
                finally:
                    self.held -= 1
            if cfg.latency_ms > 0:
                await asyncio.sleep(cfg.latency_ms / 1000.0)
            if fail:
                st.failures_sent += 1
                raise SimError(cfg.fail_status, "simulated_failure",
                               f"simulated {kind} failure (fail_rate={cfg.fail_rate:g})")
            if kind == "llm" and body.get("stream"):
                response = await _stream_answer(request, result, body)
            else:
                response = web.json_response(result)
        except SimError as e:
            if e.status == 400 and e.type == "invalid_request" and parse_error is e:
                st.bad_requests += 1
            response = self._error(api, e)
        finally:
            st.in_flight -= 1
        record.status = response.status
        record.finished = time.monotonic()
        st.statuses[response.status] += 1
        return response

    # -- routes ----------------------------------------------------------------

    def predict(self, kind: str | None):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._model_call(request, kind, "predict")
        return handler

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, "llm", "openai")

    def health(self, kind: str | None):
        async def handler(request: web.Request) -> web.Response:
            self.stats.requests[request.path] += 1
            kinds = self.config.kinds if kind is None else (kind,)
            return web.json_response({
                "status": "ok",
                "service": f"sim-{kind or self.config.kind}",
                "version": VERSION,
                "kind": kind or self.config.kind,
                "kinds": list(kinds),
                "tasks": list(ORPHEUS_TASKS) if "orpheus" in kinds else [],
                "simulated": True,
            })
        return handler

    async def models(self, request: web.Request) -> web.Response:
        self.stats.requests[request.path] += 1
        return web.json_response({"object": "list", "data": [
            {"id": self.config.llm_model, "object": "model", "created": 0, "owned_by": "luanette-sim"}]})

    async def sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def sim_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                known = {f.name for f in dataclasses.fields(SimConfig)} - {"kind"}
                unknown = set(changes) - known
                if unknown:
                    raise ValueError(f"unknown or read-only switches: {', '.join(sorted(unknown))}")
                trial = dataclasses.replace(self.config, **changes)  # validates
            except (ValueError, TypeError) as e:
                return self._error("predict", _bad(str(e)))
            for k in changes:
                setattr(self.config, k, getattr(trial, k))
        return web.json_response(self.config.to_json())

    async def sim_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        if not self.held:  # (requests still held would wait for good)
            self.released.clear()
        self.rng, self._rng_seed = random.Random(self.config.seed), self.config.seed
        return web.json_response(self.stats.snapshot())


def build_app(config: SimConfig, stats: SimStats | None = None) -> web.Application:
    """The aiohttp application for ``config`` (routes per module docstring)."""
    stats = stats if stats is not None else SimStats()
    h = _Handlers(config, stats)
    app = web.Application(client_max_size=MAX_BODY)
    app[CONFIG_KEY], app[STATS_KEY] = config, stats
    r = app.router
    r.add_get("/health", h.health(None))
    kinds = config.kinds
    predict_kinds = [k for k in kinds if k != "llm"]
    if predict_kinds:
        r.add_post("/predict", h.predict(predict_kinds[0] if len(predict_kinds) == 1 else None))
    for k in kinds:
        r.add_get(f"/{k}/health", h.health(k))
        if k == "llm":
            for prefix in ("", "/llm"):
                r.add_post(f"{prefix}/v1/chat/completions", h.chat)
                r.add_get(f"{prefix}/v1/models", h.models)
        else:
            r.add_post(f"/{k}/predict", h.predict(k))
    r.add_get("/_sim/stats", h.sim_stats)
    r.add_get("/_sim/config", h.sim_config)
    r.add_post("/_sim/config", h.sim_config)
    r.add_post("/_sim/reset", h.sim_reset)
    return app


CONFIG_KEY = web.AppKey("sim_config", SimConfig)
STATS_KEY = web.AppKey("sim_stats", SimStats)


class SimServer:
    """A running simulator: ``url``, ``config`` (mutable switches), ``stats``."""

    def __init__(self, config: SimConfig, *, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 0.25) -> None:
        self.config = config
        self.stats = SimStats()
        self.host = host
        self.port = port
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url_for(self, kind: str) -> str:
        """Base URL for one family (``.../orpheus``), for configs naming one backend."""
        return f"{self.url}/{kind}"

    async def start(self) -> SimServer:
        app = build_app(self.config, self.stats)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        # a deep backlog so a burst of 1,000 connects is not dropped into SYN retries
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def run_models(kind: str = "all", *, host: str = "127.0.0.1", port: int = 0,
                     **switches: Any) -> AsyncIterator[SimServer]:
    """Serve the simulator in the current event loop for the ``async with`` body.

    ``switches`` are :class:`SimConfig` fields (latency_ms, hold_until, busy_every, busy_burst,
    max_concurrency, retry_after, fail_rate, fail_status, seed, default_task, llm_model).
    """
    server = SimServer(SimConfig(kind=kind, **switches), host=host, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.contextmanager
def serve_in_thread(kind: str = "all", *, host: str = "127.0.0.1", port: int = 0,
                    **switches: Any) -> Iterator[SimServer]:
    """Like :func:`run_models` for synchronous code: the server runs in a daemon thread
    with its own event loop until the ``with`` block exits."""
    config = SimConfig(kind=kind, **switches)
    server = SimServer(config, host=host, port=port)
    with in_thread(server, "luanette-sim") as running:
        yield running
