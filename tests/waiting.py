"""Waiting for a condition instead of a clock, and keeping timing claims out of the
default run.

The default suite must pass on a loaded machine, so it waits for what it needs (a
counter, a status, a message) and never asserts how long something took. A test whose
point includes a wall-clock bound takes the ``timed`` parameter from :data:`TIMED`: both
variants check the behaviour, and only the ``timed`` one (marked ``perf``, deselected
unless ``pytest -m perf``) also checks the bound.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import pytest

TIMED = pytest.mark.parametrize(
    "timed", [pytest.param(False, id="untimed"), pytest.param(True, id="timed", marks=pytest.mark.perf)]
)

# Long enough for any loaded machine; reaching it means something hangs.
PATIENCE_S = 30.0


async def until(condition: Callable[[], object], what: str = "the condition", *,
                timeout: float = PATIENCE_S, step: float = 0.005) -> None:
    """Return once ``condition()`` (a value, or an awaitable of one) is true; fail after
    ``timeout`` (a hang guard)."""
    give_up = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < give_up, f"{what} did not happen within {timeout:g} s"
        await asyncio.sleep(step)


def until_sync(condition: Callable[[], object], what: str = "the condition", *,
               timeout: float = PATIENCE_S, step: float = 0.005) -> None:
    """:func:`until` for synchronous tests."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"{what} did not happen within {timeout:g} s"
        time.sleep(step)
