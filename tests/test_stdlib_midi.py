"""luanette.stdlib.midi: MIDI files as Lua tables, on real files made with mido.

Scripts run through the real runtime with the namespaces wired as the job runner wires
them (a real Cas in tmp_path, a TempNamespace closed in a ``finally``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mido
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luanette.cas import Cas, hash_bytes
from luanette.runtime import Limits, LuaCallError, ScriptError, run_script
from luanette.stdlib.cas import CasNamespace
from luanette.stdlib.clock import ClockNamespace
from luanette.stdlib.midi import MidiNamespace
from luanette.stdlib.temp import TempNamespace

TPB = 480


def midi_bytes(midi: mido.MidiFile) -> bytes:
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def song() -> mido.MidiFile:
    """Format 1, three tracks: a tempo map, a piano part with every kind of event, drums."""
    conductor = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name="Conductor"),
            mido.MetaMessage("time_signature", numerator=3, denominator=4),
            mido.MetaMessage("key_signature", key="Bb"),
            mido.MetaMessage("set_tempo", tempo=500_000),
            mido.MetaMessage("set_tempo", tempo=250_000, time=4 * TPB),  # 120 bpm, then 240
            mido.MetaMessage("marker", text="B section", time=0),
        ]
    )
    piano = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name="Piano"),
            mido.Message("program_change", channel=0, program=5),
            mido.Message("control_change", channel=0, control=64, value=127),
            mido.Message("note_on", channel=0, note=60, velocity=100, time=10),
            mido.Message("note_on", channel=0, note=64, velocity=90),
            mido.Message("pitchwheel", channel=0, pitch=-2000, time=100),
            mido.Message("note_off", channel=0, note=60, velocity=40, time=370),
            mido.Message("note_on", channel=0, note=64, velocity=0),  # velocity 0 = off
            mido.Message("polytouch", channel=0, note=67, value=30, time=5),
            mido.Message("note_on", channel=1, note=127, velocity=70, time=475),
            mido.Message("aftertouch", channel=1, value=12, time=10),
            mido.Message("sysex", data=[0x7E, 0x7F, 0x09, 0x01], time=10),
            mido.Message("note_off", channel=1, note=127, time=460),
            mido.MetaMessage("lyrics", text="la", time=0),
            mido.UnknownMetaMessage(0x60, [1, 2, 250], time=0),
            mido.MetaMessage("end_of_track", time=1440),  # the piece ends at beat 6
        ]
    )
    drums = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name="Drums"),
            mido.Message("note_on", channel=9, note=36, velocity=120),
            mido.Message("note_off", channel=9, note=36, time=240),
            mido.Message("note_on", channel=9, note=38, velocity=110, time=240),
            mido.Message("note_off", channel=9, note=38, time=240),
        ]
    )
    midi = mido.MidiFile(type=1, ticks_per_beat=TPB)
    midi.tracks.extend([conductor, piano, drums])
    return midi


def absolute(midi: mido.MidiFile) -> list[list[tuple[int, dict[str, Any]]]]:
    """Each track as (absolute tick, message dict without time)."""
    out = []
    for track in midi.tracks:
        tick, events = 0, []
        for message in track:
            tick += message.time
            fields = message.dict()
            del fields["time"]
            events.append((tick, {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}))
        out.append(events)
    return out


class Job:
    def __init__(self, tmp_path: Path, **midi_options: Any) -> None:
        self.cas = Cas(tmp_path / "cas")
        self.temp = TempNamespace(tmp_path / "temp")
        self.midi = MidiNamespace(self.cas, self.temp, **midi_options)
        self.namespaces = [self.temp, CasNamespace(self.cas, temp=self.temp), self.midi]

    def store(self, midi: mido.MidiFile | bytes) -> str:
        data = midi if isinstance(midi, bytes) else midi_bytes(midi)
        return self.cas.store(data, "audio/midi")

    async def run(self, code: str, params: Any = None) -> Any:
        return (await run_script(code, params, namespaces=self.namespaces)).result

    async def error(self, code: str, params: Any = None) -> str:
        with pytest.raises(ScriptError) as info:
            await run_script(code, params, namespaces=self.namespaces)
        message = info.value.detail.message
        assert "internal error" not in message, message
        return message


@pytest.fixture
def job(tmp_path: Path):
    job = Job(tmp_path)
    try:
        yield job
    finally:
        job.temp.close()


@pytest.fixture
def h(job: Job) -> str:
    return job.store(song())


# ------------------------------------------------------------------ read / write


async def test_read_gives_absolute_and_delta_ticks(job: Job, h: str) -> None:
    t = await job.run("return midi.read(params.h)", {"h": h})
    assert (t["ticks_per_beat"], t["format"]) == (TPB, 1)
    assert [track["name"] for track in t["tracks"]] == ["Conductor", "Piano", "Drums"]
    expected = absolute(mido.MidiFile(file=io.BytesIO(midi_bytes(song()))))  # with mido's end_of_track
    for track, want in zip(t["tracks"], expected, strict=True):
        got = [(e.pop("tick"), e) for e in track["events"]]
        deltas = [e.pop("delta") for _, e in got]
        assert got == want
        ticks = [tick for tick, _ in got]
        assert deltas == [b - a for a, b in zip([0, *ticks], ticks)]
    piano = t["tracks"][1]["events"]
    assert piano[3] == {"type": "note_on", "channel": 0, "note": 60, "velocity": 100}
    assert piano[-2] == {"type": "unknown_meta", "type_byte": 0x60, "data": [1, 2, 250]}


async def test_round_trip_through_the_cas_is_byte_identical(job: Job, h: str) -> None:
    result = await job.run(
        """
        local t = midi.read(params.h)
        local w = midi.write(t)
        local again = midi.read(w.hash)
        return {w = w, same = midi.notes(t), again = midi.notes(again), t = t, t2 = again}
        """,
        {"h": h},
    )
    data = midi_bytes(song())
    assert result["w"] == {"hash": h, "mime_type": "audio/midi", "size_bytes": len(data)}
    assert result["again"] == result["same"] and len(result["same"]) == 5
    assert result["t"] == result["t2"]
    assert job.cas.inspect(h).mime_type == "audio/midi"


async def test_round_trip_through_a_temp_file(job: Job, h: str) -> None:
    result = await job.run(
        """
        local p = temp.path("copy.mid")
        local w = midi.write(midi.read("cas:" .. params.h), p)
        local again = midi.read(p)
        return {w = w, stored = cas.store_file(p, "audio/midi"), notes = #midi.notes(again)}
        """,
        {"h": h},
    )
    assert result["w"]["path"] == "copy.mid"  # relative to the job's directory, as temp.path gives it
    assert result["w"]["mime_type"] == "audio/midi"
    assert result["stored"] == h and result["notes"] == 5


async def test_write_accepts_the_seed_argument_order(job: Job, h: str) -> None:
    path = await job.run("return midi.write(temp.path('x.mid'), midi.read(params.h)).path", {"h": h})
    assert path == "x.mid"
    assert hash_bytes((job.temp.directory / path).read_bytes()) == h


async def test_tables_built_by_hand(job: Job) -> None:
    result = await job.run(
        """
        local events = {}
        for i = 0, 3 do
          events[#events + 1] = {type = "note_on", note = 60 + i, velocity = 80, delta = i == 0 and 0 or 240}
          events[#events + 1] = {type = "note_off", note = 60 + i, time = 240}  -- seed name for delta
        end
        local w = midi.write({tracks = {{name = "Lead", events = events}}, format = 0})
        return {info = midi.info(w.hash), t = midi.read(w.hash)}
        """
    )
    info, t = result["info"], result["t"]
    assert info["format"] == 0 and info["ticks_per_beat"] == 480 and info["notes"] == 4
    assert info["length_ticks"] == 3 * 480 + 240
    track = t["tracks"][0]
    assert track["name"] == "Lead"
    assert track["events"][0] == {"type": "track_name", "name": "Lead", "tick": 0, "delta": 0}
    assert track["events"][1]["channel"] == 0  # mido's default filled in
    assert track["events"][-1] == {"type": "end_of_track", "tick": 1680, "delta": 0}


async def test_tick_wins_over_delta_and_events_are_sorted(job: Job) -> None:
    t = await job.run(
        """
        return midi.read(midi.write({ticks_per_beat = 96, tracks = {{events = {
          {type = "note_on", note = 62, tick = 96, delta = 5},
          {type = "note_on", note = 60, tick = 0},
          {type = "note_off", note = 60, tick = 48.4},
          {type = "note_off", note = 62, delta = 96},
          {type = "end_of_track", tick = 10},
        }}}}).hash)
        """
    )
    events = t["tracks"][0]["events"]
    assert [(e["type"], e.get("note"), e["tick"], e["delta"]) for e in events] == [
        ("note_on", 60, 0, 0),
        ("note_off", 60, 48, 48),
        ("note_on", 62, 96, 48),
        ("note_off", 62, 144, 48),
        ("end_of_track", None, 144, 0),
    ]


async def test_end_of_track_keeps_a_later_end(job: Job) -> None:
    t = await job.run(
        "return midi.read(midi.write({tracks = {{events = {{type = 'note_on'}, "
        "{type = 'end_of_track', tick = 1000}, {type = 'end_of_track', tick = 10}}}}}).hash)"
    )
    assert [e["type"] for e in t["tracks"][0]["events"]] == ["note_on", "end_of_track"]
    assert t["tracks"][0]["events"][-1]["tick"] == 1000


async def test_utf8_text_round_trips(job: Job) -> None:
    t = await job.run(
        "return midi.read(midi.write({tracks = {{name = 'Café ☃', events = {{type = 'text', text = 'ß'}}}}}).hash)"
    )
    assert t["tracks"][0]["name"] == "Café ☃"
    assert t["tracks"][0]["events"][1]["text"] == "ß"


async def test_latin1_files_are_still_readable(job: Job) -> None:
    midi = mido.MidiFile(charset="latin1")
    midi.tracks.append(mido.MidiTrack([mido.MetaMessage("track_name", name="Caf\xe9")]))
    t = await job.run("return midi.read(params.h)", {"h": job.store(midi)})
    assert t["tracks"][0]["name"] == "Café"


# --------------------------------------------------------------------- transpose


async def test_transpose_moves_notes_clamps_and_skips_drums(job: Job, h: str) -> None:
    result = await job.run(
        """
        local t = midi.read(params.h)
        local up = midi.transpose(t, 12)
        return {before = midi.notes(t), up = midi.notes(up), down = midi.notes(midi.transpose(t, -127)),
                t = t, up_table = up}
        """,
        {"h": h},
    )
    before, up, down = result["before"], result["up"], result["down"]
    assert [(n["note"], n["channel"]) for n in up] == [
        (min(127, n["note"] + 12) if n["channel"] != 9 else n["note"], n["channel"]) for n in before
    ]
    assert {n["note"] for n in down if n["channel"] != 9} == {0}
    assert [n["note"] for n in down if n["channel"] == 9] == [36, 38]
    # everything but the notes is unchanged; the input table itself is untouched
    assert [n["start_tick"] for n in up] == [n["start_tick"] for n in before]
    polytouch = [e for e in result["up_table"]["tracks"][1]["events"] if e["type"] == "polytouch"]
    assert polytouch[0]["note"] == 79
    assert result["t"]["tracks"][1]["events"][3]["note"] == 60


@pytest.mark.parametrize(("value", "fragment"), [("'x'", "must be an integer"), ("1.5", "must be an integer"),
                                                 ("200", "from -127 to 127")])
async def test_transpose_checks_semitones(job: Job, h: str, value: str, fragment: str) -> None:
    message = await job.error(f"midi.transpose(params.h, {value})", {"h": h})
    assert message.startswith("midi.transpose: semitones") and fragment in message


async def test_transpose_accepts_integral_floats(job: Job, h: str) -> None:
    notes = await job.run("return midi.notes(midi.transpose(params.h, 2.0))", {"h": h})
    assert sorted(n["note"] for n in notes) == [36, 38, 62, 66, 127]


# ---------------------------------------------------------------------- quantize


def quantize_input() -> mido.MidiFile:
    track = mido.MidiTrack(
        [
            mido.Message("note_on", note=60, velocity=100, time=10),  # 10 -> 0
            mido.Message("note_off", note=60, time=220),  # ends 230 -> 220
            mido.Message("note_on", note=62, velocity=100, time=130),  # 360 -> 480
            mido.Message("note_on", note=60, velocity=90, time=120),  # 480 -> 480
            mido.Message("note_off", note=62, time=100),  # 580 -> 700
            mido.Message("note_off", note=60, time=0),  # 580 -> 580
            mido.Message("control_change", control=1, value=5, time=5),  # 585 stays
        ]
    )
    midi = mido.MidiFile(ticks_per_beat=TPB)
    midi.tracks.append(track)
    return midi


async def test_quantize_snaps_starts_and_keeps_durations(job: Job) -> None:
    h = job.store(quantize_input())
    result = await job.run("return {midi.notes(params.h), midi.notes(midi.quantize(params.h, 240))}", {"h": h})
    before, after = result
    assert [(n["note"], n["start_tick"], n["end_tick"]) for n in after] == [
        (60, 0, 220),
        (60, 480, 580),
        (62, 480, 700),
    ]
    durations = sorted((n["note"], n["duration_ticks"]) for n in before)
    assert sorted((n["note"], n["duration_ticks"]) for n in after) == durations


async def test_quantize_with_strength(job: Job) -> None:
    h = job.store(quantize_input())
    notes = await job.run("return midi.notes(midi.quantize(params.h, 240, 0.5))", {"h": h})
    assert [(n["note"], n["start_tick"]) for n in notes] == [(60, 5), (62, 420), (60, 480)]
    unchanged = await job.run("return midi.notes(midi.quantize(params.h, 240, 0))", {"h": h})
    assert unchanged == await job.run("return midi.notes(params.h)", {"h": h})


async def test_quantize_puts_a_release_before_a_new_start_at_the_same_tick(job: Job) -> None:
    track = mido.MidiTrack(
        [
            mido.Message("note_on", note=60, velocity=100),
            mido.Message("note_on", note=60, velocity=100, time=470),  # 470 -> 480
            mido.Message("note_off", note=60, time=10),  # first note ends at 480
            mido.Message("note_off", note=60, time=480),
        ]
    )
    midi = mido.MidiFile(ticks_per_beat=TPB)
    midi.tracks.append(track)
    t = await job.run("return midi.quantize(params.h, 480)", {"h": job.store(midi)})
    kinds = [(e["type"], e["tick"]) for e in t["tracks"][0]["events"]]
    assert kinds == [("note_on", 0), ("note_off", 480), ("note_on", 480), ("note_off", 970), ("end_of_track", 970)]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ("0", "grid_ticks must be from 1"),
        ("'x'", "grid_ticks must be an integer"),
        ("240, 2", "strength must be from 0 to 1"),
        ("240, 'x'", "strength must be a number"),
    ],
)
async def test_quantize_checks_arguments(job: Job, h: str, args: str, fragment: str) -> None:
    assert fragment in await job.error(f"midi.quantize(params.h, {args})", {"h": h})


# ------------------------------------------------------------------------- merge


async def test_merge_combines_tracks_and_rescales_ticks(job: Job, h: str) -> None:
    other = mido.MidiFile(type=0, ticks_per_beat=240)
    other.tracks.append(
        mido.MidiTrack(
            [mido.Message("note_on", note=72, velocity=50, time=240), mido.Message("note_off", note=72, time=120)]
        )
    )
    h2 = job.store(other)
    result = await job.run(
        """
        local a, b = midi.read(params.h), midi.read(params.h2)
        return {m = midi.merge(a, b), list = midi.merge({a, b}), srcs = midi.merge(params.h, params.h2),
                notes = midi.notes(midi.merge(a, b)), one = midi.merge(b)}
        """,
        {"h": h, "h2": h2},
    )
    merged = result["m"]
    assert merged == result["list"] == result["srcs"]
    assert (merged["ticks_per_beat"], merged["format"], len(merged["tracks"])) == (TPB, 1, 4)
    assert [t["name"] for t in merged["tracks"]] == ["Conductor", "Piano", "Drums", ""]
    added = [n for n in result["notes"] if n["track"] == 4]
    assert added == [
        {"note": 72, "channel": 0, "velocity": 50, "start_tick": 480, "end_tick": 720, "duration_ticks": 240,
         "start_beat": 1.0, "duration_beats": 0.5, "track": 4}
    ]
    assert result["one"]["format"] == 0 and result["one"]["ticks_per_beat"] == 240


async def test_merge_needs_tables(job: Job) -> None:
    assert "at least one MIDI table" in await job.error("midi.merge()")
    assert "argument #2 must be a MIDI table" in await job.error("midi.merge({tracks = {}}, 5)")


# ------------------------------------------------------------------------ filter


async def test_filter_by_type_channel_and_track(job: Job, h: str) -> None:
    result = await job.run(
        """
        local t = midi.read(params.h)
        local cc = midi.filter(t, {type = {"control_change", "program_change"}})
        local ch1 = midi.filter(t, {channel = 1})
        local drums = midi.filter(t, {track = 3, type = "note_on"})
        local no_drums = midi.filter(t, {channel = 9, invert = true})
        return {cc = cc, ch1 = ch1, drums = midi.notes(drums), no_drums = midi.notes(no_drums),
                all = midi.filter(t, {}), t = t}
        """,
        {"h": h},
    )
    types = lambda table: [[e["type"] for e in track["events"]] for track in table["tracks"]]  # noqa: E731
    assert types(result["cc"]) == [
        ["end_of_track"],
        ["program_change", "control_change", "end_of_track"],
        ["end_of_track"],
    ]
    assert types(result["ch1"])[1] == ["note_on", "aftertouch", "note_off", "end_of_track"]
    assert [n["note"] for n in result["drums"]] == [36, 38]
    assert all(n["channel"] != 9 for n in result["no_drums"]) and len(result["no_drums"]) == 3
    assert result["all"] == result["t"]


async def test_filter_keeps_notes_whole(job: Job, h: str) -> None:
    result = await job.run(
        """
        local t = midi.read(params.h)
        local loud = midi.filter(t, {velocity_min = 95})
        local low = midi.filter(t, {note_max = 62, invert = true})
        local early = midi.filter(t, {type = "note_on", tick_max = 100})
        return {loud = loud, notes = midi.notes(loud), low = midi.notes(low), early = midi.notes(early)}
        """,
        {"h": h},
    )
    # velocity criteria judge each note by its note_on, so note_offs (velocity 0/40/64) stay with it
    assert [(n["note"], n["end_tick"]) for n in result["notes"]] == [(36, 240), (60, 480), (38, 720)]
    piano = [e["type"] for e in result["loud"]["tracks"][1]["events"]]
    assert piano == ["note_on", "note_off", "end_of_track"]
    assert sorted(n["note"] for n in result["low"]) == [64, 127]
    assert [(n["note"], n["end_tick"]) for n in result["early"]] == [(36, 240), (60, 480), (64, 480)]


@pytest.mark.parametrize(
    ("pred", "fragment"),
    [
        ("{note_minimum = 3}", "unknown criterion 'note_minimum'; did you mean 'note_min'?"),
        ("{chanel = 3}", "did you mean 'channel'?"),
        ("{'note_on'}", "pred must be a function or a table of criteria"),
        ("'note_on'", "pred must be a function or a table of criteria"),
        ("{channel = 16}", "pred.channel must be from 0 to 15"),
        ("{invert = 1}", "pred.invert must be a boolean"),
    ],
)
async def test_filter_predicate_errors(job: Job, h: str, pred: str, fragment: str) -> None:
    message = await job.error(f"midi.filter(params.h, {pred})", {"h": h})
    assert message.startswith("midi.filter") or "midi.filter" in message
    assert fragment in message


# Each criteria table beside a Lua function that says the same.
EQUIVALENT_PREDICATES = [
    ("{type = 'note_on'}", "function(e) return e.type == 'note_on' end"),
    ("{channel = 9, invert = true}", "function(e) return e.channel ~= 9 end"),
    ("{track = 2}", "function(e, track) return track == 2 end"),
    ("{velocity_min = 95}", "function(e) return e.velocity ~= nil and e.velocity >= 95 end"),
    ("{note_max = 62, invert = true}", "function(e) return not (e.note and e.note <= 62) end"),
    ("{tick_min = 200, tick_max = 1000}", "function(e) return e.tick >= 200 and e.tick <= 1000 end"),
]


@pytest.mark.parametrize(("criteria", "function"), EQUIVALENT_PREDICATES)
async def test_filter_with_a_lua_function_agrees_with_criteria(job: Job, h: str, criteria: str, function: str) -> None:
    result = await job.run(
        f"local t = midi.read(params.h)\nreturn {{midi.filter(t, {criteria}), midi.filter(t, {function})}}",
        {"h": h},
    )
    by_table, by_function = result
    assert by_function == by_table  # same events, same pairing, same recomputed deltas
    assert by_function != (await job.run("return midi.read(params.h)", {"h": h}))


async def test_filter_function_sees_events_once_and_notes_stay_whole(job: Job, h: str) -> None:
    result = await job.run(
        """
        local seen = {}
        local kept = midi.filter(params.h, function(e, track)
          seen[#seen + 1] = e.type .. "@" .. track
          if e.type == "note_on" then e.velocity = 1 end  -- pred may change what it keeps
          return e.type == "note_on" and e.note == 60
        end)
        return {seen = seen, notes = midi.notes(kept), piano = kept.tracks[2].events}
        """,
        {"h": h},
    )
    # note_offs and end_of_track are never judged: they follow their note_on / are kept
    assert not any(s.startswith(("note_off", "end_of_track")) for s in result["seen"])
    assert "note_on@3" in result["seen"] and "set_tempo@1" in result["seen"]
    assert [(n["note"], n["start_tick"], n["end_tick"]) for n in result["notes"]] == [(60, 10, 480)]
    piano = result["piano"]
    assert [e["type"] for e in piano] == ["note_on", "note_off", "end_of_track"]
    assert [e["delta"] for e in piano] == [10, 470, piano[2]["tick"] - 480]
    assert piano[0]["velocity"] == 1


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("midi.filter(params.h, function(e) return e.nope.x end)", "attempt to index a nil value (field 'nope')"),
        ("midi.filter({tracks = 3}, function() return true end)", "midi.filter: tbl.tracks must be"),
        ("midi.filter(params.h, function() error('no!') end)", "no!"),
    ],
)
async def test_filter_function_errors_point_at_the_script(job: Job, h: str, code: str, message: str) -> None:
    with pytest.raises(ScriptError) as info:
        await run_script(f"local x = 1\nlocal r = {code}\nreturn r", {"h": h}, namespaces=job.namespaces)
    detail = info.value.detail
    assert detail.message.startswith(message), detail.message
    assert detail.line == 2
    assert [frame.source for frame in detail.stack] == ["script"] * len(detail.stack)  # no prelude frames


async def test_filter_function_can_wait_and_is_stopped_by_the_deadline(h: str, job: Job) -> None:
    namespaces = [*job.namespaces, ClockNamespace()]
    code = "return #midi.filter(params.h, function(e) clock.sleep(1); return true end).tracks"
    assert (await run_script(code, {"h": h}, namespaces=namespaces)).result == 3
    with pytest.raises(ScriptError) as info:
        await run_script(
            "return midi.filter(params.h, function() while true do end end)",
            {"h": h},
            namespaces=namespaces,
            limits=Limits(timeout_s=0.3),
        )
    assert info.value.detail.kind == "timeout"


# ------------------------------------------------------------------- notes, info


async def test_notes_pairs_fifo_velocity_zero_and_open_notes(job: Job) -> None:
    track = mido.MidiTrack(
        [
            mido.Message("note_on", note=60, velocity=100),
            mido.Message("note_on", note=60, velocity=50, time=100),  # second, overlapping
            mido.Message("note_on", note=60, velocity=0, time=100),  # ends the first (FIFO)
            mido.Message("note_off", note=60, time=100),  # ends the second
            mido.Message("note_on", channel=2, note=60, velocity=70),  # never ended
            mido.Message("note_off", note=61, time=50),  # ends nothing
            mido.MetaMessage("end_of_track", time=50),
        ]
    )
    midi = mido.MidiFile(ticks_per_beat=100)
    midi.tracks.append(track)
    notes = await job.run("return midi.notes(params.h)", {"h": job.store(midi)})
    assert [(n["channel"], n["velocity"], n["start_tick"], n["end_tick"]) for n in notes] == [
        (0, 100, 0, 200),
        (0, 50, 100, 300),
        (2, 70, 300, 400),
    ]
    assert notes[0]["start_beat"] == 0.0 and notes[0]["duration_beats"] == 2.0 and notes[0]["track"] == 1


async def test_notes_of_an_empty_table_is_an_empty_array(job: Job) -> None:
    assert await job.run("local n = midi.notes({tracks = {}}) return {#n, n}") == [0, []]


async def test_info_of_a_known_file(job: Job, h: str) -> None:
    info = await job.run("return {midi.info(params.h), midi.info(midi.read(params.h))}", {"h": h})
    assert info[0] == info[1]
    # 6 beats (2880 ticks): 4 at 120 bpm (2 s) then 2 at 240 bpm (0.5 s)
    assert info[0] == {
        "format": 1,
        "ticks_per_beat": TPB,
        "tempo": 500_000,
        "bpm": 120.0,
        "length_ticks": 2880,
        "length_beats": 6.0,
        "length_seconds": 2.5,
        "tracks": 3,
        "events": 7 + 16 + 6,
        "notes": 5,
    }


async def test_info_defaults_without_tempo(job: Job) -> None:
    info = await job.run("return midi.info({tracks = {{events = {{type = 'note_on', tick = 960}}}}})")
    assert (info["tempo"], info["bpm"], info["length_beats"], info["length_seconds"]) == (500_000, 120.0, 2.0, 1.0)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("{tracks = {{events = {{type = 'note_on', note = 200}}}}}",
         "midi.write: tbl.tracks[1].events[1].note: data byte must be in range 0..127"),
        ("{tracks = {{events = {{type = 'note_on'}, {type = 'note_on', note = 60.5}}}}}",
         "midi.write: tbl.tracks[1].events[2].note: data byte must be int"),
        ("{tracks = {{events = {{type = 'note_on', note = 'C4'}}}}}",
         "midi.write: tbl.tracks[1].events[1].note: data byte must be int"),
        ("{tracks = {{events = {{type = 'note_onn'}}}}}",
         "midi.write: tbl.tracks[1].events[1].type: unknown event type 'note_onn' (did you mean 'note_on'?)"),
        ("{tracks = {{events = {{type = 'clock'}}}}}", "clock is a live MIDI message"),
        ("{tracks = {{events = {{type = 'note_on', pitch = 3}}}}}",
         "tbl.tracks[1].events[1]: note_on events have no field 'pitch'"),
        ("{tracks = {{events = {{note = 60}}}}}", "tbl.tracks[1].events[1].type must be a string, got nil"),
        ("{tracks = {{events = {{type = 'note_on', tick = -1}}}}}", "tbl.tracks[1].events[1].tick must be from 0"),
        ("{tracks = {{events = {{type = 'note_on', delta = 'x'}}}}}", "events[1].delta must be a number of ticks"),
        ("{tracks = {{events = {{type = 'set_tempo', tempo = -5}}}}}", "tbl.tracks[1].events[1].tempo:"),
        ("{tracks = {{events = {{type = 'key_signature', key = 'H'}}}}}", "tbl.tracks[1].events[1].key: invalid key"),
        ("{tracks = {{events = {{type = 'text', text = '\\xff'}}}}}",
         "tbl.tracks[1].events[1].text must be UTF-8 text"),
        ("{tracks = {{events = {{type = 'sysex', data = {1, 200}}}}}}", "tbl.tracks[1].events[1].data"),
        ("{tracks = {{events = {{type = 'unknown_meta', data = {1}}}}}}", "events[1].type_byte must be an integer"),
        ("{tracks = {{events = {42}}}}", "tbl.tracks[1].events[1] must be an event table, got number"),
        ("{tracks = {{events = {[2] = {type = 'note_on'}}}}}", "tbl.tracks[1].events must be an array"),
        ("{tracks = {{}, {}}, format = 0}", "tbl.format is 0, which holds exactly one track, but there are 2"),
        ("{tracks = {}, format = 3}", "tbl.format must be from 0 to 2"),
        ("{tracks = {}, ticks_per_beat = 0}", "tbl.ticks_per_beat must be from 1 to 32767"),
        ("{ticks_per_beat = 480}", "tbl.tracks is missing"),
        ("{{type = 'note_on'}}", "got an array (pass the whole table from midi.read"),
        ("{tracks = {5}}", "tbl.tracks[1] must be a track table {name, events}, got number"),
        ("{tracks = {{name = 5}}}", "tbl.tracks[1].name must be a string, got number"),
        ("42", "tbl must be a MIDI table or a src"),
    ],
)
async def test_bad_tables_are_clean_lua_errors(job: Job, table: str, message: str) -> None:
    got = await job.error(f"midi.write({table})")
    assert message in got


async def test_a_bare_event_list_is_transposed_in_place(job: Job, h: str) -> None:
    # upstream's (and the seed's) style: the list is edited and returned
    got = await job.run(
        "local t = midi.read(params.h) local events = t.tracks[2].events local first = events[4]"
        " local same = midi.transpose(events, 7)"
        " return {rawequal(same, events), first.note, midi.notes({tracks = {t.tracks[2]}})[1].note}",
        {"h": h},
    )
    assert got == [True, 67, 67]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"hello, not midi", "src is not a readable MIDI file: MThd not found"),
        (midi_bytes(song())[:40], "src is not a readable MIDI file"),
        (b"", "src is not a readable MIDI file"),
    ],
)
async def test_unreadable_files(job: Job, data: bytes, fragment: str) -> None:
    message = await job.error("midi.read(params.h)", {"h": job.store(data)})
    assert message.startswith("midi.read: ") and fragment in message


async def test_sources_that_do_not_exist(job: Job) -> None:
    assert await job.error("midi.read(params.h)", {"h": "0" * 32}) == f"midi.read: src: no object {'0' * 32} in the CAS"
    assert "no file 'nope.mid' in the temp directory" in await job.error("midi.read('nope.mid')")
    assert "lowercase" in await job.error("midi.read(string.rep('A', 32))")
    assert "must be a string, got table" in await job.error("midi.read({})")
    assert "missing a required argument: 'src'" in await job.error("midi.read(nil)")


async def test_read_cap_and_event_cap(tmp_path: Path) -> None:
    size = len(midi_bytes(song()))
    job = Job(tmp_path, max_read_bytes=size - 1, max_events=20)
    try:
        big = job.store(song())
        message = await job.error("midi.read(params.h)", {"h": big})
        assert f"is {size} bytes, over the read limit of {size - 1} bytes" in message
        (job.temp.directory / "big.mid").write_bytes(midi_bytes(song()))
        assert f"over the read limit of {size - 1} bytes" in await job.error("midi.read('big.mid')")
        message = await job.error(
            "local e = {} for i = 1, 21 do e[i] = {type = 'note_on'} end midi.notes({tracks = {{events = e}}})"
        )
        assert "tbl has more than 20 events" in message
        small = mido.MidiFile()
        small.tracks.append(mido.MidiTrack([mido.Message("note_on")] * 25))
        assert "src has more than 20 events" in await job.error("midi.read(params.h)", {"h": job.store(small)})
    finally:
        job.temp.close()


async def test_write_to_a_read_only_cas(tmp_path: Path) -> None:
    Cas(tmp_path / "cas")
    namespace = MidiNamespace(Cas(tmp_path / "cas", read_only=True), None)
    with pytest.raises(ScriptError) as info:
        await run_script("midi.write({tracks = {}})", namespaces=[namespace])
    assert info.value.detail.message == (
        "midi.write: cas_read_only: the CAS is read-only (it was opened read-only): objects can be read but not stored"
    )
    with pytest.raises(ScriptError) as info:
        await run_script("midi.read('x.mid')", namespaces=[namespace])
    assert "no temp directory" in info.value.detail.message


# ------------------------------------------------------------- property: round trip

note_lists = st.lists(
    st.tuples(
        st.integers(0, 15),  # channel
        st.integers(0, 127),  # note
        st.integers(1, 127),  # velocity
        st.integers(0, 5000),  # start
        st.integers(0, 2000),  # duration
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(notes=note_lists, tpb=st.sampled_from([24, 96, 480, 960]))
def test_write_read_keeps_every_note(tmp_path: Path, notes: list[tuple[int, int, int, int, int]], tpb: int) -> None:
    namespace = MidiNamespace(Cas(tmp_path / "cas"), None)
    events = []
    for channel, note, velocity, start, duration in notes:
        events.append({"type": "note_on", "channel": channel, "note": note, "velocity": velocity, "tick": start})
        events.append({"type": "note_off", "channel": channel, "note": note, "tick": start + duration})
    table = {"ticks_per_beat": tpb, "format": 0, "tracks": [{"events": events}]}
    before = namespace.notes(table)
    written = namespace.write(table)
    again = namespace.read(written["hash"])
    assert namespace.notes(again) == before
    assert namespace.read(namespace.write(again)["hash"]) == again
    assert len(before) == len(notes)


def test_python_api_raises_lua_call_errors(tmp_path: Path) -> None:
    namespace = MidiNamespace(Cas(tmp_path / "cas"), None)
    with pytest.raises(LuaCallError, match="tbl.tracks is missing"):
        namespace.notes({"ticks_per_beat": 480})
