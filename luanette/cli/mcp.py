"""``luanette mcp``: the command line of the MCP server (luanette/mcpserver.py).

Kept apart from the server so that ``luanette serve`` never imports the MCP SDK
(pydantic, starlette: seconds of start-up) just to build its argument parser.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from luanette import auth
from luanette.config import DEFAULT_BIND


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def http_address(text: str) -> tuple[str, int]:
    """``127.0.0.1:8765`` (or ``[::1]:8765``, ``localhost:8765``) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r} (try 127.0.0.1:8765)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``luanette mcp``."""
    parser.add_argument("--endpoint", default=os.environ.get("LUANETTE_ENDPOINT", DEFAULT_BIND),
                        help=f"the daemon's ROUTER endpoint (default $LUANETTE_ENDPOINT or {DEFAULT_BIND})")
    parser.add_argument("--curve", default=os.environ.get(auth.ENV_CURVE), metavar="DIR",
                        help="connect with CURVE: DIR holds the daemon's server.key and this client's "
                        "client.key_secret (default $LUANETTE_CURVE)")
    parser.add_argument("--http", type=http_address, default=None, metavar="HOST:PORT",
                        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    parser.add_argument("--insecure", action="store_true",
                        help="allow --http on a non-loopback address (anyone who reaches it can run code "
                        "with this server's keys)")
    parser.add_argument("--timeout", type=_positive, default=30.0, metavar="SECONDS",
                        help="longest wait for one reply of the daemon (default 30)")
    parser.add_argument("--connect-timeout", type=_positive, default=2.0, metavar="SECONDS",
                        help="longest wait for the daemon to accept a connection (default 2)")
    parser.add_argument("--wait-timeout", type=_positive, default=600.0, metavar="SECONDS",
                        help="longest a job_execute with wait follows its job before returning it "
                        "still running (default 600)")
    parser.add_argument("--hide", action="append", default=[], metavar="TOOL",
                        help="do not offer this request as a tool (repeatable), e.g. --hide shutdown")


def run(args: argparse.Namespace) -> int:
    """Carry out ``luanette mcp``; returns the exit status."""
    import anyio

    from luanette import mcpserver

    if args.http is not None and not is_loopback(args.http[0]) and not args.insecure:
        print(f"luanette mcp: refusing to serve HTTP on {args.http[0]}: other machines could reach it and "
              "call the daemon with this server's rights; use a loopback address or --insecure",
              file=sys.stderr)
        return 2
    try:
        curve = auth.load_client(args.curve) if args.curve else None
    except auth.AuthError as e:
        print(f"luanette mcp: {e}", file=sys.stderr)
        return 2
    options = mcpserver.Options(
        endpoint=args.endpoint,
        curve=curve,
        timeout=args.timeout,
        connect_within=args.connect_timeout,
        wait_timeout=args.wait_timeout,
        hidden=frozenset(args.hide),
    )
    try:
        if args.http is None:
            anyio.run(mcpserver.serve_stdio, options)
        else:
            host, port = args.http
            print(f"luanette mcp: serving http://{host}:{port}/mcp for {args.endpoint}", file=sys.stderr, flush=True)
            anyio.run(mcpserver.serve_http, options, host, port)
    except KeyboardInterrupt:
        pass
    return 0
