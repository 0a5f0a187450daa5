"""``luanette-cli``: talk to a running daemon from a shell.

Exit status: 0 on success, 1 when the daemon answers Error, 2 for bad usage or input,
3 when no reply came in time or no connection could be made (nothing listening, or
the CURVE handshake failed: said within ~2 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import zmq
import zmq.asyncio

from hooteproto import types as t
from hooteproto.client import Client, ConnectionFailed, CurveKeys, RequestTimeout
from hooteproto.codec import DecodeError, Encoding, payload_codec
from luanette import auth
from luanette.config import DEFAULT_BIND, DEFAULT_PUB

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
    parser.add_argument("--curve", default=os.environ.get(auth.ENV_CURVE), metavar="DIR",
                        help="connect with CURVE: DIR holds the daemon's server.key and this client's "
                        "client.key_secret (default $LUANETTE_CURVE)")
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

    script = sub.add_parser("script", help="store and find scripts").add_subparsers(dest="action", required=True)
    st = script.add_parser("store", help="store a Lua file; prints its hash")
    st.add_argument("file", type=Path, help="Lua source ('-' for stdin)")
    st.add_argument("--tag", action="append", default=None, help="a tag (repeatable)")
    st.add_argument("--creator", default=None)
    se = script.add_parser("search", help="find stored scripts")
    se.add_argument("--tag", default=None)
    se.add_argument("--creator", default=None)
    se.add_argument("--vibe", default=None, help="words to match in name, description and tags")
    de = sub.add_parser("describe", help="show a stored script's describe()")
    de.add_argument("hash")
    ru = sub.add_parser("run", help="run a stored script as a job; prints the job id")
    ru.add_argument("hash")
    ru.add_argument("--params", default=None, metavar="JSON")
    ru.add_argument("--tag", action="append", default=None, help="a job tag (repeatable)")
    ru.add_argument("--wait", action="store_true", help="show progress and print the result when done")

    job = sub.add_parser("job", help="inspect and control jobs").add_subparsers(dest="action", required=True)
    job.add_parser("status", help="one job's state and result").add_argument("job_id")
    po = job.add_parser("poll", help="wait until jobs finish")
    po.add_argument("job_ids", nargs="+")
    po.add_argument("--wait-ms", type=int, default=10_000, help="how long to wait (capped at 30 s by the daemon)")
    po.add_argument("--all", action="store_true", help="wait for all of them (default: any)")
    job.add_parser("cancel", help="stop a queued or running job").add_argument("job_id")
    li = job.add_parser("list", help="recent jobs, newest first")
    li.add_argument("--status", default=None, choices=[s.value for s in t.JobStatus])

    ses = sub.add_parser("session", help="garden sessions kept for review (describe().review = true)").add_subparsers(
        dest="action", required=True
    )
    sl = ses.add_parser("list", help="pending sessions, oldest first")
    sl.add_argument("--job", default=None, metavar="JOB_ID", help="only the sessions of this job")
    ses.add_parser("show", help="one pending session and its operations").add_argument("session_id")
    ses.add_parser("commit", help="apply a pending session to the garden (all or nothing)").add_argument("session_id")
    ses.add_parser("discard", help="drop a pending session").add_argument("session_id")

    wa = sub.add_parser("watch", help="print broadcasts (job states, progress) as they arrive")
    wa.add_argument("--pub", default=os.environ.get("LUANETTE_PUB", DEFAULT_PUB),
                    help=f"daemon PUB endpoint (default $LUANETTE_PUB or {DEFAULT_PUB})")
    wa.add_argument("--count", type=int, default=None, help="exit after N messages")
    return parser


def _json_arg(text: str, what: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise CliError(f"{what} is not valid JSON: {e}", EXIT_USAGE) from None


def _read_code(args: argparse.Namespace) -> str:
    if getattr(args, "code", None) is not None:
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
    if args.command == "script" and args.action == "store":
        return t.ScriptStore(content=_read_code(args), tags=args.tag, creator=args.creator)
    if args.command == "script":
        return t.ScriptSearch(tag=args.tag, creator=args.creator, vibe=args.vibe)
    if args.command == "describe":
        return t.LuaDescribe(script_hash=args.hash)
    if args.command == "run":
        params = None if args.params is None else _json_arg(args.params, "--params")
        return t.JobExecute(script_hash=args.hash, params=params, tags=args.tag)
    if args.command == "job":
        match args.action:
            case "status":
                return t.JobStatusRequest(job_id=args.job_id)
            case "poll":
                mode = t.PollMode.ALL if args.all else t.PollMode.ANY
                return t.JobPoll(job_ids=args.job_ids, timeout_ms=max(args.wait_ms, 0), mode=mode)
            case "cancel":
                return t.JobCancel(job_id=args.job_id)
            case _:
                return t.JobList(status=args.status)
    if args.command == "session":
        match args.action:
            case "list":
                return t.SessionList(job_id=args.job)
            case "show":
                return t.SessionShow(session_id=args.session_id)
            case "commit":
                return t.SessionCommit(session_id=args.session_id)
            case _:
                return t.SessionDiscard(session_id=args.session_id)
    try:
        return payload_codec.decode(args.payload.encode(), Encoding.JSON)
    except DecodeError as e:
        raise CliError(f"not a payload: {e}", EXIT_USAGE) from None


def _dump(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _value(result: Any) -> str:
    return result if isinstance(result, str) else _dump(result)


def render(args: argparse.Namespace, reply: t.Payload) -> str:
    """Readable text for a successful reply."""
    command, action = args.command, getattr(args, "action", None)
    match reply:
        case t.Pong(worker_id=wid, uptime_secs=up):
            return f"pong from {wid} (up {up} s)"
        case t.ToolList(tools=tools):
            width = max((len(x.name) for x in tools), default=0)
            return "\n".join(f"{x.name:<{width}}  {x.description}" for x in tools)
        case t.Success(result={"result": result, "duration_ms": ms}) if command == "eval":
            return f"{_value(result)}\n({ms:.1f} ms)" if sys.stdout.isatty() else _value(result)
        case t.Success(result={"hash": digest, "name": name}) if command == "script":
            return f"{digest}  {name or ''}".rstrip()
        case t.Success(result=list(found)) if command == "script":
            return "\n".join(f"{x['hash']}  {x['name'] or '-'}  {' '.join(x['tags'])}" for x in found)
        case t.Success(result={"job_id": job_id}) if command == "run":
            return job_id
        case t.Success(result=list(jobs)) if command == "job" and action == "list":
            return "\n".join(f"{j['job_id']}  {j['status']:<9}  {j['source']}" for j in jobs)
        case t.Success(result={"cancelled": True, "job_id": job_id}):
            return f"cancelled {job_id}"
        case t.Success(result=list(found)) if command == "session" and action == "list":
            return "\n".join(
                f"{s['session_id']}  {s['operation_count']:>4} ops  {s['job_id'] or '-'}" for s in found
            )
        case t.Success(result={"committed": True, "session_id": sid, "operations": n}):
            return f"committed {sid} ({n} operations)"
        case t.Success(result={"discarded": True, "session_id": sid, "operations": n}):
            return f"discarded {sid} ({n} operations)"
        case t.Success(result=result):
            return _dump(result)
    return _dump(msgspec.to_builtins(reply))


async def _ask(client: Client, args: argparse.Namespace, request: t.Payload) -> t.Payload:
    try:
        return await client.request(request, timeout=args.timeout)
    except RequestTimeout:
        raise CliError(
            f"no reply from {args.endpoint} within {args.timeout:g} s (is the daemon running?)",
            EXIT_TIMEOUT,
        ) from None
    except DecodeError as e:
        raise CliError(f"unreadable reply: {e}", EXIT_ERROR_REPLY) from None


def _curve(args: argparse.Namespace) -> CurveKeys | None:
    if not args.curve:
        return None
    try:
        return auth.load_client(args.curve)
    except auth.AuthError as e:
        raise CliError(str(e), EXIT_USAGE) from None


CONNECT_WITHIN_S = 2.0
"""How soon the CLI says that it cannot connect, rather than waiting out --timeout."""


async def run(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Carry out the command line, print the outcome, return the exit status."""
    if args.command == "watch":
        return await watch(args, out)
    request = build_request(args)
    async with Client(args.endpoint, encoding=Encoding(args.encoding), curve=_curve(args)) as client:
        try:
            await client.connected(within=min(CONNECT_WITHIN_S, args.timeout))
        except ConnectionFailed as e:
            raise CliError(str(e), EXIT_TIMEOUT) from None
        reply = await _ask(client, args, request)
        if args.command == "run" and args.wait and isinstance(reply, t.Success):
            return await wait_for_job(client, args, reply.result["job_id"], out)
    if args.json:
        out(msgspec.json.encode(reply).decode())
    if isinstance(reply, t.Error):
        if not args.json:
            raise CliError(f"error [{reply.code}]: {reply.message}", EXIT_ERROR_REPLY)
        return EXIT_ERROR_REPLY
    if not args.json:
        out(render(args, reply))
    return 0


def _result(reply: t.Payload) -> Any:
    """The result of a Success reply; an Error (or any other reply) ends the command."""
    if isinstance(reply, t.Error):
        raise CliError(f"error [{reply.code}]: {reply.message}", EXIT_ERROR_REPLY)
    if not isinstance(reply, t.Success):
        raise CliError(f"unexpected reply: {t.tag_of(type(reply))}", EXIT_ERROR_REPLY)
    return reply.result


async def wait_for_job(client: Client, args: argparse.Namespace, job_id: str, out: Callable[[str], None]) -> int:
    """``run --wait``: show progress on a terminal until the job ends, then its result."""
    live = sys.stderr.isatty() and not args.json
    started = time.monotonic()
    while True:
        polled = _result(await _ask(client, args, t.JobPoll(job_ids=[job_id], timeout_ms=250, mode=t.PollMode.ALL)))
        if polled["completed"]:
            info = polled["completed"][0]
            break
        if live:
            status = _result(await _ask(client, args, t.JobStatusRequest(job_id=job_id)))
            progress = status.get("progress") or {}
            bar = f"{progress.get('percent', 0):5.1f}%" if progress else status["status"]
            note = progress.get("message") or ""
            print(f"\r{job_id}  {bar}  {note[:40]:<40}  {time.monotonic() - started:6.1f} s", end="", file=sys.stderr)
    if live:
        print("\r" + " " * 100 + "\r", end="", file=sys.stderr)
    if args.json:
        out(msgspec.json.encode(info).decode())
    if info["status"] != "complete":
        err = info.get("error") or {}
        where = f" (line {err['line']})" if err.get("line") is not None else ""
        if args.json:
            return EXIT_ERROR_REPLY
        raise CliError(
            f"job {job_id} {info['status']}: {err.get('kind', '')}: {err.get('message', '')}{where}", EXIT_ERROR_REPLY
        )
    if not args.json:
        out(_value(info["result"]))
    return 0


async def watch(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Print each broadcast frame (one JSON object a line) until ``--count`` or Ctrl-C."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    keys = _curve(args)
    if keys is not None:
        keys.apply(sock)
    sock.connect(args.pub)
    seen = 0
    try:
        while args.count is None or seen < args.count:
            out((await sock.recv()).decode())
            seen += 1
    finally:
        sock.close()
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
