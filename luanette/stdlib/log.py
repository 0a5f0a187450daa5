"""The `log` namespace: log.debug/info/warn/error(message, fields?) from Lua.

Each call emits the structlog event "lua.log" on the run's logger (so it carries the
run id and the caller's bound context, e.g. request_id) with the message and, when
given, the fields table under "fields".  Lua's print() emits the same event at info
level (see luanette.runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from luanette.engine.api import LuaCallError, RunContext


def _message_text(message: Any) -> str:
    if isinstance(message, bytes):
        return message.decode("utf-8", "replace")
    if message is None:
        return "nil"
    if isinstance(message, bool):
        return "true" if message else "false"
    return str(message)


class LogNamespace:
    """Lua global `log`."""

    name = "log"

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        """One function per level, bound to this run's logger."""
        emitter = _Emitter(run)
        return {"debug": emitter.debug, "info": emitter.info, "warn": emitter.warn, "error": emitter.error}


class _Emitter:
    """The log functions of one run.

    Methods of one small object rather than four closures: every run gets them, most
    never log, and these cost less than half as much to make (on the event loop).
    """

    __slots__ = ("_run",)

    def __init__(self, run: RunContext) -> None:
        self._run = run

    def debug(self, message: Any = None, fields: Any = None) -> None:
        self._emit("debug", message, fields)

    def info(self, message: Any = None, fields: Any = None) -> None:
        self._emit("info", message, fields)

    def warn(self, message: Any = None, fields: Any = None) -> None:
        self._emit("warn", message, fields)

    def error(self, message: Any = None, fields: Any = None) -> None:
        self._emit("error", message, fields)

    def _emit(self, level: str, message: Any, fields: Any) -> None:
        if fields is not None and not isinstance(fields, dict):
            raise LuaCallError("fields must be a table with string keys")
        self._run.script_log(level, _message_text(message), fields)
