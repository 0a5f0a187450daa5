"""``luanette-sim``: stand-ins for the services Luanette talks to.

    luanette-sim models --kind orpheus --port 2000
    luanette-sim models --kind all --port 0 --latency-ms 200 --busy-every 5
    luanette-sim garden --bind tcp://127.0.0.1:5555 --latency-ms 20
    luanette-sim timeline-event --luanette tcp://127.0.0.1:5580 \
        --type generate_transition --position 32 --tempo 120 --metadata '{"to": "b"}'

The servers (``models``, ``garden``) print ``listening <base URL or endpoint>`` as the
first stdout line once the socket is bound, so a parent process can start them on port 0
and read where they are. SIGINT / SIGTERM stop them cleanly (exit 0). Both take
``--host`` / ``--port``; ``garden`` also takes a whole ZeroMQ ``--bind`` endpoint (e.g.
``ipc://...``). ``timeline-event`` is one-shot: it prints the reply as JSON and exits 0
on Success, 1 on Error or no reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any


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
    from luanette.sim.models import KINDS, ORPHEUS_TASKS  # lazy: keeps --help fast

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
    p.add_argument("--hold-until", type=_non_negative_int, default=0, metavar="N",
                   help="hold model requests until N are held at once, then let them all go "
                   "(a barrier for concurrency tests; 0 = off)")
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
            kind=args.kind, latency_ms=args.latency_ms, hold_until=args.hold_until,
            busy_every=args.busy_every,
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
    return await _until_signalled(
        server, server.url,
        f"luanette-sim models: kind={config.kind} routes under {server.url} "
        f"(and {', '.join(server.url_for(k) for k in config.kinds)})",
    )


async def _until_signalled(server: Any, address: str, banner: str) -> int:
    """Print ``listening <address>`` (the first stdout line) and ``banner`` (stderr),
    serve until SIGINT/SIGTERM, stop ``server``; exit status 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {address}", flush=True)
    print(banner, file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0


def _run_models(args: argparse.Namespace) -> int:
    return asyncio.run(_serve_models(args))


# --- garden --------------------------------------------------------------------------


def _add_garden(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "garden",
        help="simulate the chaosgarden shell socket (regions, transport, latents) over ZeroMQ",
        description="Bind a ROUTER that answers chaosgarden shell requests (compact "
        "MsgPack Message frames, or HOOT01 with a JSON Message) from an in-memory "
        "timeline: transport, regions, the latent lifecycle and approvals. Prints "
        "'listening <endpoint>' as the first stdout line.",
    )
    p.add_argument("--bind", default=None, metavar="ENDPOINT",
                   help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:0, a free port); "
                   "not together with --host/--port")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_non_negative_int, default=None,
                   help="port to bind; 0 picks a free one (default)")
    p.add_argument("--latency-ms", type=_non_negative_float, default=0.0,
                   help="delay added to every reply (non-blocking)")
    p.add_argument("--drop-every", type=_non_negative_int, default=0, metavar="N",
                   help="leave every Nth request unanswered and unapplied")
    p.add_argument("--unresponsive", action="store_true",
                   help="answer nothing (a hung daemon), for client timeout tests")
    p.add_argument("--tempo", type=float, default=120.0, help="initial tempo in BPM (default 120)")
    p.set_defaults(func=_run_garden)


def _garden_bind(args: argparse.Namespace) -> str:
    if args.bind is not None:
        if args.host is not None or args.port is not None:
            raise ValueError("give either --bind or --host/--port, not both")
        return args.bind
    host = args.host or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{args.port or 0}"


async def _serve_garden(args: argparse.Namespace) -> int:
    import zmq  # lazy: keeps --help and the other subcommands light

    from luanette.sim.garden import GardenSimServer, GardenState

    try:
        bind = _garden_bind(args)
        state = GardenState(tempo=args.tempo)
    except ValueError as e:
        print(f"luanette-sim: {e}", file=sys.stderr)
        return 2
    server = GardenSimServer(bind, state=state, latency_ms=args.latency_ms,
                             drop_every=args.drop_every, unresponsive=args.unresponsive)
    try:
        await server.start()
    except zmq.ZMQError as e:
        print(f"luanette-sim: cannot bind {bind}: {e}", file=sys.stderr)
        return 1
    assert server.endpoint is not None  # set by start()
    return await _until_signalled(
        server, server.endpoint,
        f"luanette-sim garden: shell ROUTER on {server.endpoint} (latency {args.latency_ms:g} ms)",
    )


def _run_garden(args: argparse.Namespace) -> int:
    return asyncio.run(_serve_garden(args))


# --- timeline-event ------------------------------------------------------------------


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def _add_timeline_event(sub: argparse._SubParsersAction) -> None:
    from hooteproto.codec import Encoding  # lazy, like the others
    from hooteproto.types import TimelineEventType

    p = sub.add_parser(
        "timeline-event",
        help="send one TimelineEvent to a Luanette daemon, as chaosgarden does at a marker",
        description="Send a hooteproto TimelineEvent over HOOT01 to a Luanette ROUTER "
        "and print the reply payload as JSON. Exit 0 on Success, 1 on Error or timeout.",
    )
    p.add_argument("--luanette", required=True, metavar="ENDPOINT",
                   help="the Luanette daemon's endpoint, e.g. tcp://127.0.0.1:5580")
    p.add_argument("--type", dest="event_type", required=True,
                   choices=[e.value for e in TimelineEventType], help="the event type")
    p.add_argument("--position", type=float, required=True, metavar="BEATS",
                   help="timeline position of the event in beats")
    p.add_argument("--tempo", type=float, default=120.0, help="tempo in BPM (default 120)")
    p.add_argument("--metadata", type=_json_value, default={}, metavar="JSON",
                   help="event metadata as JSON (default {})")
    p.add_argument("--timeout", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the reply (default 5)")
    p.add_argument("--traceparent", default=None, help="W3C traceparent to send along")
    p.add_argument("--encoding", choices=[e.value for e in Encoding], default="compact",
                   help="body encoding of the request (default compact MsgPack)")
    p.add_argument("--curve", default=os.environ.get("LUANETTE_CURVE"), metavar="DIR",
                   help="CURVE keys for a daemon started with --curve: DIR holds server.key and "
                   "client.key_secret (default $LUANETTE_CURVE)")
    p.set_defaults(func=_run_timeline_event)


def _run_timeline_event(args: argparse.Namespace) -> int:
    import msgspec

    from hooteproto.client import RequestTimeout
    from hooteproto.codec import DecodeError, Encoding
    from hooteproto.types import Success
    from luanette.auth import AuthError, load_client
    from luanette.sim.garden import send_timeline_event

    try:
        curve = load_client(args.curve) if args.curve else None
    except AuthError as e:
        print(f"luanette-sim: {e}", file=sys.stderr)
        return 2
    try:
        reply = asyncio.run(send_timeline_event(
            args.luanette, args.event_type, args.position, args.tempo, args.metadata,
            timeout=args.timeout, traceparent=args.traceparent,
            encoding=Encoding(args.encoding), curve=curve,
        ))
    except RequestTimeout as e:
        print(f"luanette-sim: {e}", file=sys.stderr)
        return 1
    except DecodeError as e:
        print(f"luanette-sim: undecodable reply: {e}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(reply).decode(), flush=True)
    return 0 if isinstance(reply, Success) else 1


# --- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luanette-sim",
        description="Simulators of the services around Luanette, for tests and compose.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_models(sub)
    _add_garden(sub)
    _add_timeline_event(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``luanette-sim`` with ``argv`` (default: the process arguments); returns the
    exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
