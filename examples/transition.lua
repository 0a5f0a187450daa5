-- The chaosgarden flow of seed 001: a "generate transition" marker on the timeline
-- starts this job (see [[triggers]] in deploy/luanette.toml). It bridges the two
-- sections with orpheus and stores the result. Given a `position`, it also shows its
-- work on the timeline: a latent region that reports started, progress and resolved
-- (or failed), and then waits in the garden for a person to approve it. A region the
-- run leaves open (an error, a cancel, a timeout) is marked failed by on_shutdown, which
-- runs after main however it ended.
function describe()
  return {
    name = "transition",
    description = "Generate a transition between two MIDI sections",
    params = {
      current_section = { type = "string", required = true, description = "CAS hash" },
      next_section = { type = "string", required = true, description = "CAS hash" },
      beats_available = { type = "number", default = 8 },
      tempo = { type = "number", default = 120 },
      position = { type = "number", description = "beat of the marker; with it, a latent region is made" },
    },
    returns = "{hash, beats, notes, region_id} of the transition",
    -- the latent region must be in the garden at once (latent_started follows it), so
    -- the garden edits are not held in a session overlay
    execution_mode = "autoCommit",
  }
end

-- The timeline side, when there is one: every call is a no-op without a region.
local timeline = {}

function timeline.open(p)
  if p.position == nil then return nil end
  local region = garden.create_region {
    position = p.position, duration = p.beats_available, behavior = "latent", content_id = job.id(),
  }
  garden.latent_started(region, job.id())
  return region
end

function timeline.progress(region, fraction, message)
  progress.update(fraction * 100, message)
  if region then garden.latent_progress(region, fraction) end
end

-- What on_shutdown needs to know: the open region, and why the work failed.
local open_region, failure

function main(p)
  local region = timeline.open(p)
  open_region = region
  local ok, result = pcall(function()
    timeline.progress(region, 0.1, "reading sections")
    local from, to = midi.info(p.current_section), midi.info(p.next_section)
    timeline.progress(region, 0.3, "bridging")
    local out = orpheus.bridge { from = p.current_section, to = p.next_section }
    local hash = out.variations[1].hash
    local info = midi.info(hash)
    timeline.progress(region, 0.9, "handing over")
    return { hash = hash, beats = info.length_beats, notes = info.notes,
             from_notes = from.notes, to_notes = to.notes, region_id = region }
  end)
  if not ok then
    failure = tostring(result)  -- on_shutdown marks the region failed with it
    error(result, 0)
  end
  if region then
    garden.latent_resolved(region, { artifact_id = result.hash, content_hash = result.hash, content_type = "midi" })
    open_region = nil
  end
  progress.update(100, "done")
  return result
end

-- After main, however it ended ("completed", "error", "cancelled", "timeout"): a cancel
-- fails every wait of main at once, so the region is settled here, where waits work
-- again (for at most describe().shutdown_timeout seconds, 5 by default).
function on_shutdown(reason)
  if open_region then
    garden.latent_failed(open_region, failure or reason)
  end
end
