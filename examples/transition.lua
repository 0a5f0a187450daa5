-- The chaosgarden flow of seed 001: bridge two sections with orpheus, return the hash.
function describe()
  return {
    name = "transition",
    description = "Generate a transition between two MIDI sections",
    params = {
      current_section = { type = "string", required = true, description = "CAS hash" },
      next_section = { type = "string", required = true, description = "CAS hash" },
      beats_available = { type = "number", default = 8 },
      tempo = { type = "number", default = 120 },
    },
    returns = "{hash, beats, notes} of the transition",
  }
end

function main(p)
  progress.update(10, "reading sections")
  local from, to = midi.info(p.current_section), midi.info(p.next_section)
  progress.update(30, "bridging")
  local out = orpheus.bridge({ from = p.current_section, to = p.next_section })
  local hash = out.variations[1].hash
  local info = midi.info(hash)
  progress.update(100, "done")
  return { hash = hash, beats = info.length_beats, notes = info.notes,
           from_notes = from.notes, to_notes = to.notes }
end
