-- Read a MIDI file from the CAS, transpose and quantize it, store the result.
function describe()
  return {
    name = "midi_process",
    description = "Transpose and quantize a MIDI file from the CAS",
    params = {
      source = { type = "string", required = true, description = "CAS hash of the MIDI file" },
      semitones = { type = "integer", default = 0 },
      grid = { type = "number", default = 0.25, description = "quantize grid in beats" },
    },
    returns = "{hash, notes, length_beats} of the new MIDI file",
  }
end

function main(p)
  local song = midi.read(p.source)
  song = midi.transpose(song, p.semitones)
  song = midi.quantize(song, math.max(1, math.floor(song.ticks_per_beat * p.grid)))
  local out = midi.write(song)
  local info = midi.info(out.hash)
  return { hash = out.hash, notes = info.notes, length_beats = info.length_beats }
end
