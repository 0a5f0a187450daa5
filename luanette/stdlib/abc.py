"""The `abc` namespace: ABC notation, read by music21's ABC parser.

Upstream compatibility (issue 12): names, arguments and return shapes follow upstream's
``abc.*`` (crates/luanette/src/stdlib/abc.rs); docs/lua-api.md says where they differ.

Lua API (``notation`` is ABC text, at most ``MAX_ABC_BYTES``)::

    abc.parse(notation)     -> {valid, errors = {..}, warnings = {..}, title, composer,
                                key, mode, tonic, sharps, meter, default_length, tempo,
                                note_count, bar_count, tunes}
    abc.validate(notation)  -> valid, errors
    abc.to_midi(notation [, opts]) -> {hash, mime_type = "audio/midi", size_bytes}
        opts: velocity (1..127), channel (0..15), ticks_per_beat (default 480),
        dest (a temp path: written there, {path, mime_type, size_bytes} returned)
    abc.to_midi_file(notation, path [, opts]) -> true   (path: a temp path)
    abc.transpose(notation, semitones_or_key) -> notation

``parse`` and ``validate`` report bad notation in ``errors``; the other functions fail
with ``abc_invalid: <errors>``.  Only the first tune of a file with several (``X:``
fields) is converted or described; ``tunes`` counts them.

The music follows ABC 2.1 (an accidental holds to the bar's end; a tune whose header
has neither ``L:`` nor ``M:`` gets ``L:1/8``).  music21 is imported on first use, in the
worker process (it takes a third of a second).
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from luanette.cas import Cas
from luanette.engine.api import LuaCallError, RunContext, charge_cas_write
from luanette.stdlib.cas import cas_failure
from luanette.stdlib.paths import as_text, lua_type, relative

if TYPE_CHECKING:
    from luanette.stdlib.temp import TempNamespace

MIME: Final = "audio/midi"
MAX_ABC_BYTES: Final = 64 * 1024
# music21's conversion to a score grows faster than the tune (about 2 s for 2000 notes),
# and a Python call cannot be interrupted by the run's deadline: bound what to_midi takes
MAX_MIDI_NOTES: Final = 2000
DEFAULT_TICKS_PER_BEAT: Final = 480
MUSIC21_TICKS: Final = 10080  # music21.defaults.ticksPerQuarter
_MODES: Final = frozenset("maj min m ion mix dor phr lyd loc aeo exp".split())
_KEY: Final = re.compile(r"\s*(?:(none|HP|Hp)|([A-G])([#b]?)\s*([A-Za-z]*))(?=\s|$)(.*)", re.DOTALL)
_METER: Final = re.compile(r"\s*(?:C\|?|none|\(?\d+(?:\+\d+)*\)?/\d+)\s*(?:%.*)?")
_LENGTH: Final = re.compile(r"\s*1?\d*/\d+\s*(?:%.*)?|\s*1\s*")
_FIELD: Final = re.compile(r"([A-Za-z]):(.*)")
_PITCH: Final = re.compile(r"(\^\^|\^|__|_|=)?([A-Ga-g])([,']*)")
_ACCIDENTAL: Final = {2: "^^", 1: "^", 0: "=", -1: "_", -2: "__"}
_CHORD_SYMBOL: Final = re.compile(r'"([A-G])([#b]?)([^"/]*)(?:/([A-G])([#b]?))?"')
_STEPS: Final = "CDEFGAB"


def _m21() -> Any:
    import music21

    return music21


class _Tune:
    """One tune's text, prepared for music21, and what the checks found."""

    def __init__(self, text: str) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.tunes = 0
        self.prepared = self._prepare(text)
        self.handler: Any = None

    def _prepare(self, text: str) -> str:
        """The first tune of ``text``, with ABC 2.1's defaults written out, checking the
        header fields music21 lets through."""
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        out: list[str] = []
        in_header, has_length, has_key, has_x = True, False, False, False
        for number, line in enumerate(lines, 1):
            field = _FIELD.match(line)
            name = field.group(1) if field else None
            if name == "X":
                self.tunes += 1
                if self.tunes > 1:
                    continue
                has_x = True
            if self.tunes > 1:
                continue
            if field and in_header:
                value = field.group(2)
                if name in ("L", "M"):
                    pattern = _LENGTH if name == "L" else _METER
                    if not pattern.fullmatch(value):
                        self.errors.append(f"line {number}: {name}:{value.strip()} is not a valid {name}: field")
                        continue
                    has_length = True
                if name == "K":
                    has_key = True
                    in_header = False
                    self._check_key(value, number)
                    if not has_length:
                        out.append("L:1/8")
            out.append(line)
        if not has_key:
            self.errors.append("no K: (key) field: a tune's header ends with its K: line")
        if not has_x:
            self.warnings.append("no X: (reference number) field")
            self.tunes = max(self.tunes, 1)
        body = "\n".join(out)
        return body if body.lstrip().startswith("%abc") else "%abc-2.1\n" + body

    def _check_key(self, value: str, number: int) -> None:
        match = _KEY.fullmatch(value)
        mode = match.group(4).lower()[:3] if match and match.group(4) else ""
        if value.strip() and (match is None or (mode and mode not in _MODES)):
            self.errors.append(f"line {number}: K:{value.strip()} is not a key (e.g. G, Am, D dor, Bb mix, none)")

    def handle(self) -> Any:
        """music21's token handler of the tune (None when it failed: see errors)."""
        if self.handler is None and not self.errors:
            m21 = _m21()
            handler = m21.abcFormat.ABCHandler()
            try:
                handler.process(self.prepared)
            except Exception as exc:  # music21 raises what its code meets: report it
                self.errors.append(_reason(exc))
                return None
            self.handler = handler
            if not any(_is_note(t) for t in handler.tokens):
                self.warnings.append("the tune has no notes")
        return self.handler

    def score(self) -> Any:
        """The tune as a music21 Score; LuaCallError ``abc_invalid`` when it is not valid."""
        if self.handle() is None:
            raise LuaCallError(f"abc_invalid: {'; '.join(self.errors)}")
        notes = _counts(self.handler)[0]
        if notes > MAX_MIDI_NOTES:
            raise LuaCallError(f"abc_too_large: the tune has {notes} notes; to_midi converts at most {MAX_MIDI_NOTES}")
        m21 = _m21()
        try:
            with _BEAMS_OFF:
                stream_class = m21.stream.Stream
                make_beams = stream_class.makeBeams
                # beams only matter to engraving, and beaming is most of music21's time
                stream_class.makeBeams = _no_beams
                try:
                    score = m21.abcFormat.translate.abcToStreamScore(self.handler)
                finally:
                    stream_class.makeBeams = make_beams
        except Exception as exc:
            raise LuaCallError(f"abc_invalid: {_reason(exc)}") from None
        # chord symbols ("Am") are accompaniment: the MIDI file holds the written notes
        for symbol in list(score.recurse().getElementsByClass(m21.harmony.ChordSymbol)):
            symbol.activeSite.remove(symbol)
        try:
            return score.expandRepeats()  # abc2midi plays repeats too
        except Exception:  # repeats that do not pair up: play it as written
            return score


_BEAMS_OFF: Final = threading.Lock()  # the runs of a worker share music21's classes


def _no_beams(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _counts(handler: Any) -> tuple[int, int]:
    """Notes (a chord's each counted) and bar lines of a tune's tokens."""
    notes = bars = 0
    for token in handler.tokens:
        name = type(token).__name__
        if name == "ABCNote" and not token.isRest:
            notes += 1
        elif name == "ABCChord":
            notes += sum(1 for t in token.subTokens if type(t).__name__ == "ABCNote" and not t.isRest)
        elif name == "ABCBar":
            bars += 1
    return notes, bars


def _reason(exc: Exception) -> str:
    text = str(exc).split(" tPrev:")[0].strip() or type(exc).__name__
    return f"music21 could not read it: {text}"


def _is_note(token: Any) -> bool:
    name = type(token).__name__
    return (name == "ABCNote" and not token.isRest) or name == "ABCChord"


def _notation(value: Any) -> str:
    text = as_text(value, "notation")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ABC_BYTES:
        raise LuaCallError(f"abc_too_large: notation is over {MAX_ABC_BYTES} bytes")
    return text


def _int_opt(opts: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = opts.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise LuaCallError(f"opts.{key} must be an integer, got {lua_type(value)}")
    if not low <= int(value) <= high:
        raise LuaCallError(f"opts.{key} must be in {low}..{high}, got {int(value)}")
    return int(value)


def _describe(tune: _Tune) -> dict[str, Any]:
    result: dict[str, Any] = {"valid": False, "errors": [], "warnings": [], "tunes": tune.tunes}
    handler = tune.handle()
    result["valid"] = not tune.errors
    result["errors"], result["warnings"] = list(tune.errors), list(tune.warnings)
    if handler is None:
        return result
    for token in handler.tokens:
        if type(token).__name__ == "ABCMetadata":
            _field(result, token)
    result["note_count"], result["bar_count"] = _counts(handler)
    return result


def _field(result: dict[str, Any], token: Any) -> None:
    tag, value = token.tag, token.data.strip()
    if tag == "T" and "title" not in result:
        result["title"] = value
    elif tag == "C" and "composer" not in result:
        result["composer"] = value
    elif tag == "M" and "meter" not in result:
        result["meter"] = value
    elif tag == "L" and "default_length" not in result:
        result["default_length"] = value
    elif tag == "Q" and "tempo" not in result:
        try:
            result["tempo"] = float(token.getMetronomeMarkObject().number)
        except Exception:  # a Q: without a number ("Allegro"): no tempo
            pass
    elif tag == "K" and "key" not in result:
        result["key"] = value
        sharps, mode = token.getKeySignatureParameters()
        result["sharps"], result["mode"] = sharps, mode or "major"
        key = token.getKeySignatureObject()
        tonic = getattr(key, "tonic", None)
        if tonic is not None:
            result["tonic"] = tonic.name.replace("-", "b")


# --- transposition --------------------------------------------------------------------


class _Transposer:
    """Rewrites a tune's pitches, key fields and chord symbols by an interval, spelling
    the notes for the new key (an accidental only where the key and the bar do not give
    the pitch), the rest of the text unchanged."""

    def __init__(self, tune: _Tune, amount: Any) -> None:
        handler = tune.handle()
        if handler is None:
            raise LuaCallError(f"abc_invalid: {'; '.join(tune.errors)}")
        self.m21 = _m21()
        self.handler = handler
        self.key = next((t for t in handler.tokens if type(t).__name__ == "ABCMetadata" and t.isKey()), None)
        old_key = self.key.getKeySignatureObject() if self.key is not None else None
        tonic = getattr(old_key, "tonic", None)
        mode = getattr(old_key, "mode", None) or "major"
        if isinstance(amount, (str, bytes)):
            target = as_text(amount, "semitones_or_key")
            new_tonic, new_mode = self._target(target, mode)
            if tonic is None:
                raise LuaCallError("the tune's K: field names no key to transpose from; give semitones")
            self.semitones = (new_tonic.pitchClass - tonic.pitchClass + 5) % 12 - 5  # -5..+6
        else:
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or int(amount) != amount:
                raise LuaCallError(f"semitones_or_key must be an integer or a key name, got {lua_type(amount)}")
            self.semitones = int(amount)
            if abs(self.semitones) > 48:
                raise LuaCallError(f"semitones must be in -48..48, got {self.semitones}")
            new_tonic = self._best_tonic(tonic, mode, old_key) if tonic is not None else None
            new_mode = mode
        p = self.m21.pitch
        if tonic is not None and new_tonic is not None:
            start = p.Pitch(tonic.name, octave=4)
            end = p.Pitch(new_tonic.name, octave=4)
            end.octave += round((start.ps + self.semitones - end.ps) / 12)
            self.interval = self.m21.interval.Interval(noteStart=start, noteEnd=end)
            self.new_key = self.m21.key.Key(new_tonic.name, new_mode)
        else:
            self.interval = self.m21.interval.Interval(self.semitones)
            self.new_key = None
        self.new_tonic = new_tonic

    def _target(self, text: str, mode: str) -> tuple[Any, str]:
        match = _KEY.fullmatch(text)
        if match is None or not match.group(2):
            raise LuaCallError(f"semitones_or_key: {text!r} is not a key name like 'A', 'Bb' or 'F#m'")
        suffix = match.group(4).lower()
        new_mode = mode if not suffix else ("minor" if suffix[:3] in ("m", "min") else self._mode(suffix))
        return self.m21.pitch.Pitch(match.group(2) + match.group(3).replace("b", "-")), new_mode

    @staticmethod
    def _mode(suffix: str) -> str:
        names = {"maj": "major", "ion": "ionian", "mix": "mixolydian", "dor": "dorian", "phr": "phrygian",
                 "lyd": "lydian", "loc": "locrian", "aeo": "aeolian"}  # fmt: skip
        return names.get(suffix[:3], "major")

    def _best_tonic(self, tonic: Any, mode: str, old_key: Any) -> Any:
        """The spelling of the new tonic whose key has the fewest sharps or flats (ties go
        the old key's way)."""
        p, k = self.m21.pitch, self.m21.key
        moved = p.Pitch(ps=tonic.ps + self.semitones)
        options = [moved, *moved.getAllCommonEnharmonics(alterLimit=1)]
        flats = getattr(old_key, "sharps", 0) < 0

        def cost(candidate: Any) -> tuple[int, bool]:
            try:
                sharps = k.Key(candidate.name, mode).sharps
            except Exception:
                return (99, True)
            return (abs(sharps), (sharps > 0) == flats)

        best = min(options, key=cost)
        return p.Pitch(best.name)

    def key_text(self, value: str) -> str:
        """A K: field's value with its tonic moved."""
        match = _KEY.fullmatch(value)
        if match is None or not match.group(2) or self.new_tonic is None:
            return value
        start, end = match.span(3) if match.group(3) else (match.end(2), match.end(2))
        return value[: match.start(2)] + self.new_tonic.name.replace("-", "b") + value[end:]

    def symbol(self, match: re.Match[str]) -> str:
        """A chord symbol ("Am7/G") with its root and bass moved."""

        def move(step: str, accidental: str) -> str:
            moved = self.m21.pitch.Pitch(step + accidental.replace("b", "-")).transpose(self.interval)
            if abs(moved.alter) > 1:
                moved = moved.getEnharmonic()
            return str(moved.name).replace("-", "b")

        root, acc, quality, bass, bass_acc = match.groups()
        text = move(root, acc) + quality
        if bass:
            text += "/" + move(bass, bass_acc)
        return f'"{text}"'

    def rewrite(self, text: str) -> str:
        """The transposed notation."""
        masked = _masked(text)
        edits: list[tuple[int, int, str]] = []
        cursor = 0
        key_alters = self._key_alters()
        by_pitch: dict[tuple[str, int], int] = {}
        by_step: dict[str, int] = {}
        for token in self.handler.tokens:
            name = type(token).__name__
            if name == "ABCBar":
                at = masked.find(token.src.strip(), cursor)
                if at >= 0:
                    cursor = at + len(token.src.strip())
                by_pitch.clear()
                by_step.clear()
                continue
            if name == "ABCChord":
                notes = [t for t in token.subTokens if type(t).__name__ == "ABCNote" and not t.isRest]
            elif name == "ABCNote" and not token.isRest:
                notes = [token]
            else:
                continue
            core = re.sub(r'^(?:"[^"]*"\s*)+', "", token.src)
            at = masked.find(core, cursor)
            if at < 0:
                raise LuaCallError(f"abc_unsupported: cannot place {token.src!r} in the text to transpose it")
            spans = [m for m in _PITCH.finditer(masked, at, at + len(core))]
            cursor = at + len(core)
            for note, span in zip(notes, spans, strict=False):
                pitch = self.m21.pitch.Pitch(note.pitchName).transpose(self.interval)
                if abs(pitch.alter) > 2:
                    pitch = pitch.getEnharmonic()
                edits.append((span.start(), span.end(), self._spell(pitch, key_alters, by_pitch, by_step)))
        out = text
        for start, end, new in sorted(edits, reverse=True):
            out = out[:start] + new + out[end:]
        return self._fields(out)

    def _key_alters(self) -> dict[str, int]:
        if self.new_key is None:
            return dict.fromkeys(_STEPS, 0)
        signature = self.new_key
        alters = {}
        for step in _STEPS:
            accidental = signature.accidentalByStep(step)
            alters[step] = int(accidental.alter) if accidental is not None else 0
        return alters

    @staticmethod
    def _spell(pitch: Any, key: dict[str, int], by_pitch: dict[tuple[str, int], int], by_step: dict[str, int]) -> str:
        step, octave, alter = pitch.step, int(pitch.octave if pitch.octave is not None else 4), int(pitch.alter)
        # the bar's earlier accidentals: readers differ on whether one holds for other
        # octaves, so an accidental is left out only where both readings agree
        same_octave = by_pitch.get((step, octave), key[step])
        any_octave = by_step.get(step, key[step])
        accidental = ""
        if not alter == same_octave == any_octave:
            accidental = _ACCIDENTAL[alter]
            by_pitch[(step, octave)] = by_step[step] = alter
        if octave >= 5:
            return accidental + step.lower() + "'" * (octave - 5)
        return accidental + step + "," * (4 - octave)

    def _fields(self, text: str) -> str:
        """K: fields (header lines and inline [K:...]) and chord symbols, moved."""
        lines = text.split("\n")
        for i, line in enumerate(lines):
            field = _FIELD.match(line)
            if field and field.group(1) == "K":
                lines[i] = "K:" + self.key_text(field.group(2))
            elif not field and not line.lstrip().startswith("%"):
                line = re.sub(r"\[K:([^\]]*)\]", lambda m: f"[K:{self.key_text(m.group(1))}]", line)
                lines[i] = _CHORD_SYMBOL.sub(self.symbol, line)
        return "\n".join(lines)


def _masked(text: str) -> str:
    """``text`` with every character that is not music (field lines, comments, quoted
    text, !decorations!, inline fields) blanked, positions kept."""
    out = list(text)
    position = 0
    for line in text.split("\n"):
        end = position + len(line)
        if _FIELD.match(line):
            out[position:end] = " " * len(line)
        else:
            for pattern in (r'"[^"]*"', r"![^!\n]*!", r"\+[^+\n]*\+", r"\[[A-Za-z]:[^\]]*\]", r"(?<!\\)%.*"):
                for m in re.finditer(pattern, line):
                    out[position + m.start() : position + m.end()] = " " * (m.end() - m.start())
        position = end + 1
    return "".join(out)


# --- MIDI -----------------------------------------------------------------------------


def _midi_bytes(tune: _Tune, opts: dict[str, Any]) -> bytes:
    import mido

    velocity = _int_opt(opts, "velocity", 1, 127)
    channel = _int_opt(opts, "channel", 0, 15)
    tpb = _int_opt(opts, "ticks_per_beat", 1, 32767) or DEFAULT_TICKS_PER_BEAT
    m21 = _m21()
    score = tune.score()
    try:
        data = m21.midi.translate.streamToMidiFile(score).writestr()
        source = mido.MidiFile(file=io.BytesIO(data))
    except Exception as exc:
        raise LuaCallError(f"abc_invalid: music21 could not make MIDI of it: {type(exc).__name__}: {exc}") from None
    # music21 counts 10080 ticks a beat; scripts and midi.* expect a usual resolution
    out = mido.MidiFile(type=source.type, ticks_per_beat=tpb)
    for track in source.tracks:
        new = mido.MidiTrack()
        tick = previous = 0
        for message in track:
            tick += message.time
            scaled = round(tick * tpb / source.ticks_per_beat)
            changes: dict[str, Any] = {"time": scaled - previous}
            previous = scaled
            if not message.is_meta and hasattr(message, "channel") and channel is not None:
                changes["channel"] = channel
            if message.type == "note_on" and message.velocity > 0 and velocity is not None:
                changes["velocity"] = velocity
            new.append(message.copy(**changes))
        out.tracks.append(new)
    buffer = io.BytesIO()
    out.save(file=buffer)
    return buffer.getvalue()


class AbcNamespace:
    """Lua global `abc`.  ``cas`` backs ``to_midi``; ``temp`` its ``dest`` and
    ``to_midi_file``; either may be None."""

    name = "abc"
    lua_prelude_lazy: Final = True  # (only fills its own table: runs on first use)
    lua_prelude: Final = b"""
local abc = ...
local raw = abc.validate
local type, error, pcall = type, error, pcall
abc.validate = function(...)
  local ok, both = pcall(raw, ...)
  if not ok then
    if both == "not enough memory" or type(both) ~= "string" then error(both, 0) end
    error(both, 2)
  end
  return both[1], both[2]
end
"""

    def __init__(self, cas: Cas | None, temp: TempNamespace | None = None) -> None:
        self.cas = cas
        self.temp = temp

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {
            "parse": self.parse,
            "validate": self.validate,
            "to_midi": self.to_midi,
            "to_midi_file": self.to_midi_file,
            "transpose": self.transpose,
        }

    def parse(self, notation: Any) -> dict[str, Any]:
        return _describe(_Tune(_notation(notation)))

    def validate(self, notation: Any) -> list[Any]:
        tune = _Tune(_notation(notation))
        tune.handle()
        return [not tune.errors, list(tune.errors)]

    def to_midi(self, notation: Any, opts: Any = None) -> dict[str, Any]:
        if opts is None or opts == {}:
            opts = {}
        if not isinstance(opts, dict):
            raise LuaCallError(f"opts must be a table, got {lua_type(opts)}")
        data = _midi_bytes(_Tune(_notation(notation)), opts)
        dest = opts.get("dest")
        if dest is not None:
            return self._write_temp(dest, data, "opts.dest")
        if self.cas is None:
            raise LuaCallError("this job has no CAS: give opts.dest, a temp path")
        charge_cas_write(len(data))
        try:
            h = self.cas.store(data, MIME)
        except Exception as exc:
            raise cas_failure(exc, "notation") from None
        return {"hash": h, "mime_type": MIME, "size_bytes": len(data)}

    def to_midi_file(self, notation: Any, path: Any, opts: Any = None) -> bool:
        if opts is None or opts == {}:
            opts = {}
        if not isinstance(opts, dict):
            raise LuaCallError(f"opts must be a table, got {lua_type(opts)}")
        self._write_temp(path, _midi_bytes(_Tune(_notation(notation)), opts), "path")
        return True

    def _write_temp(self, dest: Any, data: bytes, what: str) -> dict[str, Any]:
        if self.temp is None:
            raise LuaCallError(f"{what}: this job has no temp directory")
        path = self.temp.write_bytes(dest, data, what)
        return {"path": relative(self.temp.directory, path), "mime_type": MIME, "size_bytes": len(data)}

    def transpose(self, notation: Any, semitones_or_key: Any) -> str:
        text = _notation(notation)
        tune = _Tune(text)
        if tune.tunes > 1:
            raise LuaCallError("abc_unsupported: transpose takes one tune; this text has several X: fields")
        return _Transposer(tune, semitones_or_key).rewrite(text)
