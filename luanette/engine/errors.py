"""How a failed run is described: messages without chunk prefixes, script frames, hints.

Everything here turns what the sandbox reports (a message and frames, as MessagePack
from Lua) into an ``ErrorDetail`` an AI caller can act on.
"""

from __future__ import annotations

import re
from typing import Any, Final

from luanette.engine import hints
from luanette.engine.api import CancelToken, ErrorDetail, Limits, StackFrame

MEMORY_MESSAGE: Final = "not enough memory"


def text(value: bytes | str) -> str:
    """Lua bytes as text (invalid UTF-8 replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def split_position(message: str, chunk_name: str) -> tuple[str, int | None]:
    """Strip a leading "<chunk>:<line>: " of the script's own chunk."""
    match = re.match(rf"{re.escape(chunk_name)}:(\d+): ", message)
    if not match:
        return message, None
    return message[match.end() :], int(match.group(1))


def runtime_detail(
    info: dict[str, Any], chunk_name: str, limits: Limits, source: bytes | str | None = None
) -> ErrorDetail:
    """A runtime error the sandbox described, with its cause, hints and troubleshooting
    (luanette.engine.hints); ``source``, the script's own chunk, lets hints read the
    failing line."""
    message, line = split_position(text(info["message"]), chunk_name)
    stack = frames(info)
    if message == MEMORY_MESSAGE:
        return memory_detail(limits, stack)
    code = text(source) if source is not None else None
    scene = hints.Scene.of(message, info, _line_of(code, chunk_name, stack, line), code)
    cause, found, troubleshooting = hints.explain(scene)
    named = _NAMED_FAILURE.match(message)
    kind = named.group(1) if named and named.group(1) in NAMED_KINDS else "lua_runtime"
    return ErrorDetail(kind, message, line, stack, found, cause, troubleshooting)


def _line_of(code: str | None, chunk_name: str, stack: list[StackFrame], line: int | None) -> str | None:
    """The failing line of the script's own chunk (not of a module it required)."""
    if code is None:
        return None
    if stack:
        if stack[0].source != chunk_name or stack[0].line is None:
            return None
        line = stack[0].line
    if line is None:
        return None
    lines = code.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else None


NAMED_KINDS = frozenset(
    {
        "cas_quota_exceeded", "log_quota_exceeded", "storage_full", "cas_read_only", "unavailable",
        "permission_denied", "read_only", "too_many_tasks",
        "too_many_modules", "require_too_deep", "module_too_large",
    }  # fmt: skip
)
"""Failures a namespace function reports as "<ns.fn>: <kind>: ..." (catchable with pcall);
uncaught, the run's error has that kind instead of lua_runtime."""
_NAMED_FAILURE = re.compile(r"^[A-Za-z_][\w.]*: ([a-z_]+): ")


def frames(info: dict[str, Any]) -> list[StackFrame]:
    """The script frames the sandbox reported."""
    return [StackFrame(text(f["name"]), f.get("line"), text(f["source"])) for f in info.get("frames", [])]


def syntax_detail(raw: bytes | str, chunk_name: str) -> ErrorDetail:
    """Code that does not compile: the parser's message, line, and what it usually means."""
    message, line = split_position(text(raw), chunk_name)
    return ErrorDetail(
        "lua_syntax", message, line, hints=hints.syntax_hints(message), cause="syntax",
        troubleshooting=list(hints.TROUBLESHOOTING["syntax"]),
    )  # fmt: skip


def memory_detail(limits: Limits, stack: list[StackFrame] | None = None) -> ErrorDetail:
    return ErrorDetail(
        "memory_limit",
        f"the script exceeded its memory limit of {limits.memory_bytes / 2**20:g} MiB",
        stack[0].line if stack else None,
        stack or [],
        ["build smaller tables and strings, or process the data in parts"],
    )


def stopped_detail(
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


def result_too_large_detail(size: int, limits: Limits) -> ErrorDetail:
    return ErrorDetail(
        "result_too_large",
        f"the result is {size / 2**20:.1f} MiB as MessagePack; a run may return at most "
        f"{limits.result_bytes / 2**20:.1f} MiB",
        hints=["store large data with cas.store and return its hash instead"],
    )


def unserializable_detail(message: bytes) -> ErrorDetail:
    return ErrorDetail(
        "result_not_serializable",
        text(message),
        hints=["return only trees of tables, strings, numbers, booleans and nil; convert other values first"],
    )
