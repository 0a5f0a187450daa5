"""Lua global ``pipeline``: generation pipelines (seed 004 section 3) run inside a job.

Lua API (docs/plugins.md, "Pipelines")::

    pipeline.register(def)                 -> def.id        (this run's registry)
    pipeline.run(id_or_def [, vars])       -> PipelineResult
    pipeline.complete(prompt [, opts])     -> text, PipelineResult
    pipeline.assemble(context [, vars])    -> AssembledContext
    pipeline.count_tokens(text)            -> n (an estimate: see luanette.pipelines)
    pipeline.list()                        -> ids registered in this run

The orchestration is Lua (the prelude below): a step calls the script's own ``llm``,
``orpheus`` or ``musicgen`` namespace, so the run's capabilities and its backend limits
apply as to any call the script makes; parallel branches and fan-outs are ``core.all``
tasks, so their requests are in flight together; a ``custom`` source, a
``chunk_handler`` and a step's ``parse`` are Lua functions of the defining script,
called directly.  Python checks the definition (``luanette.pipelines``), expands
``${}`` references, truncates the context, and streams: with ``streaming.enabled`` an
LLM step's answer is read as server-sent events by the front, which publishes every
chunk as a ``generation_chunk`` broadcast as it comes and returns the whole answer with
its chunk list; the chunk handler is then called once per chunk, in order, before the
next step starts.  (The handler runs after the stream has ended rather than during it:
a worker's service call has one answer, and a Lua function cannot be called while its
thread waits for one.  Watchers that need chunks live subscribe to the broadcast.)

Registered pipelines belong to the run that registered them; a plugin or script that
wants one everywhere registers it in each run (``define()`` returns the table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from luanette.engine.api import LuaCallError, RunContext
from luanette.pipelines import (
    MAX_FANOUT,
    MAX_REGISTERED,
    PipelineError,
    assemble,
    check_definition,
    estimate_tokens,
    expand,
    expand_value,
    lookup,
    parse_definition,
)
from luanette.stdlib.models import _CHAT, Models, _options

__all__ = ["PipelineNamespace", "pipeline_namespaces"]

_PRELUDE: Final = (
    b"""
local P, marks = ...
local MAX_FANOUT, MAX_REGISTERED = """
    + str(MAX_FANOUT).encode()
    + b", "
    + str(MAX_REGISTERED).encode()
    + b"""
local type, pairs, ipairs, error, pcall, tostring, tonumber = type, pairs, ipairs, error, pcall, tostring, tonumber
local format, concat, mtype = string.format, table.concat, math.type
local G = _ENV

-- the Python halves: errors read "pipeline: <code>: ..." rather than naming them
local function private(fn)
  return function(...)
    local ok, a, b = pcall(fn, ...)
    if ok then return a, b end
    if type(a) == "string" then error((a:gsub("^pipeline%._[%w_]+: ", "pipeline: ")), 0) end
    error(a, 0)
  end
end
-- taken out of the table the script sees; each is bound on its first call
local hidden = marks.hidden
local check, expand, expand_value = private(hidden(P, "_check")), private(hidden(P, "_expand")),
  private(hidden(P, "_expand_value"))
local lookup, assemble, tokens = private(hidden(P, "_lookup")), private(hidden(P, "_assemble")), hidden(P, "_tokens")
local now_ms, stream, source = hidden(P, "_now_ms"), private(hidden(P, "_stream")), private(hidden(P, "_source"))

-- Everything below is built on the run's first pipeline call: most runs make none, and
-- building it every run cost more than the rest of a trivial run's setup.
local function build()
local exports = {}
local function fail(code, message) error("pipeline: " .. code .. ": " .. message, 0) end

local function need(name)
  local ns = G[name]
  if type(ns) ~= "table" then
    fail("permission_denied", "this pipeline needs the '" .. name .. "' namespace, which this run does not have "
      .. "(declare its capability in describe().capabilities)")
  end
  return ns
end

-- Lua functions do not cross into Python: each becomes "<function #n>" there.
local function strip(value, fns, depth)
  if depth > 32 then fail("pipeline_invalid", "the definition is nested too deeply") end
  local kind = type(value)
  if kind == "function" then
    fns[#fns + 1] = value
    return "<function #" .. #fns .. ">"
  end
  if kind ~= "table" or rawequal(value, marks.NULL) then return value end
  local out = {}
  for k, v in pairs(value) do out[k] = strip(v, fns, depth + 1) end
  return out
end

local function prepare(def)
  if type(def) ~= "table" then fail("pipeline_invalid", "a pipeline definition is a table, got " .. type(def)) end
  local fns = {}
  local checked = check(strip(def, fns, 0))
  return {def = checked.def, plan = checked.plan, fns = fns, handlers = type(def.handlers) == "table" and def.handlers}
end

local function handler(entry, ref, what)
  local n = type(ref) == "string" and tonumber(ref:match("^<function #(%d+)>$"))
  if n then return entry.fns[n] end
  local fn = entry.handlers and entry.handlers[ref]
  if type(fn) ~= "function" then fn = G[ref] end
  if type(fn) ~= "function" then
    fail("pipeline_invalid",
      what .. ": no function called " .. tostring(ref) .. " (in handlers or the script's globals)")
  end
  return fn
end

local function gctx(state, step_id)
  return {
    get = function(_, key) return state.store[key] end,
    set = function(_, key, value) state.store[key] = value end,
    current_step = function() return step_id end,
    emit = function(_, name, payload)
      local hooks = G.hooks
      if type(hooks) == "table" and type(hooks.emit) == "function" then return hooks.emit(name, payload) end
    end,
    count_tokens = function(_, text) return tokens(text) end,
    vars = state.vars,
    pipeline_id = state.def.id,
  }
end

local function scope_of(state, item, index, results)
  return {vars = state.vars, steps = state.steps, item = item, index = index, results = results}
end

local function as_text(value)
  if type(value) == "string" then return value end
  if value == nil then return "" end
  return G.json.encode(value)
end

local function cas_text(hash)
  local data = need("cas").get(hash)
  if data:sub(1, 4) == "MThd" then
    local info = need("midi").info(hash)
    return format("MIDI %s: %d notes in %d tracks, %.1f beats at %.0f bpm (%.1f s)", hash, info.notes,
      info.tracks, info.length_beats, info.bpm, info.length_seconds)
  end
  return data
end

local function assemble_context(entry, state, config)
  local parts = {}
  local scope = scope_of(state)
  if config.system then parts[#parts + 1] = {name = "system", text = expand(config.system, scope)} end
  for _, src in ipairs(config.sources or {}) do
    local text, kind = nil, src.type
    if kind == "static_text" then
      text = expand(src.content, scope)
    elseif kind == "script_search" then
      text = source("script_search", {query = expand(src.query, scope), tag = src.tag, limit = src.limit})
    elseif kind == "job_result" then
      text = source("job_result", {job_id = expand(src.job_id, scope)})
    elseif kind == "cas" then
      text = cas_text(expand(src.hash, scope))
    else  -- custom
      text = as_text(handler(entry, src.handler, "custom source")(src.config, gctx(state, "context")))
    end
    parts[#parts + 1] = {name = src.name or kind, text = text}
  end
  return assemble(parts, config.max_tokens, config.priorities or {})
end

-- A count the model reported itself; servers that do not count say 0 (LitServe does).
local function usage_tokens(usage)
  if type(usage) == "table" and mtype(usage.total_tokens) == "integer" and usage.total_tokens > 0 then
    return usage.total_tokens
  end
end

-- One model call of a step: its text, data, tokens, whether they are estimated.
local function generate(state, step, key, scope)
  local kind = step.kind or "llm"
  if kind == "orpheus" then
    local params = step.params and expand_value(step.params, scope) or {}
    local out = need("orpheus")[step.task or "generate"](params)
    local used = 0
    for _, v in ipairs(out.variations or {}) do used = used + (v.num_tokens or 0) end
    return out.hash, out, used, false
  elseif kind == "musicgen" then
    local params = step.params and expand_value(step.params, scope) or {prompt = expand(step.prompt, scope)}
    local out = need("musicgen").generate(params)
    return out.hash, out, 0, false
  end
  local prompt = expand(step.prompt, scope)
  local messages = {}
  if state.system ~= "" then messages[1] = {role = "system", content = state.system} end
  messages[#messages + 1] = {role = "user", content = prompt}
  local body = {messages = messages, model = step.model, max_tokens = step.max_tokens, temperature = step.temperature}
  local content, usage
  local streaming = state.def.streaming
  if streaming.enabled then
    need("llm")
    local answer = stream("llm", body, {job_id = state.job_id, pipeline_id = state.def.id, step_id = key,
                                        buffer_size = streaming.buffer_size})
    content, usage = answer.content, answer.usage
    local chunks = answer.chunks or {}
    state.chunks = state.chunks + #chunks
    if state.chunk_handler then
      local ctx = gctx(state, key)
      for i = 1, #chunks do state.chunk_handler(chunks[i], ctx, i == #chunks) end
    end
  else
    local answer = need("llm").chat(body)
    content, usage = answer.content, answer.usage
  end
  local used, estimated = usage_tokens(usage), false
  if not used then
    used, estimated = tokens(state.system) + tokens(prompt) + tokens(content), true
  end
  local data
  if step.parse then
    data = handler(state.entry, step.parse, "step " .. step.id .. " parse")(content, gctx(state, key))
  elseif content:match("^%s*[%[{]") then
    local ok, decoded = pcall(G.json.decode, content)
    if ok then data = decoded end
  end
  return content, data, used, estimated
end

local function account(state, record)
  state.steps[record.id] = record
  state.order[#state.order + 1] = record.id
  state.total = state.total + record.tokens_used
  if record.tokens_estimated then state.estimated = true end
  if state.total > state.def.max_total_tokens then
    fail("pipeline_limit", format("the pipeline used %d tokens, more than its max_total_tokens of %d",
      state.total, state.def.max_total_tokens))
  end
  return record
end

local merged  -- (defined below: a fan-out step may merge its items)

local function run_step(state, step)
  local t0 = now_ms()
  local record = {id = step.id, kind = step.kind or "llm"}
  if step.parallel_on then
    local list = lookup(step.parallel_on, scope_of(state))
    if type(list) ~= "table" then
      fail("pipeline_invalid", format("step %s: parallel_on %s is a %s, not a list", step.id, step.parallel_on,
        type(list)))
    end
    local n = #list
    if n > MAX_FANOUT then
      fail("pipeline_limit", format("step %s fans out over %d items, more than the limit of %d", step.id, n,
        MAX_FANOUT))
    end
    local tasks = {}
    for i = 1, n do
      tasks[i] = function()
        local text, data, used, est = generate(state, step, step.id .. "[" .. i .. "]", scope_of(state, list[i], i))
        return {text = text, data = data, used = used, est = est}
      end
    end
    local outs = n > 0 and G.core.all(tasks) or {}
    local results, datas, used, est = marks.array(), marks.array(), 0, false
    for i = 1, n do
      results[i], datas[i] = outs[i].text, outs[i].data == nil and marks.NULL or outs[i].data
      used, est = used + outs[i].used, est or outs[i].est
    end
    record.result, record.results, record.data = concat(results, "\\n\\n"), results, datas
    if step.merge and n > 0 then  -- the fan-out's items merged (e.g. the best by the classifier)
      local items = {}
      for i = 1, n do items[i] = {id = step.id .. "[" .. i .. "]", result = results[i]} end
      local text, info, more, more_est = merged(state, step.merge, items, step.id .. ".merge")
      record.result, record.merge = text, info == nil and marks.NULL or info
      used, est = used + more, est or more_est
    end
    record.tokens_used, record.tokens_estimated = used, est
  else
    local text, data, used, est = generate(state, step, step.id, scope_of(state))
    record.result, record.data, record.tokens_used, record.tokens_estimated = text, data, used, est
  end
  record.duration_ms = now_ms() - t0
  return account(state, record)
end

local function all_steps(state, steps)
  if #steps == 1 then return {run_step(state, steps[1])} end
  local tasks = {}
  for i, step in ipairs(steps) do tasks[i] = function() return run_step(state, step) end end
  return G.core.all(tasks)
end

local function pick_best(state, m, records)
  local criteria, scores, used, est = m.criteria, {}, 0, false
  if criteria == "classifier" or criteria == "human" or criteria == "ai" then
    local orpheus = need("orpheus")
    local label = criteria == "ai" and "ai" or "human"
    local tasks = {}
    for i, r in ipairs(records) do
      tasks[i] = function()
        local answer = orpheus.classify{midi = r.result}
        local p = type(answer.classification) == "table" and answer.classification.probabilities or {}
        used = used + (mtype(answer.num_tokens) == "integer" and answer.num_tokens or 0)
        return tonumber(p[label]) or 0
      end
    end
    scores = G.core.all(tasks)
  elseif criteria == "longest" or criteria == "shortest" then
    for i, r in ipairs(records) do scores[i] = (criteria == "longest" and 1 or -1) * #r.result end
  else
    local lines = {"Pick the best candidate by this criteria: " .. criteria, ""}
    for i, r in ipairs(records) do lines[#lines + 1] = format("[%d] %s", i, r.result) end
    lines[#lines + 1] = ""
    lines[#lines + 1] = "Answer with the number of the best candidate only."
    local prompt = concat(lines, "\\n")
    local answer = need("llm").chat{messages = {{role = "user", content = prompt}}, model = m.model}
    used = usage_tokens(answer.usage)
    if not used then used, est = tokens(prompt) + tokens(answer.content), true end
    local n = tonumber(answer.content:match("%d+"))
    if not n or n < 1 or n > #records then n = 1 end  -- an answer that names none: the first
    for i = 1, #records do scores[i] = i == n and 1 or 0 end
  end
  local best = 1
  for i = 2, #records do if scores[i] > scores[best] then best = i end end
  return records[best].result, {criteria = criteria, scores = scores, picked = records[best].id}, used, est
end

-- Parallel results merged into one: its text, data, tokens, whether estimated.
function merged(state, m, records, key)
  local texts = {}
  for i, r in ipairs(records) do texts[i] = r.result end
  if m.type == "concatenate" then return concat(texts, m.separator), nil, 0, false end
  if m.type == "pick_best" then return pick_best(state, m, records) end
  local prompt = m.prompt  -- summarize
  if not prompt:find("${results}", 1, true) then prompt = prompt .. "\\n\\n${results}" end
  local step = {id = key, kind = "llm", prompt = prompt, model = m.model, max_tokens = m.max_tokens}
  return generate(state, step, key, scope_of(state, nil, nil, texts))
end

local function merge(state, m, records)
  local t0 = now_ms()
  local record = {id = "merge", kind = m.type}
  record.result, record.data, record.tokens_used, record.tokens_estimated = merged(state, m, records, "merge")
  record.duration_ms = now_ms() - t0
  return account(state, record)
end

local registry, count = {}, 0

local function entry_of(id_or_def)
  if type(id_or_def) == "string" then
    local entry = registry[id_or_def]
    if not entry then fail("not_found", "no pipeline " .. format("%q", id_or_def) .. " is registered in this run") end
    return entry
  end
  return prepare(id_or_def)
end

local function run(entry, vars)
  local def = entry.def
  if vars ~= nil and type(vars) ~= "table" then fail("invalid_params", "vars must be a table, got " .. type(vars)) end
  local job_id
  if type(G.context) == "table" and type(G.context.job_id) == "function" then job_id = G.context.job_id() end
  local state = {entry = entry, def = def, vars = vars or {}, steps = {}, order = marks.array(), total = 0,
                 estimated = false, store = {}, chunks = 0, job_id = job_id}
  if def.streaming.enabled and def.streaming.chunk_handler then
    state.chunk_handler = handler(entry, def.streaming.chunk_handler, "streaming.chunk_handler")
  end
  local t0 = now_ms()
  local context = assemble_context(entry, state, def.context)
  state.system = context.system_prompt
  local strategy, final = def.strategy, nil
  if strategy.type == "single" then
    final = run_step(state, strategy).result
  elseif strategy.type == "sequential" then
    for _, step in ipairs(strategy.steps) do final = run_step(state, step).result end
  elseif strategy.type == "parallel" then
    final = merge(state, strategy.merge, all_steps(state, strategy.branches)).result
  else  -- chain: each layer's steps wait only for earlier layers
    local by_id = {}
    for _, step in ipairs(strategy.steps) do by_id[step.id] = step end
    for _, layer in ipairs(entry.plan.layers) do
      local steps = {}
      for i, id in ipairs(layer) do steps[i] = by_id[id] end
      all_steps(state, steps)
    end
    final = state.steps[strategy.steps[#strategy.steps].id].result
  end
  return {
    pipeline_id = def.id,
    steps = state.steps,
    order = state.order,
    final_result = final,
    total_tokens_used = state.total,
    tokens_estimated = state.estimated,
    duration_ms = now_ms() - t0,
    chunks = state.chunks,
    context = {total_tokens = context.total_tokens, sources_used = context.sources_used,
               truncated = context.truncated, tokens_estimated = true},
  }
end

function exports.register(def)
  local entry = prepare(def)
  local id = entry.def.id
  if not registry[id] then
    if count >= MAX_REGISTERED then
      fail("pipeline_limit", format("more than %d pipelines registered in one run", MAX_REGISTERED))
    end
    count = count + 1
  end
  registry[id] = entry
  return id
end

function exports.run(id_or_def, vars)
  return run(entry_of(id_or_def), vars)
end

function exports.complete(prompt, opts)
  if type(prompt) ~= "string" then fail("invalid_params", "prompt must be a string, got " .. type(prompt)) end
  if opts ~= nil and type(opts) ~= "table" then fail("invalid_params", "opts must be a table, got " .. type(opts)) end
  opts = opts or {}
  local stream_on = opts.stream == true
  local result = run(prepare{
    id = "complete",
    context = {system = opts.system, sources = opts.sources, max_tokens = opts.max_context_tokens},
    strategy = {type = "single", prompt = (prompt:gsub("%${", "$${")), model = opts.model,
                max_tokens = opts.max_tokens, temperature = opts.temperature},
    streaming = {enabled = stream_on, chunk_handler = opts.chunk_handler, buffer_size = opts.buffer_size},
  }, opts.vars)
  return result.final_result, result
end

function exports.assemble(config, vars)
  local entry = prepare{id = "assemble", context = config, strategy = {type = "single", prompt = "-"}}
  local state = {entry = entry, def = entry.def, vars = vars or {}, steps = {}, store = {}}
  return assemble_context(entry, state, entry.def.context)
end

function exports.count_tokens(text)
  return tokens(text)
end

function exports.list()
  local ids = marks.array()
  for id in pairs(registry) do ids[#ids + 1] = id end
  table.sort(ids)
  return ids
end
return exports
end

local built
local function api()
  built = built or build()
  return built
end
function P.register(def) return api().register(def) end
function P.run(id_or_def, vars) return api().run(id_or_def, vars) end
function P.complete(prompt, opts) return api().complete(prompt, opts) end
function P.assemble(config, vars) return api().assemble(config, vars) end
function P.count_tokens(text) return api().count_tokens(text) end
function P.list() return api().list() end
"""
)


class PipelineNamespace:
    """Lua global ``pipeline`` (see the module docstring), over the model namespaces'
    :class:`Models`.  It holds no per-run state: one serves every run."""

    name = "pipeline"
    lua_prelude_lazy: Final = True  # (only fills its own table: runs on first use)
    lua_prelude: Final = _PRELUDE

    def __init__(self, models: Models) -> None:
        self.models = models

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        routes = self.models.routes.llm

        def check(value: Any) -> dict[str, Any]:
            definition = parse_definition(value)
            plan = check_definition(definition)
            return {"def": _without_none(msgspec.to_builtins(definition)), "plan": plan}

        async def stream(namespace: Any, body: Any, meta: Any) -> dict[str, Any]:
            # ``namespace`` ("llm") is the capability scope the gate checks (model:llm)
            chat = _options(_clean(body), _CHAT, ("messages",))
            if "model" not in chat and routes.model:
                chat["model"] = routes.model
            labels = dict(meta) if isinstance(meta, dict) else {}
            buffer_size = int(labels.pop("buffer_size", 1) or 1)
            answer = await self.models.stream(run, routes.chat, chat, buffer_size=buffer_size, meta=labels)
            chunks = answer.get("chunks") or []
            return {**answer, "chunks": msgspec.to_builtins(chunks)}

        async def source(kind: Any, args: Any) -> Any:
            # the worker's proxy of the front asks the front (its script index, its jobs)
            fetch = getattr(self.models.backends, "pipeline_source", None)
            if fetch is None:
                raise LuaCallError(f"unavailable: a {kind} source needs the daemon (no front in this process)")
            return await fetch(str(kind), dict(args) if isinstance(args, dict) else {})

        return {
            "_check": check,
            "_expand": lambda template, scope: expand(_text(template), _scope(scope)),
            "_expand_value": lambda value, scope: expand_value(value, _scope(scope)),
            "_lookup": lambda path, scope: lookup(_text(path), _scope(scope)),
            "_assemble": lambda parts, max_tokens, priorities: assemble(
                list(parts or []), int(max_tokens), dict(priorities or {})
            ),
            "_tokens": lambda text: estimate_tokens(_text(text)),
            "_now_ms": lambda: int(time.monotonic() * 1000),
            "_stream": stream,
            "_source": source,
        }


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise PipelineError("pipeline_invalid", f"expected text, got {type(value).__name__}")
    return value


def _without_none(value: Any) -> Any:
    # an unset field must be nil in Lua, not the null sentinel (which is truthy)
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _scope(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _clean(body: Any) -> Any:
    # the Lua side sends nil fields as absent, but an empty table may arrive as a list
    return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body


def pipeline_namespaces(models: Sequence[Any]) -> tuple[PipelineNamespace, ...]:
    """The ``pipeline`` namespace over the :class:`Models` the model namespaces share
    (none when there are no model namespaces)."""
    for namespace in models:
        core = getattr(namespace, "models", None)
        if isinstance(core, Models):
            return (PipelineNamespace(core),)
    return ()
