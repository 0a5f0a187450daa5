"""The `progress` namespace: progress.update(percent [, message]) from a job's script.

The latest value shows in JobStatus (``progress``) and goes out as a ``progress``
broadcast. Broadcasts are rate-limited (a loop calling update a million times must not
flood subscribers): one per ``MIN_INTERVAL_S``, plus every change of message and 100%.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from luanette.engine.api import LuaCallError, RunContext

MIN_INTERVAL_S = 0.1


class ProgressNamespace:
    """Lua global `progress`, bound to one job. ``report(percent, message)`` is called
    on the Lua worker thread; it must be thread-safe."""

    name = "progress"

    def __init__(self, report: Callable[[float, str | None], None]) -> None:
        self._report = report
        self._last_sent = 0.0
        self._last_message: str | None = None

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {"update": self.update}

    def update(self, percent: Any, message: Any = None) -> None:
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent):
            raise LuaCallError("percent must be a number from 0 to 100")
        if not 0 <= percent <= 100:
            raise LuaCallError(f"percent must be from 0 to 100, got {percent:g}")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if message is not None and not isinstance(message, str):
            raise LuaCallError("message must be a string")
        now = time.monotonic()
        if percent == 100 or message != self._last_message or now - self._last_sent >= MIN_INTERVAL_S:
            self._last_sent, self._last_message = now, message
            self._report(float(percent), message)
