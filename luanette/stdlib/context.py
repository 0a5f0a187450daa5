"""The `context` namespace: what a run knows about itself (seed 003's ``context``).

Every ``lua_eval`` run and every job has it.

- ``context.cancelled() -> boolean``: whether the run has been asked to stop (its cancel
  token: ``job_cancel``, the shutdown drain, an abandoned request).  The count hook
  stops a cancelled script within one hook interval, and a wait (``clock.sleep``, a
  model call) ends at once, so a loop that polls it ends either way; ``cancelled()``
  lets a script notice between two steps of its own.
- ``context.job_id()``, ``context.script_hash()`` -> string, nil in ``lua_eval``.
- ``context.deadline() -> number``: when the run times out, Unix seconds (a float).
- ``context.remaining_ms() -> integer``: milliseconds left before it (0 once past).
- ``context.user() -> string | nil``: who asked for the run: the public key (z85 text)
  of the client under CURVE, ``"local"`` without CURVE (a loopback-only daemon); for a
  job started by a timeline trigger, whoever sent the ``timeline_event``.  nil when the
  front did not say (a job queued by the daemon itself).
- ``context.creator() -> string | nil``: the ``creator`` the stored script was saved
  with (``script_store``; ``"luanette"`` for a trigger's ``script_file``); nil in
  ``lua_eval`` and for a script stored without one.  It is what the script's author
  wrote, not an authenticated identity: ``user()`` is the one to trust.
- ``context.trigger() -> table | nil``: for a job a timeline trigger started,
  ``{event_type, position_beats, tempo, metadata, rule}`` (``rule``: the rule's name;
  ``metadata``: the event's, nil when Lua cannot hold it); nil otherwise.
- ``context.hlc_time() -> integer``: a hybrid logical clock reading, ``wall_ms * 1000
  + counter`` (see :class:`HybridClock`).
- ``context{...}``: upstream's inference-context descriptor (luanette.stdlib.native).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from luanette.engine.api import RunContext
from luanette.stdlib.native import NATIVE_PRELUDE

if TYPE_CHECKING:
    from luanette.engine.channel import RunInfo

COUNTER_SPAN: Final = 1000
"""Readings per wall-clock millisecond before the logical part borrows the next one."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    """A hybrid logical clock of one process: readings that never go backwards.

    A reading is one integer, ``wall_ms * 1000 + counter``: the larger of the wall
    clock (Unix milliseconds, counter 0) and the last reading plus one.  So readings
    strictly increase within the process, whatever the wall clock does (an NTP step
    back, two calls in one millisecond), and stay next to the wall clock: ``reading //
    1000`` is the millisecond, ahead of the real one only after more than 1000 readings
    in one millisecond or a step back, until the wall clock catches up.

    Why one integer: a script compares two readings with ``<``, sorts by them and uses
    them as keys, and ``wall_ms * 1000`` stays below 2^53 until the year 2255, so a
    reading survives JSON and a float-only client exactly.

    It is per process: each worker has its own, and nothing carries readings between
    workers or across a restart, so readings from two workers are ordered only as far
    as their wall clocks agree (within one worker, they are a total order of its runs'
    calls).
    """

    def __init__(self, wall_ms: Callable[[], int] = _wall_ms) -> None:
        self._wall_ms = wall_ms
        self._last = 0
        self._lock = threading.Lock()  # sync calls come from many runs' Lua threads

    def now(self) -> int:
        """The next reading."""
        with self._lock:
            self._last = max(self._last + 1, self._wall_ms() * COUNTER_SPAN)
            return self._last


HLC: Final = HybridClock()
"""This process's clock (a worker forked from the launcher gets its own copy)."""


class ContextNamespace:
    """Lua global `context`, bound to one run.  Its prelude makes it callable and adds
    upstream's ``space`` and ``encoding`` (luanette.stdlib.native)."""

    name = "context"
    lua_prelude = NATIVE_PRELUDE

    def __init__(
        self,
        *,
        job_id: str | None = None,
        script_hash: str | None = None,
        user: str | None = None,
        creator: str | None = None,
        trigger: dict[str, Any] | None = None,
        clock: HybridClock = HLC,
    ) -> None:
        self.job_id = job_id
        self.script_hash = script_hash
        self.user = user
        self.creator = creator
        self.trigger = trigger
        self.clock = clock

    @classmethod
    def of(
        cls, info: RunInfo | None, *, job_id: str | None = None, script_hash: str | None = None
    ) -> ContextNamespace:
        """The namespace of a run the front described with ``info`` (``job_id`` and
        ``script_hash``, when given, take precedence over its own)."""
        if info is None:
            return cls(job_id=job_id, script_hash=script_hash)
        return cls(
            job_id=job_id if job_id is not None else info.job_id,
            script_hash=script_hash if script_hash is not None else info.script_hash,
            user=info.user,
            creator=info.creator,
            trigger=info.trigger,
        )

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        # made on the run's first context.* call: read the deadline once, so that every
        # call gives the same value (the run's deadline is a monotonic time)
        deadline = time.time() + run.remaining_s()

        def remaining_ms() -> int:
            return max(0, int(run.remaining_s() * 1000))

        return {
            "cancelled": lambda: run.cancel.cancelled,
            "job_id": lambda: self.job_id,
            "script_hash": lambda: self.script_hash,
            "deadline": lambda: deadline,
            "remaining_ms": remaining_ms,
            "user": lambda: self.user,
            "creator": lambda: self.creator,
            "trigger": lambda: self.trigger,
            "hlc_time": self.clock.now,
        }
