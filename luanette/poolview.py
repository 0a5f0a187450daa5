"""What the front knows of its workers, in one shape for every reader.

``lua://workers`` (luanette/resources.py), ``luanette-cli workers`` and the
``luanette.workers.*`` / ``luanette.pool.*`` gauges (luanette/telemetry.py) read the
engine's :meth:`~luanette.engine.pool.Engine.workers` and ``pool_stats()`` through
:func:`snapshot`, which fills in what an engine does not say (an older engine has no
``pool_stats``, and its workers no ``group`` or ``state``), so no reader depends on
more than the shape below:

- ``workers``: one entry a worker, ``{name, group, capabilities, hostname, pid,
  version, remote, state, runs, capacity, rss_bytes, last_heartbeat_s, inline_steps}``;
- ``pool``: ``{workers, groups: {group: {workers, busy, idle, runs, capacity}},
  waiting, oldest_waiting_s}``, counting the ready workers (a starting or leaving one
  is in ``workers`` only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

LOCAL_GROUP: Final = "local"
"""The group of the front's own worker processes (unless the engine says otherwise)."""

STATES: Final = ("starting", "ready", "leaving")


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def worker_entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One worker as the engine reports it, with every key of the documented shape (and
    any other key the engine adds, as it is)."""
    state = raw.get("state")
    if state not in STATES:  # an engine that says ready/leaving instead
        state = "leaving" if raw.get("leaving") else "ready" if raw.get("ready", True) else "starting"
    runs = raw.get("runs")
    capabilities = raw.get("capabilities")
    return {
        **raw,
        "name": str(raw.get("name", "")),
        "group": str(raw.get("group") or LOCAL_GROUP),
        "capabilities": [str(c) for c in capabilities] if isinstance(capabilities, list | tuple) else ["*"],
        "hostname": str(raw.get("hostname") or ""),
        "pid": _int(raw.get("pid")),
        "version": str(raw.get("version") or ""),
        "remote": bool(raw.get("remote", False)),
        "state": state,
        "runs": len(runs) if isinstance(runs, set | list | tuple) else _int(runs),
        "capacity": _int(raw.get("capacity")),
        "rss_bytes": _int(raw.get("rss_bytes")),
        "last_heartbeat_s": _number(raw.get("last_heartbeat_s")),
        "inline_steps": _int(raw.get("inline_steps")),
    }


def _group_entry(raw: Any) -> dict[str, int]:
    raw = raw if isinstance(raw, Mapping) else {}
    return {key: _int(raw.get(key)) for key in ("workers", "busy", "idle", "runs", "capacity")}


def pool_from_workers(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The pool's counts worked out from the workers (for an engine without
    ``pool_stats``), as the engine counts them: only ready workers, busy with a run,
    idle without."""
    groups: dict[str, dict[str, int]] = {}
    for worker in workers:
        if worker["state"] != "ready":
            continue
        group = groups.setdefault(worker["group"], _group_entry(None))
        group["workers"] += 1
        group["runs"] += worker["runs"]
        group["capacity"] += worker["capacity"]
        group["busy" if worker["runs"] > 0 else "idle"] += 1
    total = sum(group["workers"] for group in groups.values())
    return {"workers": total, "groups": groups, "waiting": 0, "oldest_waiting_s": None}


def pool_entry(raw: Any, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine's ``pool_stats()`` with every key of the documented shape."""
    if not isinstance(raw, Mapping):
        return pool_from_workers(workers)
    groups = raw.get("groups")
    return {
        "workers": _int(raw.get("workers"), len(workers)),
        "groups": {str(name): _group_entry(g) for name, g in groups.items()} if isinstance(groups, Mapping) else {},
        "waiting": _int(raw.get("waiting")),
        "oldest_waiting_s": _number(raw.get("oldest_waiting_s")),
    }


def snapshot(engine: Any) -> dict[str, Any]:
    """``{workers: [...], pool: {...}}`` of ``engine`` now (see the module's docstring)."""
    workers = [worker_entry(w) for w in engine.workers()]
    stats = getattr(engine, "pool_stats", None)
    return {"workers": workers, "pool": pool_entry(stats() if callable(stats) else None, workers)}


def pool_stats(engine: Any) -> dict[str, Any]:
    """Just the ``pool`` part of :func:`snapshot` (what the gauges read): the engine's
    ``pool_stats()`` when it has one, without listing the workers."""
    stats = getattr(engine, "pool_stats", None)
    if callable(stats):
        raw = stats()
        if isinstance(raw, Mapping):
            return pool_entry(raw, [])
    return snapshot(engine)["pool"]
