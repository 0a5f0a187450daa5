"""``luanette``: the daemon's command line (``luanette serve``)."""

from __future__ import annotations

import argparse
import signal
import sys

import anyio
import structlog
import zmq

from luanette import auth, gcpolicy, logs
from luanette.cli import mcp as mcp_cli
from luanette.cli import worker as worker_cli
from luanette.cli.argtypes import count, non_negative, positive
from luanette.config import DEFAULT_BIND, DEFAULT_POOL, DEFAULT_PUB, Config
from luanette.faults import StorageFault
from luanette.lease import Lease, LeaseLost, LeaseUnavailable, holder_name
from luanette.server import Server
from luanette.settings import Settings, SettingsError, load_settings
from luanette.telemetry import otlp_url
from luanette.triggers import TriggerError


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``65536`` -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M or 1G)") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``luanette`` argument parser (tests check docker-compose command lines with it)."""
    parser = argparse.ArgumentParser(prog="luanette", description="Sandboxed Lua job daemon over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    d = Config()
    serve.add_argument("--bind", default=DEFAULT_BIND, help=f"ROUTER endpoint (default {DEFAULT_BIND})")
    serve.add_argument("--name", dest="worker_name", default=d.worker_name, help="worker name in logs and Pong")
    serve.add_argument("--script-timeout", type=positive(float), default=d.script_timeout, metavar="SECONDS",
                       help=f"wall-clock limit per script (default {d.script_timeout:g})")
    serve.add_argument("--cancel-grace", type=non_negative, default=d.cancel_grace, metavar="SECONDS",
                       help="after a cancel, time a script has to end by itself before it is stopped "
                       f"(default {d.cancel_grace:g})")
    serve.add_argument("--script-memory", type=parse_size, default=d.script_memory, metavar="SIZE",
                       help="memory limit per Lua runtime, e.g. 256M (default 256M)")
    serve.add_argument("--workers", type=count, default=None, metavar="N",
                       help="worker processes that run Lua (default: one per core; 0: remote workers only)")
    serve.add_argument("--pool", default=DEFAULT_POOL, metavar="ENDPOINT",
                       help=f"endpoint remote workers join (luanette worker --connect), or 'none' "
                       f"(default {DEFAULT_POOL}; off loopback only with --curve)")
    serve.add_argument("--workers-min", type=count, default=None, metavar="N",
                       help="with --workers-max: scale local worker processes on queue depth")
    serve.add_argument("--workers-max", type=positive(int), default=None, metavar="N",
                       help="most local worker processes when scaling (see --workers-min)")
    serve.add_argument("--no-worker-timeout", type=positive(float), default=d.no_worker_timeout,
                       metavar="SECONDS", help="how long a job waits for a worker of its group and "
                       f"capabilities before it fails no_worker (default {d.no_worker_timeout:g})")
    serve.add_argument("--lua-memory-total", type=parse_size, default=None, metavar="SIZE",
                       help="memory all workers' Lua may use together, e.g. 8G; a worker past its "
                       "share is recycled (default: half the RAM)")
    serve.add_argument("--queue-target", dest="queue_target_s", type=positive(float), default=d.queue_target_s,
                       metavar="SECONDS", help="longest an eval may wait for a slot before it is "
                       f"answered 'busy' (default {d.queue_target_s:g})")
    serve.add_argument("--max-evals", type=positive(int), default=d.max_evals,
                       help=f"LuaEval requests running at once (default {d.max_evals})")
    serve.add_argument("--eval-queue", type=positive(int), default=d.eval_queue,
                       help=f"LuaEval requests that may wait before 'busy' (default {d.eval_queue})")
    serve.add_argument("--drain-timeout", type=positive(float), default=d.drain_timeout, metavar="SECONDS",
                       help=f"on shutdown, time for in-flight work (default {d.drain_timeout:g})")
    serve.add_argument("--send-timeout", type=positive(float), default=d.send_timeout, metavar="SECONDS",
                       help=f"how long a reply waits for a slow peer (default {d.send_timeout:g})")
    serve.add_argument("--send-hwm", type=positive(int), default=d.send_hwm,
                       help=f"replies queued per peer before sends wait (default {d.send_hwm})")
    serve.add_argument("--pub", default=DEFAULT_PUB, metavar="ENDPOINT",
                       help=f"PUB endpoint for broadcasts, or 'none' (default {DEFAULT_PUB})")
    serve.add_argument("--cas-root", default=None, metavar="DIR",
                       help="CAS root (default $HOOTENANNY_CAS_PATH, else ~/.hootenanny/cas)")
    serve.add_argument("--state-dir", default=None, metavar="DIR",
                       help="job and script database directory (default: the user state directory)")
    serve.add_argument("--state", type=state_url, default=None, metavar="URL",
                       help="keep jobs, the script index and flows in PostgreSQL at URL "
                       "(postgresql://user@host:port/db) instead of SQLite in --state-dir, which then "
                       "holds only files; fronts sharing URL take turns: one serves, the others stand "
                       "by (see docs/operations.md)")
    serve.add_argument("--modules", default=None, metavar="DIR",
                       help="directory of Lua modules for require() (default: none, only stored scripts)")
    serve.add_argument("--plugins", default=None, metavar="DIR",
                       help="directory of plugins (*.lua) loaded at start-up (default: none; see docs/plugins.md)")
    serve.add_argument("--hook-timeout", type=positive(float), default=d.hook_timeout, metavar="SECONDS",
                       help=f"time budget of one plugin hook handler (default {d.hook_timeout:g})")
    serve.add_argument("--max-jobs", type=positive(int), default=d.max_jobs,
                       help=f"jobs running at once (default {d.max_jobs})")
    serve.add_argument("--job-queue", type=positive(int), default=d.job_queue,
                       help=f"jobs that may wait before 'busy' (default {d.job_queue})")
    serve.add_argument("--job-retention-days", type=positive(float), default=d.job_retention_s / 86400,
                       help="finished jobs older than this are pruned at start-up (default 7)")
    serve.add_argument("--job-retention-count", type=positive(int), default=d.job_retention_count,
                       help=f"finished jobs kept at most (default {d.job_retention_count})")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="TOML settings file: model backends (see docs/configuration.md)")
    serve.add_argument("--log-json", action="store_true", help="log JSON lines instead of console text")
    serve.add_argument("--otlp-endpoint", type=otlp_endpoint, default=None, metavar="URL",
                       help="export spans and metrics over OTLP/HTTP to this collector, e.g. "
                       "http://127.0.0.1:4318 (default: export nothing)")
    serve.add_argument("--run-cas-bytes", type=parse_size, default=d.run_cas_bytes, metavar="SIZE",
                       help="bytes one run may write to the CAS (default 512M)")
    serve.add_argument("--run-result-bytes", type=parse_size, default=d.run_result_bytes, metavar="SIZE",
                       help="largest result of one run (default 16M)")
    serve.add_argument("--run-log-lines", type=positive(int), default=d.run_log_lines, metavar="N",
                       help=f"log lines one run may write (default {d.run_log_lines})")
    serve.add_argument("--run-log-bytes", type=parse_size, default=d.run_log_bytes, metavar="SIZE",
                       help="log bytes one run may write (default 1M)")
    serve.add_argument("--pub-results", type=parse_size, default=d.pub_results, metavar="SIZE",
                       help="largest job result sent in job_state_changed broadcasts; larger ones say "
                       "where to fetch it; 0: never (default 64K)")
    serve.add_argument("--curve", default=None, metavar="DIR",
                       help="require CURVE: DIR holds server.key_secret, clients/*.key and admins/*.key "
                       "(re-read on SIGHUP; see docs/security.md)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --bind/--pub without --curve (anyone who reaches the "
                       "port can run code)")
    keys = sub.add_parser("keys", help="CURVE key pairs").add_subparsers(dest="action", required=True)
    generate = keys.add_parser("generate", help="write a key pair NAME.key and NAME.key_secret into DIR")
    generate.add_argument("directory", metavar="DIR")
    generate.add_argument("--name", default="server", help="file name of the pair (default server)")
    init = keys.add_parser("init", help="lay out DIR/server, DIR/client, DIR/admin and DIR/worker (keeps what exists)")
    init.add_argument("directory", metavar="DIR")
    mcp_cli.add_arguments(sub.add_parser("mcp", help="serve the daemon to MCP clients (stdio, or --http)"))
    worker_cli.add_arguments(sub.add_parser("worker", help="run Lua for a front on another machine (joins its pool)"))
    return parser


def exposure_problem(config: Config) -> str | None:
    """Why the daemon must not start as configured: a socket other machines can reach
    without CURVE (unless ``--insecure``); None when it may."""
    if config.curve or config.insecure:
        return None
    exposed = [e for e in (config.bind, config.pub, config.pool) if e is not None and not auth.is_local(e)]
    if not exposed:
        return None
    return (
        f"{', '.join(exposed)} can be reached from other machines, and without --curve anyone who "
        "reaches it can run code, read every job's results and stop the daemon. Use --curve DIR "
        "(see docs/security.md), bind tcp://127.0.0.1:PORT, or pass --insecure to accept the risk."
    )


def state_url(text: str) -> str:
    """An argparse type: a PostgreSQL URL libpq can parse (nothing is connected to)."""
    from luanette import postgres  # imported here: psycopg only for a PostgreSQL store

    try:
        return postgres.check_url(text)
    except postgres.BadUrl as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def otlp_endpoint(text: str) -> str:
    """An argparse type: an http(s) collector URL."""
    try:
        otlp_url(text, "traces")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def config_from(args: argparse.Namespace) -> Config:
    """The Config that parsed ``serve`` arguments describe."""
    fields = set(Config.__struct_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["job_retention_s"] = args.job_retention_days * 86400
    if values.get("pub", "").lower() == "none":
        values["pub"] = None
    if (values.get("pool") or "none").lower() == "none":
        values["pool"] = None
    low, high = values.get("workers_min"), values.get("workers_max")
    if (low is None) != (high is None) or (high is not None and low is not None and low >= high):
        raise SystemExit("luanette: --workers-min and --workers-max go together, and min < max")
    return Config(**values)


async def serve(config: Config, settings: Settings) -> None:
    """Run the server until Shutdown, SIGINT or SIGTERM, then drain and return.

    With a PostgreSQL store (``--state``) the lease comes first (luanette.lease): a
    standby waits here, binding nothing, until the active front is lost; a front that
    loses its lease stops at once and :class:`~luanette.lease.LeaseLost` is raised."""
    lease: Lease | None = None
    if config.state is not None:
        lease = Lease(config.state, holder_name(config.worker_name))
        if not await _wait_for(lease):
            return
    try:
        await _serve(config, settings, lease)
    finally:
        if lease is not None and lease.held:
            lease.release()


async def _wait_for(lease: Lease) -> bool:
    """Take the lease, waiting as a standby; False when SIGINT or SIGTERM came first
    (a standby stops at once: it has nothing to drain)."""
    stopped = False
    unreachable: LeaseUnavailable | None = None
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            nonlocal stopped
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    structlog.get_logger("luanette.lease").info(
                        "lease.wait_stopped", signal=signal.Signals(sig).name, state=lease.location
                    )
                    stopped = True
                    tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        try:
            await lease.acquire()
        except LeaseUnavailable as e:  # raised after the group, not wrapped by it
            unreachable = e
        tg.cancel_scope.cancel()
    if unreachable is not None:
        raise unreachable
    if stopped and lease.held:  # the signal and the lease came together: give it back
        lease.release()
    return not stopped


async def _serve(config: Config, settings: Settings, lease: Lease | None) -> None:
    server = Server(config, settings=settings)
    server.lost_front = None if lease is None else lease.lost_front
    server.bind()  # outside the task group, so a busy address is a plain ZMQError
    gcpolicy.settle()  # what the server holds lives as long as the process
    failure: TriggerError | None = None
    lost: LeaseLost | None = None
    async with anyio.create_task_group() as tg:

        async def watch_lease(lease: Lease) -> None:
            nonlocal lost
            try:
                await lease.watch()
            except LeaseLost as e:
                # no drain: a standby may already be failing these jobs as worker_lost
                lost = e
                lease.held = False  # nothing to release: the session is gone or unreachable
                tg.cancel_scope.cancel()

        if lease is not None:
            tg.start_soon(watch_lease, lease)

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        server.reload_keys()
                    else:
                        server.request_shutdown(f"signal {signal.Signals(sig).name}")

        tg.start_soon(watch_signals)
        try:
            await server.serve()
        except TriggerError as e:  # a missing script_file: raised after the group, unwrapped
            failure = e
        tg.cancel_scope.cancel()
    if lost is not None:
        raise lost
    if failure is not None:
        raise failure


def generate_keys(args: argparse.Namespace) -> int:
    """``luanette keys generate DIR [--name NAME]`` and ``luanette keys init DIR``."""
    try:
        if args.action == "init":
            written = auth.init(args.directory)
        else:
            written = list(auth.generate(args.directory, args.name))
    except (auth.AuthError, OSError) as e:
        print(f"luanette: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        return generate_keys(args)
    if args.command == "mcp":
        return mcp_cli.run(args)
    if args.command == "worker":
        return worker_cli.run(args)
    config = config_from(args)
    problem = exposure_problem(config)
    if problem is not None:
        print(f"luanette: refusing to start: {problem}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
    except SettingsError as e:
        print(f"luanette: {e}", file=sys.stderr)
        return 2
    logs.configure(json=config.log_json)
    log = structlog.get_logger("luanette")
    if config.insecure and not config.curve:
        log.warning("server.insecure", bind=config.bind, pub=config.pub,
                    reason="--insecure: no authentication; anyone who reaches the sockets can run code")
    try:
        anyio.run(serve, config, settings)
    except auth.AuthError as e:  # the key directory cannot be used
        print(f"luanette: {e}", file=sys.stderr)
        return 2
    except (OSError, zmq.ZMQError) as e:  # e.g. the address is in use
        log.error("server.failed", error=str(e), bind=config.bind)
        return 1
    except TriggerError as e:  # a trigger's script_file is missing or does not compile
        log.error("server.failed", error=str(e))
        return 2
    except LeaseUnavailable as e:  # --state names a database that cannot be reached
        log.error("server.failed", error=str(e))
        return 2
    except LeaseLost as e:
        log.error("lease.lost", error=str(e), action="stopped serving at once: a standby front may take over")
        return 3
    except StorageFault as e:  # the job database cannot be opened
        log.error("server.failed", error=str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
