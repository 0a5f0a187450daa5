"""The upstream tool bridge: ``hootenanny.*``, ``mcp.hootenanny.*`` and ``chaosgarden.*``.

The Rust luanette bound every tool of the hootenanny server as ``hootenanny.<tool>``
(``mcp.hootenanny.<tool>`` before its rename) and the garden's tools as
``chaosgarden.<tool>``.  Luanette does the work of some of those tools itself; this
namespace maps those names onto the local namespaces, in Lua, so a script written for
upstream runs unchanged where the feature exists:

- CAS: ``cas_store {content_base64 | data | content, mime_type}`` ->
  ``{hash, size, mime_type}``; ``cas_get {hash}`` -> ``{hash, size, data}``;
  ``cas_inspect {hash}`` -> ``{hash, exists, size, mime_type, local_path}`` (``local_path``
  is ``cas.path``'s script-visible form, which ``midi.read`` takes; never a host path);
  ``cas_upload_file {file_path, mime_type}`` (a temp path) -> ``{hash, size, mime_type}``.
- Models: ``orpheus_generate``, ``orpheus_generate_seeded {seed_hash}``,
  ``orpheus_continue {input_hash}``, ``orpheus_bridge {section_a_hash, section_b_hash}``,
  ``orpheus_loops {seed_hash}``, ``musicgen_generate`` run the model call at once and
  answer upstream's ``{job_id, tool}``; the job (local to the run, id ``local-N``) is
  already finished, its result upstream's shape (``output_hashes``, ``artifact_ids`` --
  the same hashes: Luanette has no artifact store -- ``num_variations``, ...) plus the
  local namespace's own result.  ``orpheus_classify {midi_hash}`` answers directly.
- Jobs of the run: ``job_status {job_id}``, ``job_poll {job_ids}``, ``job_list {status}``,
  ``job_cancel {job_id}``, ``job_sleep {milliseconds}``.
- ``garden_<name>`` and ``chaosgarden.<name>``: ``garden.<name>``, upstream's argument
  tables unpacked (``seek {beat}``, ``set_tempo {bpm}``, ``move_region {region_id,
  new_position}``, ...).

Every other name is a function that fails with ``not_supported: hootenanny.<tool> ...``
naming the tool.  The bridge only calls the run's own namespaces (captured when the run
starts), so it reaches exactly what the run's capabilities grant; a mapped tool whose
namespace the run lacks fails naming the capability to declare.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any, Final

from luanette.engine.api import LuaCallError, RunContext
from luanette.stdlib.paths import lua_type

_PRELUDE: Final = rb"""
local functions, marks = ...
local decode_base64 = marks.hidden(functions, "_decode_base64")  -- bound on its first call
local type, pairs, ipairs, next, error, tostring, pcall, setmetatable, select =
  type, pairs, ipairs, next, error, tostring, pcall, setmetatable, select
local char, concat, unpack = string.char, table.concat, table.unpack
local sub, find, time = string.sub, string.find, os.time
local array = marks.array
-- the run's namespaces as they were granted (a script reassigning a global does not
-- redirect the bridge)
local ns = {cas = cas, orpheus = orpheus, musicgen = musicgen, garden = garden, clock = clock}
-- The tools are built on the run's first use of the bridge: most runs never touch it,
-- and building them cost more than the rest of a trivial run's setup.
local function build()
local NEEDS = {cas = "cas.read or cas.write", orpheus = "model:orpheus", musicgen = "model:musicgen",
               garden = "garden.read or garden.write", clock = "nothing"}

local function fail(name, message) error(name .. ": " .. message, 3) end

local function namespace(name, wanted)
  local found = ns[wanted]
  if not found then
    fail(name, "permission_denied: it maps onto " .. wanted .. ".*, which this run does not have "
      .. "(declare " .. NEEDS[wanted] .. " in describe().capabilities)")
  end
  return found
end

local function args_of(name, a)
  if a == nil then return {} end
  if type(a) ~= "table" then fail(name, "expected a table of named arguments, got " .. type(a)) end
  return a
end

local function required(name, a, key)
  local value = a[key]
  if value == nil then fail(name, "'" .. key .. "' is required") end
  return value
end

local function not_supported(qualified, hint)
  return function()
    error("not_supported: " .. qualified .. " is a tool Luanette does not provide"
      .. (hint and ("; " .. hint) or " (see lua-api.md, upstream compatibility)"), 2)
  end
end

-- Jobs of this run: a mapped model tool runs at its call, so its job is finished when
-- the script first sees its id.
local jobs, order = {}, {}
local function record(tool, ok, value)
  local id = "local-" .. (#order + 1)
  local now = time()
  local job = {job_id = id, status = ok and "complete" or "failed", source = tool,
               created_at = now, started_at = now, completed_at = now}
  if ok then job.result = value else job.error = tostring(value) end
  jobs[id], order[#order + 1] = job, id
  return {job_id = id, tool = tool}
end

local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

local function job_of(name, id)
  if type(id) ~= "string" then fail(name, "job_id must be a string, got " .. type(id)) end
  local job = jobs[id]
  if not job then
    fail(name, "no job " .. id .. " in this run (the bridge's jobs are the tool calls this run made)")
  end
  return job
end

-- An error that must not become a failed job: a refusal, or the run being stopped.
local function passes_through(err)
  return type(err) ~= "string" or find(err, "permission_denied", 1, true) or find(err, "cancelled:", 1, true)
    or err == "not enough memory"
end

local function as_job(tool, call, ...)
  local ok, value = pcall(call, ...)
  if not ok and passes_through(value) then error(value, 0) end
  return record(tool, ok, value)
end

local GENERATION = {temperature = true, top_p = true, max_tokens = true, num_variations = true,
                    model = true, tags = true}

-- upstream's request fields as ours: generation options, and the input hashes renamed
local function orpheus_options(a, renames, model)
  local o = {}
  for k, v in pairs(a) do
    if GENERATION[k] and (model or k ~= "model") then o[k] = v end
  end
  for from, to in pairs(renames) do o[to] = a[from] end
  return o
end

local function generated(result)
  local hashes, tokens = {}, {}
  for i, v in ipairs(result.variations or {result}) do
    hashes[i] = v.hash
    tokens[i] = v.num_tokens
  end
  local out = copy(result)
  out.output_hashes, out.artifact_ids = array(hashes), array(copy(hashes))
  out.tokens_per_variation, out.num_variations = array(tokens), #hashes
  return out
end

local ORPHEUS = {
  orpheus_generate = {"generate", {}, true},
  orpheus_generate_seeded = {"generate_seeded", {seed_hash = "seed"}, true},
  orpheus_continue = {"continue", {input_hash = "midi"}, true},
  orpheus_bridge = {"bridge", {section_a_hash = "from", section_b_hash = "to"}, false},
  orpheus_loops = {"loops", {seed_hash = "seed"}, false},
}

local tools = {}

for tool, spec in pairs(ORPHEUS) do
  local name = "hootenanny." .. tool
  tools[tool] = function(a)
    a = args_of(name, a)
    local orpheus_ns = namespace(name, "orpheus")
    return as_job(tool, function() return generated(orpheus_ns[spec[1]](orpheus_options(a, spec[2], spec[3]))) end)
  end
end

tools.orpheus_classify = function(a)
  a = args_of("hootenanny.orpheus_classify", a)
  return namespace("hootenanny.orpheus_classify", "orpheus").classify({midi = a.midi_hash or a.midi})
end

local MUSICGEN = {prompt = true, duration = true, temperature = true, top_k = true, top_p = true,
                  guidance_scale = true, do_sample = true}
tools.musicgen_generate = function(a)
  a = args_of("hootenanny.musicgen_generate", a)
  local musicgen_ns = namespace("hootenanny.musicgen_generate", "musicgen")
  local o = {}
  for k, v in pairs(a) do if MUSICGEN[k] then o[k] = v end end
  o.random_seed = a.seed or a.random_seed
  return as_job("musicgen_generate", function()
    local ref = musicgen_ns.generate(o)
    local out = copy(ref)
    out.output_hashes, out.artifact_ids = array({ref.hash}), array({ref.hash})
    return out
  end)
end

tools.cas_store = function(a)
  local name = "hootenanny.cas_store"
  a = args_of(name, a)
  local data = a.data or a.content
  if a.content_base64 ~= nil then data = decode_base64(a.content_base64) end
  if type(data) == "table" then  -- upstream's Vec<u8>: an array of bytes
    local chars = {}
    for i, byte in ipairs(data) do chars[i] = char(byte) end
    data = concat(chars)
  end
  if type(data) ~= "string" then fail(name, "give content_base64, data or content (a string)") end
  local mime = a.mime_type or "application/octet-stream"
  local hash = namespace(name, "cas").store(data, mime)
  return {hash = hash, size = #data, mime_type = mime}
end

tools.cas_get = function(a)
  local name = "hootenanny.cas_get"
  a = args_of(name, a)
  local data = namespace(name, "cas").get(required(name, a, "hash"))
  return {hash = a.hash, size = #data, data = data}
end

tools.cas_inspect = function(a)
  local name = "hootenanny.cas_inspect"
  a = args_of(name, a)
  local cas_ns = namespace(name, "cas")
  local hash = required(name, a, "hash")
  if not cas_ns.exists(hash) then return {hash = hash, exists = false} end
  local info = cas_ns.inspect(hash)
  return {hash = info.hash, exists = true, size = info.size_bytes, mime_type = info.mime_type,
          local_path = cas_ns.path(hash)}
end

tools.cas_upload_file = function(a)
  local name = "hootenanny.cas_upload_file"
  a = args_of(name, a)
  local cas_ns = namespace(name, "cas")
  local hash = cas_ns.store_file(required(name, a, "file_path"), a.mime_type)
  local info = cas_ns.inspect(hash)
  return {hash = hash, size = info.size_bytes, mime_type = info.mime_type}
end

tools.job_status = function(a)
  a = args_of("hootenanny.job_status", a)
  return copy(job_of("hootenanny.job_status", a.job_id))
end

tools.job_poll = function(a)
  local name = "hootenanny.job_poll"
  a = args_of(name, a)
  local completed, failed = {}, {}
  local ids = a.job_ids or {}
  if type(ids) ~= "table" then fail(name, "job_ids must be an array of job ids") end
  for _, id in ipairs(ids) do
    local job = job_of(name, id)
    local into = job.status == "complete" and completed or failed
    into[#into + 1] = id
  end
  return {completed = array(completed), failed = array(failed), pending = array(), timed_out = false}
end

tools.job_list = function(a)
  a = args_of("hootenanny.job_list", a)
  local listed = {}
  local counts = {pending = 0, running = 0, complete = 0, failed = 0, cancelled = 0}
  for _, id in ipairs(order) do
    local job = jobs[id]
    counts[job.status] = counts[job.status] + 1
    if a.status == nil or a.status == job.status then listed[#listed + 1] = copy(job) end
  end
  return {jobs = array(listed), total = #listed, by_status = counts}
end

tools.job_cancel = function(a)
  a = args_of("hootenanny.job_cancel", a)
  local job = job_of("hootenanny.job_cancel", a.job_id)
  return {job_id = job.job_id, cancelled = false, status = job.status}  -- it has finished
end

tools.job_sleep = function(a)
  local name = "hootenanny.job_sleep"
  a = args_of(name, a)
  namespace(name, "clock").sleep(required(name, a, "milliseconds"))
  return {slept_ms = a.milliseconds}
end

-- upstream's garden tools took one table of named arguments; ours take positions
local GARDEN_ARGS = {
  seek = {"beat"}, set_tempo = {"bpm"}, delete_region = {"region_id"},
  move_region = {"region_id", "new_position"}, get_regions = {"start", "end"},
  latent_started = {"region_id", "job_id"}, latent_progress = {"region_id", "progress"},
  latent_failed = {"region_id", "error"}, approve = {"region_id", "decided_by"},
  reject = {"region_id", "decided_by", "reason"},
}
local ALIASES = {start = "start_beat", ["end"] = "end_beat", new_position = "position"}

local function garden_tool(qualified, short)
  return function(...)
    local garden_ns = namespace(qualified, "garden")
    local call = garden_ns[short]
    if call == nil then return not_supported(qualified)() end
    local keys, first = GARDEN_ARGS[short], ...
    if keys and select("#", ...) == 1 and type(first) == "table" then
      local values = {}
      for i, key in ipairs(keys) do
        local value = first[key]
        if value == nil and ALIASES[key] then value = first[ALIASES[key]] end
        values[i] = value
      end
      return call(unpack(values, 1, #keys))
    end
    if select("#", ...) == 1 and type(first) == "table" and next(first) == nil then return call() end
    return call(...)
  end
end

local GARDEN_TOOLS = {status = 1, play = 1, pause = 1, stop = 1, seek = 1, set_tempo = 1, create_region = 1,
  delete_region = 1, move_region = 1, get_regions = 1, latent_started = 1, latent_progress = 1,
  latent_resolved = 1, latent_failed = 1, get_pending = 1, approve = 1, reject = 1, query = 1}

local HINTS = {abc_parse = "use abc.parse", abc_validate = "use abc.validate", abc_to_midi = "use abc.to_midi",
  abc_transpose = "use abc.transpose", artifact_get = "Luanette has no artifact store; use cas.*",
  artifact_list = "Luanette has no artifact store; use cas.*",
  artifact_upload = "Luanette has no artifact store; use cas.store_file"}

return {tools = tools, garden_tool = garden_tool, not_supported = not_supported,
  GARDEN_TOOLS = GARDEN_TOOLS, HINTS = HINTS}
end

local built
local function bridge(prefix, lookup)
  return setmetatable({}, {
    __index = function(t, key)
      if type(key) ~= "string" then return nil end
      built = built or build()
      local found = lookup(key, built)
      if found then t[key] = found end  -- (a run's own table: cached for this run only)
      return found or built.not_supported(prefix .. key)
    end,
    __metatable = prefix,
  })
end

local chaosgarden_table = bridge("chaosgarden.", function(key, b)
  if b.GARDEN_TOOLS[key] then return b.garden_tool("chaosgarden." .. key, key) end
end)

local hootenanny_table = bridge("hootenanny.", function(key, b)
  if b.tools[key] then return b.tools[key] end
  if sub(key, 1, 7) == "garden_" and b.GARDEN_TOOLS[sub(key, 8)] then
    return b.garden_tool("hootenanny." .. key, sub(key, 8))
  end
  if b.HINTS[key] then return b.not_supported("hootenanny." .. key, b.HINTS[key]) end
end)

hootenanny = hootenanny_table
chaosgarden = chaosgarden_table
mcp = setmetatable({hootenanny = hootenanny_table, chaosgarden = chaosgarden_table}, {
  __index = function(_, key)
    if type(key) == "string" then
      return bridge("mcp." .. key .. ".", function() return nil end)
    end
  end,
  __metatable = "mcp",
})
"""

MAX_BASE64_CHARS: Final = 96 * 2**20
"""The longest ``content_base64`` ``hootenanny.cas_store`` decodes (72 MiB of content;
the run's CAS write quota still applies to what it stores)."""


class UpstreamNamespace:
    """Lua globals ``hootenanny``, ``mcp`` and ``chaosgarden``: upstream's tool names over
    the run's own namespaces (all in its Lua prelude; see the module docstring)."""

    name = "hootenanny"
    lua_prelude = _PRELUDE

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        # taken out of the table by the prelude before the script runs
        return {"_decode_base64": decode_base64}


def decode_base64(text: Any) -> bytes:
    """``content_base64`` of ``hootenanny.cas_store`` as bytes; a Lua error naming what is wrong."""
    if isinstance(text, str):
        text = text.encode("ascii", "replace")
    if not isinstance(text, bytes):
        raise LuaCallError(f"hootenanny.cas_store: content_base64 must be a string, got {lua_type(text)}")
    if len(text) > MAX_BASE64_CHARS:
        raise LuaCallError(
            f"hootenanny.cas_store: content_base64_too_large: at most {MAX_BASE64_CHARS} characters, got {len(text)}"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise LuaCallError("hootenanny.cas_store: content_base64 is not valid base64") from None
