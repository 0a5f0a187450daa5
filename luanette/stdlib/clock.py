"""The `clock` namespace: a virtual clock per run, and a real non-blocking sleep.

- ``clock.now()``: the run's virtual time, integer milliseconds. It starts at the run's
  wall-clock start (Unix ms) and moves only with ``clock.advance``, so scripts that
  schedule musical events can be tested without waiting (seed 000's virtual clock).
- ``clock.advance(ms)``: move the virtual clock forward (``ms`` >= 0); returns the new time.
- ``clock.sleep(ms)``: really wait ``ms`` milliseconds without holding a thread (the
  script yields to the event loop); the run's deadline and cancel still apply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from luanette.engine.api import LuaCallError, RunContext

MAX_SLEEP_MS = 24 * 3600 * 1000


def _milliseconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LuaCallError(f"{what} must be a number of milliseconds")
    if value < 0:
        raise LuaCallError(f"{what} must not be negative, got {value:g}")
    return float(value)


class ClockNamespace:
    """Lua global `clock`. Stateless itself: each run gets its own virtual clock."""

    name = "clock"

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        virtual = [int(time.time() * 1000)]

        def now() -> int:
            return virtual[0]

        def advance(ms: Any) -> int:
            virtual[0] += int(_milliseconds(ms, "ms"))
            return virtual[0]

        async def sleep(ms: Any) -> None:
            wait = _milliseconds(ms, "ms")
            if wait > MAX_SLEEP_MS:
                raise LuaCallError(f"ms must be at most {MAX_SLEEP_MS} (a day)")
            await anyio.sleep(wait / 1000)

        return {"now": now, "advance": advance, "sleep": sleep}
