"""The `log` namespace: log.debug/info/warn/error(message, fields?) from Lua.

Each call emits the structlog event "lua.log" on the run's logger (so it carries the
run id and the caller's bound context, e.g. request_id) with the message and, when
given, the fields table under "fields".  Lua's print() emits the same event at info
level (see luanette.runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from luanette.runtime import LuaCallError, RunContext

LEVELS = ("debug", "info", "warn", "error")


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
        return {level: self._emitter(run, level) for level in LEVELS}

    @staticmethod
    def _emitter(run: RunContext, level: str) -> Callable[..., None]:
        def emit(message: Any = None, fields: Any = None) -> None:
            if fields is not None and not isinstance(fields, dict):
                raise LuaCallError("fields must be a table with string keys")
            run.script_log(level, _message_text(message), fields)

        return emit
