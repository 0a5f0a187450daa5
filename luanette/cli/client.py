"""``luanette-cli``: talk to a running daemon from a shell.

Exit status: 0 on success, 1 when the daemon answers Error (or a waited-for job does
not complete), 2 for bad usage or input, 3 when no reply came in time or no connection
could be made (nothing listening, or the CURVE handshake failed: said within ~2 s).
A reader that closes the pipe early (``luanette-cli ... | head -1``) ends it quietly
with status 0.

``--json`` prints one reply payload of the protocol on stdout, whatever the command
(see :func:`run`); ``watch`` prints broadcasts, one JSON object a line.
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


CLI_CODES = {EXIT_ERROR_REPLY: "cli_error", EXIT_USAGE: "cli_usage", EXIT_TIMEOUT: "cli_no_reply"}
"""The ``code`` of the Error payload ``--json`` prints for a failure of the CLI's own,
by exit status (the daemon's codes never start with ``cli_``)."""


class CliError(Exception):
    """A failure to report in one line with an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def payload(self) -> t.Error:
        """The failure as the Error payload ``--json`` prints."""
        return t.Error(code=CLI_CODES.get(self.status, "cli_error"), message=str(self), details=None)


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
    sub.add_parser("workers", help="the Lua workers, local and remote, and the runs waiting for one (lua://workers)")
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
    ru.add_argument("--priority", type=int, default=None, metavar="N",
                    help="queue priority from -10 to 10 (default 0): higher starts first; running jobs "
                    "are never interrupted")
    ru.add_argument("--wait", action="store_true", help="show progress and print the result when done")
    ru.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="with --wait: print a progress line on stderr at each change (default: a live "
                    "line when stderr is a terminal, progress lines when stdout is not one)")

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

    plg = sub.add_parser("plugin", help="plugins and their hooks (docs/plugins.md)").add_subparsers(
        dest="action", required=True
    )
    plg.add_parser("list", help="plugins, loaded or failed with their error")
    plg.add_parser("load", help="load a stored script tagged 'plugin' (HASH) or a --plugins file (NAME)").add_argument(
        "plugin", metavar="HASH|NAME"
    )
    plg.add_parser("unload", help="run a plugin's cleanup and drop its hooks").add_argument("name")
    plg.add_parser("reload", help="unload a plugin and load it again from its origin").add_argument("name")

    flw = sub.add_parser("flow", help="state-machine flows (docs/plugins.md#flows)").add_subparsers(
        dest="action", required=True
    )
    flw.add_parser("register", help="register the flow a module's define() returns").add_argument(
        "source", metavar="HASH|PLUGIN", help="a stored script's hash or a loaded plugin's name"
    )
    fs = flw.add_parser("start", help="start an instance of a registered flow")
    fs.add_argument("definition", metavar="FLOW_ID")
    fs.add_argument("--context", default=None, help="JSON object merged over the definition's context")
    fs.add_argument("--subject", default="", help="what the instance is about (e.g. a region id)")
    fs.add_argument("--user", default=None, help="act as this user (admins only)")
    fn = flw.add_parser("send", help="send an action to an instance; prints the TransitionResult")
    fn.add_argument("instance")
    fn.add_argument("flow_action", metavar="ACTION")  # "action" is the subcommand's
    fn.add_argument("--data", default=None, help="JSON value handed to the guard and handlers")
    fn.add_argument("--user", default=None, help="act as this user (admins only)")
    flw.add_parser("get", help="one instance with its history").add_argument("instance")
    fl = flw.add_parser("list", help="instances, newest first (or --definitions)")
    fl.add_argument("--subject", default=None)
    fl.add_argument("--state", default=None)
    fl.add_argument("--definition", default=None, metavar="FLOW_ID")
    fl.add_argument("--limit", type=int, default=100)
    fl.add_argument("--definitions", action="store_true", help="list the registered definitions instead")

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
    if args.command == "workers":
        return t.ReadResource(uri=WORKERS_URI)
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
        priority = msgspec.UNSET if args.priority is None else args.priority
        return t.JobExecute(script_hash=args.hash, params=params, tags=args.tag, priority=priority)
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
    if args.command == "plugin":
        match args.action:
            case "list":
                return t.PluginList()
            case "load":
                return t.PluginLoad(plugin=args.plugin)
            case "unload":
                return t.PluginUnload(name=args.name)
            case _:
                return t.PluginReload(name=args.name)
    if args.command == "flow":
        match args.action:
            case "register":
                return t.FlowRegister(source=args.source)
            case "start":
                context = None if args.context is None else _json_arg(args.context, "--context")
                return t.FlowStart(definition=args.definition, context=context, subject=args.subject, user=args.user)
            case "send":
                data = None if args.data is None else _json_arg(args.data, "--data")
                return t.FlowSend(instance=args.instance, action=args.flow_action, data=data, user=args.user)
            case "get":
                return t.FlowGet(instance=args.instance)
            case _:
                return t.FlowList(subject=args.subject, state=args.state, definition=args.definition,
                                  limit=args.limit, definitions=args.definitions)  # fmt: skip
    try:
        return payload_codec.decode(args.payload.encode(), Encoding.JSON)
    except DecodeError as e:
        raise CliError(f"not a payload: {e}", EXIT_USAGE) from None


def _dump(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _value(result: Any) -> str:
    return result if isinstance(result, str) else _dump(result)


WORKERS_URI = "lua://workers"
WORKER_COLUMNS = ("NAME", "GROUP", "HOST", "STATE", "RUNS", "HEARTBEAT", "CAPABILITIES")


def workers_view(reply: t.Payload) -> t.Payload:
    """``workers``: the reply to its ``read_resource`` of ``lua://workers`` turned into
    a ``success`` whose result is the resource itself, ``{workers, pool}`` (what
    ``--json`` prints); any other reply as it is."""
    if not isinstance(reply, t.Success):
        return reply
    try:
        (content,) = reply.result["contents"]
        return t.Success(result=msgspec.json.decode(content["text"]))
    except (KeyError, TypeError, ValueError, msgspec.DecodeError) as e:
        raise CliError(f"unreadable {WORKERS_URI}: {e}", EXIT_ERROR_REPLY) from None


def _heartbeat(seconds: Any) -> str:
    return f"{seconds:.1f} s ago" if isinstance(seconds, int | float) else "-"


def render_workers(view: dict[str, Any]) -> str:
    """The workers as a table (one line a worker), then one line a group and the runs
    waiting for a worker."""
    rows = [WORKER_COLUMNS]
    for w in view.get("workers", []):
        host = w.get("hostname") or "-"
        if w.get("pid"):
            host = f"{host}:{w['pid']}" if host != "-" else f"pid {w['pid']}"
        rows.append((
            str(w.get("name", "")),
            str(w.get("group", "")) + (" (remote)" if w.get("remote") else ""),
            host,
            str(w.get("state", "")),
            f"{w.get('runs', 0)}/{w.get('capacity', 0)}",
            _heartbeat(w.get("last_heartbeat_s")),
            ",".join(w.get("capabilities") or []) or "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(WORKER_COLUMNS) - 1)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
             for row in rows]  # fmt: skip
    pool = view.get("pool") or {}
    for name, group in sorted((pool.get("groups") or {}).items()):
        lines.append(
            f"group {name}: {group.get('workers', 0)} workers, {group.get('busy', 0)} busy, "
            f"{group.get('idle', 0)} idle, {group.get('runs', 0)}/{group.get('capacity', 0)} runs"
        )
    waiting = pool.get("waiting") or 0
    oldest = pool.get("oldest_waiting_s")
    since = f" (the oldest for {oldest:.1f} s)" if waiting and isinstance(oldest, int | float) else ""
    lines.append(f"{waiting} runs waiting for a worker{since}")
    return "\n".join(lines)


def _plugin_line(plugin: dict[str, Any]) -> str:
    if plugin.get("state") == "failed":
        error = plugin.get("error") or {}
        return f"{plugin['name']}  failed  {plugin['origin']}  {error.get('kind')}: {error.get('message')}"
    events = ", ".join(s["event"] for s in plugin.get("subscriptions", []))
    return f"{plugin['name']}  loaded  {plugin['origin']}  [{events}]"


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
        case t.Success(result=dict(info)) if command == "run" and args.wait:  # the finished JobInfo
            return _value(info.get("result"))
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
        case t.Success(result=dict(view)) if command == "workers":
            return render_workers(view)
        case t.Success(result=list(found)) if command == "plugin" and action == "list":
            return "\n".join(_plugin_line(p) for p in found)
        case t.Success(result={"unloaded": True, "name": name}):
            return f"unloaded {name}"
        case t.Success(result=dict(plugin)) if command == "plugin":
            return _plugin_line(plugin)
        case t.Success(result=list(found)) if command == "flow" and action == "list" and not args.definitions:
            return "\n".join(f"{f['id']}  {f['definition_id']}  {f['current_state']}  {f['subject']}" for f in found)
        case t.Success(result={"type": "success", "new_state": state, "from_state": old, "action": act}):
            return f"{old} --{act}--> {state}"
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
    """Carry out the command line, print the outcome, return the exit status.

    With ``--json`` the outcome is one protocol reply payload, a JSON object whose
    ``type`` says what it is: the daemon's reply to the command's request (``success``
    with ``result``, ``error`` with ``code``/``message``/``details``, or the request's
    own reply such as ``pong``); for ``run --wait`` the reply ``job_status`` gives for
    the finished job (``success``, ``result`` its JobInfo; exit 1 unless it completed);
    for ``workers`` a ``success`` whose ``result`` is ``lua://workers``' ``{workers, pool}``;
    for a failure of the CLI itself an ``error`` with a ``cli_*`` code (:data:`CLI_CODES`).
    """
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
            reply = await wait_for_job(client, args, reply.result["job_id"])
    if args.command == "workers":
        reply = workers_view(reply)
    unfinished = _unfinished_job(args, reply)
    if args.json:
        out(msgspec.json.encode(reply).decode())
        return EXIT_ERROR_REPLY if isinstance(reply, t.Error) or unfinished else 0
    if isinstance(reply, t.Error):
        raise CliError(f"error [{reply.code}]: {reply.message}", EXIT_ERROR_REPLY)
    if unfinished:
        raise CliError(unfinished, EXIT_ERROR_REPLY)
    out(render(args, reply))
    return 0


def _unfinished_job(args: argparse.Namespace, reply: t.Payload) -> str | None:
    """For ``run --wait``, the one line saying why the job did not complete (None if
    it did, or for any other command)."""
    if not (args.command == "run" and args.wait and isinstance(reply, t.Success)):
        return None
    info = reply.result
    if info["status"] == "complete":
        return None
    err = info.get("error") or {}
    where = f" (line {err['line']})" if err.get("line") is not None else ""
    return f"job {info['job_id']} {info['status']}: {err.get('kind', '')}: {err.get('message', '')}{where}"


def _progress_mode(args: argparse.Namespace) -> str | None:
    """How ``run --wait`` shows progress: "live" (one line rewritten on the terminal),
    "lines" (a line a change, for logs and pipes) or None."""
    if args.progress is not None:
        return "lines" if args.progress else None
    if sys.stderr.isatty():
        return "live"
    return None if sys.stdout.isatty() else "lines"


def _progress_text(job_id: str, status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    percent = progress.get("percent")
    shown = f"{status['status']:<9} {percent:5.1f}%" if percent is not None else status["status"]
    note = progress.get("message") or ""
    return f"{job_id}  {shown}  {note}".rstrip()


async def wait_for_job(client: Client, args: argparse.Namespace, job_id: str) -> t.Payload:
    """``run --wait``: poll until the job ends, showing its progress on stderr (see
    :func:`_progress_mode`); returns the finished job as ``job_status`` answers it (a
    Success with its JobInfo), or the Error a poll got."""
    mode = _progress_mode(args)
    started = time.monotonic()
    shown = None
    while True:
        polled = await _ask(client, args, t.JobPoll(job_ids=[job_id], timeout_ms=250, mode=t.PollMode.ALL))
        if not isinstance(polled, t.Success):
            return polled
        if polled.result["completed"]:
            info = polled.result["completed"][0]
            break
        if mode is None:
            continue
        status = await _ask(client, args, t.JobStatusRequest(job_id=job_id))
        if not isinstance(status, t.Success):
            return status
        text = _progress_text(job_id, status.result)
        if mode == "live":
            print(f"\r{text[:90]:<90}  {time.monotonic() - started:6.1f} s", end="", file=sys.stderr, flush=True)
        elif text != shown:
            print(f"{text}  ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
        shown = text
    if mode == "live":
        print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)
    elif mode == "lines":
        print(f"{_progress_text(job_id, info)}  ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    return t.Success(result=info)


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


def _out(text: str) -> None:
    # a line at a time, so a reader such as `head -1` gets each one as it is made
    print(text, flush=True)


def _quiet_stdout() -> None:
    """After the reader closed stdout: point it at /dev/null, so that the interpreter's
    own flush at exit finds nothing to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """The ``luanette-cli`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status = anyio.run(run, args, _out)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # the reader has all it wanted (`| head -1`): not a failure, as with other CLIs
        _quiet_stdout()
        return 0
    except CliError as e:
        if args.json:
            _out(msgspec.json.encode(e.payload()).decode())
        print(f"luanette-cli: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
