"""Sandboxed Lua 5.4 execution for Luanette.

One run = one fresh ``lupa.lua54.LuaRuntime``.  Privileged setup code (``_SANDBOX``)
builds the script's environment from an empty table and runs the script inside a Lua
coroutine with a count hook.  The Python driver (``run_script``) runs the setup and then
resumes that coroutine in worker threads (lupa releases the GIL while Lua runs): a
script that does no I/O costs one thread step and one call into Lua.  Whenever the
script calls an ``async`` namespace function the coroutine yields a private I/O request:
the driver awaits the Python coroutine on the event loop, then resumes the script with
the answer.

Stopping: the count hook calls a Python check every ``hook_interval`` instructions; once
the deadline has passed or the cancel token is set, the hook raises a private sentinel
error, and every catch point of the sandbox (pcall, xpcall, load, coroutine.resume,
wrap, close) re-raises it, so a script cannot swallow its own kill.  Waits on I/O are
cancelled on the loop.  A worker thread stuck in one long C call is abandoned one second
after the deadline (or after a cancel); ``stats`` counts those.

Only the runtime's own bridge functions are Python objects inside Lua, and they are
upvalues of privileged closures; values cross as MessagePack bytes (``luaconv``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import difflib
import functools
import inspect
import itertools
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

import anyio
import msgspec
import structlog
from lupa.lua54 import LuaError, LuaMemoryError, LuaRuntime

from luanette.luaconv import LUA_CODEC, NULL, from_lua, to_lua

# Seconds a worker thread may overrun the deadline (or a cancel) before it is abandoned.
ABANDON_GRACE_S: Final = 1.0
# Chunk name of the privileged code (in compile errors: its bytecode has no debug information).
_PRIVILEGED_CHUNK: Final = "=luanette"
_MEMORY_MESSAGE: Final = "not enough memory"
# Memory a description of the script's out-of-memory error may use beyond the limit.
_DESCRIBE_MEMORY_BYTES: Final = 2**20
_C_BOUNDARY: Final = "attempt to yield across a C-call boundary"

# Globals of the sandbox (plus the script convention's `params` and `main`); a namespace
# may not take one of these names.  tests/test_sandbox.py checks this against Lua.
SANDBOX_GLOBALS: Final = frozenset(
    "assert error ipairs next pairs pcall xpcall print rawequal rawget rawlen rawset "
    "select setmetatable getmetatable tonumber tostring type _VERSION _G load "
    "collectgarbage string table math utf8 coroutine os params main".split()
)

_log = structlog.get_logger("luanette.runtime")
_T = TypeVar("_T")


# --------------------------------------------------------------------------- types


class Limits(msgspec.Struct, frozen=True):
    """Resource limits of one run."""

    timeout_s: float = 30.0  # wall-clock deadline for the whole run, I/O waits included
    memory_bytes: int = 256 * 2**20  # lupa max_memory: Lua's allocator refuses beyond this
    hook_interval: int = 10_000  # instructions between deadline/cancel checks

    def __post_init__(self) -> None:
        # a zero interval would install no hook at all, and so no deadline
        if not (self.timeout_s > 0 and self.memory_bytes > 0 and self.hook_interval >= 1):
            raise ValueError(f"invalid limits: {self}")


class StackFrame(msgspec.Struct, frozen=True):
    """One script frame of a Lua error; runtime frames are never reported."""

    function: str  # "main", "main chunk", "helper", or "function <script:12>"
    line: int | None  # current line in that frame, if known
    source: str  # chunk the frame belongs to, normally the script's chunk name


class ErrorDetail(msgspec.Struct, frozen=True):
    """Structured description of a failed run, written for AI callers."""

    # one of: lua_syntax, lua_runtime, timeout, cancelled, memory_limit,
    # result_not_serializable, invalid_params
    kind: str
    message: str  # the Lua message without the "script:3:" prefix
    line: int | None = None  # script line of the error, when the message names one
    stack: list[StackFrame] = []  # script frames, innermost first
    hints: list[str] = []  # e.g. "did you mean 'print'?"


class ScriptError(Exception):
    """A run that failed; ``detail`` says how.  ``str(error)`` is the message."""

    def __init__(self, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.detail = detail


class LuaCallError(Exception):
    """Raised by a namespace function to fail the Lua call with ``message``.

    The script sees a Lua error "<namespace>.<function>: <message>" that it can catch
    with pcall.  Any other exception becomes "internal error in <ns>.<fn>" and is logged.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Outcome(msgspec.Struct, frozen=True):
    """A successful run: the script's result (JSON-like) and how long the run took."""

    result: Any
    duration_ms: float


class RuntimeStats(msgspec.Struct):
    """Process-wide counters of the runtime (read by telemetry)."""

    runs: int = 0
    # worker threads given up on because Lua did not come back (a long C call)
    abandoned_threads: int = 0
    # of those, how many are still running
    abandoned_running: int = 0


stats = RuntimeStats()
_stats_lock = threading.Lock()


def _count(**deltas: int) -> None:
    with _stats_lock:
        for name, delta in deltas.items():
            setattr(stats, name, getattr(stats, name) + delta)


class CancelToken:
    """A thread-safe request to stop a run.

    ``cancel()`` sets a plain flag that the Lua count hook reads, so a running script
    stops within one hook interval, and wakes the driver if it is waiting on I/O.
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel`` has been called."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """The reason given to the first ``cancel`` call."""
        return self._reason

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop; callable from any thread, idempotent."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def _listen(self, listener: Callable[[], object]) -> None:
        """Call ``listener`` (from the cancelling thread) on cancel, until ``_unlisten``."""
        with self._lock:
            self._listeners.append(listener)

    def _unlisten(self, listener: Callable[[], object]) -> None:
        with self._lock:
            self._listeners.remove(listener)


class RunContext(msgspec.Struct, frozen=True, dict=True):
    """What a namespace knows about the run it serves."""

    run_id: str
    limits: Limits
    cancel: CancelToken
    deadline: float  # time.monotonic() value at which the run times out
    caller_logger: Any  # structlog logger of run_script's caller
    null: Any = NULL  # return this to give Lua the null sentinel

    @functools.cached_property
    def logger(self) -> Any:
        """structlog logger bound with run_id and the caller's context.

        Bound on first use: most runs never log, and binding costs more than a small run's
        other bookkeeping on the event loop.
        """
        return self.caller_logger.bind(run_id=self.run_id)

    def remaining_s(self) -> float:
        """Seconds left before the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    def script_log(self, level: str, message: str, fields: Mapping[str, Any] | None = None) -> None:
        """Emit a script's log line: structlog event "lua.log" on the run's logger."""
        extra = {"fields": dict(fields)} if fields else {}
        getattr(self.logger, _LOG_METHODS[level])("lua.log", message=message, **extra)


_LOG_METHODS: Final = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}


class Namespace(Protocol):
    """A stdlib module as Lua sees it: a global table of functions.

    ``functions`` is called once per run.  Sync callables run in the Lua worker thread;
    ``async def`` callables run on the event loop while the script waits.  Arguments
    arrive as JSON-like Python values (Lua strings that are not UTF-8 arrive as bytes;
    trailing nils are dropped) and the return value goes back the same way.  Raise
    ``LuaCallError`` to fail the call with a message the script can read.

    A namespace may also have a Lua half: an optional ``lua_prelude`` attribute (Lua
    source, bytes) run once per run after the functions are bound and before the
    script.  It runs as sandbox code (the script's globals, the count hook, none of the
    privileged locals) with two arguments: the namespace's table and ``marks``, a table
    holding ``NULL`` (the null sentinel) and ``array(t)`` (marks ``t``, default a new
    table, as a JSON array and returns it).  It is compiled without debug information,
    so its frames stay out of the script's stack traces and ``error(msg, 2)`` inside it
    points at the script's line.  Values (``json.null``) and functions that call back
    into Lua (``midi.filter(tbl, pred)``) live there.
    """

    name: str

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]: ...


# ------------------------------------------------------------------- the sandbox

# Privileged setup of one run, after the codec (see _PRIVILEGED).  It runs once on the
# main Lua thread with the real standard library, captures what it needs as locals,
# builds the script environment from an empty table and runs the script up to its end
# or its first I/O request.  It returns that first reply (see `finish`), or "syntax"
# and the message; after an "io" reply come the driver's entry points: `step` (resume
# the script), `where` (the script's frames while it waits) and `release` (free the
# script's memory before the runtime is dropped).  Script code runs only in coroutines
# created here (each with the count hook) and can reach none of these locals.
# Privileged code never calls a string method with `:` syntax: the string metatable
# points at the script's (mutable) copy of `string`.
_SANDBOX: Final = rb"""
local check, call_sync, spec, preludes_packed, hook_interval, chunk_name, code, params_packed = ...

local type, next, select, error, tostring = type, next, select, error, tostring
local rawget, rawequal, setmetatable, pcall, xpcall, load = rawget, rawequal, setmetatable, pcall, xpcall, load
local collectgarbage = collectgarbage
local co_create, co_resume, co_yield = coroutine.create, coroutine.resume, coroutine.yield
local co_status, co_running, co_isyieldable = coroutine.status, coroutine.running, coroutine.isyieldable
local sethook, getinfo, getmetatable = debug.sethook, debug.getinfo, debug.getmetatable
local format, sub, rep, gmatch = string.format, string.sub, string.rep, string.gmatch
local concat, sort = table.concat, table.sort
local encode, encode_args, decode, failure = codec.encode, codec.encode_args, codec.decode, codec.failure
local NULL = codec.NULL

string.dump = nil  -- no bytecode for anyone
python = nil       -- lupa's helper table in the real globals

-- Functions the sandbox's wrappers call with a script's arguments, called as fields so
-- that an argument error names them ("bad argument #1 to 'setmetatable'"): privileged
-- code is loaded without debug information, so Lua cannot name the locals it calls.
local lib = {pcall = pcall, load = load, setmetatable = setmetatable, create = co_create,
  resume = co_resume, close = coroutine.close}

local KILL = {}    -- error value of a stopped run
local MEMORY_ERROR = "not enough memory"
local IO = {}      -- first value yielded to the driver: an I/O request
local killed = false
local env = {}
local script_co
local main_function  -- the script's main, named in stacks (its caller has no debug information)
local qualnames = {}  -- "ns.fn" by bridge index

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

local function c_boundary(qualname)
  return "attempt to yield across a C-call boundary: " .. qualname .. " waits for I/O, "
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
    if not ok then error(reply, 2) end
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

-- coroutine.resume for scripts: I/O requests of the inner coroutine go on outward to
-- the driver, and the answer comes back in.
local function forward(co, ok, first, ...)
  if killed then error(KILL, 0) end
  if ok and rawequal(first, IO) then
    local index = ...
    if not co_isyieldable() then error(script_where() .. c_boundary(qualnames[index]), 0) end
    return forward(co, co_resume(co, co_yield(IO, ...)))
  end
  return ok, first, ...
end

local function sb_resume(co, ...)
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
  if co_running() == script_co then error("attempt to yield from outside a coroutine", 2) end
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

for _, name in next, {"assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget",
    "rawlen", "rawset", "select", "getmetatable", "tonumber", "tostring", "type", "_VERSION"} do
  env[name] = _G[name]
end
env.pcall = function(...) return unless_killed(lib.pcall(...)) end
env.xpcall, env.load, env.setmetatable, env.collectgarbage =
  sb_xpcall, sb_load, sb_setmetatable, sb_collectgarbage
env.string, env.table, env.math, env.utf8 = copy(string), copy(table), copy(math), copy(utf8)
env.os = {clock = os.clock, time = os.time, date = os.date}
env.coroutine = {
  create = sb_create, resume = sb_resume, wrap = sb_wrap, yield = sb_yield,
  close = function(co) return unless_killed(lib.close(co)) end,
  status = co_status, running = co_running, isyieldable = co_isyieldable,
}
env._G = env

local string_meta = getmetatable("")
string_meta.__index = env.string
string_meta.__metatable = false

local print_line = bind_sync(0, "print")
env.print = function(...)
  local n = select("#", ...)
  local parts = {...}
  for i = 1, n do parts[i] = tostring(parts[i]) end
  return print_line(concat(parts, "\t", 1, n))
end

-- spec: "ns.fn ns.other *ns.waits ...", bridge indexes 1, 2, 3, ...; "*" marks async
local index = 0
for star, namespace, name in gmatch(spec, "(%*?)([^ .]+)%.([^ ]+)") do
  index = index + 1
  local qualname = namespace .. "." .. name
  qualnames[index] = qualname
  env[namespace] = env[namespace] or {}
  env[namespace][name] = (star == "*" and bind_async or bind_sync)(index, qualname)
end

-- Lua halves of namespaces (see Namespace.lua_prelude): bytecode we compiled, run as
-- sandbox code on the script's environment before the script.
if preludes_packed then
  local marks = {NULL = NULL, array = function(t)
    if t == nil then t = {} end
    if type(t) ~= "table" or rawequal(t, NULL) then
      error("bad argument #1 to 'array' (table expected, got " .. type(t) .. ")", 2)
    end
    return lib.setmetatable(t, codec.ARRAY)
  end}
  local preludes = decode(preludes_packed)
  for i = 1, #preludes, 2 do
    lib.load(preludes[i + 1], preludes[i], "b", env)(env[preludes[i]], marks)
  end
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

local function function_name(info)
  if info.what == "main" then return "main chunk" end
  if rawequal(info.func, main_function) then return "main" end
  -- "?": called by privileged code, which has no names for Lua to give
  if info.name and info.name ~= "?" then return info.name end
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
        for field in next, v do
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

local function describe(err)
  local info = {message = render(err), frames = frames_of(script_co)}
  if not (err == MEMORY_ERROR or killed) then info.names = global_names() end
  return encode(info, "error", "described", true)
end

-- The script coroutine ------------------------------------------------------------

local chunk, syntax_error = load(code, "=" .. chunk_name, "t", env)
if not chunk then return "syntax", syntax_error end
local params = decode(params_packed)
env.params = params

-- Script convention: run the chunk; if it defined a global function main, main(params)
-- gives the result, else the chunk's first return value does.
local function runner()
  local result = chunk()
  local main = rawget(env, "main")
  if type(main) == "function" then
    main_function = main
    result = main(params)
  end
  local ok, packed = pcall(encode, result, "result", "returned", false)
  if killed then error(KILL, 0) end
  if ok then return packed end
  local problem = failure(packed)
  if not problem then error(packed, 0) end  -- out of memory
  return nil, problem
end
script_co = hooked(co_create(runner))

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
  script_co, env, chunk, params = nil, nil, nil, nil
  if collectgarbage("count") > RELEASE_ABOVE_KB then
    collectgarbage()
    blank_64k()
  end
end

local function over(tag, ...)
  pcall(release)  -- out of memory here is no reason to fail the run: lua_close frees it all
  return tag, ...
end

-- The script ran out of memory, and describing that needs some: the driver raises the
-- memory limit, then calls this.  (A reserve freed at this point, allocated by every
-- run, made every run ~10% slower.)
local function describe_memory_error()
  collectgarbage()
  return over("error", describe(MEMORY_ERROR))
end

-- Replies to the driver: "io", index, args | "done", result | "unserializable", message
-- | "error", description | "killed", description | "memory", describe_memory_error.
-- The run is over after any reply but "io" and "memory", so the script's memory is
-- released before answering.
local function finish(ok, first, ...)
  if killed then return over("killed", describe(KILL)) end
  if not ok and first == MEMORY_ERROR then return "memory", describe_memory_error end
  if not ok then return over("error", describe(first)) end
  if co_status(script_co) == "suspended" then return "io", ... end
  if first then return over("done", first) end
  return over("unserializable", (...))
end

local function step(...)
  return finish(co_resume(script_co, ...))
end

local tag, io_index, io_args = step()
if tag == "io" then return tag, io_index, io_args, step, where, release end
return tag, io_index
"""


def _deny_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    # lupa asks this for every attribute access from Lua on a Python object.
    raise AttributeError("Python attributes are not accessible from Lua")


# The codec first, in a function of its own, so its locals are not the sandbox's.
_PRIVILEGED: Final = b"local codec = (function()\n" + LUA_CODEC + b"end)()\n" + _SANDBOX

# Runs the privileged bytecode with the driver's arguments.  lupa holds the GIL while
# it loads the chunk it is given (this small one); the big one loads here, inside Lua,
# which does not.
_LOADER: Final = b"return load((...), '" + _PRIVILEGED_CHUNK.encode() + b"', 'b')(select(2, ...))"


def _compile(source: bytes, chunk_name: bytes) -> bytes:
    """Lua source as stripped bytecode (no debug information)."""
    compiler = LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
    dump = compiler.eval(b"function(source, name) return string.dump(assert(load(source, name, 't')), true) end")
    bytecode: bytes = dump(source, chunk_name)
    return bytecode


@functools.cache
def _bytecode(source: bytes) -> bytes:
    """Privileged Lua compiled once per process, without debug information.

    Loading bytecode is ~3x faster than compiling the text, and without debug information
    (line numbers, names of locals) the privileged chunk is 40% smaller and loads 40%
    faster.  The sandbox relies on it: privileged frames are the Lua frames without a
    current line (see script_where).
    """
    return _compile(source, _PRIVILEGED_CHUNK.encode())


@functools.cache
def _prelude_bytecode(name: str, source: bytes) -> bytes:
    """A namespace's Lua half compiled once per process, stripped (see Namespace)."""
    return _compile(source, b"=" + name.encode())


def _new_lua(memory_bytes: int) -> LuaRuntime:
    return LuaRuntime(
        encoding=None,  # Lua strings are bytes in Python: binary data survives
        register_eval=False,
        register_builtins=False,
        unpack_returned_tuples=True,
        attribute_filter=_deny_attributes,
        max_memory=memory_bytes,
    )


# ------------------------------------------------------------------ error details


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _split_position(message: str, chunk_name: str) -> tuple[str, int | None]:
    """Strip a leading "<chunk>:<line>: " of the script's own chunk."""
    match = re.match(rf"{re.escape(chunk_name)}:(\d+): ", message)
    if not match:
        return message, None
    return message[match.end() :], int(match.group(1))


_NIL_NAME = re.compile(r"a nil value \((global|field|method) '([^']+)'\)")


def _did_you_mean(message: str, names: Sequence[str]) -> list[str]:
    """Suggest the closest existing name for a nil global, field or method."""
    match = _NIL_NAME.search(message)
    if not match:
        return []
    kind, name = match.groups()
    if kind == "global":
        candidates = {n: n for n in names if "." not in n}
    else:
        candidates = {}
        for qualified in names:
            if "." in qualified:
                candidates.setdefault(qualified.rsplit(".", 1)[1], qualified)
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if not close:
        return []
    suggestion = candidates[close[0]] if kind == "field" else close[0]
    return [f"did you mean '{suggestion}'?"]


def _runtime_detail(info: dict[str, Any], chunk_name: str, limits: Limits) -> ErrorDetail:
    message, line = _split_position(_text(info["message"]), chunk_name)
    stack = _frames(info)
    if message == _MEMORY_MESSAGE:
        return _memory_detail(limits, stack)
    hints = _did_you_mean(message, [_text(n) for n in info.get("names", [])])
    if message.startswith(_C_BOUNDARY):
        hints.append(
            "call functions that wait for I/O before or after table.sort/string.gsub "
            "(or similar), not from the callback you pass to them"
        )
    return ErrorDetail("lua_runtime", message, line, stack, hints)


def _frames(info: dict[str, Any]) -> list[StackFrame]:
    return [StackFrame(_text(f["name"]), f.get("line"), _text(f["source"])) for f in info.get("frames", [])]


def _syntax_detail(raw: bytes | str, chunk_name: str) -> ErrorDetail:
    message, line = _split_position(_text(raw), chunk_name)
    return ErrorDetail("lua_syntax", message, line)


def _memory_detail(limits: Limits, stack: list[StackFrame] | None = None) -> ErrorDetail:
    return ErrorDetail(
        "memory_limit",
        f"the script exceeded its memory limit of {limits.memory_bytes / 2**20:g} MiB",
        stack[0].line if stack else None,
        stack or [],
        ["build smaller tables and strings, or process the data in parts"],
    )


def _stopped_detail(
    reason: str, token: CancelToken, limits: Limits, stack: list[StackFrame], waiting_for: str | None = None
) -> ErrorDetail:
    line = stack[0].line if stack else None
    waiting = f" while waiting for {waiting_for}" if waiting_for else ""
    if reason == "timeout":
        return ErrorDetail(
            "timeout",
            f"the script exceeded its time limit of {limits.timeout_s} s{waiting}",
            line,
            stack,
            [
                f"the script ran longer than {limits.timeout_s} s; look for a loop that "
                "never ends, or do less work per run"
            ],
        )
    why = token.reason if token.reason not in (None, "cancelled") else None
    message = f"the run was cancelled{waiting}" + (f": {why}" if why else "")
    return ErrorDetail("cancelled", message, line, stack)


def _unserializable_detail(message: bytes) -> ErrorDetail:
    return ErrorDetail(
        "result_not_serializable",
        _text(message),
        hints=["return only trees of tables, strings, numbers, booleans and nil; convert other values first"],
    )


# ------------------------------------------------------------------ run machinery


class _Request(msgspec.Struct, frozen=True):
    """The script waits for an async namespace function."""

    index: int
    args: bytes


class _Final(msgspec.Struct, frozen=True):
    """The run is over."""

    result: Any = None
    error: ErrorDetail | None = None


class _Killer:
    """The count hook's view of a run: a deadline and a cancel token, read as plain values."""

    __slots__ = ("deadline", "reason", "token")

    def __init__(self, deadline: float, token: CancelToken) -> None:
        self.deadline = deadline
        self.token = token
        self.reason: str | None = None

    def check(self) -> bool:
        """True once the run must stop; called from the Lua hook in the worker thread."""
        if self.reason is None:
            if self.token.cancelled:
                self.reason = "cancelled"
            elif time.monotonic() >= self.deadline:
                self.reason = "timeout"
            else:
                return False
        return True

    def expire(self) -> str:
        """The driver stopped waiting: record and return why."""
        if self.reason is None:
            self.reason = "cancelled" if self.token.cancelled else "timeout"
        return self.reason

    def stop(self) -> None:
        """The run is over: Lua still running anywhere stops at its next hook."""
        if self.reason is None:
            self.reason = "finished"


class _Bridge:
    """The Python callables of one run, called by index from Lua (0 is print)."""

    def __init__(self, run: RunContext, namespaces: Sequence[Namespace]) -> None:
        self._run = run
        self._calls: list[Callable[..., Any]] = [self._print]
        # computed on a function's first call: most runs call few of their functions,
        # and inspect.signature costs more than the rest of binding one
        self._signatures: dict[int, inspect.Signature | None] = {0: None}  # print: always one line
        shape = []
        for namespace in namespaces:
            functions = namespace.functions(run)
            shape.append((type(namespace), namespace.name, tuple(functions)))
            self._calls.extend(functions.values())
        key = tuple(shape)
        layout = _layouts.get(key)
        if layout is None:
            layout = _layouts[key] = _Layout.of(namespaces, [names for _, _, names in shape], self._calls)
        self.qualnames = layout.qualnames
        self.spec = layout.spec
        self.preludes = layout.preludes

    def call_sync(self, index: int, packed: bytes) -> tuple[bool, bytes]:
        """Called from Lua (worker thread): (True, result) or (False, Lua error message)."""
        try:
            return True, to_lua(self._calls[index](*self._arguments(index, packed)))
        except Exception as exc:  # every failure becomes a Lua error
            return False, self._failure(index, exc)

    async def call_async(self, request: _Request) -> tuple[bool, bytes]:
        """Await an async namespace function on the loop for a suspended script."""
        index = request.index
        try:
            return True, to_lua(await self._calls[index](*self._arguments(index, request.args)))
        except Exception as exc:  # every failure becomes a Lua error
            return False, self._failure(index, exc)

    def _print(self, line: bytes) -> None:
        self._run.script_log("info", _text(line))

    def _arguments(self, index: int, packed: bytes) -> list[Any]:
        args: list[Any] = from_lua(packed)
        while args and args[-1] is None:
            args.pop()
        if index not in self._signatures:
            try:
                self._signatures[index] = inspect.signature(self._calls[index])
            except (TypeError, ValueError):  # some builtins have none
                self._signatures[index] = None
        signature = self._signatures[index]
        if signature is not None:
            try:
                signature.bind(*args)
            except TypeError as exc:
                raise LuaCallError(f"wrong arguments ({exc})") from None
        return args

    def _failure(self, index: int, exc: Exception) -> bytes:
        qualname = self.qualnames[index]
        if isinstance(exc, LuaCallError):
            return f"{qualname}: {exc.message}".encode()
        self._run.logger.exception("lua.namespace_error", function=qualname)
        return f"internal error in {qualname}".encode()


class _Layout(msgspec.Struct, frozen=True):
    """What the sandbox setup needs to know of a run's namespaces.

    The same namespaces give the same layout run after run, so it is computed once per
    shape (namespace types, names and function names) and cached: binding forty-odd
    functions cost ~75 us of event-loop time per job.  A namespace type must therefore
    give the same function names the same kind (sync or async) on every run.
    """

    qualnames: list[str]  # by bridge index; 0 is print
    spec: bytes  # "ns.fn ns.other *ns.waits ..." ("*" = async), bridge indexes 1, 2, ...
    preludes: bytes | None  # MessagePack [name, bytecode, name, bytecode, ...] or None

    @classmethod
    def of(cls, namespaces: Sequence[Namespace], names: Sequence[tuple[str, ...]], calls: Sequence[Callable[..., Any]]) -> _Layout:
        """The layout of ``namespaces``, whose functions are ``names`` (one tuple per
        namespace) and ``calls`` (all of them in order, after print)."""
        qualnames, spec = ["print"], []
        preludes: list[bytes | str] = []
        taken: set[str] = set()
        for namespace, function_names in zip(namespaces, names, strict=True):
            _check_namespace_name(namespace.name, taken)
            prelude = getattr(namespace, "lua_prelude", None)
            if prelude:
                preludes += [namespace.name, _prelude_bytecode(namespace.name, prelude)]
            for name in function_names:
                if not name.isidentifier():
                    raise ValueError(f"{namespace.name}: {name!r} is not a Lua identifier")
                qualname = f"{namespace.name}.{name}"
                is_async = inspect.iscoroutinefunction(calls[len(qualnames)])
                qualnames.append(qualname)
                spec.append("*" + qualname if is_async else qualname)
        return cls(qualnames, " ".join(spec).encode(), to_lua(preludes) if preludes else None)


_layouts: dict[tuple[Any, ...], _Layout] = {}


def _check_namespace_name(name: str, taken: set[str]) -> None:
    if not name.isidentifier() or name in SANDBOX_GLOBALS or name in taken:
        raise ValueError(f"namespace name {name!r} is not usable as a Lua global")
    taken.add(name)


class _Session:
    """One LuaRuntime and its script coroutine.

    Every method runs in a worker thread, never two at once; the session is closed (its
    runtime released) in the thread that finishes the run.
    """

    def __init__(
        self, code: str, params: bytes, chunk_name: str, run: RunContext, bridge: _Bridge, killer: _Killer
    ) -> None:
        self._code = code.encode()
        self._params = params
        self._chunk_name = chunk_name
        self._run = run
        self._bridge = bridge
        self._killer = killer
        self._lua: LuaRuntime | None = None
        # entry points into the sandbox, while the script waits for I/O
        self._step: Callable[..., Any] | None = None
        self._where: Callable[[], bytes] | None = None
        self._release: Callable[[], None] | None = None

    def start(self) -> _Request | _Final:
        """Build the sandbox and run the script until it finishes or waits for I/O."""
        try:
            self._lua = _new_lua(self._run.limits.memory_bytes)
            reply = self._lua.execute(
                _bytecode(_LOADER),
                _bytecode(_PRIVILEGED),
                self._killer.check,
                self._bridge.call_sync,
                self._bridge.spec,
                self._bridge.preludes,
                self._run.limits.hook_interval,
                self._chunk_name.encode(),
                self._code,
                self._params,
                mode="b",
            )
            if reply[0] == b"io":
                self._step, self._where, self._release = reply[3:]
            return self._reply(*reply[:3])
        except LuaError as exc:
            return self._final(self._lua_failure(exc))

    def resume(self, ok: bool, payload: bytes) -> _Request | _Final:
        """Give the script the answer to its I/O request and run it on."""
        assert self._step is not None
        try:
            return self._reply(*self._step(ok, payload))
        except LuaError as exc:
            return self._final(self._lua_failure(exc))

    @property
    def closed(self) -> bool:
        """Whether the runtime has been released."""
        return self._lua is None

    def close(self) -> None:
        """Free the script's memory and drop the runtime (call when Lua is not running)."""
        if self._release is not None:
            with contextlib.suppress(LuaError):  # out of memory again: lua_close frees it all anyway
                self._release()
        self._step = self._where = self._release = None
        self._lua = None

    def interrupted(self, reason: str, request: _Request) -> _Final:
        """The driver stopped waiting on the script's I/O: say where it waited, then close."""
        assert self._where is not None
        try:
            stack = _frames(from_lua(self._where()))
        except LuaError:  # out of memory: report without a stack
            stack = []
        waiting_for = self._bridge.qualnames[request.index]
        return self._final(
            _Final(error=_stopped_detail(reason, self._run.cancel, self._run.limits, stack, waiting_for))
        )

    def stopped(self, reason: str) -> _Final:
        """The driver gave up on a thread step that did not come back."""
        return _Final(error=_stopped_detail(reason, self._run.cancel, self._run.limits, []))

    def _reply(self, tag: bytes, *values: Any) -> _Request | _Final:
        if tag == b"io":
            return _Request(*values)
        if tag == b"memory":
            assert self._lua is not None
            self._lua.set_max_memory(self._run.limits.memory_bytes + _DESCRIBE_MEMORY_BYTES)
            return self._reply(*values[0]())
        self._release = None  # every other reply is final, and the sandbox released the script
        if tag == b"done":
            return self._final(_Final(result=from_lua(values[0])))
        if tag == b"syntax":
            return self._final(_Final(error=_syntax_detail(values[0], self._chunk_name)))
        if tag == b"unserializable":
            return self._final(_Final(error=_unserializable_detail(values[0])))
        info = from_lua(values[0])
        if tag == b"killed":
            stack = _frames(info)
            detail = _stopped_detail(self._killer.expire(), self._run.cancel, self._run.limits, stack)
        else:
            detail = _runtime_detail(info, self._chunk_name, self._run.limits)
        return self._final(_Final(error=detail))

    def _lua_failure(self, exc: LuaError) -> _Final:
        # Only privileged code raises into Python, and only when Lua runs out of memory.
        if isinstance(exc, LuaMemoryError) or _text(exc.args[0]).startswith(_MEMORY_MESSAGE):
            return _Final(error=_memory_detail(self._run.limits))
        raise exc

    def _final(self, final: _Final) -> _Final:
        self.close()
        return final


class _Worker:
    """Runs session steps in worker threads; owns the session once the driver abandons one."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._lock = threading.Lock()
        self.busy = False
        self._abandoned = False

    def run(self, step: Callable[..., Any], *args: Any) -> Any:
        """Worker thread: run one step unless the driver has already given up."""
        with self._lock:
            if self._abandoned:
                return None
            self.busy = True
        try:
            return step(*args)
        finally:
            with self._lock:
                self.busy = False
                orphaned = self._abandoned
            if orphaned:
                _count(abandoned_running=-1)
                self._session.close()

    def abandon(self) -> None:
        """Loop thread: the driver stops waiting for the current step."""
        with self._lock:
            self._abandoned = True
            if self.busy:
                _count(abandoned_threads=1, abandoned_running=1)


class _ThreadPool:
    """Daemon threads that run session steps.

    Handing a step over costs one queue put and one loop wake-up: a quarter of the loop
    time of anyio.to_thread.run_sync in a cancel scope (limiter, scope and task
    bookkeeping), which counts at thousands of short runs a second.  The thread that
    went idle last takes the next step, so the steps of a run tend to share a thread and
    its malloc arena: glibc merges the blocks a collection freed only for the arena of
    the thread asking for memory, so a heap built in one thread and collected in another
    would be merged later, in lua_close, with the GIL held.  Threads start on demand, up
    to ``max_threads`` (further steps wait their turn), and end after ``idle_s`` idle.
    """

    def __init__(self, max_threads: int, idle_s: float, eager_threads: int, grow_after_s: float) -> None:
        self._max_threads = max_threads
        self._eager_threads = min(eager_threads, max_threads)
        self._grow_after_s = grow_after_s
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._threads = 0
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []  # inboxes, last idle last
        self._backlog: collections.deque[Callable[[], None]] = collections.deque()
        self._busy_since: dict[int, float] = {}  # thread ident -> when its current step began
        self._check_pending = False

    @property
    def threads(self) -> int:
        """Threads alive now."""
        return self._threads

    def submit(self, job: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        """Run ``job`` (which must not raise) in one of the threads.

        Up to ``eager_threads`` threads start at once.  Past that a step waits, and the
        pool grows (up to ``max_threads``) only while some thread has been on one step
        for ``grow_after_s``: a long, CPU-bound script then does not hold the others
        up, while a burst of short steps (a thousand jobs starting together) stays on
        a few threads, which on a few cores is as fast.  Call from ``loop``'s thread.
        """
        with self._lock:
            if self._idle:
                inbox = self._idle.pop()
            elif self._threads < self._eager_threads:
                self._threads += 1
                inbox = None
            else:
                self._backlog.append(job)
                self._check_later(loop)
                return
        if inbox is not None:
            inbox.put(job)
            return
        self._start(job)

    def _check_later(self, loop: asyncio.AbstractEventLoop) -> None:
        # (lock held) one pending growth check at a time
        if not self._check_pending and self._threads < self._max_threads:
            self._check_pending = True
            loop.call_later(self._grow_after_s, self._grow, loop)

    def _grow(self, loop: asyncio.AbstractEventLoop) -> None:
        started = []
        with self._lock:
            self._check_pending = False
            now = time.monotonic()
            stuck = sum(1 for since in self._busy_since.values() if now - since >= self._grow_after_s)
            while stuck and self._backlog and self._threads < self._max_threads:
                started.append(self._backlog.popleft())
                self._threads += 1
                stuck -= 1
            if self._backlog:
                self._check_later(loop)
        for job in started:
            self._start(job)

    def _start(self, job: Callable[[], None]) -> None:
        try:
            threading.Thread(target=self._work, args=(job,), name="luanette-lua", daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def _work(self, job: Callable[[], None]) -> None:
        me = threading.get_ident()
        inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        while True:
            with self._lock:  # (a plain store could resize the dict while _grow reads it)
                self._busy_since[me] = time.monotonic()
            job()
            with self._lock:
                if self._backlog:
                    job = self._backlog.popleft()
                    continue
                del self._busy_since[me]
                self._idle.append(inbox)
            try:
                job = inbox.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:  # still idle: end
                        self._idle.remove(inbox)
                        self._threads -= 1
                        return
                job = inbox.get()  # a job was handed over as the wait ended


# Lua steps of every run in the process; runs beyond this many threads wait their turn.
# More threads than this buy no speed on a few cores (measured: 4, 16 and 64 give the
# same wall time for 1,000 concurrent runs on 2 cores) and the daemon promises a small
# thread count; 16 leaves room for steps abandoned inside a C call that never returns.
# Two threads a core start at once; more only while a thread has been on one step for
# 5 ms (a long, CPU-bound script), so bursts of short steps stay on a few threads.
_threads = _ThreadPool(
    max_threads=16, idle_s=10.0, eager_threads=max(2, 2 * (os.cpu_count() or 1)), grow_after_s=0.005
)


def _in_thread(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., _T], *args: Any
) -> asyncio.Future[_T]:
    """Run ``fn(*args)`` in a pool thread, in a copy of the caller's context."""
    future: asyncio.Future[_T] = loop.create_future()
    _threads.submit(functools.partial(_thread_job, loop, future, contextvars.copy_context(), fn, args), loop)
    return future


def _thread_job(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    context: contextvars.Context,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    try:
        outcome = context.run(fn, *args), None
    except BaseException as exc:  # raised again where the future is awaited
        outcome = None, exc
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_resolve, future, *outcome)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled, or given up on
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


# Result of a thread step the driver stopped waiting for (deadline + grace passed).
_ABANDONED: Final = object()


class _Driver:
    """Drives one session from the event loop: thread steps and I/O waits in turn."""

    def __init__(self, session: _Session, bridge: _Bridge, killer: _Killer) -> None:
        self._session = session
        self._bridge = bridge
        self._killer = killer
        self._worker = _Worker(session)
        # asyncio only (the daemon's backend)
        self._loop = asyncio.get_running_loop()
        self._step: asyncio.Future[Any] | None = None  # the thread step being waited for
        self._abandon: asyncio.TimerHandle | None = None  # gives up on that step
        self._io_scope: anyio.CancelScope | None = None  # of the I/O wait in progress

    async def run(self) -> _Final:
        """Run the script to its end; the runtime is released before returning."""
        token = self._killer.token
        # wakes the loop from the cancelling thread
        listener = functools.partial(self._loop.call_soon_threadsafe, self._on_cancel)
        token._listen(listener)
        try:
            reply = await self._thread_step(self._session.start)
            while not isinstance(reply, _Final):
                answer = await self._wait_io(reply)
                if answer is None:
                    return await self._thread_step(self._session.interrupted, self._killer.expire(), reply)
                reply = await self._thread_step(self._session.resume, *answer)
            return reply
        finally:
            token._unlisten(listener)
            self._killer.stop()
            # unless the last step closed it, or an abandoned thread will
            if not (self._session.closed or self._worker.busy):
                with anyio.CancelScope(shield=True):
                    await _in_thread(self._loop, self._session.close)

    async def _thread_step(self, step: Callable[..., _T], *args: Any) -> _T | _Final:
        self._step = _in_thread(self._loop, self._worker.run, step, *args)
        self._abandon = self._loop.call_at(
            self._loop_deadline(ABANDON_GRACE_S), _resolve, self._step, _ABANDONED, None
        )
        if self._killer.token.cancelled:
            self._on_cancel()
        try:
            result = await self._step
        except BaseException:
            self._worker.abandon()  # cancelled from outside: the hook stops the thread
            raise
        finally:
            self._abandon.cancel()
            self._step = self._abandon = None
        if result is _ABANDONED:
            self._worker.abandon()  # deadline + grace passed and Lua did not come back
            return self._session.stopped(self._killer.expire())
        return result

    async def _wait_io(self, request: _Request) -> tuple[bool, bytes] | None:
        with anyio.CancelScope(deadline=self._loop_deadline(0.0)) as self._io_scope:
            if self._killer.token.cancelled:
                self._io_scope.cancel()
            try:
                return await self._bridge.call_async(request)
            finally:
                self._io_scope = None
        return None

    def _loop_deadline(self, grace: float) -> float:
        return self._loop.time() + (self._killer.deadline - time.monotonic()) + grace

    def _on_cancel(self) -> None:
        # Loop thread.  A wait on I/O ends now; a thread step gets the grace to come back.
        if self._io_scope is not None:
            self._io_scope.cancel()
        if self._step is not None and self._abandon is not None:  # a thread step
            when = self._loop.time() + ABANDON_GRACE_S
            if when < self._abandon.when():
                self._abandon.cancel()
                self._abandon = self._loop.call_at(when, _resolve, self._step, _ABANDONED, None)


# ------------------------------------------------------------------------ public API

# Run ids: a per-process prefix (unique across restarts) and a counter.
_RUN_ID_PREFIX: Final = uuid.uuid4().hex[:12]
_run_numbers = itertools.count(1)


async def run_script(
    code: str,
    params: Any = None,
    *,
    limits: Limits = Limits(),
    cancel: CancelToken | None = None,
    namespaces: Sequence[Namespace] = (),
    chunk_name: str = "script",
    log: Any = None,
) -> Outcome:
    """Run a Lua script in a fresh sandbox and return its result.

    ``params`` (JSON-like) is the script's ``params`` global and the argument of
    ``main(params)``.  The result is main's first return value if the script defines a
    global function ``main``, else the chunk's first return value, converted by the
    rules in ``luanette.luaconv``.  ``log`` is a structlog logger whose bound context
    (e.g. request_id) every script log line carries.

    Raises ScriptError with an ErrorDetail for syntax and runtime errors, timeouts,
    cancellation, the memory limit, results that cannot be converted and params that
    cannot be passed to Lua (kind "invalid_params").
    """
    started = time.perf_counter()
    with _stats_lock:
        stats.runs += 1
    token = cancel or CancelToken()
    run = RunContext(
        run_id=f"{_RUN_ID_PREFIX}-{next(_run_numbers)}",
        limits=limits,
        cancel=token,
        deadline=time.monotonic() + limits.timeout_s,
        caller_logger=log or _log,
    )
    try:
        packed_params = to_lua(params)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ScriptError(ErrorDetail("invalid_params", f"params cannot be passed to Lua: {exc}")) from None
    bridge = _Bridge(run, namespaces)
    killer = _Killer(run.deadline, token)
    session = _Session(code, packed_params, chunk_name, run, bridge, killer)
    final = await _Driver(session, bridge, killer).run()
    if final.error is not None:
        raise ScriptError(final.error)
    return Outcome(final.result, (time.perf_counter() - started) * 1000)


def check_syntax(code: str, chunk_name: str = "script") -> ErrorDetail | None:
    """Compile ``code`` as Lua 5.4 text without running it; the syntax error, if any."""
    lua = _new_lua(Limits().memory_bytes)
    try:
        lua.compile(code.encode(), name="=" + chunk_name, mode="t")
    except LuaError as exc:  # LuaSyntaxError, or LuaMemoryError for absurd sources
        return _syntax_detail(exc.args[0], chunk_name)
    return None
