-- The start of every plugin and flow run (luanette/plugins.py, luanette/flows.py): load
-- the module's source with load() (so errors name its file and lines), clear its own main
-- and on_shutdown (these runs are not script runs), and answer op "describe".  The
-- driver that follows does the rest of what params.op asks.
local P = params
local chunk, err = load(P.source, "=" .. P.chunk, "t")
if not chunk then error(P.what .. " does not compile: " .. tostring(err), 0) end
local M = chunk()
main, on_shutdown = nil, nil
if type(M) ~= "table" then M = _G end
if P.op == "describe" then
  if type(M.describe) ~= "function" then return {found = false} end
  return {found = true, value = M.describe()}
end
