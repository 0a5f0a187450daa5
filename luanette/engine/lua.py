"""The in-process Lua engine: warm sandboxed states, the driver of one run, its threads.

A Lua state (``lupa.lua54.LuaRuntime``) is made once and serves many runs, one at a
time, as Redis 7 and Luau do: the privileged sandbox chunk (codec.lua + sandbox.lua,
loaded once per state) is called once per run and builds that run's environment from
an empty table over copies of the standard libraries, so nothing one run does is
visible to the next.  A state that saw a timeout, a cancel, the memory limit or any
other abnormal end is dropped, never reused.  Compiled chunks are cached by their text.

The driver (``run_script``) resumes the script's coroutine in threads of a small pool
(lupa releases the GIL while Lua runs): a script that does no I/O costs one thread step
and one call into Lua.  Whenever the script calls an ``async`` namespace function the
coroutine yields a private I/O request to the sandbox's scheduler, which runs the run's
other tasks (``core.spawn``, ``core.all``, ...) until none can run, then returns every
new request (by number) to the driver: it runs each as an asyncio task on the event
loop and resumes the sandbox with the answers that came first.  Requests of cancelled
tasks, and all of them when the run ends, are cancelled.

Stopping: the count hook calls a Python check every ``hook_interval`` instructions; once
the deadline has passed or the cancel token is set, the hook raises a private sentinel
error, and every catch point of the sandbox (pcall, xpcall, load, coroutine.resume,
wrap, close) re-raises it, so a script cannot swallow its own kill.  Waits on I/O are
cancelled on the loop.  A thread stuck in one long C call is abandoned one second after
the deadline (or after a cancel); ``stats`` counts those, and the worker process that
holds it is replaced by its supervisor (``luanette.engine.pool``).

A cancel with a grace (``Limits.cancel_grace_s``) is cooperative first: the script's
waits fail at once with a catchable "cancelled: <reason>" and the hook stops the run
only once the grace has passed (or at a second cancel); the run ends as cancelled
either way.  After the main phase, however it ended (except out of memory or an
abandoned thread), the script's global ``on_shutdown(reason)`` runs in the same sandbox
with a deadline of its own (``Limits.shutdown_timeout_s``); its failure is logged.

Only the runtime's own bridge functions are Python objects inside Lua, and they are
upvalues of privileged closures; values cross as MessagePack bytes (``luaconv``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import importlib.resources
import inspect
import itertools
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import anyio
import msgspec
from lupa.lua54 import LuaError, LuaMemoryError, LuaRuntime
from opentelemetry import trace

from luanette.engine.api import (
    SANDBOX_GLOBALS,
    CancelToken,
    ErrorDetail,
    Limits,
    LogSink,
    LuaCallError,
    Namespace,
    Outcome,
    RunContext,
    ScriptError,
    Usage,
    current_usage,
)
from luanette.engine.errors import (
    MEMORY_MESSAGE,
    frames,
    memory_detail,
    result_too_large_detail,
    runtime_detail,
    stopped_detail,
    syntax_detail,
    text,
    unserializable_detail,
)
from luanette.luaconv import LUA_CODEC, from_lua, to_lua
from luanette.modules import ModuleError

# Seconds a worker thread may overrun the deadline (or a cancel) before it is abandoned.
ABANDON_GRACE_S: Final = 1.0
# Chunk name of the privileged code (in compile errors: its bytecode has no debug information).
_PRIVILEGED_CHUNK: Final = "=luanette"
# Memory a description of the script's out-of-memory error may use beyond the limit.
_DESCRIBE_MEMORY_BYTES: Final = 2**20
# A state serves at most this many runs, then a new one takes over (bounds whatever a
# long-lived heap accumulates: fragmentation, interned strings).
MAX_RUNS_PER_STATE: Final = 5_000
# Longest a step may run inline on the event loop before it is taken back and run in
# a thread (see _Driver.run).
INLINE_BUDGET_S: Final = 0.002
# Killer.reason of a speculative inline step that had to give the loop back.
PREEMPTED: Final = "preempted"
# Idle states kept per process at all times; after a burst of more concurrent runs, up
# to the burst's size (set_idle_states) for IDLE_BURST_KEEP_S, then trimmed back.
MAX_IDLE_STATES: Final = 32
IDLE_BURST_KEEP_S: Final = 30.0
# States trim_idle_states frees per call (each lua_close holds the GIL: a few at a time).
TRIM_BATCH: Final = 16
# Compiled chunks kept per process (by text), and the largest text cached.
CHUNK_CACHE: Final = 256
MAX_CACHED_CHUNK: Final = 256 * 2**10

_T = TypeVar("_T")


class RuntimeStats(msgspec.Struct):
    """Process-wide counters of the runtime (read by telemetry and the worker)."""

    runs: int = 0
    # worker threads given up on because Lua did not come back (a long C call)
    abandoned_threads: int = 0
    # of those, how many are still running
    abandoned_running: int = 0
    states_created: int = 0  # Lua states made
    states_discarded: int = 0  # dropped after an abnormal end
    chunk_hits: int = 0  # runs whose chunk came compiled from the cache
    inline_steps: int = 0  # first steps run on the event loop
    preempted_steps: int = 0  # of those, taken back and run again in a thread


stats = RuntimeStats()
_stats_lock = threading.Lock()


def _count(**deltas: int) -> None:
    with _stats_lock:
        for name, delta in deltas.items():
            setattr(stats, name, getattr(stats, name) + delta)


# ------------------------------------------------------------------- the sandbox


def _lua_source(name: str) -> bytes:
    return (importlib.resources.files("luanette.engine") / name).read_bytes()


# The codec as a function of its own (its locals are not the sandbox's), which the
# sandbox calls for each run: a run's null is a table no other run sees.
_PRIVILEGED: Final = b"local new_codec = function()\n" + LUA_CODEC + b"end\n" + _lua_source("sandbox.lua")

# Run once per state: take string.dump and lupa's helper table away from the real
# globals (no bytecode for anyone but the engine), load the privileged chunk, and hand
# back the per-run entry and the chunk compiler.  lupa holds the GIL while it loads the
# chunk it is given (this small one); the big one loads here, inside Lua, which does not.
_STATE_INIT: Final = b"""
local privileged, chunk_name = ...
local dump, load = string.dump, load
string.dump = nil
python = nil
local run = load(privileged, chunk_name, "b")()  -- the machinery, once; run: once per run
local function compile(code, name)
  local chunk, err = load(code, name, "t")
  if not chunk then return nil, err end
  return dump(chunk)
end
return run, compile
"""


def _deny_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    # lupa asks this for every attribute access from Lua on a Python object.
    raise AttributeError("Python attributes are not accessible from Lua")


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


class _State:
    """A Lua state with the privileged chunk loaded: ``run`` starts one run, ``compile``
    turns script text into bytecode (with debug information, for the chunk cache)."""

    __slots__ = ("compile", "known", "lua", "run", "runs")

    def __init__(self) -> None:
        self.lua = _new_lua(0)
        self.run, self.compile = self.lua.execute(_STATE_INIT, _bytecode(_PRIVILEGED), _PRIVILEGED_CHUNK.encode())
        self.runs = 0
        self.known: set[int] = set()  # layouts whose spec and preludes the state keeps
        _count(states_created=1)


class _StatePool:
    """Idle states of this process, the most recently used first (its memory is warm).

    A run holds its state while it waits for I/O, so a burst of concurrent runs (a
    thousand jobs each waiting on a model) needs a state each, and a new state with its
    first layout costs ~0.5 ms of CPU, twice a trivial run.  The pool keeps ``base``
    idle states always and, for ``keep_s`` after more than ``base`` were in use at
    once, as many as were (up to ``burst``): the next burst finds them warm.  Then
    :meth:`trim` frees the extra ones a few at a time.
    """

    def __init__(self, base: int, burst: int | None = None, keep_s: float = IDLE_BURST_KEEP_S) -> None:
        self._idle: list[_State] = []
        self._lock = threading.Lock()
        self._base = base
        self._burst = base if burst is None else max(base, burst)
        self._keep_s = keep_s
        self._in_use = 0
        self._peak = 0  # most states in use at once in the current burst
        self._needed_at = -math.inf  # (monotonic) the last take beyond base

    def take(self) -> _State:
        """An idle state, or a new one."""
        with self._lock:
            self._in_use += 1
            if self._in_use > self._base:
                self._needed_at = time.monotonic()
                self._peak = max(self._peak, self._in_use)
            if self._idle:
                return self._idle.pop()
        return _State()

    def give(self, state: _State) -> None:
        """Return a state whose run ended normally; it serves the next run."""
        state.runs += 1
        with self._lock:
            self._in_use -= 1
            if state.runs < MAX_RUNS_PER_STATE and len(self._idle) < self._keep():
                self._idle.append(state)

    def drop(self) -> None:
        """A state taken is not coming back (its run ended abnormally)."""
        with self._lock:
            self._in_use -= 1

    def _keep(self) -> int:
        if time.monotonic() - self._needed_at < self._keep_s:
            return min(self._burst, max(self._base, self._peak))
        return self._base

    def set_burst(self, burst: int) -> None:
        """Keep up to ``burst`` idle states after a burst (never fewer than base)."""
        self._burst = max(self._base, burst)

    def trim(self) -> int:
        """Free up to TRIM_BATCH idle states beyond what :meth:`_keep` allows now (the
        least recently used); how many."""
        with self._lock:
            keep = self._keep()
            if keep == self._base:
                self._peak = 0
            extra = min(TRIM_BATCH, len(self._idle) - keep)
            if extra <= 0:
                return 0
            dropped = self._idle[:extra]
            del self._idle[:extra]
        del dropped  # (lua_close, outside the lock)
        return extra

    def __len__(self) -> int:
        return len(self._idle)

    def clear(self) -> None:
        """Drop every idle state (their memory goes back with them)."""
        with self._lock:
            self._idle.clear()


_states = _StatePool(MAX_IDLE_STATES)


class _ChunkCache:
    """Script text -> bytecode, so a script run again is not compiled again."""

    def __init__(self, size: int) -> None:
        self._chunks: collections.OrderedDict[tuple[bytes, bytes], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._size = size
        # scripts whose runs end quickly without calling out: candidates to run inline
        self._quick: dict[tuple[bytes, bytes], bool] = {}

    def quick(self, key: tuple[bytes, bytes]) -> bool:
        """Whether runs of this script have ended within the inline budget, calling no
        namespace function."""
        return self._quick.get(key, False)

    def learn(self, key: tuple[bytes, bytes], quick: bool) -> None:
        """Remember how a run of this script went: quick (a candidate to run inline,
        unless it was once taken back), or taken back from inline (never again)."""
        if not quick or key in self._chunks:
            if len(self._quick) > 4 * self._size:
                self._quick.clear()
            self._quick[key] = quick and self._quick.get(key, True)

    def get(self, key: tuple[bytes, bytes]) -> bytes | None:
        with self._lock:
            found = self._chunks.get(key)
            if found is not None:
                self._chunks.move_to_end(key)
            return found

    def put(self, key: tuple[bytes, bytes], bytecode: bytes) -> None:
        with self._lock:
            self._chunks[key] = bytecode
            if len(self._chunks) > self._size:
                self._chunks.popitem(last=False)

    def clear(self) -> int:
        """Forget every compiled chunk; how many there were."""
        with self._lock:
            count = len(self._chunks)
            self._chunks.clear()
            self._quick.clear()
            return count


_chunks = _ChunkCache(CHUNK_CACHE)


def forget_chunks() -> int:
    """Drop this process's compiled chunks (scripts were stored again or removed: the
    front's ``Invalidate``); how many were cached."""
    return _chunks.clear()


def release_idle_states() -> None:
    """Drop the idle Lua states of this process (a worker does it before it measures
    whether it has grown past its memory share)."""
    _states.clear()


def set_idle_states(burst: int) -> None:
    """Keep up to ``burst`` idle Lua states for a while after a burst of concurrent
    runs (a worker sizes it from its memory share)."""
    _states.set_burst(burst)


def trim_idle_states() -> int:
    """Free some of the idle states a burst left once it is long over (call it now and
    then); how many were freed."""
    return _states.trim()


# ------------------------------------------------------------------ run machinery


class _Request(msgspec.Struct, frozen=True):
    """A task of the script waits for an async namespace function (or core.sleep)."""

    index: int
    args: Any  # MessagePack arguments; core.sleep's milliseconds


# Bridge index of core.sleep's request (sandbox.lua's SLEEP): the driver sleeps itself.
_SLEEP_INDEX: Final = -1
# Bridge index of require's request for a module (sandbox.lua's MODULE): the run's
# module loader answers it (in a worker: the front, see luanette.modules).
_MODULE_INDEX: Final = -2
# A module loader: (name, directory of the requiring module) -> {key, name, chunk, dir,
# source}; raises ModuleError with the message the script sees.
ModuleLoader = Callable[[str, str], Awaitable[Mapping[str, Any]]]


class _ModuleSource(msgspec.Struct, frozen=True):
    """A module the loader found, as it travels from the loop to the Lua thread, where
    it is compiled (or found compiled) before the script sees it."""

    key: str
    name: str
    chunk: str
    dir: str
    source: bytes

    def packed(self, state: _State) -> bytes:
        """The sandbox's module reply: key, name, chunk, dir, code, mode; the code is
        bytecode this worker compiled from the same text when that compiles."""
        code, mode = self.source, b"t"
        cache_key = (self.chunk.encode(), self.source)
        if len(self.source) <= MAX_CACHED_CHUNK:
            bytecode = _chunks.get(cache_key)
            if bytecode is None:
                compiled = state.compile(self.source, b"=" + cache_key[0])
                if isinstance(compiled, bytes):  # else (nil, message): the sandbox reports it
                    bytecode = compiled
                    _chunks.put(cache_key, bytecode)
            else:
                _count(chunk_hits=1)
            if bytecode is not None:
                code, mode = bytecode, b"b"
        return to_lua([self.key, self.name, self.chunk, self.dir, code, mode])
_NIL: Final = to_lua(None)


class _Waits(msgspec.Struct, frozen=True):
    """No task of the script can run: new requests by number, and the numbers of
    requests whose tasks were cancelled (core.all, core.race)."""

    requests: list[tuple[int, _Request]]
    cancels: list[int]

    @classmethod
    def of(cls, values: Sequence[Any]) -> _Waits:
        """From the sandbox's "io" reply: number, index, args, ... (number < 0: cancel)."""
        requests, cancels = [], []
        for position in range(0, len(values), 3):
            number = values[position]
            if number < 0:
                cancels.append(-number)
            else:
                requests.append((number, _Request(values[position + 1], values[position + 2])))
        return cls(requests, cancels)


class _Final(msgspec.Struct, frozen=True):
    """The run is over."""

    result: Any = None
    error: ErrorDetail | None = None


# A speculative inline step taken back (see _Driver._inline_start); never reaches a caller.
_PREEMPTED: Final = _Final(error=ErrorDetail("preempted", "the step was taken back from the event loop"))


class _Killer:
    """The count hook's view of a run: a deadline and a cancel token, read as plain values.

    A cancel with a grace (``Limits.cancel_grace_s``) first only makes the script's waits
    fail ("cancelled: <reason>", see ``_Driver``); the run is stopped hard once the grace
    has passed, or at a second cancel.  During on_shutdown (``begin_shutdown``) the
    deadline is its own and any cancel after it began stops it at once."""

    __slots__ = ("cancelled_at", "deadline", "grace", "inline_until", "reason", "shutdown_cancels", "token")

    def __init__(self, deadline: float, token: CancelToken, grace: float = 0.0) -> None:
        self.deadline = deadline
        self.token = token
        self.grace = grace
        self.reason: str | None = None
        # while a step runs inline on the event loop: when it must give the loop back
        self.inline_until: float | None = None
        self.cancelled_at: float | None = None  # when the cancel was first seen
        self.shutdown_cancels: int | None = None  # token.count as on_shutdown began

    def begin_shutdown(self, timeout_s: float) -> None:
        """on_shutdown starts: a deadline of its own and a fresh cancel state."""
        self.deadline = time.monotonic() + timeout_s
        self.shutdown_cancels = self.token.count
        self.reason = None

    def cooperative(self) -> bool:
        """Whether the run is cancelled but within its grace: its waits fail, it runs on."""
        if self.shutdown_cancels is not None or not self.token.cancelled:
            return False
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        return True

    def _hard_cancel(self, now: float) -> bool:
        if self.shutdown_cancels is not None:
            return self.token.count > self.shutdown_cancels
        if not self.token.cancelled:
            return False
        if self.cancelled_at is None:
            self.cancelled_at = now
        return self.token.count > 1 or now >= self.cancelled_at + self.grace

    def check(self) -> bool:
        """True once the run must stop; called from the Lua hook in the worker thread."""
        if self.reason is None:
            now = time.monotonic()
            if self._hard_cancel(now):
                self.reason = "cancelled"
            elif now >= self.deadline:
                self.reason = "timeout"
            elif self.inline_until is not None and now >= self.inline_until:
                self.reason = PREEMPTED
            else:
                return False
        return True

    def expire(self) -> str:
        """The driver stopped waiting: record and return why."""
        if self.reason is None:
            self.reason = "cancelled" if self._hard_cancel(time.monotonic()) else "timeout"
        return self.reason

    def stop(self) -> None:
        """The run is over: Lua still running anywhere stops at its next hook."""
        if self.reason is None:
            self.reason = "finished"


class _Bridge:
    """The Python callables of one run, called by index from Lua (0 is print)."""

    def __init__(
        self, run: RunContext, namespaces: Sequence[Namespace], killer: _Killer, modules: ModuleLoader | None = None
    ) -> None:
        self._run = run
        self._modules = modules
        self._namespaces = namespaces
        self.killer = killer
        self.calls = 0  # namespace calls the script made
        # computed on a function's first call: most runs call few of their functions,
        # and inspect.signature costs more than the rest of binding one
        self._signatures: dict[int, inspect.Signature | None] = {0: None}  # print: always one line
        key = tuple((type(namespace), namespace.name) for namespace in namespaces)
        layout = _layouts.get(key)
        if layout is None:  # a new shape: bind everything once to learn it
            calls: list[Callable[..., Any] | None] = [self._print]
            names = []
            for namespace in namespaces:
                functions = namespace.functions(run)
                names.append(tuple(functions))
                calls.extend(functions.values())
            layout = _layouts[key] = _Layout.of(namespaces, names, calls)  # type: ignore[arg-type]
        else:
            # A namespace's functions are made on the first call of one of them: most
            # runs use few namespaces, and making a run's closures costs more than the
            # rest of starting it.
            calls = [self._print, *([None] * (len(layout.qualnames) - 1))]
        self._calls = calls
        self._made: dict[int, Mapping[str, Callable[..., Any]]] = {}  # by namespace position
        self._layout = layout
        self.qualnames = layout.qualnames
        self.spec = layout.spec
        self.preludes = layout.preludes
        self.layout_key = layout.key

    def _function(self, index: int) -> Callable[..., Any]:
        function = self._calls[index]
        if function is None:
            position = self._layout.owners[index]
            made = self._made.get(position)
            if made is None:
                made = self._made[position] = self._namespaces[position].functions(self._run)
            # by name, not all at once: a gated namespace wraps a function when it is asked for
            function = self._calls[index] = made[self.qualnames[index].partition(".")[2]]
        return function

    def call_sync(self, index: int, packed: bytes) -> tuple[bool | None, bytes]:
        """Called from Lua (worker thread): (True, result) or (False, Lua error message);
        (None, b"") when a speculative inline step calls out (see ``_Driver``)."""
        if self.killer.inline_until is not None:
            self.killer.reason = PREEMPTED
            return None, b""
        self.calls += 1
        try:
            return True, to_lua(self._function(index)(*self._arguments(index, packed)))
        except Exception as exc:  # every failure becomes a Lua error
            try:
                return False, self._failure(index, exc)
            except Exception:  # never let a Python exception object reach Lua
                return False, b"internal error"

    @property
    def limits(self) -> Limits:
        return self._run.limits

    def shutdown_failed(self, reason: str, error: ErrorDetail) -> None:
        """on_shutdown failed or was stopped: a script log line (the job's log) with the
        error as field on_shutdown_error, and a warning in the daemon's log."""
        detail = msgspec.to_builtins(error)
        self._run.logger.warning("lua.on_shutdown_failed", reason=reason, kind=error.kind, error=error.message)
        with contextlib.suppress(Exception):  # (the run's log quota may be spent)
            self._run.script_log("error", f"on_shutdown failed: {error.message}", {"on_shutdown_error": detail})

    def qualname(self, index: int) -> str:
        """The Lua name of the function at a bridge index."""
        if index == _MODULE_INDEX:
            return "require"
        return "core.sleep" if index == _SLEEP_INDEX else self.qualnames[index]

    async def call_async(self, request: _Request) -> tuple[bool, bytes | _ModuleSource]:
        """Await an async namespace function on the loop for a waiting task."""
        index = request.index
        self.calls += 1
        if index == _SLEEP_INDEX:
            await asyncio.sleep(request.args / 1000)
            return True, _NIL
        if index == _MODULE_INDEX:
            return await self._module(request.args)
        try:
            return True, to_lua(await self._function(index)(*self._arguments(index, request.args)))
        except Exception as exc:  # every failure becomes a Lua error
            return False, self._failure(index, exc)

    async def _module(self, packed: bytes) -> tuple[bool, bytes | _ModuleSource]:
        """require's request: the module, or the message of a Lua error."""
        name, base = from_lua(packed)
        name, base = text(name), text(base)
        if self._modules is None:
            return False, f'module not found: "{name}" (modules are not available to this run)'.encode()
        try:
            found = await self._modules(name, base)
            source = found["source"]
            return True, _ModuleSource(
                str(found["key"]),
                str(found["name"]),
                str(found["chunk"]),
                str(found["dir"]),
                source if isinstance(source, bytes) else str(source).encode(),
            )
        except ModuleError as exc:
            return False, str(exc).encode()
        except Exception:  # every failure becomes a Lua error
            self._run.logger.exception("lua.module_error", module=name)
            return False, b"internal error in require"

    def _print(self, line: bytes) -> None:
        self._run.script_log("info", text(line))

    def _arguments(self, index: int, packed: bytes) -> list[Any]:
        args: list[Any] = from_lua(packed)
        while args and args[-1] is None:
            args.pop()
        if index not in self._signatures:
            self._signatures[index] = _signature(self._function(index))
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


# Signatures of namespace functions by code object: a namespace makes new closures for
# every run, but of the same few code objects, and inspect.signature costs ~10 us.
_signatures: dict[tuple[Any, ...], inspect.Signature | None] = {}
_MAX_SIGNATURES: Final = 4096


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    """What a call's arguments are checked against (None: anything goes)."""
    inner = inspect.unwrap(function)
    code = getattr(inner, "__code__", None)
    if code is None:
        return _signature_of(function)
    kwdefaults = getattr(inner, "__kwdefaults__", None)
    key = (code, inspect.ismethod(inner), getattr(inner, "__defaults__", None),
           tuple(kwdefaults.items()) if kwdefaults else None)
    try:
        return _signatures[key]
    except KeyError:
        pass
    except TypeError:  # unhashable defaults
        return _signature_of(function)
    signature = _signature_of(function)
    if len(_signatures) < _MAX_SIGNATURES:
        _signatures[key] = signature
    return signature


def _signature_of(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have none
        return None


class _Layout(msgspec.Struct, frozen=True):
    """What the sandbox setup needs to know of a run's namespaces.

    The same namespaces give the same layout run after run, so it is computed once per
    shape (namespace types and names) and cached: binding forty-odd functions cost
    ~75 us per job.  A namespace type must therefore give the same function names, in
    the same order and of the same kind (sync or async), on every run.
    """

    key: int  # unique per layout in this process: what a state caches it under
    qualnames: list[str]  # by bridge index; 0 is print
    spec: bytes  # bytecode of a chunk that returns the sandbox's table of them (_spec_chunk)
    preludes: bytes | None  # MessagePack [name, bytecode, lazy, name, bytecode, lazy, ...] or None
    owners: list[int]  # by bridge index: position of its namespace (-1 for print)
    firsts: list[int]  # by namespace position: bridge index of its first function

    @classmethod
    def of(
        cls, namespaces: Sequence[Namespace], names: Sequence[tuple[str, ...]], calls: Sequence[Callable[..., Any]]
    ) -> _Layout:
        """The layout of ``namespaces``, whose functions are ``names`` (one tuple per
        namespace) and ``calls`` (all of them in order, after print)."""
        qualnames, is_async_by_index = ["print"], [False]
        owners, firsts = [-1], []
        preludes: list[bytes | str | bool] = []
        taken: set[str] = set()
        for position, (namespace, function_names) in enumerate(zip(namespaces, names, strict=True)):
            _check_namespace_name(namespace.name, taken, getattr(namespace, "core_extension", False))
            firsts.append(len(qualnames))
            prelude = getattr(namespace, "lua_prelude", None)
            if prelude:
                lazy = bool(getattr(namespace, "lua_prelude_lazy", False))
                preludes += [namespace.name, _prelude_bytecode(namespace.name, prelude), lazy]
            for name in function_names:
                if not name.isidentifier():
                    raise ValueError(f"{namespace.name}: {name!r} is not a Lua identifier")
                qualname = f"{namespace.name}.{name}"
                is_async_by_index.append(inspect.iscoroutinefunction(calls[len(qualnames)]))
                qualnames.append(qualname)
                owners.append(position)
        return cls(
            next(_layout_keys), qualnames, _spec_chunk(qualnames, is_async_by_index),
            to_lua(preludes) if preludes else None, owners, firsts,
        )


_PLAIN_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def _lua_string(text: str) -> str:
    """A Lua string literal of ``text``: every byte but ASCII letters, digits, ``_`` and
    ``.`` written as a decimal escape (names are identifiers, but Python's may be
    non-ASCII)."""
    return '"' + "".join(chr(b) if b in _PLAIN_BYTES else f"\\{b:03d}" for b in text.encode()) + '"'


def _spec_chunk(qualnames: Sequence[str], is_async: Sequence[bool]) -> bytes:
    """Bytecode of a chunk that returns the layout as the sandbox keeps it (see
    sandbox.lua): ``[index] = {async, namespace, name, "ns.name"}``, ``order`` (the
    namespaces in order), ``names[namespace] = {name = index}``, ``qualnames[index]``.
    A new state loads it once per layout: parsing the same from text in Lua took ~3x as
    long (~110 us for a job's 117 functions), and a burst of concurrent runs makes a
    state for each."""
    entries: list[str] = []
    names: dict[str, list[str]] = {}  # namespace -> its "[name] = index" items, in order
    for index in range(1, len(qualnames)):
        namespace, _, name = qualnames[index].partition(".")
        flag = "true" if is_async[index] else "false"
        quoted = ", ".join(_lua_string(part) for part in (namespace, name, qualnames[index]))
        entries.append(f"{{{flag}, {quoted}}}")
        names.setdefault(namespace, []).append(f"[{_lua_string(name)}] = {index}")
    order = ", ".join(_lua_string(namespace) for namespace in names)
    by_namespace = ",\n".join(f"[{_lua_string(ns)}] = {{{', '.join(items)}}}" for ns, items in names.items())
    source = (
        "local parsed = {" + ",\n".join(entries) + "}\n"
        f"parsed.order = {{{order}}}\n"
        f"parsed.names = {{{by_namespace}}}\n"
        "local qualnames = {}\n"
        "for i = 1, #parsed do qualnames[i] = parsed[i][4] end\n"
        "parsed.qualnames = qualnames\n"
        "return parsed\n"
    )
    return _compile(source.encode(), b"=layout")


_layouts: dict[tuple[Any, ...], _Layout] = {}
_layout_keys = itertools.count(1)


def _check_namespace_name(name: str, taken: set[str], core_extension: bool = False) -> None:
    # `core` belongs to the sandbox, which merges a namespace marked core_extension into it
    usable = name not in SANDBOX_GLOBALS or (core_extension and name == "core")
    if not name.isidentifier() or not usable or name in taken:
        raise ValueError(f"namespace name {name!r} is not usable as a Lua global")
    taken.add(name)


def _skip_shebang(code: bytes) -> bytes:
    """``code`` with a first line starting with ``#`` (``#!/usr/bin/env lua``) made a
    comment, as the ``lua`` command skips it: scripts written to run as files load
    unchanged, and every later line keeps its number."""
    if not code.startswith(b"#"):
        return code
    return b"-- " + code[1:]  # ("--[[" would open a long comment; "-- [[" does not)


class _Session:
    """One LuaRuntime and its script coroutine.

    Every method runs in a worker thread, never two at once; the session is closed (its
    runtime released) in the thread that finishes the run.
    """

    def __init__(
        self, code: str, params: bytes, chunk_name: str, run: RunContext, bridge: _Bridge, killer: _Killer
    ) -> None:
        self._code = _skip_shebang(code.encode())
        self._params = params
        self._chunk_name = chunk_name
        self._run = run
        self._bridge = bridge
        self._killer = killer
        self._state: _State | None = None
        self._reusable = False  # the state may serve another run (a normal end)
        self.lua_seconds = 0.0  # how long the first step ran in Lua
        self._out_of_memory = False
        # entry points into the sandbox, while the script waits for I/O
        self._step: Callable[..., Any] | None = None
        self._where: Callable[[], bytes] | None = None
        self._release: Callable[[], None] | None = None
        self._begin_shutdown: Callable[..., Any] | None = None
        # the main phase ended and the script's on_shutdown may run (see shutdown)
        self.shutdown_pending = False
        self.phase = "main"
        self.shutdown_error: ErrorDetail | None = None  # how on_shutdown failed

    def start(self) -> _Waits | _Final:
        """Build the sandbox and run the script until it finishes or waits for I/O."""
        try:
            self._state = state = _states.take()
            state.lua.set_max_memory(self._run.limits.memory_bytes)
            code, mode = self._chunk(state)
            bridge = self._bridge
            known = bridge.layout_key in state.known  # (else the state is sent them, once)
            began = time.perf_counter()
            reply = state.run(
                self._killer.check,
                bridge.call_sync,
                bridge.layout_key,
                None if known else bridge.spec,
                None if known else bridge.preludes,
                self._run.limits.hook_interval,
                self._chunk_name.encode(),
                code,
                mode,
                self._params,
            )
            if not known:
                state.known.add(bridge.layout_key)
            self.lua_seconds = time.perf_counter() - began
            if reply[0] == b"io":
                self._step, self._where, self._release, self._begin_shutdown = reply[1:5]
                return _Waits.of(reply[5:])
            return self._reply(*reply)
        except LuaError as exc:
            return self._final(self._lua_failure(exc))

    def shutdown(self, reason: str) -> _Waits | _Final:
        """Run the script's on_shutdown(reason), if it defines one, in the same sandbox
        (after the main phase ended; the killer has its own deadline by now)."""
        begin, self._begin_shutdown = self._begin_shutdown, None
        self.shutdown_pending = False
        self.phase = "shutdown"
        assert begin is not None
        # namespaces bound their waits to the run's deadline: on_shutdown has its own
        msgspec.structs.force_setattr(self._run, "deadline", max(self._run.deadline, self._killer.deadline))
        try:
            reply = begin(reason.encode())
            if not isinstance(reply, tuple):  # "none": no on_shutdown, the script was released
                self._release = None
                return self._final(_Final())
            if reply[0] == b"io":
                self._step, self._where, self._release, self._begin_shutdown = reply[1:5]
                self._begin_shutdown = None
                return _Waits.of(reply[5:])
            return self._reply(*reply)
        except LuaError as exc:
            final = self._lua_failure(exc)
            self.shutdown_error = final.error
            return self._final(_Final())

    @property
    def key(self) -> tuple[bytes, bytes]:
        """The chunk cache's key of this script."""
        return self._chunk_name.encode(), self._code

    def _chunk(self, state: _State) -> tuple[bytes, bytes]:
        """The script as cached bytecode when it compiled before, else as text."""
        if len(self._code) > MAX_CACHED_CHUNK:
            return self._code, b"t"
        key = (self._chunk_name.encode(), self._code)
        bytecode = _chunks.get(key)
        if bytecode is not None:
            _count(chunk_hits=1)
            return bytecode, b"b"
        compiled = state.compile(self._code, b"=" + key[0])
        if not isinstance(compiled, bytes):  # (nil, message): the sandbox reports it
            return self._code, b"t"
        _chunks.put(key, compiled)
        return compiled, b"b"

    def resume(self, answers: list[Any]) -> _Waits | _Final:
        """Give the script's tasks the answers to their requests (number, ok, payload, ...)
        and run them on."""
        assert self._step is not None
        try:
            if any(isinstance(answer, _ModuleSource) for answer in answers):
                assert self._state is not None
                answers = [a.packed(self._state) if isinstance(a, _ModuleSource) else a for a in answers]
            reply = self._step(*answers)
            # (lupa gives a single returned value as itself, not as a tuple)
            return self._reply(*(reply if isinstance(reply, tuple) else (reply,)))
        except LuaError as exc:
            return self._final(self._lua_failure(exc))

    @property
    def closed(self) -> bool:
        """Whether the state has been released."""
        return self._state is None

    def close(self) -> None:
        """Free the script's memory and give the state back, or drop it after an
        abnormal end (call when Lua is not running)."""
        if self._release is not None:
            with contextlib.suppress(LuaError):  # out of memory again: lua_close frees it all anyway
                self._release()
        self._step = self._where = self._release = None
        state, self._state = self._state, None
        if state is None:
            return
        if self._reusable:
            _states.give(state)
        else:
            _states.drop()
            _count(states_discarded=1)

    def interrupted(self, reason: str, waiting_for: str | None) -> _Final:
        """The driver stopped waiting on the script's I/O: say where it waited, then close."""
        assert self._where is not None
        try:
            stack = frames(from_lua(self._where()))
        except LuaError:  # out of memory: report without a stack
            stack = []
        if self.phase == "shutdown":
            self.shutdown_error = self._shutdown_stopped(reason, stack, waiting_for)
            return self._final(_Final())
        self.shutdown_pending = self._begin_shutdown is not None
        return self._final(_Final(error=stopped_detail(reason, self._run.cancel, self._run.limits, stack, waiting_for)))

    def _shutdown_stopped(self, reason: str, stack: list[Any], waiting_for: str | None = None) -> ErrorDetail:
        waiting = f" while waiting for {waiting_for}" if waiting_for else ""
        line = stack[0].line if stack else None
        if reason == "timeout":
            limit = self._run.limits.shutdown_timeout_s
            return ErrorDetail("timeout", f"on_shutdown exceeded its time limit of {limit:g} s{waiting}", line, stack)
        return ErrorDetail("cancelled", f"on_shutdown was cancelled{waiting}", line, stack)

    def stopped(self, reason: str) -> _Final:
        """The driver gave up on a thread step that did not come back."""
        return _Final(error=stopped_detail(reason, self._run.cancel, self._run.limits, []))

    def _reply(self, tag: bytes, *values: Any) -> _Waits | _Final:
        if tag == b"io":
            return _Waits.of(values)
        if tag == b"memory":
            assert self._state is not None
            self._out_of_memory = True
            self._state.lua.set_max_memory(self._run.limits.memory_bytes + _DESCRIBE_MEMORY_BYTES)
            return self._reply(*values[0]())
        if tag == b"shutdown":  # final, but the sandbox is kept for on_shutdown
            self._begin_shutdown, self._release = values[0], values[1]
            self.shutdown_pending = True
            return self._reply(*values[2:])
        if self.phase == "shutdown":
            return self._shutdown_reply(tag, values)
        if not self.shutdown_pending:
            self._release = None  # every other reply is final, and the sandbox released the script
        # a run that ended by itself leaves a state fit for the next; a killed one,
        # or one out of memory, does not
        preempted = tag == b"killed" and self._killer.reason == PREEMPTED
        self._reusable = (tag != b"killed" or preempted) and not self._out_of_memory
        if preempted:  # taken back at a hook or before a call: the state is sound
            self.shutdown_pending = False  # it runs again from the start
            return self._final(_PREEMPTED)
        if tag == b"done":
            if len(values[0]) > self._run.limits.result_bytes:
                return self._final(_Final(error=result_too_large_detail(len(values[0]), self._run.limits)))
            return self._final(_Final(result=from_lua(values[0])))
        if tag == b"syntax":
            return self._final(_Final(error=syntax_detail(values[0], self._chunk_name)))
        if tag == b"unserializable":
            return self._final(_Final(error=unserializable_detail(values[0])))
        info = from_lua(values[0])
        if tag == b"killed":
            stack = frames(info)
            detail = stopped_detail(self._killer.expire(), self._run.cancel, self._run.limits, stack)
        else:
            detail = runtime_detail(info, self._chunk_name, self._run.limits, self._code)
        return self._final(_Final(error=detail))

    def _shutdown_reply(self, tag: bytes, values: tuple[Any, ...]) -> _Final:
        """The end of on_shutdown: its result is ignored, its failure kept."""
        self._release = None
        self._reusable = self._reusable and tag != b"killed" and not self._out_of_memory
        if tag == b"killed":
            self.shutdown_error = self._shutdown_stopped(self._killer.expire(), frames(from_lua(values[0])))
        elif tag == b"error":
            self.shutdown_error = runtime_detail(from_lua(values[0]), self._chunk_name, self._run.limits, self._code)
        return self._final(_Final())

    def _lua_failure(self, exc: LuaError) -> _Final:
        # Only privileged code raises into Python, and only when Lua runs out of memory.
        if isinstance(exc, LuaMemoryError) or text(exc.args[0]).startswith(MEMORY_MESSAGE):
            return _Final(error=memory_detail(self._run.limits))
        raise exc

    def _final(self, final: _Final) -> _Final:
        if not self.shutdown_pending:
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
_threads = _ThreadPool(max_threads=16, idle_s=10.0, eager_threads=max(2, 2 * (os.cpu_count() or 1)), grow_after_s=0.005)


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
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
    outcome: tuple[Any, BaseException | None]
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
# Runs of this process in a thread step or waiting on I/O: while there are any, no step
# runs inline (it would hold up their I/O and results).
_busy_runs = 0


class _Driver:
    """Drives one session from the event loop: thread steps and I/O waits in turn."""

    def __init__(
        self,
        session: _Session,
        bridge: _Bridge,
        killer: _Killer,
        on_shutdown_start: Callable[[float], object] | None = None,
    ) -> None:
        self._on_shutdown_start = on_shutdown_start
        self._session = session
        self._bridge = bridge
        self._killer = killer
        self._worker = _Worker(session)
        # asyncio only (the daemon's backend)
        self._loop = asyncio.get_running_loop()
        self._step: asyncio.Future[Any] | None = None  # the thread step being waited for
        self._abandon: asyncio.TimerHandle | None = None  # gives up on that step
        # the script's requests in progress, by number (several when core tasks wait)
        self._pending: dict[int, tuple[_Request, asyncio.Task[tuple[bool, bytes | _ModuleSource]]]] = {}
        self._dropped: set[asyncio.Task[Any]] = set()  # cancelled requests not yet ended
        self._wake: asyncio.Future[None] | None = None  # set on a cancel while I/O is awaited
        self._deadline_timer: asyncio.TimerHandle | None = None  # pokes the wait at the deadline
        self._timer_for = 0.0  # the deadline it was set for

    async def run(self) -> _Final:
        """Run the script to its end; the runtime is released before returning."""
        token = self._killer.token
        # wakes the loop from the cancelling thread
        listener = functools.partial(self._loop.call_soon_threadsafe, self._on_cancel)
        token.listen(listener)
        global _busy_runs
        try:
            reply = self._inline_start()
            if isinstance(reply, _Final) and not self._session.shutdown_pending:
                return self._cancelled(reply)
            _busy_runs += 1
            try:
                if reply is None:
                    reply = await self._thread_step(self._session.start)
                    # Lua's own time, not the thread switches around it (which a busy
                    # machine stretches); a slow run just does not teach anything
                    if (
                        isinstance(reply, _Final)
                        and self._session.lua_seconds < INLINE_BUDGET_S
                        and self._bridge.calls == 0
                    ):
                        _chunks.learn(self._session.key, True)
                final = self._cancelled(await self._drive(reply))
                if self._session.shutdown_pending:
                    await self._shutdown(final)
                return final
            finally:
                _busy_runs -= 1
        finally:
            token.unlisten(listener)
            self._killer.stop()
            await self._end_io()
            # unless the last step closed it, or an abandoned thread will
            if not (self._session.closed or self._worker.busy):
                with anyio.CancelScope(shield=True):
                    await _in_thread(self._loop, self._session.close)

    async def _drive(self, reply: _Waits | _Final) -> _Final:
        """Answer the script's requests until its phase (main or on_shutdown) ends."""
        while not isinstance(reply, _Final):
            answers = await self._wait_io(reply)
            if answers is None:
                reason, waiting_for = self._killer.expire(), self._waiting_for()
                self._cancel_io()
                return await self._thread_step(self._session.interrupted, reason, waiting_for)
            reply = await self._thread_step(self._session.resume, answers)
        return reply

    def _cancelled(self, final: _Final) -> _Final:
        """A run that saw a cancel ends as cancelled, even if it ended by itself in its
        grace (having caught the cancellation errors of its waits)."""
        if self._killer.cancelled_at is None or (final.error is not None and final.error.kind == "cancelled"):
            return final
        stack = final.error.stack if final.error is not None else []
        return _Final(error=stopped_detail("cancelled", self._killer.token, self._bridge.limits, stack))

    async def _shutdown(self, final: _Final) -> None:
        """Run the script's on_shutdown(reason) with its own time limit; its result is
        ignored and its failure logged (never the run's outcome)."""
        if final.error is None:
            reason = "completed"
        elif final.error.kind in ("timeout", "cancelled"):
            reason = final.error.kind
        else:
            reason = "error"
        self._cancel_io()
        timeout_s = self._bridge.limits.shutdown_timeout_s
        self._killer.begin_shutdown(timeout_s)
        if self._on_shutdown_start is not None:
            self._on_shutdown_start(timeout_s)
        end = await self._drive(await self._thread_step(self._session.shutdown, reason))
        error = self._session.shutdown_error or end.error
        if error is not None:
            self._bridge.shutdown_failed(reason, error)

    def _inline_start(self) -> _Waits | _Final | None:
        """Run the first step on the event loop itself, speculatively, when that is safe
        and likely to pay: no other run of this process is busy, and earlier runs of the
        same script ended within the inline budget without calling out.  The step is
        taken back (and run again in a thread, from the start) if it runs past the
        budget or calls a namespace function, which have not happened yet then, so
        nothing is done twice.  A step handed to a thread costs two thread switches,
        three times the whole of a small run.  None: run it in a thread."""
        if _busy_runs or not _chunks.quick(self._session.key) or self._killer.token.cancelled:
            return None
        self._killer.inline_until = time.monotonic() + INLINE_BUDGET_S
        try:
            reply = self._session.start()
        finally:
            self._killer.inline_until = None
        stats.inline_steps += 1
        if reply is _PREEMPTED:
            stats.preempted_steps += 1
            _chunks.learn(self._session.key, False)
            self._killer.reason = None
            self._bridge.calls = 0
            return None
        return reply

    async def _thread_step(self, step: Callable[..., _T], *args: Any) -> _T | _Final:
        self._step = _in_thread(self._loop, self._worker.run, step, *args)
        self._abandon = self._loop.call_at(self._loop_deadline(ABANDON_GRACE_S), _resolve, self._step, _ABANDONED, None)
        if self._killer.token.cancelled and self._killer.shutdown_cancels is None:
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

    async def _wait_io(self, waits: _Waits) -> list[Any] | None:
        """Start the new requests, cancel the dropped ones, and wait for the first answers:
        [number, ok, payload, ...]; None when the deadline passed or the run was cancelled."""
        for number in waits.cancels:
            entry = self._pending.pop(number, None)
            if entry is not None:
                entry[1].cancel()
                self._dropped.add(entry[1])
                entry[1].add_done_callback(self._dropped.discard)
        for number, request in waits.requests:
            task = self._loop.create_task(self._bridge.call_async(request))
            task.add_done_callback(self._poke)
            self._pending[number] = (request, task)
        # One wake-up future per wait, set by an answer, a cancel or the run's deadline
        # timer (asyncio.wait would hang callbacks on every request and start a timer
        # each time: a third of a worker's time with a thousand runs waiting).
        while True:
            if self._killer.check() or not self._pending:
                return None
            if self._killer.cooperative():
                return self._fail_waits()
            answers: list[Any] = []
            for number, (request, task) in list(self._pending.items()):
                if task.done():
                    del self._pending[number]
                    try:
                        ok, payload = task.result()
                    except BaseException:  # (call_async turns every Exception into an answer)
                        ok, payload = False, f"internal error in {self._bridge.qualname(request.index)}".encode()
                    answers += (number, ok, payload)
            if answers:
                return answers
            self._arm_deadline()
            self._wake = self._loop.create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    def _poke(self, _: object = None) -> None:
        """Wake the wait for I/O, if the run is in one."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _arm_deadline(self) -> None:
        # one timer per run, moved only when the deadline moves (on_shutdown's own)
        deadline = self._killer.deadline
        if self._deadline_timer is None or self._timer_for != deadline:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_timer = self._loop.call_at(self._loop_deadline(0.0), self._poke)
            self._timer_for = deadline

    def _fail_waits(self) -> list[Any]:
        """Cancelled, within the grace: every wait fails with a Lua error the script may
        catch to clean up ("cancelled: <reason>"), and its request is cancelled."""
        message = f"cancelled: {self._killer.token.reason or 'cancelled'}".encode()
        answers: list[Any] = []
        for number, (_, task) in self._pending.items():
            task.cancel()
            self._dropped.add(task)
            task.add_done_callback(self._dropped.discard)
            answers += (number, False, message)
        self._pending.clear()
        return answers

    def _waiting_for(self) -> str | None:
        """The function the script waits for (its oldest request in progress)."""
        if not self._pending:
            return None
        return self._bridge.qualname(self._pending[min(self._pending)][0].index)

    def _cancel_io(self) -> None:
        """Cancel every request in progress (the run is ending)."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for _, task in self._pending.values():
            task.cancel()
            self._dropped.add(task)
        self._pending.clear()

    async def _end_io(self) -> None:
        """Cancel every request in progress and wait until they have ended."""
        self._cancel_io()
        if self._dropped:
            dropped, self._dropped = list(self._dropped), set()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*dropped, return_exceptions=True)

    def _loop_deadline(self, grace: float) -> float:
        return self._loop.time() + (self._killer.deadline - time.monotonic()) + grace

    def _on_cancel(self) -> None:
        # Loop thread.  A wait on I/O ends now; a thread step gets the grace to come back.
        self._poke()
        if self._step is not None and self._abandon is not None:  # a thread step
            when = self._loop.time() + ABANDON_GRACE_S
            if self._killer.shutdown_cancels is None and self._killer.token.count < 2:
                when += self._killer.grace
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
    span: Any = None,
    log_sink: LogSink | None = None,
    on_shutdown_start: Callable[[float], object] | None = None,
    modules: ModuleLoader | None = None,
) -> Outcome:
    """Run a Lua script in a fresh sandbox (on a warm state) and return its result.

    ``params`` (JSON-like) is the script's ``params`` global and the argument of
    ``main(params)``.  The result is main's first return value if the script defines a
    global function ``main``, else the chunk's first return value, converted by the
    rules in ``luanette.luaconv``.  ``log`` is a structlog logger whose bound context
    (e.g. request_id) every script log line carries; ``log_sink``, when given, takes
    the script's log lines instead.  ``span`` is the run's OpenTelemetry span for
    ``otel.*`` (default: the span current here).  ``on_shutdown_start`` is called (on
    the loop, with its time limit in seconds) when the script's on_shutdown begins.
    ``modules`` finds what the script's ``require`` loads (None: nothing can be required).

    Raises ScriptError with an ErrorDetail for syntax and runtime errors, timeouts,
    cancellation, the memory limit, results that cannot be converted and params that
    cannot be passed to Lua (kind "invalid_params").
    """
    started = time.perf_counter()
    with _stats_lock:
        stats.runs += 1
    token = cancel or CancelToken()
    usage = Usage(limits)
    # the run's quotas, for namespaces that serve many runs (the model calls' CAS writes);
    # its Lua threads run in a copy of this context
    current_usage.set(usage)
    run = RunContext(
        run_id=f"{_RUN_ID_PREFIX}-{next(_run_numbers)}",
        limits=limits,
        cancel=token,
        deadline=time.monotonic() + limits.timeout_s,
        # the span current here: a namespace's functions are made later, in a Lua thread
        span=span if span is not None else trace.get_current_span(),
        log_sink=log_sink,
        usage=usage,
        **({"caller_logger": log} if log is not None else {}),
    )
    try:
        packed_params = to_lua(params)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ScriptError(ErrorDetail("invalid_params", f"params cannot be passed to Lua: {exc}")) from None
    killer = _Killer(run.deadline, token, limits.cancel_grace_s)
    bridge = _Bridge(run, namespaces, killer, modules)
    session = _Session(code, packed_params, chunk_name, run, bridge, killer)
    final = await _Driver(session, bridge, killer, on_shutdown_start).run()
    if final.error is not None:
        raise ScriptError(final.error)
    return Outcome(final.result, (time.perf_counter() - started) * 1000)


def check_syntax(code: str, chunk_name: str = "script") -> ErrorDetail | None:
    """Compile ``code`` as Lua 5.4 text without running it; the syntax error, if any.
    (The daemon's front does not call it: a worker compiles stored scripts.)"""
    lua = _new_lua(Limits().memory_bytes)
    try:
        lua.compile(code.encode(), name="=" + chunk_name, mode="t")
    except LuaError as exc:  # LuaSyntaxError, or LuaMemoryError for absurd sources
        return syntax_detail(exc.args[0], chunk_name)
    return None
