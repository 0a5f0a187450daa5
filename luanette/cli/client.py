"""``luanette-cli``: talk to a running daemon from a shell.

Exit status: 0 on success, 1 when the daemon answers Error, 2 for bad usage or input,
3 when no reply came in time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from hooteproto import types as t
from hooteproto.client import Client, RequestTimeout
from hooteproto.codec import DecodeError, Encoding, payload_codec
from luanette.config import DEFAULT_BIND

EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


class CliError(Exception):
    """A failure to report in one line with an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    """The ``luanette-cli`` argument parser."""
    parser = argparse.ArgumentParser(prog="luanette-cli", description="Talk to a Luanette daemon over ZeroMQ.")
    parser.add_argument("--endpoint", default=os.environ.get("LUANETTE_ENDPOINT", DEFAULT_BIND),
                        help=f"daemon ROUTER endpoint (default $LUANETTE_ENDPOINT or {DEFAULT_BIND})")
    parser.add_argument("--encoding", choices=[e.value for e in Encoding], default="compact",
                        help="request body encoding (default compact MsgPack)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for a reply (default 60)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", help="check the daemon is alive")
    ev = sub.add_parser("eval", help="run Lua code once and print its result")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("code", nargs="?", help="Lua code")
    src.add_argument("-f", "--file", type=Path, help="read the Lua code from FILE ('-' for stdin)")
    ev.add_argument("--params", default=None, metavar="JSON", help="params table as JSON")
    sub.add_parser("tools", help="list the requests the daemon serves")
    send = sub.add_parser("send", help="send any payload given as JSON (for debugging)")
    send.add_argument("payload", metavar="JSON", help='e.g. \'{"type": "ping"}\'')
    return parser


def _json_arg(text: str, what: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise CliError(f"{what} is not valid JSON: {e}", EXIT_USAGE) from None


def _read_code(args: argparse.Namespace) -> str:
    if args.file is None:
        return args.code
    if str(args.file) == "-":
        return sys.stdin.read()
    try:
        return args.file.read_text()
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror}", EXIT_USAGE) from None


def build_request(args: argparse.Namespace) -> t.Payload:
    """The payload a parsed command line asks for."""
    if args.command == "ping":
        return t.Ping()
    if args.command == "tools":
        return t.ListTools()
    if args.command == "eval":
        params = None if args.params is None else _json_arg(args.params, "--params")
        return t.LuaEval(code=_read_code(args), params=params)
    try:
        return payload_codec.decode(args.payload.encode(), Encoding.JSON)
    except DecodeError as e:
        raise CliError(f"not a payload: {e}", EXIT_USAGE) from None


def _dump(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def render(command: str, reply: t.Payload) -> str:
    """Readable text for a successful reply."""
    match reply:
        case t.Pong(worker_id=wid, uptime_secs=up):
            return f"pong from {wid} (up {up} s)"
        case t.ToolList(tools=tools):
            width = max((len(x.name) for x in tools), default=0)
            return "\n".join(f"{x.name:<{width}}  {x.description}" for x in tools)
        case t.Success(result={"result": result, "duration_ms": ms}) if command == "eval":
            text = result if isinstance(result, str) else _dump(result)
            return f"{text}\n({ms:.1f} ms)" if sys.stdout.isatty() else text
        case t.Success(result=result):
            return _dump(result)
    return _dump(msgspec.to_builtins(reply))


async def run(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Send the request the command line names, print the reply, return the exit status."""
    request = build_request(args)
    async with Client(args.endpoint, encoding=Encoding(args.encoding)) as client:
        try:
            reply = await client.request(request, timeout=args.timeout)
        except RequestTimeout:
            raise CliError(
                f"no reply from {args.endpoint} within {args.timeout:g} s (is the daemon running?)",
                EXIT_TIMEOUT,
            ) from None
        except DecodeError as e:
            raise CliError(f"unreadable reply: {e}", EXIT_ERROR_REPLY) from None
    if args.json:
        out(msgspec.json.encode(reply).decode())
    if isinstance(reply, t.Error):
        if not args.json:
            raise CliError(f"error [{reply.code}]: {reply.message}", EXIT_ERROR_REPLY)
        return EXIT_ERROR_REPLY
    if not args.json:
        out(render(args.command, reply))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return anyio.run(run, args, print)
    except CliError as e:
        print(f"luanette-cli: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
