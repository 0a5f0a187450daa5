"""Daemon configuration: one struct, filled from command-line flags."""

from __future__ import annotations

import msgspec

DEFAULT_BIND = "tcp://127.0.0.1:5570"


class Config(msgspec.Struct, kw_only=True, frozen=True):
    """Everything the daemon can be told. Every field has a working default."""

    bind: str = DEFAULT_BIND
    """ROUTER endpoint clients connect to. ``tcp://127.0.0.1:*`` picks a free port."""
    worker_name: str = "luanette"
    script_timeout: float = 30.0
    """Wall-clock seconds a script may run before it is stopped."""
    script_memory: int = 256 * 2**20
    """Bytes of memory one Lua runtime may allocate."""
    max_evals: int = 16
    """LuaEval requests running at once; more wait in a queue."""
    eval_queue: int = 256
    """LuaEval requests that may wait; past that a client gets ``busy``."""
    drain_timeout: float = 10.0
    """On shutdown, seconds in-flight work may take before it is cancelled."""
    send_timeout: float = 5.0
    """Seconds a reply may wait for a peer that is not reading before it is dropped
    (and logged and counted)."""
    send_hwm: int = 1000
    """Messages queued per peer before a reply has to wait (libzmq SNDHWM)."""
    log_json: bool = False
