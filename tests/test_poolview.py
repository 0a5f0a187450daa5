"""luanette/poolview.py: every reader of the workers (lua://workers, luanette-cli
workers, the pool gauges) gets the documented shape, whatever the engine fills in."""

from __future__ import annotations

from typing import Any

from luanette import poolview

KEYS = {
    "name", "group", "capabilities", "hostname", "pid", "version", "remote", "state", "runs", "capacity",
    "rss_bytes", "last_heartbeat_s", "inline_steps",
}  # fmt: skip


class OldEngine:
    """An engine as before remote workers: ready/leaving flags, no group, no pool_stats."""

    def workers(self) -> list[dict[str, Any]]:
        return [
            {"name": "w0", "pid": 11, "runs": 2, "rss_bytes": 5, "ready": True, "leaving": False, "inline_steps": 1},
            {"name": "w1", "pid": 12, "runs": 0, "rss_bytes": 5, "ready": True, "leaving": False, "inline_steps": 0},
            {"name": "w2", "pid": 13, "runs": 0, "rss_bytes": 0, "ready": False, "leaving": False},
            {"name": "w3", "pid": 14, "runs": 0, "rss_bytes": 0, "ready": True, "leaving": True},
        ]


class NewEngine:
    """An engine with remote workers and its own pool_stats."""

    def workers(self) -> list[dict[str, Any]]:
        return [
            {"name": "gpu-a", "group": "gpu-host", "capabilities": ["net"], "hostname": "box7", "pid": 77,
             "version": "0.1.0", "remote": True, "state": "ready", "runs": 1, "capacity": 8, "rss_bytes": 9,
             "last_heartbeat_s": 0.4, "inline_steps": 3},
        ]  # fmt: skip

    def pool_stats(self) -> dict[str, Any]:
        return {
            "workers": 1,
            "groups": {"gpu-host": {"workers": 1, "busy": 1, "idle": 0, "runs": 1, "capacity": 8}},
            "waiting": 2,
            "oldest_waiting_s": 3.5,
        }


def test_an_engine_without_groups_or_pool_stats_is_filled_in():
    view = poolview.snapshot(OldEngine())
    assert all(KEYS <= set(w) for w in view["workers"])
    assert [w["state"] for w in view["workers"]] == ["ready", "ready", "starting", "leaving"]
    assert {w["group"] for w in view["workers"]} == {"local"} and not any(w["remote"] for w in view["workers"])
    assert view["workers"][0]["capabilities"] == ["*"] and view["workers"][0]["last_heartbeat_s"] is None
    assert view["pool"] == {  # the ready ones
        "workers": 2,
        "groups": {"local": {"workers": 2, "busy": 1, "idle": 1, "runs": 2, "capacity": 0}},
        "waiting": 0,
        "oldest_waiting_s": None,
    }
    assert poolview.pool_stats(OldEngine()) == view["pool"]


def test_an_engines_own_view_passes_through():
    engine = NewEngine()
    view = poolview.snapshot(engine)
    assert view["workers"] == engine.workers()
    assert view["pool"] == engine.pool_stats() == poolview.pool_stats(engine)


def test_missing_and_malformed_keys_get_defaults():
    (worker,) = poolview.snapshot(type("E", (), {"workers": lambda self: [{"name": "x", "runs": {1, 2}}]})())[
        "workers"
    ]
    assert worker["runs"] == 2 and worker["state"] == "ready" and worker["pid"] == 0 and worker["capacity"] == 0
    pool = poolview.pool_entry({"groups": {"g": {"busy": "many"}}, "waiting": None, "oldest_waiting_s": True}, [])
    assert pool == {
        "workers": 0,
        "groups": {"g": {"workers": 0, "busy": 0, "idle": 0, "runs": 0, "capacity": 0}},
        "waiting": 0,
        "oldest_waiting_s": None,
    }
