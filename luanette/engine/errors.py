"""How a failed run is described: messages without chunk prefixes, script frames, hints.

Everything here turns what the sandbox reports (a message and frames, as MessagePack
from Lua) into an ``ErrorDetail`` an AI caller can act on.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any, Final

from luanette.engine.api import CancelToken, ErrorDetail, Limits, StackFrame

MEMORY_MESSAGE: Final = "not enough memory"
C_BOUNDARY: Final = "attempt to yield across a C-call boundary"


def text(value: bytes | str) -> str:
    """Lua bytes as text (invalid UTF-8 replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def split_position(message: str, chunk_name: str) -> tuple[str, int | None]:
    """Strip a leading "<chunk>:<line>: " of the script's own chunk."""
    match = re.match(rf"{re.escape(chunk_name)}:(\d+): ", message)
    if not match:
        return message, None
    return message[match.end() :], int(match.group(1))


_NIL_NAME = re.compile(r"a nil value \((global|field|method) '([^']+)'\)")


def did_you_mean(message: str, names: Sequence[str]) -> list[str]:
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


def runtime_detail(info: dict[str, Any], chunk_name: str, limits: Limits) -> ErrorDetail:
    message, line = split_position(text(info["message"]), chunk_name)
    stack = frames(info)
    if message == MEMORY_MESSAGE:
        return memory_detail(limits, stack)
    hints = did_you_mean(message, [text(n) for n in info.get("names", [])])
    if message.startswith(C_BOUNDARY):
        hints.append(
            "call functions that wait for I/O before or after table.sort/string.gsub "
            "(or similar), not from the callback you pass to them"
        )
    named = _NAMED_FAILURE.match(message)
    kind = named.group(1) if named and named.group(1) in NAMED_KINDS else "lua_runtime"
    return ErrorDetail(kind, message, line, stack, hints)


NAMED_KINDS = frozenset(
    {
        "cas_quota_exceeded", "log_quota_exceeded", "storage_full", "cas_read_only", "unavailable",
        "permission_denied", "read_only", "too_many_tasks",
    }  # fmt: skip
)
"""Failures a namespace function reports as "<ns.fn>: <kind>: ..." (catchable with pcall);
uncaught, the run's error has that kind instead of lua_runtime."""
_NAMED_FAILURE = re.compile(r"^[A-Za-z_][\w.]*: ([a-z_]+): ")


def frames(info: dict[str, Any]) -> list[StackFrame]:
    """The script frames the sandbox reported."""
    return [StackFrame(text(f["name"]), f.get("line"), text(f["source"])) for f in info.get("frames", [])]


def syntax_detail(raw: bytes | str, chunk_name: str) -> ErrorDetail:
    message, line = split_position(text(raw), chunk_name)
    return ErrorDetail("lua_syntax", message, line)


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
