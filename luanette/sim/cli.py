"""``luanette-sim``: stand-ins for the services Luanette talks to.

    luanette-sim models --kind orpheus --port 2000
    luanette-sim models --kind all --port 0 --latency-ms 200 --busy-every 5

The first line on stdout is ``listening <base URL>`` once the socket is bound, so a
parent process can start it with ``--port 0`` and read the URL. SIGINT / SIGTERM stop
it cleanly (exit 0). Further subcommands (``garden``) hang off the same parser.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _non_negative_float(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _add_models(sub: argparse._SubParsersAction) -> None:
    from luanette.sim.models import KINDS, ORPHEUS_TASKS  # noqa: PLC0415 (lazy: keeps --help fast)

    p = sub.add_parser(
        "models",
        help="simulate GPU model services (orpheus, musicgen, llm) over HTTP",
        description="Serve /health and /predict (orpheus family, musicgen) and "
        "/v1/chat/completions (llm) with real MIDI/WAV output. Routes of each kind are "
        "also served under /<kind>/. Prints 'listening <url>' as the first stdout line.",
    )
    p.add_argument("--kind", choices=(*KINDS, "all"), default="all",
                   help="model family to serve; 'all' serves every route on one port (default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_non_negative_int, default=0,
                   help="port to bind; 0 picks a free one (default)")
    p.add_argument("--latency-ms", type=_non_negative_float, default=0.0,
                   help="delay added to every model request (non-blocking)")
    p.add_argument("--busy-every", type=_non_negative_int, default=0, metavar="N",
                   help="every Nth model request answers 429")
    p.add_argument("--busy-burst", type=_non_negative_int, default=0, metavar="N",
                   help="the first N model requests answer 429")
    p.add_argument("--max-concurrency", type=_non_negative_int, default=0, metavar="N",
                   help="answer 429 while more than N model requests are in flight (0 = no limit)")
    p.add_argument("--retry-after", type=_non_negative_float, default=1.0, metavar="SECONDS",
                   help="Retry-After header value on 429 answers (default 1)")
    p.add_argument("--fail-rate", type=_fraction, default=0.0, metavar="F",
                   help="fraction of model requests answering --fail-status (seeded)")
    p.add_argument("--fail-status", type=int, default=500, metavar="CODE",
                   help="status for simulated failures (default 500)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for failure draws and generated content (default 0)")
    p.add_argument("--default-task", choices=ORPHEUS_TASKS, default="generate",
                   help="orpheus task when a request names none (e.g. 'bridge' to mimic "
                   "the bridge service)")
    p.add_argument("--llm-model", default="sim-llm", help="model name reported by the llm")
    p.set_defaults(func=_run_models)


async def _serve_models(args: argparse.Namespace) -> int:
    from luanette.sim.models import SimConfig, SimServer

    try:
        config = SimConfig(
            kind=args.kind, latency_ms=args.latency_ms, busy_every=args.busy_every,
            busy_burst=args.busy_burst, max_concurrency=args.max_concurrency,
            retry_after=args.retry_after, fail_rate=args.fail_rate,
            fail_status=args.fail_status, seed=args.seed, default_task=args.default_task,
            llm_model=args.llm_model,
        )
    except ValueError as e:
        print(f"luanette-sim: {e}", file=sys.stderr)
        return 2
    server = SimServer(config, host=args.host, port=args.port)
    try:
        await server.start()
    except OSError as e:
        print(f"luanette-sim: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {server.url}", flush=True)
    print(f"luanette-sim models: kind={config.kind} routes under {server.url} "
          f"(and {', '.join(server.url_for(k) for k in config.kinds)})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0


def _run_models(args: argparse.Namespace) -> int:
    return asyncio.run(_serve_models(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luanette-sim",
        description="Simulators of the services around Luanette, for tests and compose.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_models(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
