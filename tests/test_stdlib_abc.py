"""abc.* (upstream compatibility, issue 12): ABC notation read by music21, over the real
socket with real worker processes; MIDI files checked with mido, and against Debian's
abc2midi (package abcmidi) when it is installed."""

from __future__ import annotations

import io
import shutil
import subprocess

import mido
import pytest

from tests.test_stdlib_audio import job

pytestmark = pytest.mark.timeout(120)

TUNE = """X:1
T:Test Tune
C:Someone
M:4/4
L:1/8
Q:1/4=100
K:G
GABc dedB|^c2 c2 =F2 z2|[CEG]4 (3ABc d2|]
"""
# G A B c d e d B | c# c# F (rest) | C E G chord, a triplet A B c, d
PITCHES = [67, 69, 71, 72, 74, 76, 74, 71, 73, 73, 65, 60, 64, 67, 69, 71, 72, 74]


def notes_of(data: bytes) -> list[tuple[float, int]]:
    """(start in beats, pitch) of every note of a MIDI file, sorted."""
    midi = mido.MidiFile(file=io.BytesIO(data))
    found = []
    for track in midi.tracks:
        tick = 0
        for message in track:
            tick += message.time
            if message.type == "note_on" and message.velocity > 0:
                found.append((round(tick / midi.ticks_per_beat, 3), message.note))
    return sorted(found)


async def test_parse_and_validate_good_and_bad_notation(client):
    done = await job(client, """
        function main(p)
          local bad = {}
          for i, text in ipairs(p.bad) do
            local valid, errors = abc.validate(text)
            bad[i] = {valid = valid, errors = errors, parsed = abc.parse(text).valid}
          end
          local valid, errors = abc.validate(p.tune)
          local ok, err = pcall(abc.parse, 42)
          local ok2, err2 = pcall(abc.parse, string.rep("C", 70000))
          return {parsed = abc.parse(p.tune), valid = valid, errors = errors, bad = bad, type_error = err,
                  too_large = err2, minimal = abc.parse("X:1\\nK:C\\nCDEF|")}
        end
    """, {"tune": TUNE, "bad": ["hello world", "X:1\nK:Q\nCDEF|", "X:1\nM:x/y\nK:C\nCDEF|", "X:1\nK:C\n[CEG|"]})
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    parsed = r["parsed"]
    assert parsed["valid"] is True and parsed["errors"] == [] and parsed["warnings"] == []
    assert (parsed["title"], parsed["composer"], parsed["key"], parsed["meter"]) == ("Test Tune", "Someone", "G", "4/4")
    assert (parsed["tonic"], parsed["mode"], parsed["sharps"], parsed["tempo"]) == ("G", "major", 1, 100.0)
    assert (parsed["note_count"], parsed["bar_count"], parsed["tunes"]) == (len(PITCHES), 3, 1)
    assert (r["valid"], r["errors"]) == (True, [])
    messages = [entry["errors"][0] for entry in r["bad"]]
    assert all(entry["valid"] is False and entry["parsed"] is False for entry in r["bad"])
    assert "no K: (key) field" in messages[0]
    assert "K:Q is not a key" in messages[1]
    assert "M:x/y is not a valid M: field" in messages[2]
    assert "no closing bracket" in messages[3]
    assert r["type_error"].startswith("abc.parse: notation must be a string, got number")
    assert "abc.parse: abc_too_large:" in r["too_large"]
    # ABC 2.1: a header without L: or M: means eighth notes
    assert r["minimal"]["valid"] is True and r["minimal"]["note_count"] == 4


async def test_to_midi_stores_a_midi_file_in_the_cas(server, client):
    done = await job(client, """
        function main(p)
          local plain = abc.to_midi(p.tune)
          local tuned = abc.to_midi(p.tune, {velocity = 100, channel = 3, ticks_per_beat = 96})
          local file = abc.to_midi(p.tune, {dest = "tune.mid"})
          local again = abc.to_midi_file(p.tune, "again.mid")
          local ok, err = pcall(abc.to_midi, "X:1\\nK:C\\n[CEG|")
          local ok2, err2 = pcall(abc.to_midi, p.tune, {channel = 16})
          local ok3, err3 = pcall(abc.to_midi, "X:1\\nL:1/16\\nK:C\\n" .. string.rep("CDEF GABc|", 260))
          return {plain = plain, tuned = tuned, file = file, again = again, notes = midi.info(plain.hash).notes,
                  from_temp = midi.info("tune.mid").notes, invalid = err, channel = err2, long = err3}
        end
    """, {"tune": TUNE})
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    assert r["plain"]["mime_type"] == "audio/midi" and r["plain"]["size_bytes"] > 0
    data = server.server.cas.retrieve(r["plain"]["hash"])
    midi = mido.MidiFile(file=io.BytesIO(data))
    assert midi.ticks_per_beat == 480
    starts = notes_of(data)
    assert sorted(p for _, p in starts) == sorted(PITCHES)
    # eighth notes from beat 0; the chord starts bar 3 (beat 8), all three notes at once
    assert starts[:4] == [(0.0, 67), (0.5, 69), (1.0, 71), (1.5, 72)]
    assert [p for b, p in starts if b == 8.0] == [60, 64, 67]
    tempos = [m.tempo for t in midi.tracks for m in t if m.type == "set_tempo"]
    assert tempos and mido.tempo2bpm(tempos[0]) == pytest.approx(100)
    tuned = mido.MidiFile(file=io.BytesIO(server.server.cas.retrieve(r["tuned"]["hash"])))
    ons = [m for t in tuned.tracks for m in t if m.type == "note_on" and m.velocity > 0]
    assert tuned.ticks_per_beat == 96 and {(m.velocity, m.channel) for m in ons} == {(100, 3)}
    assert r["file"]["path"] == "tune.mid" and r["again"] is True
    assert r["notes"] == r["from_temp"] == len(PITCHES)
    assert r["invalid"].startswith("abc.to_midi: abc_invalid:")
    assert "opts.channel must be in 0..15" in r["channel"]
    assert r["long"] == "abc.to_midi: abc_too_large: the tune has 2080 notes; to_midi converts at most 2000"


ORACLE_TUNE = """X:1
T:Oracle
M:3/4
L:1/8
Q:1/4=90
K:D
A2 | d2 f2 a2 | g>f e2 d2 | c/d/e (3fga b2 | ^G2 =c2 [DFA]2 | d6 |]
"""


@pytest.mark.skipif(shutil.which("abc2midi") is None, reason="abc2midi (Debian package abcmidi) is not installed")
async def test_to_midi_plays_the_notes_abc2midi_plays(server, client, tmp_path):
    source = tmp_path / "tune.abc"
    source.write_text(ORACLE_TUNE)
    subprocess.run(["abc2midi", str(source), "-o", str(tmp_path / "oracle.mid")], check=True, capture_output=True)
    oracle = notes_of((tmp_path / "oracle.mid").read_bytes())
    done = await job(client, "return abc.to_midi(params.tune)", {"tune": ORACLE_TUNE})
    assert done["status"] == "complete", done.get("error")
    ours = notes_of(server.server.cas.retrieve(done["result"]["hash"]))
    assert [p for _, p in ours] == [p for _, p in oracle]
    # abc2midi may shift the whole piece (an anacrusis, a lead-in): compare onsets from the
    # first; it also spreads a chord's notes a few ticks apart, hence the tolerance
    assert [b - ours[0][0] for b, _ in ours] == pytest.approx([b - oracle[0][0] for b, _ in oracle], abs=0.05)


async def test_transpose_by_semitones_and_to_a_key(server, client):
    done = await job(client, """
        function main(p)
          local up = abc.transpose(p.tune, 2)
          local to_bb = abc.transpose(p.tune, "Bb")
          local down = abc.transpose(p.tune, -12)
          local results = {up = up, to_bb = to_bb, down = down}
          for name, text in pairs({up = up, to_bb = to_bb, down = down}) do
            results[name .. "_midi"] = abc.to_midi(text).hash
            results[name .. "_valid"] = abc.validate(text)
          end
          results.original = abc.to_midi(p.tune).hash
          local ok, e1 = pcall(abc.transpose, p.tune, 1.5)
          local ok2, e2 = pcall(abc.transpose, p.tune, "H")
          local ok3, e3 = pcall(abc.transpose, "X:1\\nK:C\\n[CEG|", 2)
          results.errors = {e1, e2, e3}
          return results
        end
    """, {"tune": TUNE})
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    assert r["up"] == TUNE.replace("K:G", "K:A").replace(
        "GABc dedB|^c2 c2 =F2 z2|[CEG]4 (3ABc d2|]", "ABcd efec|^d2 d2 =G2 z2|[DFA]4 (3Bcd e2|]"
    )
    assert "K:Bb" in r["to_bb"] and "Bcde fgfd|=e2 e2 _A2 z2|[EGB]4" in r["to_bb"]
    assert "K:G" in r["down"] and "G,A,B,C DEDB,|" in r["down"]

    def pitches(h: str) -> list[int]:
        return [p for _, p in notes_of(server.server.cas.retrieve(h))]

    original = pitches(r["original"])
    assert r["up_valid"] and r["to_bb_valid"] and r["down_valid"]
    assert pitches(r["up_midi"]) == [p + 2 for p in original]
    assert pitches(r["to_bb_midi"]) == [p + 3 for p in original]
    assert pitches(r["down_midi"]) == [p - 12 for p in original]
    assert "semitones_or_key must be an integer or a key name" in r["errors"][0]
    assert "'H' is not a key name" in r["errors"][1]
    assert r["errors"][2].startswith("abc.transpose: abc_invalid:")


async def test_chord_symbols_move_with_the_tune(client):
    tune = 'X:1\nL:1/4\nK:C\n"C"c "G7/B"B "Am"A "F"F|]\n'
    done = await job(client, "return abc.transpose(params.tune, 5)", {"tune": tune})
    assert done["status"] == "complete", done.get("error")
    assert done["result"].splitlines()[-1] == '"F"f "C7/E"e "Dm"d "Bb"B|]'
