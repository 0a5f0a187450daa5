"""How the daemon's processes use Python's cyclic garbage collector.

Measured on the 2-core VM (LuaEval at 64 in flight): with the interpreter's defaults
the front spent ~20 us of every request in the collector and stopped for ~36 ms at
each full collection (its heap after start is ~60,000 tracked objects: aiohttp,
opentelemetry, msgspec types, the MCP SDK), and each worker ~35 us of every run.
Nearly all of those objects live as long as the process; the requests' own objects
die young, mostly by reference counting, before any collection sees them.

So once a process has imported and built everything it keeps, :func:`settle` moves
those objects to the permanent generation (``gc.freeze``), which no collection scans
again, and collects the young generation less often.  In the worker launcher it runs
before the forks: a collection in a forked worker then no longer writes to every
inherited object's header, so the pages stay shared with the launcher (the reason
``gc.freeze`` exists).  Cycles are still collected; only how often changes.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 5_000
"""Allocations (net) between young collections; the interpreter's default is 700."""


def settle() -> None:
    """Freeze what the process holds now and space the young collections out; call it
    once start-up is done (idempotent: later calls freeze what was made since)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
