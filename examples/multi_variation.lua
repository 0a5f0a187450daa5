-- Several orpheus generations, collected: one call per variation so each can fail alone.
function describe()
  return {
    name = "multi_variation",
    description = "Generate several MIDI variations with orpheus and collect them",
    params = {
      count = { type = "integer", default = 3 },
      temperature = { type = "number", default = 1.0 },
    },
    returns = "{variations = {{hash, notes}}, failed = n}",
  }
end

function main(p)
  local variations, failed = {}, 0
  for i = 1, p.count do
    progress.update((i - 1) * 100 / p.count, "variation " .. i)
    local ok, out = pcall(orpheus.generate, { temperature = p.temperature, random_seed = i })
    if ok then
      local hash = out.variations[1].hash
      variations[#variations + 1] = { hash = hash, notes = midi.info(hash).notes }
    else
      log.warn("variation failed", { index = i, error = out })
      failed = failed + 1
    end
  end
  progress.update(100, "done")
  return { variations = variations, failed = failed }
end
