-- Shared code for the examples, loaded with require("variations") when the daemon runs
-- with `--modules examples/modules`: orpheus variations generated concurrently.
local M = {}

-- `count` orpheus generations at once: core.all starts them together, so they take
-- about the time of one when the backend's concurrency allows. Returns {hash, notes}
-- of each, in order. One failing generation fails the lot (core.all cancels the
-- others); use core.all_settled to keep what succeeded.
function M.generate(count, opts)
  opts = opts or {}
  local calls = {}
  for i = 1, count do
    calls[i] = function()
      local out = orpheus.generate { temperature = opts.temperature, random_seed = (opts.seed or 0) + i }
      local hash = out.variations[1].hash
      return { hash = hash, notes = midi.info(hash).notes }
    end
  end
  return core.all(calls)
end

return M
