"""The `midi` namespace: Standard MIDI Files as plain Lua tables (parsing and writing by mido).

The MIDI table
--------------

::

    {
      ticks_per_beat = 480,          -- pulses per quarter note (1..32767; default 480)
      format = 1,                    -- SMF format 0, 1 or 2 (default 1)
      tracks = {                     -- an array, first track is tracks[1]
        { name = "Piano",            -- name of the track's first track_name event, or ""
          events = {                 -- an array, in time order
            { type = "set_tempo", tempo = 500000, tick = 0, delta = 0 },
            { type = "note_on", channel = 0, note = 60, velocity = 100, tick = 0, delta = 0 },
            { type = "note_off", channel = 0, note = 60, velocity = 0, tick = 480, delta = 480 },
            { type = "end_of_track", tick = 480, delta = 0 },
          } },
      },
    }

Every event has ``type``, ``tick`` (absolute, in ticks from the start of its track)
and ``delta`` (ticks since the previous event of the track), plus the fields mido
gives that type, under mido's names: ``note_on``/``note_off`` {channel, note,
velocity}, ``control_change`` {channel, control, value}, ``program_change`` {channel,
program}, ``pitchwheel`` {channel, pitch}, ``polytouch`` {channel, note, value},
``aftertouch`` {channel, value}, ``sysex`` {data = {bytes}}, and meta events such as
``set_tempo`` {tempo} (microseconds per beat), ``time_signature`` {numerator,
denominator, clocks_per_click, notated_32nd_notes_per_beat}, ``key_signature`` {key},
``track_name``/``instrument_name`` {name}, ``text``/``marker``/``lyrics`` {text},
``end_of_track`` {} and
``unknown_meta`` {type_byte, data}.  Channels are 0-based as in MIDI (drums are 9).
Text is UTF-8 (files whose text is not UTF-8 are read as Latin-1).

Tables going in may be partial: missing fields take mido's defaults (velocity 64,
channel 0, ...); when ``tick`` is missing it is the previous event's tick plus
``delta`` (or ``time``, the seed scripts' name for it; default 0), so a list of
events written by deltas alone works.  ``tick`` wins over ``delta``; fractional ticks
are rounded; events are then stably sorted by tick and each track ends with exactly one
``end_of_track`` (at its old tick or the last event's, whichever is later).  A
non-empty track ``name`` sets the name of the track's first ``track_name`` event (adding one at
tick 0 if needed).  Other fields must be integers (``60.0`` is fine) in mido's
ranges; an unknown type or field is an error.  Every function returns a new,
normalised table: Lua tables cross into Python by copy, so nothing is changed in place
(write ``t = midi.transpose(t, 7)``, not ``midi.transpose(t.events, 7)``).

Lua API
-------

``src`` is a CAS hash (32 hex characters, or ``cas:`` and the hash) or a file of the
job's temp directory (a name or a path from ``temp.path``; any other path is an error:
CAS content is addressed by hash).  Wherever a MIDI table ``tbl`` is expected, a
``src`` is accepted too.  Reads are capped at ``max_read_bytes`` and every table at
``max_events`` events.  Track numbers are 1-based, like Lua arrays.

- ``midi.read(src) -> tbl``
- ``midi.write(tbl [, dest]) -> {hash, mime_type = "audio/midi", size_bytes}`` stores the
  file in the CAS; with ``dest`` (a temp path) it writes there instead and returns
  ``{path, mime_type, size_bytes}`` (``path`` as ``temp.path`` gives it: relative to the
  job's directory).  ``midi.write(dest, tbl)`` (the seed's order) works too.
- ``midi.transpose(tbl, semitones) -> tbl``: note numbers of note_on, note_off and
  polytouch move by ``semitones`` (an integer), clamped to 0..127; channel 9 (drums)
  is left alone.
- ``midi.quantize(tbl, grid_ticks [, strength]) -> tbl``: each note's start moves
  ``strength`` (0..1, default 1) of the way to the nearest multiple of ``grid_ticks``;
  its note_off moves with it, so durations are kept; other events stay put.
- ``midi.merge(a, b, ...) -> tbl`` (or ``midi.merge({a, b, ...})``): the tracks of all
  inputs, in order, in one table with ``a``'s ticks_per_beat (other inputs' ticks are
  rescaled); format 1 (2 if every input is format 2; 0 for a single track).
- ``midi.filter(tbl, pred) -> tbl``: keeps the events ``pred`` accepts.  ``pred`` is a
  Lua function ``pred(event, track) -> boolean`` (``track`` is the 1-based track
  number; it may change the event it is given, and may call any other function,
  ``clock.sleep`` included), or a declarative table of criteria that all must hold
  (``{}`` matches everything): ``type`` (a name or array of names), ``channel`` and
  ``track`` (a number or array), ``note_min``/``note_max``, ``velocity_min``/
  ``velocity_max``, ``tick_min``/``tick_max`` (bounds inclusive), ``invert = true`` to
  drop the matching events instead.  A criterion on a field fails for events without
  that field.  Either way a note is judged by its note_on and its note_off follows that
  verdict (``pred`` is not called for it), so filtering never leaves a hanging note;
  ``end_of_track`` is always kept and ``delta`` is recomputed.
- ``midi.notes(tbl) -> { {note, channel, velocity, start_tick, end_tick, duration_ticks,
  start_beat, duration_beats, track}, ... }``: note_on/note_off pairs (a note_on with
  velocity 0 is a note_off; the earliest open note of that channel and pitch closes
  first; a note never closed ends at its track's end), sorted by start, track,
  channel, note.
- ``midi.info(src_or_tbl) -> {format, ticks_per_beat, tempo, bpm, length_ticks,
  length_beats, length_seconds, tracks, events, notes}``: ``tempo`` is the first
  set_tempo (microseconds per beat, default 500000), ``bpm`` from it,
  ``length_seconds`` follows every tempo change; ``tracks``, ``events`` and ``notes``
  are counts.

Bad input is a Lua error naming the argument and the place in it, e.g.
``midi.write: tbl.tracks[1].events[3].note: data byte must be in range 0..127``.
"""

from __future__ import annotations

import collections
import difflib
import functools
import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import mido
from mido.messages.checks import check_value

from luanette.cas import Cas
from luanette.engine.api import LuaCallError, RunContext, charge_cas_write
from luanette.stdlib.cas import OBJECT_PATH, cas_failure, check_hash
from luanette.stdlib.paths import as_text, lua_type, relative

if TYPE_CHECKING:
    from luanette.stdlib.temp import TempNamespace

MIME: Final = "audio/midi"
DEFAULT_MAX_READ_BYTES: Final = 8 * 2**20
DEFAULT_MAX_EVENTS: Final = 100_000
DEFAULT_TICKS_PER_BEAT: Final = 480
DEFAULT_TEMPO: Final = 500_000
DRUM_CHANNEL: Final = 9
MAX_TICK: Final = 0x0FFFFFFF  # the largest delta a MIDI file can hold
MAX_TRACKS: Final = 0xFFFF
_NOTE_TYPES: Final = frozenset({"note_on", "note_off", "polytouch"})
_TIME_KEYS: Final = frozenset({"type", "tick", "delta", "time"})
_HASHLIKE: Final = re.compile(r"cas:.*|[0-9a-fA-F]{32}|" + OBJECT_PATH.pattern, re.DOTALL)
# Ranges of the integer fields of channel messages (as mido checks them), for a fast path.
_RANGES: Final = {
    "channel": (0, 15),
    "note": (0, 127),
    "velocity": (0, 127),
    "value": (0, 127),
    "control": (0, 127),
    "program": (0, 127),
    "pitch": (-8192, 8191),
}
_FILTER_KEYS: Final = (
    "type channel track note_min note_max velocity_min velocity_max tick_min tick_max invert".split()
)


# ------------------------------------------------------------------------ model


@dataclass
class _Track:
    events: list[dict[str, Any]]  # each with "type", its fields and "tick"; sorted by tick


@dataclass
class _Song:
    ticks_per_beat: int
    format: int
    tracks: list[_Track] = field(default_factory=list)


@dataclass(frozen=True)
class _Spec:
    kind: str  # "message", "meta" or "unknown_meta"
    defaults: Mapping[str, Any]


@functools.lru_cache(maxsize=128)
def _spec(etype: str) -> _Spec | str:
    """How events of type ``etype`` look, or why there cannot be one in a MIDI file."""
    if etype == "unknown_meta":
        return _Spec("unknown_meta", {"type_byte": None, "data": []})
    try:
        message = mido.Message(etype)
    except (LookupError, ValueError, TypeError):
        pass
    else:
        if message.is_realtime or etype in ("quarter_frame", "songpos", "song_select", "tune_request"):
            return f"{etype} is a live MIDI message; it cannot be stored in a MIDI file"
        return _Spec("message", _fields(message))
    try:
        meta = mido.MetaMessage(etype)
    except (LookupError, ValueError, TypeError):
        known = sorted(_known_types())
        close = difflib.get_close_matches(etype, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown event type {etype[:60]!r}{hint}"
    return _Spec("meta", _fields(meta))


@functools.cache
def _known_types() -> frozenset[str]:
    from mido.messages.specs import SPEC_BY_TYPE
    from mido.midifiles.meta import _META_SPEC_BY_TYPE

    return frozenset(SPEC_BY_TYPE) | frozenset(_META_SPEC_BY_TYPE) | {"unknown_meta"}


def _fields(message: Any) -> dict[str, Any]:
    fields = _plain(message.dict())
    fields.pop("type", None)
    fields.pop("time", None)
    return fields


def _plain(value: Any) -> Any:
    """mido values as JSON-like ones (tuples and SysexData become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------ arguments


def _where(what: str, ti: int, ei: int | None = None, key: str | None = None) -> str:
    text = f"{what}.tracks[{ti + 1}]"
    if ei is not None:
        text += f".events[{ei + 1}]"
    return text + (f".{key}" if key else "")


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LuaCallError(f"{what} must be an integer, got {lua_type(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise LuaCallError(f"{what} must be an integer, got {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise LuaCallError(f"{what} must be from {low} to {high}, got {value}")
    return value


def _tick(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LuaCallError(f"{what} must be a number of ticks, got {lua_type(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LuaCallError(f"{what} must be a finite number, got {value!r}")
        value = round(value)
    if not 0 <= value <= MAX_TICK:
        raise LuaCallError(f"{what} must be from 0 to {MAX_TICK}, got {value}")
    return value


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LuaCallError(f"{what} must be a number, got {lua_type(value)}")
    if not low <= value <= high:
        raise LuaCallError(f"{what} must be from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _array(value: Any, what: str) -> list[Any]:
    """A Lua array argument (an empty table counts as an empty array)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and not value:
        return []
    got = "a table with keys" if isinstance(value, dict) else lua_type(value)
    raise LuaCallError(f"{what} must be an array, got {got}")


def _coerce(value: Any) -> Any:
    """Integral floats as ints, also inside lists (mido's checks refuse floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    return value


# ------------------------------------------------------------ upstream's names

# The Rust luanette (midly) named some events and fields differently; tables in either
# vocabulary are accepted, and a call given upstream's names answers in them.
_UPSTREAM_META: Final = {"tempo": "set_tempo"}  # meta_type -> mido type, where they differ
_MIDO_META: Final = {"set_tempo": "tempo"}
_UPSTREAM_ONLY: Final = frozenset({"meta", "pitch_bend", "channel_aftertouch"})


def _key_of(sharps_flats: Any, minor: Any, where: str) -> str:
    from mido.midifiles.meta import _key_signature_decode

    key = _key_signature_decode.get((_integer(sharps_flats, f"{where}.sharps_flats", -7, 7), 1 if minor else 0))
    assert key is not None
    return key


def _from_upstream(value: dict[str, Any], where: str) -> dict[str, Any] | None:
    """An event in upstream's vocabulary as one in ours (None: upstream wrote nothing for
    it, an ``unknown`` meta event); ours is returned as it is."""
    etype = value.get("type")
    if etype == "meta":
        meta_type = value.get("meta_type")
        if meta_type == "unknown":
            return None
        if not isinstance(meta_type, str):
            raise LuaCallError(f"{where}.meta_type must be a string, got {lua_type(meta_type)}")
        out = {k: v for k, v in value.items() if k not in ("type", "meta_type", "sharps_flats", "minor")}
        out["type"] = _UPSTREAM_META.get(meta_type, meta_type)
        if meta_type == "key_signature" and "key" not in value:
            out["key"] = _key_of(value.get("sharps_flats", 0), value.get("minor", False), where)
        return out
    if etype == "control_change" and "controller" in value:
        out = dict(value)
        out["control"] = out.pop("controller")
        return out
    if etype == "aftertouch" and ("pressure" in value or "note" in value):  # upstream's is per key
        out = {k: v for k, v in value.items() if k != "pressure"}
        out["type"] = "polytouch"
        out["value"] = value.get("pressure", value.get("value", 0))
        return out
    if etype == "channel_aftertouch":
        out = {k: v for k, v in value.items() if k != "pressure"}
        out["type"] = "aftertouch"
        out["value"] = value.get("pressure", value.get("value", 0))
        return out
    if etype == "pitch_bend":
        out = {k: v for k, v in value.items() if k != "value"}
        out["type"] = "pitchwheel"
        out["pitch"] = value.get("value", value.get("pitch", 0))
        return out
    return value


def _to_upstream(event: dict[str, Any]) -> dict[str, Any]:
    """An event of ours in upstream's vocabulary (``tick`` and ``delta`` kept)."""
    etype = event["type"]
    spec = _spec(etype)
    if isinstance(spec, _Spec) and spec.kind != "message":
        out = {k: v for k, v in event.items() if k != "type"}
        out["type"] = "meta"
        out["meta_type"] = _MIDO_META.get(etype, etype)
        if etype == "key_signature":
            from mido.midifiles.meta import _key_signature_encode

            sharps_flats, minor = _key_signature_encode[out.pop("key")]
            out["sharps_flats"], out["minor"] = sharps_flats, bool(minor)
        return out
    if etype == "control_change":
        out = dict(event)
        out["controller"] = out.pop("control")
        return out
    if etype == "polytouch":
        out = {k: v for k, v in event.items() if k != "value"}
        out["type"], out["pressure"] = "aftertouch", event["value"]
        return out
    if etype == "aftertouch":
        out = {k: v for k, v in event.items() if k != "value"}
        out["type"], out["pressure"] = "channel_aftertouch", event["value"]
        return out
    if etype == "pitchwheel":
        out = {k: v for k, v in event.items() if k != "pitch"}
        out["type"], out["value"] = "pitch_bend", event["pitch"]
        return out
    return event


@dataclass
class _Shape:
    """What came in, so that the same comes out."""

    bare: bool = False  # a bare event list (upstream's midi.transpose(track.events, 7))
    upstream: bool = False  # upstream's event names
    ended: bool = True  # the bare list had an end_of_track


# ------------------------------------------------------------------ table -> model


def _event(
    value: Any, what: str, ti: int, ei: int, previous_tick: int, shape: _Shape | None = None
) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise LuaCallError(f"{_where(what, ti, ei)} must be an event table, got {lua_type(value)}")
    etype = value.get("type")
    if etype in _UPSTREAM_ONLY or (etype == "control_change" and "controller" in value) or (
        etype == "aftertouch" and ("pressure" in value or "note" in value)
    ):
        translated = _from_upstream(value, _where(what, ti, ei))
        if shape is not None:
            shape.upstream = True
        if translated is None:
            return None
        value = translated
        etype = value.get("type")
    if isinstance(etype, bytes):
        etype = etype.decode("utf-8", "replace")
    if not isinstance(etype, str):
        raise LuaCallError(f"{_where(what, ti, ei, 'type')} must be a string, got {lua_type(etype)}")
    spec = _spec(etype)
    if isinstance(spec, str):
        raise LuaCallError(f"{_where(what, ti, ei, 'type')}: {spec}")
    if "tick" in value:
        tick = value["tick"]
        if type(tick) is not int or not 0 <= tick <= MAX_TICK:  # the fast path skips _where
            tick = _tick(tick, _where(what, ti, ei, "tick"))
    else:
        key = "delta" if "delta" in value else "time"
        tick = previous_tick + _tick(value.get(key, 0), _where(what, ti, ei, key))
        if tick > MAX_TICK:
            raise LuaCallError(f"{_where(what, ti, ei, key)}: the event's tick would pass {MAX_TICK}")
    event: dict[str, Any] = {"type": etype}
    for key, default in spec.defaults.items():
        event[key] = list(default) if isinstance(default, list) else default
    for key, item in value.items():
        if key in _TIME_KEYS:
            continue
        if key not in spec.defaults:
            names = ", ".join([*spec.defaults, "tick", "delta"])
            raise LuaCallError(
                f"{_where(what, ti, ei)}: {etype} events have no field {key!r} (fields: {names})"
            )
        if type(item) is float or type(item) is list:
            item = _coerce(item)
        event[key] = item
    _validate(event, spec, what, ti, ei)
    event["tick"] = tick
    return event


def _validate(event: dict[str, Any], spec: _Spec, what: str, ti: int, ei: int) -> None:
    etype = event["type"]
    if spec.kind == "message":
        for key, item in event.items():
            if key == "type":
                continue
            bounds = _RANGES.get(key)
            if bounds is not None and type(item) is int and bounds[0] <= item <= bounds[1]:
                continue  # the common case, without mido's slower checks
            try:
                check_value(key, item)
            except (TypeError, ValueError) as exc:
                raise LuaCallError(f"{_where(what, ti, ei, key)}: {exc}") from None
        return
    if spec.kind == "unknown_meta":
        _integer(event["type_byte"], _where(what, ti, ei, "type_byte"), 0, 0x7F)
        data = _array(event["data"], _where(what, ti, ei, "data"))
        for index, byte in enumerate(data):
            _integer(byte, f"{_where(what, ti, ei, 'data')}[{index + 1}]", 0, 255)
        return
    meta = mido.MetaMessage(etype)
    for key, item in event.items():
        if key == "type":
            continue
        if isinstance(item, bytes):
            raise LuaCallError(f"{_where(what, ti, ei, key)} must be UTF-8 text")
        try:
            setattr(meta, key, item)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise LuaCallError(f"{_where(what, ti, ei, key)}: {exc}") from None
    try:
        with mido.midifiles.meta.meta_charset("utf-8"):
            meta.bytes()
    except Exception as exc:  # mido's encoders raise assorted errors for bad values
        raise LuaCallError(f"{_where(what, ti, ei)}: cannot encode {etype}: {exc}") from None


def _finish(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort by tick (stable) and end with exactly one end_of_track."""
    events.sort(key=lambda e: e["tick"])
    end = 0
    kept = []
    for event in events:
        if event["type"] == "end_of_track":
            end = max(end, event["tick"])
        else:
            kept.append(event)
    if kept:
        end = max(end, kept[-1]["tick"])
    kept.append({"type": "end_of_track", "tick": end})
    return kept


def _track(
    value: Any, what: str, ti: int, budget: list[int], max_events: int, shape: _Shape | None = None
) -> _Track:
    if not isinstance(value, dict):
        raise LuaCallError(
            f"{_where(what, ti)} must be a track table {{name, events}}, got {lua_type(value)}"
        )
    raw_events = _array(value.get("events", []), _where(what, ti) + ".events")
    budget[0] += len(raw_events)
    if budget[0] > max_events:
        raise LuaCallError(f"{what} has more than {max_events} events")
    events = []
    tick = 0
    for ei, raw in enumerate(raw_events):
        event = _event(raw, what, ti, ei, tick, shape)
        if event is None:
            continue
        tick = event["tick"]
        events.append(event)
    name = value.get("name")
    if name is not None:
        name = as_text(name, _where(what, ti) + ".name")
    events = _finish(events)
    if name:
        _set_name(events, name, what, ti)
    return _Track(events)


def _set_name(events: list[dict[str, Any]], name: str, what: str, ti: int) -> None:
    for event in events:
        if event["type"] == "track_name":
            event["name"] = name
            break
    else:
        events.insert(0, {"type": "track_name", "name": name, "tick": 0})
    try:
        with mido.midifiles.meta.meta_charset("utf-8"):
            mido.MetaMessage("track_name", name=name).bytes()
    except Exception as exc:
        raise LuaCallError(f"{_where(what, ti)}.name: {exc}") from None


def _song_from_table(value: Any, what: str, max_events: int, shape: _Shape | None = None) -> _Song:
    if isinstance(value, list) or (isinstance(value, dict) and not value):
        if shape is None:
            raise LuaCallError(
                f"{what} must be a MIDI table {{ticks_per_beat, format, tracks}}, got an array "
                "(pass the whole table from midi.read, not a list of tracks or events)"
            )
        # a bare event list: one track of the default resolution
        shape.bare = True
        events = value if isinstance(value, list) else []
        shape.ended = any(
            isinstance(e, dict) and (e.get("type") == "end_of_track" or e.get("meta_type") == "end_of_track")
            for e in events
        )
        value = {"tracks": [{"events": events}]}
    if not isinstance(value, dict):
        raise LuaCallError(
            f"{what} must be a MIDI table or a src (CAS hash or temp path), got {lua_type(value)}"
        )
    if "tracks" not in value:
        raise LuaCallError(f"{what}.tracks is missing: a MIDI table is {{ticks_per_beat, format, tracks}}")
    raw_tracks = _array(value["tracks"], f"{what}.tracks")
    if len(raw_tracks) > MAX_TRACKS:
        raise LuaCallError(f"{what}.tracks has more than {MAX_TRACKS} tracks")
    tpb = _integer(value.get("ticks_per_beat", DEFAULT_TICKS_PER_BEAT), f"{what}.ticks_per_beat", 1, 32767)
    fmt = _integer(value.get("format", 1), f"{what}.format", 0, 2)
    budget = [0]
    tracks = [_track(raw, what, ti, budget, max_events, shape) for ti, raw in enumerate(raw_tracks)]
    return _Song(tpb, fmt, tracks)


# ------------------------------------------------------------- bytes <-> model


def _song_from_bytes(data: bytes, what: str, max_events: int) -> _Song:
    try:
        try:
            midi = mido.MidiFile(file=io.BytesIO(data), charset="utf-8")
        except UnicodeDecodeError:
            midi = mido.MidiFile(file=io.BytesIO(data), charset="latin1")
    except Exception as exc:  # mido raises assorted errors on malformed input
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError):
            reason = "the data ends in the middle of a chunk"
        raise LuaCallError(f"{what} is not a readable MIDI file: {reason}") from None
    tpb = midi.ticks_per_beat
    if not isinstance(tpb, int) or not 1 <= tpb <= 32767:
        raise LuaCallError(f"{what} uses SMPTE time division, which is not supported")
    if sum(len(track) for track in midi.tracks) > max_events:
        raise LuaCallError(f"{what} has more than {max_events} events")
    tracks = []
    for track in midi.tracks:
        events = []
        tick = 0
        for message in track:
            tick += message.time
            event = message.dict()
            del event["time"]
            if "data" in event:  # sysex, sequencer_specific, unknown_meta: tuples
                event["data"] = list(event["data"])
            event["tick"] = tick
            events.append(event)
        tracks.append(_Track(_finish(events)))
    return _Song(tpb, midi.type, tracks)


def _song_to_bytes(song: _Song, what: str) -> bytes:
    if song.format == 0 and len(song.tracks) != 1:
        raise LuaCallError(
            f"{what}.format is 0, which holds exactly one track, but there are {len(song.tracks)} "
            "(use format 1, or midi.merge the tracks)"
        )
    midi = mido.MidiFile(type=song.format, ticks_per_beat=song.ticks_per_beat, charset="utf-8")
    for track in song.tracks:
        out = mido.MidiTrack()
        previous = 0
        for event in track.events:
            fields = {k: v for k, v in event.items() if k not in _TIME_KEYS}
            delta = event["tick"] - previous
            previous = event["tick"]
            spec = _spec(event["type"])
            assert isinstance(spec, _Spec)
            if spec.kind == "message":
                out.append(mido.Message(event["type"], skip_checks=True, time=delta, **fields))
            elif spec.kind == "meta":
                out.append(mido.MetaMessage(event["type"], time=delta, **fields))
            else:
                out.append(mido.UnknownMetaMessage(fields["type_byte"], fields["data"], time=delta))
        midi.tracks.append(out)
    buffer = io.BytesIO()
    try:
        midi.save(file=buffer)
    except Exception as exc:
        raise LuaCallError(f"{what} cannot be written as a MIDI file: {exc}") from None
    return buffer.getvalue()


# -------------------------------------------------------------- model -> table


def _out(song: _Song, shape: _Shape) -> Any:
    """The answer of a function that took ``shape``: a MIDI table or a bare event list,
    in the vocabulary it came in."""
    table = _table(song)
    if shape.upstream:
        for track in table["tracks"]:
            track["events"] = [_to_upstream(event) for event in track["events"]]
    if not shape.bare:
        return table
    events = table["tracks"][0]["events"]
    if not shape.ended:  # added by the normalising, which the list did not ask for
        events.pop()
    return events


def _table(song: _Song) -> dict[str, Any]:
    tracks = []
    for track in song.tracks:
        name = ""
        previous = 0
        for event in track.events:
            event["delta"] = event["tick"] - previous
            previous = event["tick"]
            if not name and event["type"] == "track_name":
                name = event["name"]
        tracks.append({"name": name, "events": track.events})
    return {"ticks_per_beat": song.ticks_per_beat, "format": song.format, "tracks": tracks}


# ------------------------------------------------------------------- analysis


def _pairs(events: list[dict[str, Any]]) -> list[list[Any]]:
    """[on_index, off_index or None] per note, in order of note_on (FIFO per channel+pitch)."""
    pairs: list[list[Any]] = []
    waiting: dict[tuple[int, int], collections.deque[int]] = {}
    for index, event in enumerate(events):
        etype = event["type"]
        if etype != "note_on" and etype != "note_off":
            continue
        key = (event["channel"], event["note"])
        if etype == "note_on" and event["velocity"] > 0:
            waiting.setdefault(key, collections.deque()).append(len(pairs))
            pairs.append([index, None])
        else:
            queue = waiting.get(key)
            if queue:
                pairs[queue.popleft()][1] = index
    return pairs


def _notes(song: _Song) -> list[dict[str, Any]]:
    tpb = song.ticks_per_beat
    notes = []
    for number, track in enumerate(song.tracks, 1):
        events = track.events
        end_of_track = events[-1]["tick"] if events else 0
        for on, off in _pairs(events):
            start_event = events[on]
            start = start_event["tick"]
            end = events[off]["tick"] if off is not None else end_of_track
            notes.append(
                {
                    "note": start_event["note"],
                    "channel": start_event["channel"],
                    "velocity": start_event["velocity"],
                    "start_tick": start,
                    "end_tick": end,
                    "duration_ticks": end - start,
                    "start_beat": start / tpb,
                    "duration_beats": (end - start) / tpb,
                    "track": number,
                }
            )
    notes.sort(key=lambda n: (n["start_tick"], n["track"], n["channel"], n["note"]))
    return notes


def _tempo_changes(song: _Song) -> list[tuple[int, int]]:
    changes = [
        (event["tick"], number, event["tempo"])
        for number, track in enumerate(song.tracks)
        for event in track.events
        if event["type"] == "set_tempo"
    ]
    changes.sort(key=lambda c: (c[0], c[1]))
    return [(tick, tempo) for tick, _, tempo in changes]


def _seconds(changes: list[tuple[int, int]], ticks: int, tpb: int) -> float:
    seconds = 0.0
    tick, tempo = 0, DEFAULT_TEMPO
    for at, new_tempo in changes:
        if at >= ticks:
            break
        seconds += (at - tick) * tempo / tpb / 1e6
        tick, tempo = at, new_tempo
    return seconds + (ticks - tick) * tempo / tpb / 1e6


# --------------------------------------------------------------------- filter


@dataclass(frozen=True)
class _Predicate:
    types: frozenset[str] | None
    channels: frozenset[int] | None
    tracks: frozenset[int] | None
    ranges: tuple[tuple[str, int | None, int | None], ...]  # (field, low, high)
    invert: bool

    def matches(self, event: dict[str, Any], track: int) -> bool:
        if self.types is not None and event["type"] not in self.types:
            return False
        if self.tracks is not None and track not in self.tracks:
            return False
        if self.channels is not None and event.get("channel") not in self.channels:
            return False
        for name, low, high in self.ranges:
            value = event.get(name)
            if value is None or (low is not None and value < low) or (high is not None and value > high):
                return False
        return True


def _predicate(value: Any) -> _Predicate:
    if not isinstance(value, dict):
        got = "an array" if isinstance(value, list) else lua_type(value)
        raise LuaCallError(f"pred must be a function or a table of criteria ({', '.join(_FILTER_KEYS)}), got {got}")
    for key in value:
        if key not in _FILTER_KEYS:
            close = difflib.get_close_matches(key, _FILTER_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; criteria: {', '.join(_FILTER_KEYS)}"
            raise LuaCallError(f"pred has an unknown criterion {key[:60]!r}{hint}")

    def some(name: str, convert: Callable[[Any, str], Any]) -> frozenset[Any] | None:
        if name not in value:
            return None
        item = value[name]
        items = item if isinstance(item, list) else [item]
        return frozenset(convert(x, f"pred.{name}") for x in items)

    types = some("type", lambda x, what: as_text(x, what))
    channels = some("channel", lambda x, what: _integer(x, what, 0, 15))
    tracks = some("track", lambda x, what: _integer(x, what, 1, MAX_TRACKS))
    ranges = []
    for name, high in (("note", 127), ("velocity", 127), ("tick", MAX_TICK)):
        low_key, high_key = f"{name}_min", f"{name}_max"
        if low_key in value or high_key in value:
            low = _integer(value[low_key], f"pred.{low_key}", 0, high) if low_key in value else None
            top = _integer(value[high_key], f"pred.{high_key}", 0, high) if high_key in value else None
            ranges.append((name, low, top))
    invert = value.get("invert", False)
    if not isinstance(invert, bool):
        raise LuaCallError(f"pred.invert must be a boolean, got {lua_type(invert)}")
    return _Predicate(types, channels, tracks, tuple(ranges), invert)


# ------------------------------------------------------------------ namespace


def _upstream_tracks(value: Any) -> bool:
    """Whether ``value`` is upstream's argument of ``midi.merge``: an array of tracks
    ``{events}`` (ours takes MIDI tables, which have ``tracks``)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, dict) and "events" in t and "tracks" not in t for t in value)
    )



# The Lua half of `midi`: filter with a Lua function predicate, which cannot cross into
# Python.  The Python filter normalises the table (and reads a src); the pairing of
# note_on/note_off follows _pairs: the earliest open note of a channel and pitch closes
# first, and a note_on with velocity 0 is a note_off.
_LUA_PRELUDE: Final = b"""
local midi, marks = ...
-- the Python halves this wraps, bound on their first call (marks.hidden), not at every
-- run's setup
local by_criteria = marks.hidden(midi, "filter")
local type, ipairs, pcall, error, next, rawget = type, ipairs, pcall, error, next, rawget

local function rethrow(err)
  if err == "not enough memory" or type(err) ~= "string" then error(err, 0) end
  error(err, 3)  -- at the script's call of midi.filter
end

-- The kept events of one track, and its name (that of its first track_name kept).
local function filter_track(events, track, pred)
  local open, kept, previous, name = {}, {}, 0, nil
  for _, event in ipairs(events) do
    local kind, keep = event.type, nil
    local key = kind == "note_on" or kind == "note_off"
    if key then key = event.channel * 128 + event.note end
    local queue = key and open[key]
    local closes = kind == "note_off" or (kind == "note_on" and event.velocity == 0)
    if kind == "end_of_track" then
      keep = true
    elseif closes and queue and queue.first <= queue.last then
      keep = queue[queue.first]
      queue[queue.first] = nil
      queue.first = queue.first + 1
    else
      keep = pred(event, track) and true or false
      if kind == "note_on" then
        if not queue then
          queue = {first = 1, last = 0}
          open[key] = queue
        end
        queue.last = queue.last + 1
        queue[queue.last] = keep
      end
    end
    if keep then
      event.delta = event.tick - previous
      previous = event.tick
      kept[#kept + 1] = event
      if kind == "track_name" and not name then name = event.name end
    end
  end
  return marks.array(kept), name or ""
end

-- upstream's bare event lists (midi.transpose(track.events, 7)): a list without
-- `tracks`; the empty table counts as one
local function is_events(t)
  return type(t) == "table" and rawget(t, "tracks") == nil and (rawget(t, 1) ~= nil or next(t) == nil)
end

midi.filter = function(tbl, pred)
  if type(pred) ~= "function" then return by_criteria(tbl, pred) end
  local ok, song = pcall(by_criteria, tbl, {})
  if not ok then rethrow(song) end
  if is_events(tbl) then return (filter_track(song, 1, pred)) end
  for number, track in ipairs(song.tracks) do
    track.events, track.name = filter_track(track.events, number, pred)
  end
  return song
end

-- A bare list is edited in place (as upstream did) and returned: the Python half works
-- on a copy, whose events then replace the list's.
local function in_place(name)
  local python = marks.hidden(midi, name)
  midi[name] = function(tbl, ...)
    if not is_events(tbl) then return python(tbl, ...) end
    local ok, events = pcall(python, tbl, ...)
    if not ok then rethrow(events) end
    local n = #tbl
    for i = 1, #events do tbl[i] = events[i] end
    for i = #events + 1, n do tbl[i] = nil end
    return tbl
  end
end
in_place("quantize")

-- transpose edits the list's own event tables, so a script holding one sees it change
local transpose = marks.hidden(midi, "transpose")
local NOTE_TYPES = {note_on = true, note_off = true, polytouch = true, aftertouch = true}
midi.transpose = function(tbl, semitones, ...)
  if not is_events(tbl) then return transpose(tbl, semitones, ...) end
  local shift = math.tointeger(semitones)
  if not shift or shift < -127 or shift > 127 then
    local ok, err = pcall(transpose, {}, semitones)  -- the Python half's message
    rethrow(ok and "semitones must be an integer from -127 to 127" or err)
  end
  for i, event in ipairs(tbl) do
    if type(event) ~= "table" then rethrow("tbl[" .. i .. "] must be an event table, got " .. type(event)) end
    local note = event.note
    if NOTE_TYPES[event.type] and note ~= nil and event.channel ~= 9 then
      if type(note) ~= "number" then rethrow("tbl[" .. i .. "].note must be a number, got " .. type(note)) end
      note = note + shift
      event.note = note < 0 and 0 or note > 127 and 127 or note
    end
  end
  return tbl
end
"""


class MidiNamespace:
    """Lua global `midi`.  ``cas`` backs hashes in src and ``write``; ``temp`` (the
    job's TempNamespace) backs temp paths.  Either may be None (then that kind of
    source or destination is a Lua error)."""

    name = "midi"
    lua_prelude_lazy = True  # (only fills its own table: runs on first use)
    lua_prelude = _LUA_PRELUDE

    def __init__(
        self,
        cas: Cas | None,
        temp: TempNamespace | None = None,
        *,
        max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        self.cas = cas
        self.temp = temp
        self.max_read_bytes = max_read_bytes
        self.max_events = max_events

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {
            "read": self.read,
            "write": self.write,
            "transpose": self.transpose,
            "quantize": self.quantize,
            "merge": self.merge,
            "filter": self.filter,
            "notes": self.notes,
            "info": self.info,
        }

    # --- loading ---

    def _load(self, src: Any, what: str) -> _Song:
        text = as_text(src, what)
        if _HASHLIKE.fullmatch(text):
            h = check_hash(text, what)
            if self.cas is None:
                raise LuaCallError(f"{what}: this job has no CAS")
            try:
                data = self.cas.retrieve(h, max_bytes=self.max_read_bytes)
            except Exception as exc:
                raise cas_failure(exc, what, h) from None
        else:
            if self.temp is None:
                raise LuaCallError(f"{what} is not a CAS hash, and this job has no temp directory")
            data = self.temp.read_bytes(text, self.max_read_bytes, what)
        return _song_from_bytes(data, what, self.max_events)

    def _song(self, value: Any, what: str) -> tuple[_Song, _Shape]:
        """A MIDI table, a bare event list or a src argument as a song, and its shape."""
        shape = _Shape()
        if isinstance(value, (str, bytes)):
            return self._load(value, what), shape
        return _song_from_table(value, what, self.max_events, shape), shape

    # --- the Lua functions ---

    def read(self, src: Any, options: Any = None) -> dict[str, Any]:
        names = "luanette"
        if options is not None:
            if not isinstance(options, dict) or set(options) - {"names"}:
                raise LuaCallError("options must be a table {names = \"luanette\" | \"upstream\"}")
            names = options.get("names", names)
            if names not in ("luanette", "upstream"):
                raise LuaCallError(f"options.names must be \"luanette\" or \"upstream\", got {names!r}")
        return _out(self._load(src, "src"), _Shape(upstream=names == "upstream"))

    def write(self, tbl: Any, dest: Any = None) -> dict[str, Any]:
        if isinstance(tbl, (str, bytes)) and isinstance(dest, dict):
            tbl, dest = dest, tbl  # midi.write(path, table), the seed scripts' order
        if isinstance(tbl, (str, bytes)):
            raise LuaCallError("tbl must be a MIDI table (to copy a file, midi.read it first)")
        data = _song_to_bytes(_song_from_table(tbl, "tbl", self.max_events), "tbl")
        if dest is not None:
            if self.temp is None:
                raise LuaCallError("dest: this job has no temp directory")
            path = self.temp.write_bytes(dest, data, "dest")
            return {"path": relative(self.temp.directory, path), "mime_type": MIME, "size_bytes": len(data)}
        if self.cas is None:
            raise LuaCallError("this job has no CAS: give a dest path")
        charge_cas_write(len(data))
        try:
            h = self.cas.store(data, MIME)
        except Exception as exc:
            raise cas_failure(exc, "tbl") from None
        return {"hash": h, "mime_type": MIME, "size_bytes": len(data)}

    def transpose(self, tbl: Any, semitones: Any) -> Any:
        song, shape = self._song(tbl, "tbl")
        shift = _integer(semitones, "semitones", -127, 127)
        for track in song.tracks:
            for event in track.events:
                if event["type"] in _NOTE_TYPES and event["channel"] != DRUM_CHANNEL:
                    event["note"] = min(127, max(0, event["note"] + shift))
        return _out(song, shape)

    def quantize(self, tbl: Any, grid_ticks: Any, strength: Any = None) -> Any:
        song, shape = self._song(tbl, "tbl")
        grid = _integer(grid_ticks, "grid_ticks", 1, MAX_TICK)
        amount = 1.0 if strength is None else _number(strength, "strength", 0.0, 1.0)
        for track in song.tracks:
            events = track.events
            ticks = [event["tick"] for event in events]
            # At equal ticks a note_off that ends an earlier note goes before a note_on,
            # so a quantized note never starts before the previous one releases.
            rank = [1] * len(events)
            for on, off in _pairs(events):
                start = events[on]["tick"]
                target = (start + grid // 2) // grid * grid
                shift = round(amount * (target - start))
                ticks[on] = start + shift
                if off is not None:
                    ticks[off] = events[off]["tick"] + shift
                    if events[off]["tick"] > start:
                        rank[off] = 0
            order = sorted(range(len(events)), key=lambda i: (ticks[i], rank[i], i))
            moved = []
            for i in order:
                event = events[i]
                event["tick"] = min(ticks[i], MAX_TICK)
                moved.append(event)
            track.events = _finish(moved)
        return _out(song, shape)

    def merge(self, *tables: Any) -> dict[str, Any]:
        names = [f"argument #{i}" for i in range(1, len(tables) + 1)]
        if len(tables) == 1 and _upstream_tracks(tables[0]):
            return self._merge_tracks(tables[0])
        if len(tables) == 1 and isinstance(tables[0], list):
            tables = tuple(tables[0])
            names = [f"tables[{i}]" for i in range(1, len(tables) + 1)]
        if not tables:
            raise LuaCallError("give at least one MIDI table: midi.merge(a, b, ...)")
        songs = [self._song(value, name)[0] for value, name in zip(tables, names, strict=True)]
        tpb = songs[0].ticks_per_beat
        tracks: list[_Track] = []
        for song in songs:
            if song.ticks_per_beat != tpb:
                half = song.ticks_per_beat // 2
                for track in song.tracks:
                    for event in track.events:
                        event["tick"] = min(MAX_TICK, (event["tick"] * tpb + half) // song.ticks_per_beat)
            tracks.extend(song.tracks)
        if len(tracks) > MAX_TRACKS:
            raise LuaCallError(f"the merged table would have more than {MAX_TRACKS} tracks")
        if sum(len(t.events) for t in tracks) > self.max_events:
            raise LuaCallError(f"the merged table would have more than {self.max_events} events")
        if all(song.format == 2 for song in songs):
            fmt = 2
        else:
            fmt = 1 if len(tracks) != 1 else 0
        return _table(_Song(tpb, fmt, tracks))

    def _merge_tracks(self, tracks: list[Any]) -> dict[str, Any]:
        """Upstream's ``midi.merge(tracks)``: the events of tracks ``{events}`` as one
        track ``{events}``, in time order (ties keep the order of the tracks)."""
        shape = _Shape()
        song = _song_from_table({"tracks": tracks}, "tracks", self.max_events, shape)
        events = _finish([event for track in song.tracks for event in track.events])
        merged = _out(_Song(song.ticks_per_beat, 0, [_Track(events)]), shape)["tracks"][0]
        return {"events": merged["events"]}

    def filter(self, tbl: Any, pred: Any) -> Any:
        song, shape = self._song(tbl, "tbl")
        predicate = _predicate(pred)
        for number, track in enumerate(song.tracks, 1):
            events = track.events
            judge = list(range(len(events)))  # index of the event whose verdict applies
            for on, off in _pairs(events):
                if off is not None:
                    judge[off] = on
            verdicts: dict[int, bool] = {}
            kept = []
            for index, event in enumerate(events):
                if event["type"] == "end_of_track":
                    kept.append(event)
                    continue
                j = judge[index]
                if j not in verdicts:
                    verdicts[j] = predicate.matches(events[j], number) != predicate.invert
                if verdicts[j]:
                    kept.append(event)
            track.events = kept
        return _out(song, shape)

    def notes(self, tbl: Any) -> list[dict[str, Any]]:
        return _notes(self._song(tbl, "tbl")[0])

    def info(self, src: Any) -> dict[str, Any]:
        song = self._song(src, "src")[0]
        tpb = song.ticks_per_beat
        changes = _tempo_changes(song)
        tempo = changes[0][1] if changes else DEFAULT_TEMPO
        length = max((track.events[-1]["tick"] for track in song.tracks if track.events), default=0)
        return {
            "format": song.format,
            "ticks_per_beat": tpb,
            "tempo": tempo,
            "bpm": 60_000_000 / tempo if tempo else 0.0,
            "length_ticks": length,
            "length_beats": length / tpb,
            "length_seconds": _seconds(changes, length, tpb),
            "tracks": len(song.tracks),
            "events": sum(len(track.events) for track in song.tracks),
            "notes": sum(len(_pairs(track.events)) for track in song.tracks),
        }
