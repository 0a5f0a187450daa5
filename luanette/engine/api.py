"""The contract between the engine and the namespaces it binds into Lua.

A stdlib namespace imports only this module: what a run is (``RunContext``), what a
namespace looks like (``Namespace``), how a function fails (``LuaCallError``), and the
structured description of a failed run (``ErrorDetail``) that every caller sees.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import msgspec
import structlog

from luanette.luaconv import NULL

# Globals of the sandbox (plus the script convention's `params`, its alias `args`, and
# `main`); a namespace may not take one of these names.  tests/test_sandbox.py checks
# this against Lua.
SANDBOX_GLOBALS: Final = frozenset(
    "assert error ipairs next pairs pcall xpcall print rawequal rawget rawlen rawset "
    "select setmetatable getmetatable tonumber tostring type _VERSION _G load "
    "collectgarbage string table math utf8 coroutine os params args main core require".split()
)

_LOG_METHODS: Final = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}
_log = structlog.get_logger("luanette.runtime")


# Longest time limit a script may ask for its on_shutdown (describe().shutdown_timeout).
MAX_SHUTDOWN_TIMEOUT_S: Final = 60.0
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0


class Limits(msgspec.Struct, frozen=True):
    """Resource limits of one run."""

    timeout_s: float = 30.0  # wall-clock deadline for the whole run, I/O waits included
    memory_bytes: int = 256 * 2**20  # lupa max_memory: Lua's allocator refuses beyond this
    hook_interval: int = 10_000  # instructions between deadline/cancel checks
    # quotas of one run (kinds cas_quota_exceeded, result_too_large, log_quota_exceeded)
    cas_write_bytes: int = 512 * 2**20  # written to the CAS, by the script or its model calls
    result_bytes: int = 16 * 2**20  # the result, as MessagePack
    log_lines: int = 5_000  # log.* and print lines
    log_bytes: int = 2**20  # their messages and fields
    # after a cancel, seconds the script has to end by itself (its waits fail with
    # "cancelled: <reason>") before it is stopped hard; 0: stopped at once
    cancel_grace_s: float = 0.0
    # time limit of the script's on_shutdown(reason), which runs after main ends
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        # a zero interval would install no hook at all, and so no deadline
        if not (self.timeout_s > 0 and self.memory_bytes > 0 and self.hook_interval >= 1):
            raise ValueError(f"invalid limits: {self}")
        if min(self.cas_write_bytes, self.result_bytes, self.log_lines, self.log_bytes) < 0:
            raise ValueError(f"invalid limits: {self}")
        if not (self.cancel_grace_s >= 0 and 0 < self.shutdown_timeout_s <= MAX_SHUTDOWN_TIMEOUT_S):
            raise ValueError(f"invalid limits: {self}")


class Usage:
    """What one run has used of its quotas.  A run's calls come one at a time (its Lua
    thread, or its task while it waits), so no lock."""

    __slots__ = ("cas_bytes", "limits", "log_bytes", "log_lines")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.cas_bytes = 0
        self.log_lines = 0
        self.log_bytes = 0

    def charge_cas(self, size: int) -> None:
        """Count ``size`` bytes about to be written to the CAS; LuaCallError
        ``cas_quota_exceeded`` (nothing written) when they do not fit."""
        limit = self.limits.cas_write_bytes
        if self.cas_bytes + size > limit:
            raise LuaCallError(
                f"cas_quota_exceeded: this run may write {_size(limit)} to the CAS; it has written "
                f"{_size(self.cas_bytes)} and this would add {_size(size)} (nothing was stored)"
            )
        self.cas_bytes += size

    def charge_log(self, size: int) -> None:
        """Count one log line of ``size`` bytes; LuaCallError ``log_quota_exceeded``
        (the line is not logged) past the lines or bytes allowed."""
        limits = self.limits
        if self.log_lines + 1 > limits.log_lines or self.log_bytes + size > limits.log_bytes:
            raise LuaCallError(
                f"log_quota_exceeded: this run may log {limits.log_lines} lines and {_size(limits.log_bytes)}; "
                f"it has logged {self.log_lines} lines and {_size(self.log_bytes)} (log less, or summarise)"
            )
        self.log_lines += 1
        self.log_bytes += size


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


current_usage: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("luanette_usage", default=None)
"""The quotas of the run whose code is running (its task and its Lua thread's context)."""


def charge_cas_write(size: int) -> None:
    """Count CAS bytes against the current run's quota (no run: nothing to count)."""
    usage = current_usage.get()
    if usage is not None:
        usage.charge_cas(size)


class StackFrame(msgspec.Struct, frozen=True):
    """One script frame of a Lua error; runtime frames are never reported."""

    function: str  # "main", "main chunk", "helper", or "function <script:12>"
    line: int | None  # current line in that frame, if known
    source: str  # chunk the frame belongs to, normally the script's chunk name


class ErrorDetail(msgspec.Struct, frozen=True):
    """Structured description of a failed run, written for AI callers."""

    # one of: lua_syntax, lua_runtime, timeout, cancelled, memory_limit,
    # result_not_serializable, invalid_params, worker_lost, busy
    kind: str
    message: str  # the Lua message without the "script:3:" prefix
    line: int | None = None  # script line of the error, when the message names one
    stack: list[StackFrame] = []  # script frames, innermost first
    hints: list[str] = []  # e.g. "did you mean 'print'?"; only names that exist (engine/hints.py)
    # lua_runtime and lua_syntax: why, finer than kind (nil_call, nil_index, type_error,
    # arithmetic, missing_main, not_in_sandbox, user_error, ...; docs/lua.md#causes-and-hints)
    cause: str | None = None
    troubleshooting: list[str] = []  # what to check next, which docs or request to read


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


class CancelToken:
    """A thread-safe request to stop a run.

    ``cancel()`` sets a plain flag that the Lua count hook reads, so a running script
    stops within one hook interval, and wakes whoever listens (the driver waiting on
    I/O, the engine that forwards the cancel to a worker process).
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._count = 0
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

    @property
    def count(self) -> int:
        """How many times ``cancel`` has been called (a second cancel stops a run that
        is ending cooperatively, or its on_shutdown, at once)."""
        return self._count

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop; callable from any thread.  The first reason stays;
        every call wakes the listeners."""
        with self._lock:
            self._count += 1
            if self._reason is None:
                self._reason = reason
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def listen(self, listener: Callable[[], object]) -> None:
        """Call ``listener`` (from the cancelling thread) on cancel, until ``unlisten``."""
        with self._lock:
            self._listeners.append(listener)

    def unlisten(self, listener: Callable[[], object]) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            self._listeners.remove(listener)


LogSink = Callable[[str, str, "Mapping[str, Any] | None"], None]


class RunContext(msgspec.Struct, frozen=True, dict=True):
    """What a namespace knows about the run it serves."""

    run_id: str
    limits: Limits
    cancel: CancelToken
    deadline: float  # time.monotonic() value at which the run times out
    caller_logger: Any = _log  # structlog logger of run_script's caller
    null: Any = NULL  # return this to give Lua the null sentinel
    # the run's span (an OpenTelemetry Span); None: the span current where the run starts
    span: Any = None
    # where the script's own log lines go (level, message, fields); None: the logger
    log_sink: LogSink | None = None
    usage: Usage | None = None  # its quotas; None: as fresh from ``limits``

    @functools.cached_property
    def logger(self) -> Any:
        """structlog logger bound with run_id and the caller's context.

        Bound on first use: most runs never log, and binding costs more than a small run's
        other bookkeeping.
        """
        return self.caller_logger.bind(run_id=self.run_id)

    def remaining_s(self) -> float:
        """Seconds left before the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    @functools.cached_property
    def quotas(self) -> Usage:
        """What the run has used of its quotas."""
        return self.usage if self.usage is not None else Usage(self.limits)

    def script_log(self, level: str, message: str, fields: Mapping[str, Any] | None = None) -> None:
        """Emit a script's log line: structlog event "lua.log" on the run's logger.
        Raises LuaCallError ``log_quota_exceeded`` past the run's log quota."""
        self.quotas.charge_log(len(message) + (len(repr(fields)) if fields else 0))
        if self.log_sink is not None:
            self.log_sink(level, message, dict(fields) if fields else None)
            return
        emit_script_log(self.logger, level, message, fields)


def emit_script_log(logger: Any, level: str, message: str, fields: Mapping[str, Any] | None) -> None:
    """One script log line as the structlog event "lua.log"."""
    extra = {"fields": dict(fields)} if fields else {}
    getattr(logger, _LOG_METHODS.get(level, "info"))("lua.log", message=message, **extra)


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

    With ``lua_prelude_lazy = True`` the prelude runs instead when the script first uses
    the namespace's table (reads or sets a field, or iterates it), and only then: for a
    prelude that changes nothing but its own table.  It then sees the script's globals
    as they are at that moment.
    """

    name: str

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]: ...
