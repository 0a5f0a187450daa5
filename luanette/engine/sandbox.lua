-- The sandbox.  The engine loads this chunk (after codec.lua, without debug
-- information) once per Lua state: it defines the privileged machinery (the scheduler,
-- the wrappers of the library, error description, core.*, require) once, and returns
-- `run`, which the engine calls once per run.  `run` makes every table a run can reach
-- or that records what it did anew (the environment, the copies of the libraries, the
-- namespace tables, the task and module tables, the codec and its null, the error
-- sentinels) and resets every per-run variable below, so nothing a run reaches survives
-- it; the functions are the state's (a script cannot read or change a function).  Making
-- the ~100 closures per run cost a third of a trivial run: each closure creation walks
-- Lua's list of open upvalues, which holds most of the ~190 locals of this chunk.  A
-- state serves one run at a time.
-- `run` runs on the main Lua thread with the real standard library, builds the script
-- environment from an empty table and runs the script up to its end or its first I/O
-- request.  It returns that first reply (see `finish`), or "syntax" and the message;
-- after an "io" reply come the driver's entry points: `step` (resume the script),
-- `where` (the script's frames while it waits) and `release` (free the script's memory
-- before the state is reused or dropped).  Script code runs only in coroutines created
-- here (each with the count hook) and can reach none of these locals.  Privileged code
-- never calls a string method with `:` syntax: the string metatable points at the
-- script's (mutable) copy of `string`.

local type, next, select, error, tostring = type, next, select, error, tostring
local rawget, rawequal, setmetatable, pcall, xpcall, load = rawget, rawequal, setmetatable, pcall, xpcall, load
local collectgarbage = collectgarbage
local co_create, co_resume, co_yield = coroutine.create, coroutine.resume, coroutine.yield
local co_status, co_running, co_isyieldable = coroutine.status, coroutine.running, coroutine.isyieldable
local sethook, getinfo, getmetatable = debug.sethook, debug.getinfo, debug.getmetatable
local format, sub, rep = string.format, string.sub, string.rep
local concat, sort, pack, unpack = table.concat, table.sort, table.pack, table.unpack
local math_type, getlocal, getupvalue, rawlen = math.type, debug.getlocal, debug.getupvalue, rawlen
local upvaluejoin, debug_setmetatable = debug.upvaluejoin, debug.setmetatable
-- The run's codec (new_codec, before this chunk): its null is a table a script could
-- rawset into, so each run has its own.
local codec, encode, encode_args, decode, failure, NULL

-- Functions the sandbox's wrappers call with a script's arguments, called as fields so
-- that an argument error names them ("bad argument #1 to 'setmetatable'"): privileged
-- code is loaded without debug information, so Lua cannot name the locals it calls.
local lib = {pcall = pcall, load = load, setmetatable = setmetatable, create = co_create,
  resume = co_resume, close = coroutine.close}

local MEMORY_ERROR = "not enough memory"
local SLEEP = -1   -- bridge index of core.sleep's request (the driver itself sleeps)
local MODULE = -2  -- bridge index of a module request (require)

-- Per-run variables: every one is set anew by `run` (see reset_run).
local check, call_sync, hook_interval  -- the driver's: stop?, sync calls, hook count
local KILL         -- error value of a stopped run
local IO           -- first value yielded to the driver: an I/O request
local WAIT         -- first value a task yields to the scheduler: it waits for other tasks
local EMPTY        -- {n = 0}: no arguments
-- Tasks (core.*): the script's main function is the first; see "The scheduler" below.
local task_of      -- a task's coroutine -> the task (weak keys)
local queue, qhead, qtail  -- tasks to resume, in order
local pending      -- request number -> the task waiting for its answer
local out          -- for the next "io" reply: number, index, args (a negative number: cancel it)
local main_task, current, raised
local next_number  -- of the last request
local killed
-- "main" while the script runs; "shutdown" while its on_shutdown(reason) runs (see
-- begin_shutdown); an out-of-memory end runs no on_shutdown
local phase
local out_of_memory
local env
local script_co
local main_function  -- the script's main, named in stacks (its caller has no debug information)
local qualnames    -- "ns.fn" by bridge index
local parsed       -- the layout's functions (see run)
local names_of     -- namespace table -> parsed.names[its namespace], until bind_all
local gone         -- namespace table -> {name = true} of the names bound or assigned
local waiting      -- namespace table -> index in run_preludes of its lazy Lua half, not run yet
local marks        -- what a prelude is given beside its namespace table
local run_preludes -- the preludes of the run's layout: name, function or bytecode, lazy, ...
local task_names   -- a spawned function -> its local name, or true (weak keys)
local contexts     -- frames list -> context_of its error (weak keys)
local chunk, params  -- the script's main chunk and its params
local task_of_handle  -- a task's handle -> the task (weak keys)
local tasks_started   -- tasks this run started
-- require's, for this run only: no module value or cache outlives it
local modules         -- key -> the module's value
local resolved        -- dir .. "\0" .. name -> key of a loaded module (asked again: no request)
local failed          -- dir .. "\0" .. name -> why it could not be found
local loading         -- stack of {key, name, dir} of the modules whose chunks run now
local dir_of_chunk    -- a module's source ("=a/b.lua") -> its directory
local modules_loaded, resolves

-- Count hook: ask Python whether the run must stop; once it must, keep raising.
local function hook()
  if killed or check() then
    killed = true
    error(KILL, 0)
  end
end

local function hooked(co)
  sethook(co, hook, "", hook_interval)
  return co
end

-- Pass-through for the results of every catch point: a kill is never swallowed.
local function unless_killed(...)
  if killed then error(KILL, 0) end
  return ...
end

local function c_boundary(qualname, what)
  return "attempt to yield across a C-call boundary: " .. qualname .. " waits for " .. (what or "I/O") .. ", "
    .. "which cannot happen inside a function called from C (a table.sort comparator, "
    .. "a string.gsub replacement function, a __tostring metamethod, ...)"
end

-- The arguments of a call to `qualname` as MessagePack; an encoder failure becomes a
-- Lua error at the script's call, worded like the function's own errors.
local function encode_or_raise(qualname, ...)
  local ok, packed = pcall(encode_args, "passed", ...)
  if killed then error(KILL, 0) end
  if ok then return packed end
  local problem = failure(packed)
  if problem then error(qualname .. ": " .. problem, 3) end
  error(packed, 0)  -- out of memory
end

local function bind_sync(index, qualname)
  return function(...)
    local ok, reply = call_sync(index, encode_or_raise(qualname, ...))
    if not ok then
      -- nil: the engine takes the run back (a speculative inline step may not call
      -- out; it is run again elsewhere), as uncatchable as a kill
      if ok == nil then killed = true error(KILL, 0) end
      error(reply, 2)
    end
    return decode(reply)
  end
end

local function bind_async(index, qualname)
  return function(...)
    local packed = encode_or_raise(qualname, ...)
    if not co_isyieldable() then error(c_boundary(qualname), 2) end
    local ok, reply = co_yield(IO, index, packed)
    if not ok then error(reply, 2) end
    return decode(reply)
  end
end

-- "chunk:line: " of the innermost script frame calling the function that calls this,
-- skipping privileged frames (what error() would add if it knew where the script was).
-- Privileged frames are the Lua frames without a current line: a script's chunks are
-- text, which always has line information, and privileged code has none.
local function script_where()
  local level = 3
  while true do
    local info = getinfo(level, "Sl")
    if not info or info.what == "C" then return "" end
    if info.currentline >= 0 then return format("%s:%d: ", info.short_src, info.currentline) end
    level = level + 1
  end
end

-- coroutine.resume for scripts: I/O requests (and core.await's waits) of the inner
-- coroutine go on outward to the scheduler, and the answer comes back in.
local function forward(co, ok, first, ...)
  if killed then error(KILL, 0) end
  if ok and (rawequal(first, IO) or rawequal(first, WAIT)) then
    if not co_isyieldable() then
      if rawequal(first, WAIT) then error(script_where() .. c_boundary("core.await", "other tasks"), 0) end
      error(script_where() .. c_boundary(qualnames[(...)]), 0)
    end
    return forward(co, co_resume(co, co_yield(first, ...)))
  end
  return ok, first, ...
end

-- A task's coroutine is resumed by the scheduler only (a script resuming one would
-- answer its I/O itself).
local function not_a_task(co, what)
  if task_of[co] and co_status(co) == "suspended" then
    error("cannot " .. what .. " the coroutine of a core task (use core.await, core.race)", 3)
  end
end

local function sb_resume(co, ...)
  not_a_task(co, "resume")
  return forward(co, lib.resume(co, ...))
end

local function sb_create(f)
  return hooked(lib.create(f))
end

local function rethrow(ok, ...)
  if ok then return ... end
  error((...), 0)
end

local function sb_wrap(f)
  local co = sb_create(f)
  return function(...) return rethrow(sb_resume(co, ...)) end
end

local function sb_yield(...)
  if task_of[co_running()] then error("attempt to yield from outside a coroutine", 2) end
  return co_yield(...)
end

local function sb_xpcall(f, handler, ...)
  if type(handler) ~= "function" then error("bad argument #2 to 'xpcall' (function expected)", 2) end
  return unless_killed(xpcall(f, function(e)
    if killed then return e end
    return handler(e)
  end, ...))
end

-- load: text only, and the sandbox environment unless one is given.
local function sb_load(chunk, name, _, ...)
  local chunk_env = env
  if select("#", ...) > 0 then chunk_env = ... end
  return unless_killed(lib.load(chunk, name, "t", chunk_env))
end

local function sb_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not available in the sandbox", 2)
  end
  return lib.setmetatable(t, mt)
end

local function sb_collectgarbage(option)
  if option ~= "count" then
    error("only collectgarbage(\"count\") is available in the sandbox", 2)
  end
  return collectgarbage("count")
end

local function copy(lib)
  local t = {}
  for k, v in next, lib do t[k] = v end
  return t
end


local BASE_GLOBALS = {"assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget",
    "rawlen", "rawset", "select", "getmetatable", "tonumber", "tostring", "type", "_VERSION"}

local function sb_pcall(...) return unless_killed(lib.pcall(...)) end

local function sb_close(co)
  not_a_task(co, "close")
  return unless_killed(lib.close(co))
end

local string_meta = getmetatable("")
string_meta.__metatable = false

local print_line = bind_sync(0, "print")
local function sb_print(...)
  local n = select("#", ...)
  local parts = {...}
  for i = 1, n do parts[i] = tostring(parts[i]) end
  return print_line(concat(parts, "\t", 1, n))
end

-- A namespace function's wrapper is made when the script first reads its name: binding
-- all of a job's ~170 functions cost more than the rest of a run's setup, and a run
-- calls a few.  The namespace tables behave as if filled (pairs through __pairs, an
-- assignment replaces the function for good); only next/rawget of a name not read yet
-- see nothing.  The metatable is protected.  Which names a table has is the shape's
-- shared (read-only) list; what this run has bound or assigned is noted per table, on
-- first use, so a run's setup touches no per-function entry.
local function bind_index(index)
  local entry = parsed[index]
  return (entry[1] and bind_async or bind_sync)(index, entry[4])
end
local function gone_of(t)
  local g = gone[t]
  if not g then
    g = {}
    gone[t] = g
  end
  return g
end
local function bind_all(t)
  local names = names_of[t]
  if names then
    names_of[t] = nil
    local g = gone[t]
    for name, index in next, names do
      if not (g and g[name]) then rawset(t, name, bind_index(index)) end
    end
  end
  return t
end
-- A lazy prelude runs on the first use of its table (see namespaces): read, write,
-- pairs.  Once it has run, the table's own fields are what the prelude put there.
local prelude_at  -- (below: it joins the prelude's _ENV to the run's)
local function wake(t)
  local i = waiting[t]
  if i then
    waiting[t] = nil
    prelude_at(run_preludes, i)(t, marks)
    return true
  end
end
local NAMESPACE_META = {
  __index = function(t, k)
    if wake(t) then
      local v = rawget(t, k)
      if v ~= nil then return v end
    end
    local names = names_of[t]
    local index = names and names[k]
    if index == nil then return nil end
    local g = gone_of(t)
    if g[k] then return nil end
    g[k] = true
    local f = bind_index(index)
    rawset(t, k, f)
    return f
  end,
  __newindex = function(t, k, v)
    wake(t)
    local names = names_of[t]
    if names and names[k] ~= nil then gone_of(t)[k] = true end
    rawset(t, k, v)
  end,
  __pairs = function(t)
    wake(t)
    return next, bind_all(t), nil
  end,
  __metatable = "namespace",
}

-- What a prelude is given beside its namespace table (marks): see run.
local function mark_hidden(t, name)
  -- A namespace function only its prelude may call (say pipeline._check): taken out
  -- of the table before the script runs, bound on its first call (binding it at
  -- setup cost every run, called or not).
  if getmetatable(t) ~= NAMESPACE_META or type(name) ~= "string" then
    error("marks.hidden: a namespace table and a name expected", 2)
  end
  local names = names_of[t]
  local index = names and names[name]
  local g = gone_of(t)
  if index == nil or g[name] then
    local f = rawget(t, name)
    rawset(t, name, nil)
    g[name] = true
    return f
  end
  g[name] = true
  local f
  return function(...)
    if not f then f = bind_index(index) end
    return f(...)
  end
end

local function mark_callable(t, fn)
  -- a namespace table that is also a function (context{...}); only ours, only once
  if getmetatable(t) ~= NAMESPACE_META or type(fn) ~= "function" then
    error("marks.callable: a namespace table and a function expected", 2)
  end
  local meta = {}
  for k, v in next, NAMESPACE_META do meta[k] = v end
  meta.__call = fn
  debug_setmetatable(t, meta)
end

local function mark_array(t)
  if t == nil then t = {} end
  if type(t) ~= "table" or rawequal(t, NULL) then
    error("bad argument #1 to 'array' (table expected, got " .. type(t) .. ")", 2)
  end
  return lib.setmetatable(t, codec.ARRAY)
end

-- The preludes' _ENV: each run joins every loaded prelude's to this cell, which holds
-- the current run's environment (a state serves one run at a time), so the closures a
-- run's prelude made see that run's environment.
local prelude_env
local function env_cell() return prelude_env end

-- A layout's prelude as a function: a lazy one stays bytecode until a run first uses
-- its table (undumping every prelude was a fifth of a new state's cost).
function prelude_at(preludes, i)
  local prelude = preludes[i + 1]
  if type(prelude) == "string" then
    prelude = lib.load(prelude, preludes[i], "b", {})
    upvaluejoin(prelude, 1, env_cell, 1)  -- (its _ENV: the running run's environment)
    preludes[i + 1] = prelude
  end
  return prelude
end

-- Error description (main thread, after the script coroutine died) -------------------

local function quote(v)
  local kind = type(v)
  if kind == "string" then return format("%q", sub(v, 1, 200)) end
  if kind == "number" or kind == "boolean" then return tostring(v) end
  if kind == "table" then return "{...}" end
  return kind
end

-- error({...}) values: raw access only, so no script metamethod runs here.
local function render(err)
  local kind = type(err)
  if kind == "string" then return err end
  if kind == "number" or kind == "boolean" then return tostring(err) end
  if kind ~= "table" then return "(error object is a " .. kind .. " value)" end
  if type(rawget(err, "message")) == "string" then return rawget(err, "message") end
  local parts = {}
  for k, v in next, err do
    if #parts == 20 then break end
    parts[#parts + 1] = (type(k) == "string" and k or "[" .. quote(k) .. "]") .. " = " .. quote(v)
  end
  sort(parts)
  return "{" .. concat(parts, ", ") .. "}"
end


local function global_name(f)
  for k, v in next, env do
    if rawequal(v, f) and type(k) == "string" then return k end
  end
end

local function function_name(info)
  if info.what == "main" then return "main chunk" end
  if rawequal(info.func, main_function) then return "main" end
  -- "?": called by privileged code, which has no names for Lua to give
  if info.name and info.name ~= "?" then return info.name end
  -- a task's function: the name it has where it was spawned, or as a global
  local named = task_names[info.func]
  if type(named) == "string" then return named end
  if named then
    named = global_name(info.func)
    if named then return named end
  end
  return format("function <%s:%d>", info.short_src, info.linedefined)
end

-- The script's frames: Lua frames with a current line (see script_where).
local function frames_of(co)
  local frames, level = {}, 0
  while #frames < 32 do  -- deep recursion would otherwise report thousands
    local info = getinfo(co, level, "Slnf")
    if not info then break end
    if info.currentline >= 0 then
      frames[#frames + 1] = {name = function_name(info), line = info.currentline, source = info.short_src}
    end
    level = level + 1
  end
  return frames
end

-- Global names and one level of their fields, for "did you mean" hints.
local function global_names()
  local names = {}
  for k, v in next, env do
    if type(k) == "string" then
      names[#names + 1] = k
      if type(v) == "table" and not rawequal(v, NULL) then
        local fields = 0
        for field in next, bind_all(v) do
          if type(field) == "string" and fields < 200 then
            fields = fields + 1
            names[#names + 1] = k .. "." .. field
          end
        end
      end
    end
    if #names >= 5000 then break end
  end
  return names
end

-- String keys of a table (and of the table its metatable's __index is, where methods
-- live), so a hint can suggest only names the indexed value really has.
local function keys_of(t, limit)
  local keys, seen = {}, {}
  bind_all(t)
  local mt = getmetatable(t)
  local index = type(mt) == "table" and rawget(mt, "__index") or nil
  for _, source in next, {t, type(index) == "table" and index or nil} do
    for k in next, source do
      if #keys >= limit then return keys end
      if type(k) == "string" and #k <= 64 and not seen[k] then
        seen[k] = true
        keys[#keys + 1] = k
      end
    end
  end
  return keys
end

local error_fn, assert_fn = error, assert
local MISSING_MAIN = "the script defines describe() but no global function main(params)"

-- Where co's error was raised and what its innermost script frame could see:
-- raiser is "script" (its error()/assert), "library" (a C function such as
-- string.rep), "lua" (the VM, in script code) or "sandbox" (privileged code); scope
-- lists the locals and upvalues of that frame with their types (and keys of tables).
local function context_of(co)
  local top = getinfo(co, 0, "Slf")
  if not top then return nil end
  local raiser
  if top.what == "C" then
    if rawequal(top.func, error_fn) or rawequal(top.func, assert_fn) then
      local caller = getinfo(co, 1, "l")
      raiser = caller and caller.currentline >= 0 and "script" or "sandbox"
    else
      raiser = "library"
    end
  else
    raiser = top.currentline >= 0 and "lua" or "sandbox"
  end
  local level, info = 0
  repeat
    info = getinfo(co, level, "lf")
    level = level + 1
  until not info or info.currentline >= 0
  local scope = {}
  -- keys listed in all: a task failing in a loop (core.all_settled) pays for each
  local budget = 1000
  if info then
    local function add(name, value)
      if #scope >= 100 or type(name) ~= "string" or sub(name, 1, 1) == "(" or name == "_ENV" then return end
      local entry = {name = name, type = type(value)}
      if entry.type == "table" and not rawequal(value, NULL) and budget > 0 then
        entry.keys = keys_of(value, budget < 200 and budget or 200)
        budget = budget - #entry.keys
      end
      scope[#scope + 1] = entry
    end
    -- a later local shadows an earlier one of the same name, and locals shadow upvalues:
    -- the first entry of a name is the one the line sees
    local names, values = {}, {}
    for i = 1, 200 do
      local name, value = getlocal(co, level - 1, i)
      if not name then break end
      names[i], values[i] = name, value
    end
    for i = #names, 1, -1 do add(names[i], values[i]) end
    for i = 1, 255 do
      local name, value = getupvalue(info.func, i)
      if not name then break end
      add(name, value)
    end
  end
  return {raiser = raiser, scope = scope}
end


-- The frames of a coroutine that failed with err; when err came from core.await of a
-- failed task, that task's frames come first (innermost first).  The error's context
-- (see context_of) is kept beside the list, for describe.
local function frames_with_tasks(co, err)
  local frames = frames_of(co)
  if not (raised and rawequal(raised.err, err)) then
    if not (err == MEMORY_ERROR or killed) then
      -- hints are a bonus: failing to gather them must not change how the error is told
      local ok, context = pcall(context_of, co)
      if ok then contexts[frames] = context end
    end
    return frames
  end
  local all = {}
  for i = 1, #raised.frames do all[#all + 1] = raised.frames[i] end
  for i = 1, #frames do
    if #all >= 32 then break end
    all[#all + 1] = frames[i]
  end
  contexts[all] = contexts[raised.frames]
  return all
end

local function describe(err)
  local info = {message = render(err), frames = frames_with_tasks(script_co, err)}
  if not (err == MEMORY_ERROR or killed) then
    info.names = global_names()
    local context = contexts[info.frames]
    if context then info.raiser, info.scope = context.raiser, context.scope end
    if type(err) == "table" then info.raiser = "script" end  -- only error() raises a table
  end
  return encode(info, "error", "described", true)
end

-- The script coroutine ------------------------------------------------------------


-- Script convention: the chunk's first return value is the result; when it returns
-- nothing (nil) and defined a global function main, main(params) gives the result (a
-- chunk that both defines main and returns a value is an expression: upstream's eval).
local function runner()
  local result = chunk()
  local main = rawget(env, "main")
  if result == nil and type(main) == "function" then
    main_function = main
    result = main(params)
  elseif result == nil and type(rawget(env, "describe")) == "function" then
    -- a script that describes itself does its work in main: without one it would
    -- "succeed" with nothing done (luanette.engine.errors: cause missing_main)
    error(MISSING_MAIN, 0)
  end
  local ok, packed = pcall(encode, result, "result", "returned", false)
  if killed then error(KILL, 0) end
  if ok then return packed end
  local problem = failure(packed)
  if not problem then error(packed, 0) end  -- out of memory
  return nil, problem
end

local function where()
  return encode({frames = frames_of(script_co)}, "error", "described", true)
end

-- Above this heap size (KiB, ~0.6 ms of lua_close per MiB of small blocks) release()
-- collects the garbage itself.
local RELEASE_ABOVE_KB = 1024
local function blank_64k() return rep(rep(" ", 256), 256) end  -- (rep of 1 byte is slow)

-- lupa frees a runtime with the GIL held, and glibc merges freed small blocks only at
-- the next large allocation: for a big heap do both here, inside Lua, where the GIL is
-- released, so the heap does not stall the event loop.  A small heap is left to
-- lua_close, which frees it faster than a full collection would.
local function release()
  script_co, env, chunk, params, prelude_env = nil, nil, nil, nil, nil
  queue, pending, out, main_task, current, raised = {}, {}, {}, nil, nil, nil
  if collectgarbage("count") > RELEASE_ABOVE_KB then
    collectgarbage()
    blank_64k()
  end
end

local begin_shutdown

-- A final reply.  When the script defines on_shutdown, its main phase keeps its memory
-- and hands the driver begin_shutdown (and release) ahead of the reply itself.
local function over(tag, ...)
  if phase == "main" and not out_of_memory and env and type(rawget(env, "on_shutdown")) == "function" then
    return "shutdown", begin_shutdown, release, tag, ...
  end
  pcall(release)  -- out of memory here is no reason to fail the run: lua_close frees it all
  return tag, ...
end

-- The script ran out of memory, and describing that needs some: the driver raises the
-- memory limit, then calls this.  (A reserve freed at this point, allocated by every
-- run, made every run ~10% slower.)
local function describe_memory_error()
  out_of_memory = true
  collectgarbage()
  return over("error", describe(MEMORY_ERROR))
end

-- The scheduler --------------------------------------------------------------------
-- Every piece of script code runs in a task: a hooked coroutine, the main script the
-- first.  A task that calls an async function yields (IO, index, args) here; it is given
-- a request number and waits while other tasks run.  When no task can run, the step
-- returns to the driver with every request not yet handed over (and the numbers of
-- requests whose tasks were cancelled); the driver runs them all at once and calls
-- `step` with the answers that came first (number, ok, payload, ...).  A task waiting
-- for other tasks (core.await, core.all, core.race) yields (WAIT, tasks) and runs again
-- when one of them ends.  The run ends when the main task ends: tasks still running
-- then are dropped, and the driver cancels their requests.

-- Replies to the driver: "io", number, index, args, ... | "done", result
-- | "unserializable", message | "error", description | "killed", description
-- | "memory", describe_memory_error.  The run is over after any reply but "io" and
-- "memory", so the script's memory is released before answering.
local function finish(ok, first, ...)
  if killed then return over("killed", describe(KILL)) end
  if not ok and first == MEMORY_ERROR then return "memory", describe_memory_error end
  if not ok then return over("error", describe(first)) end
  if first then return over("done", first) end
  return over("unserializable", (...))
end

local function terminal(task)
  local state = task.state
  return state == "done" or state == "failed" or state == "cancelled"
end

local function ready(task, args)
  task.state, task.args = "ready", args
  qtail = qtail + 1
  queue[qtail] = task
end

local function wake_waiters(task)
  local waiters = task.waiters
  task.waiters = {}
  for i = 1, #waiters do
    if waiters[i].state == "wait" then ready(waiters[i], EMPTY) end
  end
end

local function settle(task, ok, ...)
  if ok then
    task.state, task.results = "done", pack(...)
  else
    local err = ...
    task.state, task.err = "failed", err
    task.frames = frames_with_tasks(task.co, err)
  end
  if task.parent then task.parent.children[task] = nil end
  wake_waiters(task)
end

-- Stop a task that has not ended: its request is cancelled, its coroutine closed (its
-- to-be-closed variables run), the tasks it spawned are cancelled too.
local function cancel(task)
  local state = task.state
  if terminal(task) or state == "running" then return end
  if state == "io" then
    pending[task.reqno] = nil
    local n = #out
    out[n + 1], out[n + 2], out[n + 3] = -task.reqno, 0, 0
    task.reqno = nil
  end
  task.state = "cancelled"
  if task.parent then task.parent.children[task] = nil end
  lib.close(task.co)
  if killed then error(KILL, 0) end
  for child in next, task.children do cancel(child) end
  wake_waiters(task)
end

-- A task resumed by the scheduler came back: it waits, or it ended.
local function after(task, ok, first, ...)
  current = nil
  if killed then return finish(false, KILL) end
  if not ok and first == MEMORY_ERROR then return finish(false, MEMORY_ERROR) end
  if ok and co_status(task.co) == "suspended" then
    if rawequal(first, IO) then
      local index, args = ...
      next_number = next_number + 1
      pending[next_number] = task
      task.state, task.reqno = "io", next_number
      local n = #out
      out[n + 1], out[n + 2], out[n + 3] = next_number, index, args
    elseif rawequal(first, WAIT) then
      local targets = ...
      task.state = "wait"
      for i = 1, #targets do
        local waiters = targets[i].waiters
        waiters[#waiters + 1] = task
      end
    else
      ready(task, EMPTY)
    end
    return
  end
  if rawequal(task, main_task) then return finish(ok, first, ...) end
  settle(task, ok, first, ...)
end

local function schedule()
  while qhead <= qtail do
    local task = queue[qhead]
    queue[qhead] = nil
    qhead = qhead + 1
    if task.state == "ready" then
      local args = task.args
      task.args, task.state, current = nil, "running", task
      -- (a final reply has at most 4 values after its tag: see over)
      local tag, v1, v2, v3, v4 = after(task, co_resume(task.co, unpack(args, 1, args.n)))
      if tag then return tag, v1, v2, v3, v4 end
    end
  end
  if next(pending) == nil then
    return over("error", describe("deadlock: every task waits for another task (core.await)"))
  end
  local reply = out
  out = {}
  return "io", unpack(reply, 1, #reply)
end

-- The driver's answers: number, ok, payload, ... (requests it was given).
local function step(...)
  local answers = pack(...)
  for i = 1, answers.n, 3 do
    local task = pending[answers[i]]
    if task then
      pending[answers[i]] = nil
      task.reqno = nil
      ready(task, pack(answers[i + 1], answers[i + 2]))
    end
  end
  return schedule()
end

-- on_shutdown(reason): after the main task ended (or was stopped; the driver has
-- cancelled its requests), a fresh main task runs the script's on_shutdown in the same
-- environment; the tasks of the main phase are dropped.  Its result is ignored.
begin_shutdown = function(reason)
  phase = "shutdown"
  killed = false
  queue, qhead, qtail = {}, 1, 0
  pending, out, current, raised = {}, {}, nil, nil
  local fn = env and rawget(env, "on_shutdown")
  if type(fn) ~= "function" then
    pcall(release)
    return "none"
  end
  task_names[fn] = "on_shutdown"
  main_function = nil
  script_co = hooked(co_create(function()
    fn(reason)
    return true
  end))
  main_task = {co = script_co, waiters = {}, children = {}}
  task_of[script_co] = main_task
  ready(main_task, EMPTY)
  local function reply(tag, ...)
    if tag == "io" then return tag, step, where, release, begin_shutdown, ... end
    return tag, ...
  end
  return reply(schedule())
end

-- core.* ---------------------------------------------------------------------------

local HANDLE_META = {__name = "core.task", __metatable = "core.task"}
local MAX_SLEEP_MS = 24 * 3600 * 1000

-- The name of fn among the locals and upvalues of the innermost script frame (the one
-- spawning it), else true (a global's name is looked for if a stack needs it).
local function local_name(fn)
  local level, info = 3
  while true do
    info = getinfo(level, "lf")
    if not info then return true end
    if info.currentline >= 0 then break end
    level = level + 1
  end
  for i = 1, 250 do
    local name, value = getlocal(level, i)
    if not name then break end
    if rawequal(value, fn) and sub(name, 1, 1) ~= "(" then return name end
  end
  for i = 1, 255 do
    local name, value = getupvalue(info.func, i)
    if not name then break end
    if rawequal(value, fn) then return name end
  end
  return true
end

-- Tasks one run may start (each is a coroutine with its own stack): past it, core.spawn
-- and core.all/race raise "core.spawn: too_many_tasks: ..." (catchable).
local MAX_TASKS = 10000

local function new_task(fn, args)
  if tasks_started >= MAX_TASKS then
    error(script_where() .. "core.spawn: too_many_tasks: a run may start at most " .. MAX_TASKS .. " tasks", 0)
  end
  tasks_started = tasks_started + 1
  local co = hooked(co_create(fn))
  local task = {co = co, waiters = {}, children = {}, parent = current, handle = setmetatable({}, HANDLE_META)}
  task_of[co] = task
  task_of_handle[task.handle] = task
  if current then current.children[task] = true end
  ready(task, args)
  return task
end

local function wait_for(tasks)
  if not co_isyieldable() then error(script_where() .. c_boundary("core.await", "other tasks"), 0) end
  co_yield(WAIT, tasks)
end

-- A finished task's results, or its error raised again (a cancelled task: an error
-- naming `what`).
local function outcome(task, what)
  if task.state == "done" then return unpack(task.results, 1, task.results.n) end
  if task.state == "cancelled" then error(script_where() .. what .. ": the task was cancelled", 0) end
  raised = {err = task.err, frames = task.frames}
  error(task.err, 0)
end

local function spawn(fn, ...)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'spawn' (function expected, got " .. type(fn) .. ")", 2)
  end
  task_names[fn] = task_names[fn] or local_name(fn)
  return new_task(fn, pack(...)).handle
end

local function await(v, ...)
  local task = task_of_handle[v]
  if not task then return v, ... end  -- a plain value is its own result
  if rawequal(task, current) then error("core.await: a task cannot wait for itself", 2) end
  while not terminal(task) do wait_for({task}) end
  return outcome(task, "core.await")
end

-- The tasks of core.all{...}'s argument: handles as they are, functions spawned.
local function branches(list, name)
  if type(list) ~= "table" or task_of_handle[list] then
    error(format("bad argument #1 to '%s' (table of tasks or functions expected, got %s)", name,
      task_of_handle[list] and "a task" or type(list)), 3)
  end
  local n = rawlen(list)
  for i = 1, n do
    local v = rawget(list, i)
    local task = task_of_handle[v]
    if rawequal(task, current) then error("core." .. name .. ": a task cannot wait for itself", 3) end
    if not task and type(v) ~= "function" then
      error(format("bad argument #1 to '%s' (item %d is a %s, not a task or a function)", name, i, type(v)), 3)
    end
  end
  local tasks = {}
  for i = 1, n do
    local v = rawget(list, i)
    local task = task_of_handle[v]
    if not task then
      task_names[v] = task_names[v] or local_name(v)
      task = new_task(v, EMPTY)
    end
    tasks[i] = task
  end
  return tasks, n
end

local function cancel_others(tasks, n, keep)
  for j = 1, n do
    if not rawequal(tasks[j], keep) then cancel(tasks[j]) end
  end
end

local function all(list)
  local tasks, n = branches(list, "all")
  while true do
    local left = {}
    for i = 1, n do
      local task = tasks[i]
      if task.state == "failed" or task.state == "cancelled" then
        cancel_others(tasks, n, task)
        return outcome(task, "core.all")
      end
      if task.state ~= "done" then left[#left + 1] = task end
    end
    if #left == 0 then break end
    wait_for(left)
  end
  local results = {}
  for i = 1, n do results[i] = tasks[i].results[1] end
  return results
end

local function all_settled(list)
  local tasks, n = branches(list, "all_settled")
  while true do
    local left = {}
    for i = 1, n do
      if not terminal(tasks[i]) then left[#left + 1] = tasks[i] end
    end
    if #left == 0 then break end
    wait_for(left)
  end
  local results = {}
  for i = 1, n do
    local task = tasks[i]
    if task.state == "done" then
      results[i] = {ok = true, value = task.results[1]}
    else
      results[i] = {ok = false, error = task.state == "cancelled" and "cancelled" or task.err}
    end
  end
  return results
end

local function race(list)
  local tasks, n = branches(list, "race")
  if n == 0 then error("bad argument #1 to 'race' (no tasks to race)", 2) end
  while true do
    for i = 1, n do
      if terminal(tasks[i]) then
        cancel_others(tasks, n, tasks[i])
        return outcome(tasks[i], "core.race")
      end
    end
    wait_for(tasks)
  end
end

local function milliseconds(ms, name)
  if not math_type(ms) or ms ~= ms or ms < 0 or ms > MAX_SLEEP_MS then
    error(format("bad argument #1 to '%s' (milliseconds from 0 to %d expected, got %s)", name, MAX_SLEEP_MS,
      quote(ms)), 3)
  end
end

local function sleep(ms)
  milliseconds(ms, "sleep")
  if not co_isyieldable() then error(c_boundary("core.sleep"), 2) end
  local ok, reply = co_yield(IO, SLEEP, ms)
  if not ok then error(reply, 2) end
end

local function timeout(ms)
  milliseconds(ms, "timeout")
  return new_task(function()
    sleep(ms)
    error("core.timeout: timeout after " .. tostring(ms) .. " ms", 0)
  end, EMPTY).handle
end

-- require --------------------------------------------------------------------------
-- The front resolves every name (luanette/modules.py): require asks through the driver
-- (an I/O request, like core.sleep's) and gets key, name, chunk, dir, code, mode.  The
-- module runs in the script's own environment, in the requiring task.  Every table
-- here is made anew for each run (reset_run): no module value or cache outlives it, and
-- the next run on this state loads its modules anew.

local MAX_MODULES = 256           -- modules one run may load
local MAX_RESOLVES = 4 * MAX_MODULES  -- names one run may ask the front about
local MAX_REQUIRE_DEPTH = 64      -- modules loading at once (a requiring b requiring c ...)
local MAX_MODULE_NAME = 256       -- bytes; longer names are refused before asking

-- A to-be-closed guard pops the loading stack however the chunk ends, without a pcall
-- that would unwind the module's frames before an uncaught error is described.
local POP = {__close = function() loading[#loading] = nil end}

-- The directory relative requires start from: that of the module whose code calls
-- require (the innermost script frame), the root for the top-level script.  A tail
-- call (`return require("./x")`) leaves no frame of its caller: then the module being
-- loaded, if any (that is a module's `return require(...)` at its top level), else
-- nil: nobody can tell.
local function caller_dir()
  local level = 2
  while true do
    local info = getinfo(level, "Slt")
    if not info then return "" end
    if info.currentline >= 0 then return dir_of_chunk[info.source] or "" end
    if info.istailcall then
      local top = loading[#loading]
      return top and top[3]
    end
    level = level + 1
  end
end

local function require_error(message)
  error(script_where() .. message, 0)
end

local function cycle(key, name)
  local from = 1
  for i = #loading, 1, -1 do
    if loading[i][1] == key then from = i break end
  end
  local names = {}
  for i = from, #loading do names[#names + 1] = loading[i][2] end
  names[#names + 1] = name
  return "circular require: " .. concat(names, " -> ")
end

local function require_module(name)
  if type(name) ~= "string" then
    require_error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")")
  end
  if #name > MAX_MODULE_NAME then
    require_error(format("bad argument #1 to 'require' (module name too long: %d bytes, at most %d)", #name,
      MAX_MODULE_NAME))
  end
  -- only relative names depend on where they are required from
  local dir = ""
  if sub(name, 1, 2) == "./" or sub(name, 1, 3) == "../" then
    dir = caller_dir()
    if dir == nil then
      require_error(format("require: cannot tell what %q is relative to: 'return require(...)' in a function is a "
        .. "tail call, which leaves no trace of its caller; write 'local m = require(...) return m'", name))
    end
  end
  local asked = dir .. "\0" .. name
  local key = resolved[asked]
  if key ~= nil then return modules[key] end
  if failed[asked] then require_error(failed[asked]) end
  if resolves >= MAX_RESOLVES then
    require_error("require: too_many_modules: a run may look up at most " .. MAX_RESOLVES .. " module names")
  end
  resolves = resolves + 1
  if not co_isyieldable() then require_error(c_boundary("require", "its module")) end
  local ok, reply = co_yield(IO, MODULE, encode_args("passed", name, dir))
  if killed then error(KILL, 0) end
  if not ok then
    -- a cancel fails only the waits of its grace: on_shutdown may ask again
    if sub(reply, 1, 10) ~= "cancelled:" then failed[asked] = reply end
    require_error(reply)
  end
  local module = decode(reply)
  local module_name, chunk_name, module_dir, code, mode = module[2], module[3], module[4], module[5], module[6]
  key = module[1]
  if modules[key] ~= nil then  -- the same module by another name
    resolved[asked] = key
    return modules[key]
  end
  for i = 1, #loading do
    if loading[i][1] == key then require_error(cycle(key, module_name)) end
  end
  if modules_loaded >= MAX_MODULES then
    require_error("require: too_many_modules: a run may load at most " .. MAX_MODULES .. " modules")
  end
  if #loading >= MAX_REQUIRE_DEPTH then
    require_error("require: require_too_deep: modules may require each other at most " .. MAX_REQUIRE_DEPTH .. " deep")
  end
  local chunk, syntax = load(code, "=" .. chunk_name, mode, env)
  if not chunk then require_error(format("syntax error in %q: %s", name, syntax)) end
  modules_loaded = modules_loaded + 1
  dir_of_chunk["=" .. chunk_name] = module_dir
  loading[#loading + 1] = {key, module_name, module_dir}
  local value
  do
    local pop <close> = setmetatable({}, POP)
    value = chunk(name, chunk_name)
  end
  if value == nil then value = true end  -- as Lua's require: loaded, nothing returned
  modules[key] = value
  resolved[asked] = key
  return value
end

-- require.try(name): nil and the message instead of an error (a kill still stops).
local function try_require(name)
  local ok, value = lib.pcall(require_module, name)  -- (pcall: a C frame caller_dir passes)
  if killed then error(KILL, 0) end
  if ok then return value end
  return nil, value
end


local REQUIRE_META = {
  -- (not a tail call: caller_dir tells a script's `return require(...)` by it)
  __call = function(_, name)
    local value = require_module(name)
    return value
  end,
  __metatable = "require",
}

local function first_reply(tag, ...)
  if tag == "io" then return tag, step, where, release, begin_shutdown, ... end
  return tag, ...
end

-- One run ---------------------------------------------------------------------------

-- spec: bytecode the engine compiled (luanette.engine.lua _spec_chunk) that returns
-- parsed[index] = {async, namespace, name, "ns.name"} for bridge indexes 1, 2, ...;
-- parsed.order: the namespaces in order; parsed.names[namespace] = {name = index};
-- parsed.qualnames[index] = "ns.name".  Kept, like the loaded preludes, in the state's
-- real globals, which no script reaches; read-only once made: every run of the shape
-- shares them.
local parsed_specs = rawget(_G, "__luanette_specs")
if not parsed_specs then
  parsed_specs = {}
  _G.__luanette_specs = parsed_specs
end
local loaded_preludes = rawget(_G, "__luanette_preludes")
if not loaded_preludes then
  loaded_preludes = {}
  _G.__luanette_preludes = loaded_preludes
end

-- Every per-run variable anew: nothing the last run made is reachable from here on.
local function reset_run(run_check, run_call_sync, run_hook_interval)
  check, call_sync, hook_interval = run_check, run_call_sync, run_hook_interval
  codec = new_codec()
  encode, encode_args, decode, failure, NULL = codec.encode, codec.encode_args, codec.decode, codec.failure,
    codec.NULL
  KILL, IO, WAIT, EMPTY = {}, {}, {}, {n = 0}
  task_of = setmetatable({}, {__mode = "k"})
  queue, qhead, qtail = {}, 1, 0
  pending, out = {}, {}
  main_task, current, raised = nil, nil, nil
  next_number = 0
  killed, phase, out_of_memory = false, "main", false
  env, script_co, main_function, chunk, params, prelude_env = {}, nil, nil, nil, nil, nil
  qualnames = {[SLEEP] = "core.sleep", [MODULE] = "require"}
  parsed = nil
  names_of, gone, waiting, marks, run_preludes = {}, {}, {}, nil, nil
  task_names = setmetatable({}, {__mode = "k"})
  contexts = setmetatable({}, {__mode = "k"})
  task_of_handle = setmetatable({}, {__mode = "k"})
  tasks_started = 0
  modules, resolved, failed, loading, dir_of_chunk = {}, {}, {}, {}, {}
  modules_loaded, resolves = 0, 0
  -- The state's random generator is shared by its runs: a fresh seed, so one run's
  -- math.randomseed(42) does not decide the next run's numbers.
  math.randomseed()
end

local function base_environment()
  for i = 1, #BASE_GLOBALS do
    local name = BASE_GLOBALS[i]
    env[name] = _G[name]
  end
  env.pcall, env.xpcall, env.load, env.setmetatable, env.collectgarbage =
    sb_pcall, sb_xpcall, sb_load, sb_setmetatable, sb_collectgarbage
  env.string, env.table, env.math, env.utf8 = copy(string), copy(table), copy(math), copy(utf8)
  env.os = {clock = os.clock, time = os.time, date = os.date}
  env.coroutine = {
    create = sb_create, resume = sb_resume, wrap = sb_wrap, yield = sb_yield, close = sb_close,
    status = co_status, running = co_running, isyieldable = co_isyieldable,
  }
  env._G = env
  env.print = sb_print
  string_meta.__index = env.string
end

-- The run's namespace tables and the Lua halves of namespaces (see
-- Namespace.lua_prelude): bytecode we compiled, run as sandbox code on the script's
-- environment, before the script or, for a lazy one, when the script first uses its
-- table (running them all cost half of a trivial run's Lua, and most scripts use few
-- namespaces).  The layout and the preludes are loaded once per state and layout
-- (undumping the bytecode cost more than the rest of a run's setup).
local function namespaces(layout, spec, preludes_packed)
  parsed = parsed_specs[layout]
  if not parsed then
    if not spec then error("internal: the layout's spec was not sent", 0) end
    parsed = lib.load(spec, "=layout", "b", {})()
    parsed_specs[layout] = parsed
  end
  setmetatable(qualnames, {__index = parsed.qualnames})
  for i = 1, #parsed.order do
    local namespace = parsed.order[i]
    if not env[namespace] then
      local functions = setmetatable({}, NAMESPACE_META)
      env[namespace] = functions
      names_of[functions] = parsed.names[namespace]
    end
  end
  local preludes = loaded_preludes[layout]
  if not preludes and preludes_packed then
    preludes = {}
    local packed = decode(preludes_packed)
    for i = 1, #packed, 3 do  -- name, bytecode, lazy
      preludes[i], preludes[i + 1], preludes[i + 2] = packed[i], packed[i + 1], packed[i + 2]
    end
    loaded_preludes[layout] = preludes
  end
  if preludes then
    marks = {NULL = NULL, hidden = mark_hidden, callable = mark_callable, array = mark_array}
    prelude_env, run_preludes = env, preludes
    for i = 1, #preludes, 3 do
      local t = env[preludes[i]]
      if preludes[i + 2] and getmetatable(t) == NAMESPACE_META then
        waiting[t] = i
      else
        prelude_at(preludes, i)(t, marks)
      end
    end
  end
end

-- layout: the engine's number for the shape of the run's namespaces (luanette.engine.lua
-- _Layout); spec and preludes_packed come only the first time a state sees a layout
-- (they are kilobytes: copying them into Lua every run cost as much as the rest of
-- binding the namespaces), else nil.
return function(run_check, run_call_sync, layout, spec, preludes_packed, run_hook_interval, chunk_name, code,
    code_mode, params_packed)
  reset_run(run_check, run_call_sync, run_hook_interval)
  base_environment()
  namespaces(layout, spec, preludes_packed)
  -- code is text, or bytecode the engine compiled from the same text (its chunk cache)
  local syntax_error
  chunk, syntax_error = load(code, "=" .. chunk_name, code_mode, env)
  if not chunk then return "syntax", syntax_error end
  params = decode(params_packed)
  env.params = params
  env.args = params  -- seed 003's name for the same table
  script_co = hooked(co_create(runner))
  -- A namespace may add to `core` (core.commit, core.discard, core.overlay: the run's
  -- session, luanette/stdlib/session.py): its functions are bound before this point.
  local core = rawget(env, "core") or {}
  if core.overlay_operations then  -- (a flat name on the bridge; a prelude would cost every run)
    core.overlay = {operations = core.overlay_operations}
    core.overlay_operations = nil
  end
  core.spawn, core.await, core.all, core.all_settled = spawn, await, all, all_settled
  core.race, core.sleep, core.timeout = race, sleep, timeout
  env.core = core
  env.require = setmetatable({try = try_require}, REQUIRE_META)
  main_task = {co = script_co, waiters = {}, children = {}}
  task_of[script_co] = main_task
  ready(main_task, EMPTY)
  return first_reply(schedule())
end
