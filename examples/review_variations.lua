-- Seed 003's scripting model in one script: shared code from a module (require),
-- several orpheus generations at once (core.all), timeline edits held in a session that
-- a person reviews (review = true), and on_shutdown. Needs `luanette serve --modules
-- examples/modules`.
local variations = require("variations")

function describe()
  return {
    name = "review_variations",
    description = "Generate orpheus variations concurrently and lay them out on the timeline for review",
    params = {
      count = { type = "integer", default = 3 },
      at = { type = "number", default = 0, description = "beat of the first region" },
      beats = { type = "number", default = 8, description = "length of each region, in beats" },
      temperature = { type = "number", default = 1.0 },
    },
    capabilities = { "model:orpheus", "midi", "cas.read", "garden.read", "garden.write" },
    -- the regions wait in a pending session until someone commits or discards it:
    -- luanette-cli session list | show ID | commit ID | discard ID
    review = true,
    returns = "{variations = {{hash, notes, region_id}}, operations = n}",
  }
end

function main(p)
  local made = variations.generate(p.count, { temperature = p.temperature })
  for i, v in ipairs(made) do
    v.region_id = garden.create_region {
      position = p.at + (i - 1) * p.beats, duration = p.beats, behavior = "play_content", content_id = v.hash,
    }
  end
  -- the script sees its own edits; the garden sees none of them before the review
  assert(#garden.get_regions(p.at) >= #made)
  return { variations = made, operations = #core.overlay.operations() }
end

function on_shutdown(reason)
  -- runs after main however it ended; a failed or cancelled run's overlay is dropped
  if reason ~= "completed" then
    log.warn("review_variations did not finish: nothing goes to the timeline", { reason = reason })
  end
end
