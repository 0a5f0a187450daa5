"""Upstream's model-native descriptors: ``space(name)``, ``context{...}``, ``encoding(kind, {...})``.

The Rust luanette bound these as userdata; here they are Lua tables of the run (its
prelude, given to the ``context`` namespace, which every eval and job has), with the
same methods, called with ``:``:

- ``space(name)``: ``name`` lowercased with ``-`` as ``_`` (``"Orpheus-Loops"`` is
  ``orpheus_loops``); ``:name()``, ``:can_sample()``, ``:can_continue()``,
  ``:output_type()`` (``"midi"``, ``"audio"``, ``"symbolic"`` or ``"unknown"``);
  ``tostring`` gives ``Space(orpheus)``.
- ``context{temperature, top_p, top_k, seed, max_tokens, duration_seconds,
  guidance_scale, variant}`` (all optional; other keys are ignored, as upstream did;
  a known key of the wrong type is an error): ``:with{...}`` a new context with those
  overrides, ``:to_table()`` the fields that are set.  ``context`` stays the namespace:
  ``context.cancelled()`` and the rest are its fields; calling it builds a descriptor.
- ``encoding(kind, {artifact_id, content_hash, notation, format})``: ``:type()``,
  ``:artifact_id()``, ``:content_hash()``, ``:to_table()``.

A descriptor's data is kept out of the table (a script sees only its methods), so a
descriptor returned as a result is ``{}``: return ``:to_table()``.
"""

from __future__ import annotations

from typing import Final

NATIVE_PRELUDE: Final = rb"""
local context_ns, marks = ...
local type, error, pairs, setmetatable, tostring, tointeger =
  type, error, pairs, setmetatable, tostring, math.tointeger
local lower, gsub, format, concat = string.lower, string.gsub, string.format, table.concat
-- space and encoding are callable tables, as context is: every global of a run beside
-- the sandbox's own is a table
local function callable(name, build)
  return setmetatable({}, {__call = function(_, ...) return build(...) end, __metatable = name})
end

-- Everything below is built on the run's first use of space, context{...} or encoding:
-- most runs use none, and building it cost a third of a trivial run's setup.
local function build()
local exports = {}
local data = setmetatable({}, {__mode = "k"})  -- descriptor -> its fields

local function self_of(d, kind)
  local fields = data[d]
  if not fields or fields.kind ~= kind then
    error("bad self: call it as value:method() on a " .. kind, 3)
  end
  return fields
end

local SAMPLES = {orpheus = true, orpheus_children = true, orpheus_mono_melodies = true,
                 orpheus_loops = true, musicgen = true, yue = true}
local CONTINUES = {orpheus = true, orpheus_children = true, orpheus_mono_melodies = true, orpheus_loops = true}
local OUTPUTS = {orpheus = "midi", orpheus_children = "midi", orpheus_mono_melodies = "midi",
                 orpheus_loops = "midi", orpheus_bridge = "midi", musicgen = "audio", yue = "audio",
                 abc = "symbolic"}

local Space = {}
Space.__index = Space
Space.__metatable = "Space"
Space.__tostring = function(s) return "Space(" .. self_of(s, "space").name .. ")" end
function Space.name(s) return self_of(s, "space").name end
function Space.can_sample(s) return SAMPLES[self_of(s, "space").name] == true end
function Space.can_continue(s) return CONTINUES[self_of(s, "space").name] == true end
function Space.output_type(s) return OUTPUTS[self_of(s, "space").name] or "unknown" end


exports.space = (function(name)
  if type(name) ~= "string" then
    error("bad argument #1 to 'space' (string expected, got " .. type(name) .. ")", 2)
  end
  local s = setmetatable({}, Space)
  data[s] = {kind = "space", name = (gsub(lower(name), "-", "_"))}
  return s
end)

-- the fields of a context and what each must be
local FIELDS = {"temperature", "top_p", "top_k", "seed", "max_tokens", "duration_seconds",
                "guidance_scale", "variant"}
local CHECK = {temperature = "number", top_p = "number", top_k = "integer", seed = "integer",
               max_tokens = "integer", duration_seconds = "number", guidance_scale = "number",
               variant = "string"}

local function checked(what, key, value)
  local want = CHECK[key]
  local ok = want == "integer" and tointeger(value) or (type(value) == want and value)
  if not ok then error(format("%s: %s must be a%s %s, got %s", what, key, want == "integer" and "n" or "",
    want, type(value)), 3) end
  return ok
end

local Context = {}
Context.__index = Context
Context.__metatable = "Context"

local function new_context(fields, overrides, what)
  if overrides ~= nil and type(overrides) ~= "table" then
    error(what .. ": expected a table of sampling parameters, got " .. type(overrides), 3)
  end
  local merged = {kind = "context"}
  for _, key in pairs(FIELDS) do
    local value = overrides and overrides[key]
    if value ~= nil then merged[key] = checked(what, key, value) else merged[key] = fields[key] end
  end
  local c = setmetatable({}, Context)
  data[c] = merged
  return c
end

Context.__tostring = function(c)
  local f = self_of(c, "context")
  return format("Context(temp=%s, top_p=%s, max_tokens=%s)", tostring(f.temperature), tostring(f.top_p),
    tostring(f.max_tokens))
end
function Context.with(c, overrides) return new_context(self_of(c, "context"), overrides, "with") end
function Context.to_table(c)
  local f, t = self_of(c, "context"), {}
  for _, key in pairs(FIELDS) do t[key] = f[key] end
  return t
end

exports.context = function(params) return new_context({}, params, "context") end

local Encoding = {}
Encoding.__index = Encoding
Encoding.__metatable = "Encoding"
local ENCODING_FIELDS = {"artifact_id", "content_hash", "notation", "format"}
Encoding.__tostring = function(e)
  local f = self_of(e, "encoding")
  return format("Encoding(%s, artifact=%s)", f.type, tostring(f.artifact_id))
end
function Encoding.type(e) return self_of(e, "encoding").type end
function Encoding.artifact_id(e) return self_of(e, "encoding").artifact_id end
function Encoding.content_hash(e) return self_of(e, "encoding").content_hash end
function Encoding.to_table(e)
  local f = self_of(e, "encoding")
  local t = {type = f.type}
  for _, key in pairs(ENCODING_FIELDS) do t[key] = f[key] end
  return t
end

exports.encoding = (function(kind, params)
  if type(kind) ~= "string" then
    error("bad argument #1 to 'encoding' (string expected, got " .. type(kind) .. ")", 2)
  end
  if type(params) ~= "table" then
    error("bad argument #2 to 'encoding' (table expected, got " .. type(params) .. ")", 2)
  end
  local fields = {kind = "encoding", type = kind}
  for _, key in pairs(ENCODING_FIELDS) do
    local value = params[key]
    if value ~= nil and type(value) ~= "string" then
      error(format("encoding: %s must be a string, got %s", key, type(value)), 2)
    end
    fields[key] = value
  end
  local e = setmetatable({}, Encoding)
  data[e] = fields
  return e
end)
return exports
end

local built
space = callable("space", function(...)
  built = built or build()
  return built.space(...)
end)
-- (the sandbox's namespace tables have a protected metatable of their own)
marks.callable(context_ns, function(_, params)
  built = built or build()
  return built.context(params)
end)
encoding = callable("encoding", function(...)
  built = built or build()
  return built.encoding(...)
end)
"""
