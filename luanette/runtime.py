"""Sandboxed Lua 5.4 execution for Luanette.

One run = one fresh ``lupa.lua54.LuaRuntime``.  Privileged setup code (``_SANDBOX``)
builds the script's environment from an empty table and runs the script inside a Lua
coroutine with a count hook.  The Python driver (``run_script``) resumes that coroutine
in a worker thread (lupa releases the GIL while Lua runs), and whenever the script calls
an ``async`` namespace function the coroutine yields a private I/O request: the driver
awaits the Python coroutine on the event loop, then resumes the script with the answer.

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
import contextlib
import difflib
import functools
import inspect
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

import anyio
import msgspec
import structlog
from lupa.lua54 import LuaError, LuaMemoryError, LuaRuntime

from luanette.luaconv import LUA_CODEC, NULL, from_lua, to_lua

# Seconds a worker thread may overrun the deadline (or a cancel) before it is abandoned.
ABANDON_GRACE_S: Final = 1.0
# Chunk name of the privileged code (the sandbox hides frames of its own chunk).
_PRIVILEGED_CHUNK: Final = "=luanette"
_MEMORY_MESSAGE: Final = "not enough memory"
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

    @contextlib.contextmanager
    def _listening(self, listener: Callable[[], object]) -> Iterator[None]:
        """Call ``listener`` (from the cancelling thread) on cancel while inside."""
        with self._lock:
            self._listeners.append(listener)
            already = self._reason is not None
        if already:
            listener()
        try:
            yield
        finally:
            with self._lock:
                self._listeners.remove(listener)


class RunContext(msgspec.Struct, frozen=True):
    """What a namespace knows about the run it serves."""

    run_id: str
    limits: Limits
    cancel: CancelToken
    logger: Any  # structlog logger bound with run_id and the caller's context
    deadline: float  # time.monotonic() value at which the run times out
    null: Any = NULL  # return this to give Lua the null sentinel

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
    """

    name: str

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]: ...


# ------------------------------------------------------------------- the sandbox

# Privileged setup of one run.  It runs once on the main Lua thread with the real
# standard library, captures what it needs as locals, builds the script environment
# from an empty table and returns the driver's entry points, or nil and a syntax error:
# `step` (resume the script), `where` (the script's frames while it waits) and
# `release` (free the script's memory before the runtime is dropped).  Script code
# runs only in coroutines created here (each with the count hook) and can reach none
# of these locals.  Privileged code never calls a string method with `:` syntax: the
# string metatable points at the script's (mutable) copy of `string`.
_SANDBOX: Final = rb"""
local codec, check, call_sync, spec, hook_interval, chunk_name, code, params_packed = ...

local type, next, select, error, tostring = type, next, select, error, tostring
local rawget, rawequal, setmetatable, pcall, xpcall, load = rawget, rawequal, setmetatable, pcall, xpcall, load
local collectgarbage = collectgarbage
local co_create, co_resume, co_yield = coroutine.create, coroutine.resume, coroutine.yield
local co_status, co_running, co_isyieldable, co_close =
  coroutine.status, coroutine.running, coroutine.isyieldable, coroutine.close
local sethook, getinfo, getmetatable = debug.sethook, debug.getinfo, debug.getmetatable
local format, sub, rep, concat, sort = string.format, string.sub, string.rep, table.concat, table.sort
local encode, encode_args, decode, failure = codec.encode, codec.encode_args, codec.decode, codec.failure
local NULL = codec.NULL

string.dump = nil  -- no bytecode for anyone
python = nil       -- lupa's helper table in the real globals

local PRIVILEGED = getinfo(1, "S").source  -- this chunk's name; its frames are hidden
local KILL = {}    -- error value of a stopped run
local IO = {}      -- first value yielded to the driver: an I/O request
local killed = false
local env = {}
local script_co
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

-- Encode with `fn`, turning an encoder failure into a Lua error at the script's call.
local function encode_or_raise(fn, ...)
  local ok, packed = pcall(fn, ...)
  if killed then error(KILL, 0) end
  if ok then return packed end
  local problem = failure(packed)
  if problem then error(problem, 3) end
  error(packed, 0)  -- out of memory
end

local function bind_sync(index, qualname)
  return function(...)
    local ok, reply = call_sync(index, encode_or_raise(encode_args, "passed to " .. qualname, ...))
    if not ok then error(reply, 2) end
    return decode(reply)
  end
end

local function bind_async(index, qualname)
  return function(...)
    local packed = encode_or_raise(encode_args, "passed to " .. qualname, ...)
    if not co_isyieldable() then error(c_boundary(qualname), 2) end
    local ok, reply = co_yield(IO, index, packed)
    if not ok then error(reply, 2) end
    return decode(reply)
  end
end

-- "chunk:line: " of the innermost script frame calling the function that calls this,
-- skipping privileged frames (what error() would add if it knew where the script was).
local function script_where()
  local level = 3
  while true do
    local info = getinfo(level, "Sl")
    if not info then return "" end
    if info.source ~= PRIVILEGED then
      return info.currentline >= 0 and format("%s:%d: ", info.short_src, info.currentline) or ""
    end
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
  return forward(co, co_resume(co, ...))
end

local function sb_create(f)
  return hooked(co_create(f))
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
  return unless_killed(load(chunk, name, "t", chunk_env))
end

local function sb_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not available in the sandbox", 2)
  end
  return setmetatable(t, mt)
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
env.pcall = function(...) return unless_killed(pcall(...)) end
env.xpcall, env.load, env.setmetatable, env.collectgarbage =
  sb_xpcall, sb_load, sb_setmetatable, sb_collectgarbage
env.string, env.table, env.math, env.utf8 = copy(string), copy(table), copy(math), copy(utf8)
env.os = {clock = os.clock, time = os.time, date = os.date}
env.coroutine = {
  create = sb_create, resume = sb_resume, wrap = sb_wrap, yield = sb_yield,
  close = function(co) return unless_killed(co_close(co)) end,
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

for _, entry in next, decode(spec) do
  local index, namespace, name, is_async = entry[1], entry[2], entry[3], entry[4]
  local qualname = namespace .. "." .. name
  qualnames[index] = qualname
  env[namespace] = env[namespace] or {}
  env[namespace][name] = (is_async and bind_async or bind_sync)(index, qualname)
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
  return info.name or format("function <%s:%d>", info.short_src, info.linedefined)
end

local function frames_of(co)
  local frames, level = {}, 0
  while #frames < 32 do  -- deep recursion would otherwise report thousands
    local info = getinfo(co, level, "Sln")
    if not info then break end
    if info.what ~= "C" and info.source ~= PRIVILEGED then
      local line = info.currentline >= 0 and info.currentline or nil
      frames[#frames + 1] = {name = function_name(info), line = line, source = info.short_src}
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

-- Freed before describing an out-of-memory error, so the description can be built.
local function blank_64k() return rep(rep(" ", 256), 256) end  -- (rep of 1 byte is slow)
local reserve = blank_64k()

local function describe(err)
  local out_of_memory = err == "not enough memory"
  if out_of_memory then
    reserve = nil
    collectgarbage()
  end
  local info = {message = render(err), frames = frames_of(script_co)}
  if not (out_of_memory or killed) then info.names = global_names() end
  return encode(info, "error", "described", true)
end

-- The script coroutine ------------------------------------------------------------

local chunk, syntax_error = load(code, "=" .. chunk_name, "t", env)
if not chunk then return nil, syntax_error end
local params = decode(params_packed)
env.params = params

-- Script convention: run the chunk; if it defined a global function main, main(params)
-- gives the result, else the chunk's first return value does.
local function runner()
  local result = chunk()
  local main = rawget(env, "main")
  if type(main) == "function" then result = main(params) end
  local ok, packed = pcall(encode, result, "result", "returned", false)
  if killed then error(KILL, 0) end
  if ok then return packed end
  local problem = failure(packed)
  if not problem then error(packed, 0) end  -- out of memory
  return nil, problem
end

-- Replies to the driver: "io", index, args | "done", result | "unserializable", message
-- | "error", description | "killed", description.
local function finish(ok, first, ...)
  if killed then return "killed", describe(KILL) end
  if not ok then return "error", describe(first) end
  if co_status(script_co) == "suspended" then return "io", ... end
  if first then return "done", first end
  return "unserializable", (...)
end

script_co = hooked(co_create(runner))
local function step(...)
  return finish(co_resume(script_co, ...))
end
local function where()
  return encode({frames = frames_of(script_co)}, "error", "described", true)
end
-- lupa frees a runtime with the GIL held, and glibc merges freed small blocks only at
-- the next large allocation: do both here, inside Lua, where the GIL is released, so
-- a script's big heap does not stall the event loop.
local function release()
  script_co, env, chunk, params = nil, nil, nil, nil
  collectgarbage()
  blank_64k()
end
return step, where, release
"""


def _deny_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    # lupa asks this for every attribute access from Lua on a Python object.
    raise AttributeError("Python attributes are not accessible from Lua")


@functools.cache
def _bytecode(source: bytes) -> bytes:
    """Privileged source compiled once per process (loading bytecode is ~3x faster)."""
    compiler = LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
    dump = compiler.eval(b"function(source, name) return string.dump(assert(load(source, name, 't'))) end")
    bytecode: bytes = dump(source, _PRIVILEGED_CHUNK.encode())
    return bytecode


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


class _Function:
    """A Python callable bound into one run."""

    def __init__(self, qualname: str, call: Callable[..., Any]) -> None:
        self.qualname = qualname
        self.call = call
        self.is_async = inspect.iscoroutinefunction(call)

    @functools.cached_property
    def signature(self) -> inspect.Signature | None:
        # Computed on first call: most runs call few of their functions, and
        # inspect.signature costs more than the rest of binding a function.
        try:
            return inspect.signature(self.call)
        except (TypeError, ValueError):  # some builtins have none
            return None



class _Bridge:
    """The Python callables of one run, called by index from Lua."""

    def __init__(self, run: RunContext, namespaces: Sequence[Namespace]) -> None:
        self._run = run
        self.functions = [_Function("print", lambda line: run.script_log("info", _text(line)))]
        taken: set[str] = set()
        for namespace in namespaces:
            _check_namespace_name(namespace.name, taken)
            for name, call in namespace.functions(run).items():
                if not name.isidentifier():
                    raise ValueError(f"{namespace.name}: {name!r} is not a Lua identifier")
                self.functions.append(_Function(f"{namespace.name}.{name}", call))

    def spec(self) -> bytes:
        """[[index, namespace, name, is_async], ...] for the sandbox setup."""
        entries = [[i, *f.qualname.split("."), f.is_async] for i, f in enumerate(self.functions) if i]
        return to_lua(entries)

    def call_sync(self, index: int, packed: bytes) -> tuple[bool, bytes]:
        """Called from Lua (worker thread): (True, result) or (False, Lua error message)."""
        function = self.functions[index]
        try:
            return True, to_lua(function.call(*self._arguments(function, packed)))
        except Exception as exc:  # every failure becomes a Lua error
            return False, self._failure(function, exc)

    async def call_async(self, request: _Request) -> tuple[bool, bytes]:
        """Await an async namespace function on the loop for a suspended script."""
        function = self.functions[request.index]
        try:
            return True, to_lua(await function.call(*self._arguments(function, request.args)))
        except Exception as exc:  # every failure becomes a Lua error
            return False, self._failure(function, exc)

    @staticmethod
    def _arguments(function: _Function, packed: bytes) -> list[Any]:
        args: list[Any] = from_lua(packed)
        while args and args[-1] is None:
            args.pop()
        if function.signature is not None:
            try:
                function.signature.bind(*args)
            except TypeError as exc:
                raise LuaCallError(f"wrong arguments ({exc})") from None
        return args

    def _failure(self, function: _Function, exc: Exception) -> bytes:
        if isinstance(exc, LuaCallError):
            return f"{function.qualname}: {exc.message}".encode()
        self._run.logger.exception("lua.namespace_error", function=function.qualname)
        return f"internal error in {function.qualname}".encode()


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
        self._step: Callable[..., Any] | None = None
        self._where: Callable[[], bytes] | None = None
        self._release: Callable[[], None] | None = None

    def start(self) -> _Request | _Final:
        """Build the sandbox and run the script until it finishes or waits for I/O."""
        try:
            self._lua = _new_lua(self._run.limits.memory_bytes)
            codec = self._lua.execute(_bytecode(LUA_CODEC), mode="b")
            entry_points = self._lua.execute(
                _bytecode(_SANDBOX),
                codec,
                self._killer.check,
                self._bridge.call_sync,
                self._bridge.spec(),
                self._run.limits.hook_interval,
                self._chunk_name.encode(),
                self._code,
                self._params,
                mode="b",
            )
            if entry_points[0] is None:
                return self._final(_Final(error=_syntax_detail(entry_points[1], self._chunk_name)))
            self._step, self._where, self._release = entry_points
            return self._reply(*self._step())
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
        waiting_for = self._bridge.functions[request.index].qualname
        return self._final(
            _Final(error=_stopped_detail(reason, self._run.cancel, self._run.limits, stack, waiting_for))
        )

    def stopped(self, reason: str) -> _Final:
        """The driver gave up on a thread step that did not come back."""
        return _Final(error=_stopped_detail(reason, self._run.cancel, self._run.limits, []))

    def _reply(self, tag: bytes, *values: Any) -> _Request | _Final:
        if tag == b"io":
            return _Request(*values)
        if tag == b"done":
            return self._final(_Final(result=from_lua(values[0])))
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


class _Driver:
    """Drives one session from the event loop: thread steps and I/O waits in turn."""

    def __init__(self, session: _Session, bridge: _Bridge, killer: _Killer) -> None:
        self._session = session
        self._bridge = bridge
        self._killer = killer
        self._worker = _Worker(session)
        self._scope: anyio.CancelScope | None = None
        self._grace = 0.0

    async def run(self) -> _Final:
        """Run the script to its end; the runtime is released before returning."""
        # asyncio only (the daemon's backend): wakes the loop from the cancelling thread
        call_soon = asyncio.get_running_loop().call_soon_threadsafe
        try:
            with self._killer.token._listening(lambda: call_soon(self._on_cancel)):
                reply = await self._in_thread(self._session.start)
                while not isinstance(reply, _Final):
                    answer = await self._wait_io(reply)
                    if answer is None:
                        return await self._in_thread(self._session.interrupted, self._killer.expire(), reply)
                    reply = await self._in_thread(self._session.resume, *answer)
                return reply
        finally:
            self._killer.stop()
            await self._release()

    async def _in_thread(self, step: Callable[..., _T], *args: Any) -> _T | _Final:
        try:
            with anyio.CancelScope(deadline=self._loop_deadline(ABANDON_GRACE_S)) as scope:
                self._enter(scope, ABANDON_GRACE_S)
                return await anyio.to_thread.run_sync(self._worker.run, step, *args, abandon_on_cancel=True)
        except BaseException:
            self._worker.abandon()  # cancelled from outside: the hook stops the thread
            raise
        self._worker.abandon()  # deadline + grace passed and Lua did not come back
        return self._session.stopped(self._killer.expire())

    async def _wait_io(self, request: _Request) -> tuple[bool, bytes] | None:
        with anyio.CancelScope(deadline=self._loop_deadline(0.0)) as scope:
            self._enter(scope, 0.0)
            return await self._bridge.call_async(request)
        return None

    def _loop_deadline(self, grace: float) -> float:
        return anyio.current_time() + (self._killer.deadline - time.monotonic()) + grace

    def _enter(self, scope: anyio.CancelScope, grace: float) -> None:
        self._scope, self._grace = scope, grace
        if self._killer.token.cancelled:
            self._on_cancel()

    def _on_cancel(self) -> None:
        # Loop thread.  Waits on I/O end now; a thread step gets the grace to come back.
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, anyio.current_time() + self._grace)

    async def _release(self) -> None:
        if self._session.closed or self._worker.busy:
            return  # closed by the last step, or an abandoned thread will close it
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._session.close)


# ------------------------------------------------------------------------ public API


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
    _count(runs=1)
    token = cancel or CancelToken()
    run_id = uuid.uuid4().hex
    run = RunContext(
        run_id=run_id,
        limits=limits,
        cancel=token,
        logger=(log or _log).bind(run_id=run_id),
        deadline=time.monotonic() + limits.timeout_s,
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
