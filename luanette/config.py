"""Daemon configuration: one struct, filled from command-line flags."""

from __future__ import annotations

import msgspec

DEFAULT_BIND = "tcp://127.0.0.1:5570"
DEFAULT_PUB = "tcp://127.0.0.1:5572"
DEFAULT_POOL = "tcp://127.0.0.1:5571"  # seed 001: "async job dispatch" to sub-workers


class Config(msgspec.Struct, kw_only=True, frozen=True):
    """Everything the daemon can be told. Every field has a working default."""

    bind: str = DEFAULT_BIND
    """ROUTER endpoint clients connect to. ``tcp://127.0.0.1:*`` picks a free port."""
    worker_name: str = "luanette"
    script_timeout: float = 30.0
    """Wall-clock seconds a script may run before it is stopped."""
    cancel_grace: float = 5.0
    """After a cancel (JobCancel, the shutdown drain), seconds a script has to end by
    itself (its waits fail with "cancelled: <reason>") before it is stopped hard."""
    script_memory: int = 256 * 2**20
    """Bytes of memory one Lua runtime may allocate."""
    workers: int | None = None
    """Worker processes that run Lua; ``None``: one per core; 0: none, remote workers
    only (``luanette worker --connect``)."""
    pool: str | None = None
    """The pool endpoint remote workers join (seed 001's ``:5571``; the command line's
    default is ``tcp://127.0.0.1:5571``); ``None``: local workers only."""
    workers_min: int | None = None
    workers_max: int | None = None
    """The local supervisor scales its worker processes between these on queue depth
    (both given, min < max); ``None``: ``workers`` processes, fixed."""
    no_worker_timeout: float = 30.0
    """Seconds a job (or eval) waits for a worker that can serve it (its group, its
    capabilities) before it fails ``no_worker``."""
    lua_memory_total: int | None = None
    """Bytes of memory all workers' Lua may use together; each worker's share is this
    divided by ``workers``, and a worker past its share is recycled between runs.
    ``None``: half of the machine's RAM."""
    max_evals: int = 64
    """LuaEval requests running at once; more wait in a queue."""
    eval_queue: int = 256
    """LuaEval requests that may wait; past that a client gets ``busy``."""
    queue_target_s: float = 0.25
    """Longest a LuaEval may wait in the queue; one that waited longer is answered
    ``busy`` without running (its caller has likely given up)."""
    drain_timeout: float = 10.0
    """On shutdown, seconds in-flight work may take before it is cancelled."""
    send_timeout: float = 5.0
    """Seconds a reply may wait for a peer that is not reading before it is dropped
    (and logged and counted)."""
    send_hwm: int = 1000
    """Messages queued per peer before a reply has to wait (libzmq SNDHWM)."""
    pub: str | None = DEFAULT_PUB
    """PUB endpoint for broadcasts; ``None`` publishes nothing."""
    cas_root: str | None = None
    """CAS root; else ``$HOOTENANNY_CAS_PATH``; else ``~/.hootenanny/cas``."""
    state_dir: str | None = None
    """Where the job and script database lives; else the user state directory. With
    ``state`` it holds only files (job temp directories, plugins.json)."""
    state: str | None = None
    """A ``postgresql://`` URL: keep jobs, the script index and flows in that PostgreSQL
    database instead of SQLite in ``state_dir``, shared with standby fronts
    (luanette.lease); None: SQLite."""
    modules: str | None = None
    """Directory of Lua modules scripts load with ``require("a/b")`` (``DIR/a/b.lua``);
    ``None``: only stored scripts can be required (``require("script:NAME")``)."""
    run_cas_bytes: int = 512 * 2**20
    """Bytes one run may write to the CAS (``cas_quota_exceeded`` past it)."""
    run_result_bytes: int = 16 * 2**20
    """Largest result of one run, as MessagePack (``result_too_large``)."""
    run_log_lines: int = 5_000
    """Log lines one run may write (``log_quota_exceeded``)."""
    run_log_bytes: int = 2**20
    """Log bytes one run may write (``log_quota_exceeded``)."""
    pub_results: int = 64 * 2**10
    """Largest job result carried in a ``job_state_changed`` broadcast (JSON bytes);
    larger ones are left out with a pointer to ``job_status``; 0: never carried."""
    curve: str | None = None
    """Key directory (see luanette.auth): the ROUTER and PUB sockets require CURVE and
    only its client and admin keys may connect; ``None``: no authentication (loopback
    only, unless ``insecure``)."""
    insecure: bool = False
    """Allow a non-loopback bind without CURVE (logged as a warning)."""
    max_jobs: int = 64
    """Jobs running at once. A job waiting on a model or the garden holds no thread, so
    this is not the number of cores: CPU-bound jobs share the workers' Lua threads."""
    job_queue: int = 1000
    """Jobs that may wait to run; past that JobExecute answers ``busy``."""
    job_retention_s: float = 7 * 24 * 3600.0
    """Finished jobs older than this are pruned at start-up."""
    job_retention_count: int = 10_000
    """At most this many finished jobs are kept."""
    log_json: bool = False
    plugins: str | None = None
    """Directory of plugins (``*.lua``) loaded at start-up (docs/plugins.md); ``None``:
    only plugins loaded later with ``plugin_load``."""
    hook_timeout: float = 2.0
    """Seconds one plugin hook handler may run before it is stopped and skipped."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL (e.g. ``http://127.0.0.1:4318``) that spans and
    metrics are exported to; ``None`` exports nothing."""
