"""``luanette mcp``: a Model Context Protocol server in front of a running daemon.

Built on the official ``mcp`` SDK's low-level :class:`mcp.server.lowlevel.Server`, so
each MCP request maps onto one hooteproto request and nothing is answered locally that
the daemon would answer differently: tools are ``list_tools`` (a call sends the request
of that name), resources ``list_resources``/``read_resource``, prompts
``list_prompts``/``get_prompt``, completions ``complete`` (docs/mcp.md).

The daemon may be down, restarted or behind CURVE: every exchange opens its own
connection, bounded by ``connect_within`` for the handshake and ``timeout`` for the
reply, so a client gets a clear error instead of a hang, and a restarted daemon is
reached again without restarting this server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as mt
import msgspec
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS

from hooteproto import types as t
from hooteproto.client import Client, ConnectionFailed, CurveKeys, RequestTimeout
from hooteproto.codec import DecodeError
from hooteproto.results import CompletionResult, PromptList, PromptResult, ResourceInfo, ResourceRead

SERVER_NAME = "luanette"

INSTRUCTIONS = (
    "Luanette runs sandboxed Lua 5.4 scripts for a music-production stack (MIDI, models, CAS). "
    "Try code with lua_eval; store a script with script_store and run it as a job with job_execute "
    "(pass wait=true, or a progress token, to wait for the result with progress notifications); "
    "read lua://namespaces for the Lua API and lua://examples for example scripts; the write-script "
    "prompt gathers both."
)

REPLY_TAGS = frozenset(t.tag_of(cls) for cls in (t.Success, t.Error, t.Pong, t.ToolList))
"""Payload variants that are replies, never tools."""

READ_ONLY = frozenset({
    "ping", "list_tools", "lua_describe", "script_search", "job_status", "job_list", "job_poll",
    "list_resources", "read_resource", "list_prompts", "get_prompt", "complete",
    "session_list", "session_show",
})  # fmt: skip
DESTRUCTIVE = frozenset({"shutdown", "job_cancel", "session_discard", "session_commit"})

WAIT_FIELD = "wait"
WAIT_SCHEMA = {
    "type": "boolean",
    "description": (
        "MCP only: wait until the job ends and return its JobInfo (result or error) instead of the job id, "
        "sending progress notifications meanwhile. Default: wait when the call carries a progress token."
    ),
}

POLL_MS = 250
"""How long one job_poll waits while following a job: short enough that progress
notifications keep up with the job (as ``luanette-cli run --wait`` does), long enough
not to busy the daemon."""


@dataclass(frozen=True)
class Options:
    """How the MCP server reaches the daemon and how long it waits for it."""

    endpoint: str
    curve: CurveKeys | None = None
    timeout: float = 30.0
    """Longest wait for one reply of the daemon (seconds)."""
    connect_within: float = 2.0
    """Longest wait for the daemon to accept a connection before a call fails."""
    wait_timeout: float = 600.0
    """Longest a ``job_execute`` with ``wait`` follows its job; then it returns the job
    as it is (still running) and the client follows it with job_poll."""
    hidden: frozenset[str] = field(default_factory=frozenset)
    """Requests not offered as tools (e.g. ``shutdown``)."""


class DaemonUnavailable(Exception):
    """The daemon could not be reached or did not answer in time; ``code`` says which
    (``daemon_unavailable`` or ``daemon_timeout``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Daemon:
    """The hooteproto side: one connection per exchange (see the module docstring)."""

    def __init__(self, options: Options) -> None:
        self.options = options

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Client]:
        """A client whose handshake with the daemon succeeded; raises
        :class:`DaemonUnavailable` when none does within ``connect_within``."""
        async with Client(self.options.endpoint, curve=self.options.curve) as client:
            try:
                await client.connected(within=self.options.connect_within)
            except ConnectionFailed as e:
                raise DaemonUnavailable("daemon_unavailable", f"the Luanette daemon cannot be reached: {e}") from None
            yield client

    async def ask(self, client: Client, payload: t.Payload, *, extra_s: float = 0.0) -> t.Payload:
        """Send ``payload`` on ``client`` and return the reply; raises
        :class:`DaemonUnavailable` when it does not come within the timeout."""
        try:
            return await client.request(payload, timeout=self.options.timeout + extra_s)
        except RequestTimeout:
            raise DaemonUnavailable(
                "daemon_timeout",
                f"no reply from the Luanette daemon at {self.options.endpoint} within "
                f"{self.options.timeout + extra_s:g} s",
            ) from None
        except DecodeError as e:
            raise DaemonUnavailable("bad_reply", f"unreadable reply from the daemon: {e}") from None

    async def request(self, payload: t.Payload) -> t.Payload:
        """One request on a connection of its own."""
        async with self.connect() as client:
            return await self.ask(client, payload)


# --- replies to MCP results -------------------------------------------------------------


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _as_object(value: Any) -> dict[str, Any]:
    # 2025-era clients accept only an object as structured content
    return value if isinstance(value, dict) else {"result": value}


def tool_error(code: str, message: str, details: Any = None) -> mt.CallToolResult:
    """A failed call as MCP wants it (``is_error``, so the model can read and react):
    the daemon's ``code``, ``message`` and ``details``, as text and as structure."""
    error = {"code": code, "message": message, "details": details}
    text = f"error [{code}]: {message}"
    if details is not None:
        text += f"\ndetails: {_json(details)}"
    return mt.CallToolResult(content=[mt.TextContent(text=text)], structured_content=error, is_error=True)


def tool_result(reply: t.Payload) -> mt.CallToolResult:
    """The daemon's reply to a tool call as an MCP result: ``Success`` gives its result
    (JSON text and structured content), ``Error`` a tool error, any other reply (``pong``,
    ``tool_list``) the reply itself."""
    if isinstance(reply, t.Error):
        return tool_error(reply.code, reply.message, reply.details)
    value = reply.result if isinstance(reply, t.Success) else msgspec.to_builtins(reply)
    return mt.CallToolResult(content=[mt.TextContent(text=_json(value))], structured_content=_as_object(value))


def _protocol_error(reply: t.Payload, what: str) -> MCPError:
    """A JSON-RPC error for a non-tool request the daemon refused; ``data`` carries the
    daemon's own code, message and details."""
    if isinstance(reply, t.Error):
        code = INVALID_PARAMS if reply.code in ("invalid_params", "not_found") else INTERNAL_ERROR
        data = {"code": reply.code, "message": reply.message, "details": reply.details}
        return MCPError(code, f"{what}: {reply.message}", data)
    return MCPError(INTERNAL_ERROR, f"{what}: unexpected reply {t.tag_of(type(reply))!r}")


def _unavailable(e: DaemonUnavailable) -> MCPError:
    return MCPError(INTERNAL_ERROR, e.message, {"code": e.code, "message": e.message, "details": None})


def _success(reply: t.Payload, what: str) -> Any:
    if not isinstance(reply, t.Success):
        raise _protocol_error(reply, what)
    return reply.result


def _convert(value: Any, kind: Any, what: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as e:
        raise MCPError(INTERNAL_ERROR, f"{what}: the daemon's reply has an unexpected shape: {e}") from None


# --- tools ------------------------------------------------------------------------------


def mcp_tool(info: t.ToolInfo) -> mt.Tool:
    """An MCP tool for one of the daemon's requests (``job_execute`` gains ``wait``)."""
    schema = dict(info.input_schema)
    schema.setdefault("type", "object")
    if info.name == "job_execute":
        schema["properties"] = {**schema.get("properties", {}), WAIT_FIELD: WAIT_SCHEMA}
    annotations = mt.ToolAnnotations(
        read_only_hint=info.name in READ_ONLY,
        destructive_hint=info.name in DESTRUCTIVE,
        idempotent_hint=info.name in READ_ONLY,
    )
    return mt.Tool(name=info.name, description=info.description, input_schema=schema, annotations=annotations)


def local_tools() -> list[t.ToolInfo]:
    """The tools as a daemon of this version lists them, for when none answers: a
    desktop client that starts before the daemon still sees what it can call (and each
    call then says that the daemon is down)."""
    from luanette.dispatch import input_schema
    from luanette.tooldocs import TOOL_DOCS, describe_schema

    by_tag = {t.tag_of(cls): cls for cls in t.variants(t.Payload)}
    tools = []
    for tag in TOOL_DOCS:
        if tag in by_tag:
            description, schema = describe_schema(tag, input_schema(by_tag[tag]))
            tools.append(t.ToolInfo(name=tag, description=description, input_schema=schema))
    return tools


def build_request(name: str, arguments: dict[str, Any]) -> t.Payload:
    """The hooteproto request a tool call stands for; raises ValueError with a message
    naming the argument at fault."""
    if name in REPLY_TAGS:
        raise ValueError(f"{name!r} is a reply, not a request")
    if "type" in arguments:
        raise ValueError("unexpected argument 'type'")
    try:
        payload = msgspec.convert({**arguments, "type": name}, t.Payload, strict=False)
    except msgspec.ValidationError as e:
        message = str(e)
        if "Invalid value" in message and "$.type" in message:
            raise ValueError(f"no such tool: {name!r}") from None
        raise ValueError(f"invalid arguments: {message.replace('$.', 'arguments.')}") from None
    return payload


Ctx = ServerRequestContext[Any]

Report = Callable[[float, str], Awaitable[None]]
"""Sends one progress notification: ``(percent 0..100, message)``."""


async def follow_job(daemon: Daemon, client: Client, job_id: str, report: Report) -> mt.CallToolResult:
    """Poll job ``job_id`` until it ends (or ``wait_timeout`` passes), reporting its
    progress on the way; returns its JobInfo (a tool error when it did not complete)."""
    poll = t.JobPoll(job_ids=[job_id], timeout_ms=POLL_MS, mode=t.PollMode.ALL)
    shown: tuple[float, str] | None = None
    with anyio.move_on_after(daemon.options.wait_timeout):
        while True:
            polled = await daemon.ask(client, poll, extra_s=POLL_MS / 1000)
            if not isinstance(polled, t.Success):
                return tool_result(polled)
            if polled.result["completed"]:
                info = polled.result["completed"][0]
                await report(100.0, f"job {job_id} {info['status']}")
                return finished_job(info)
            status = await daemon.ask(client, t.JobStatusRequest(job_id=job_id))
            if not isinstance(status, t.Success):
                return tool_result(status)
            progress = status.result.get("progress") or {}
            now = (float(progress.get("percent") or 0.0), progress.get("message") or status.result["status"])
            if now != shown:
                await report(*now)
                shown = now
    status = await daemon.ask(client, t.JobStatusRequest(job_id=job_id))
    result = tool_result(status)
    if isinstance(status, t.Success):
        note = (f"job {job_id} is still {status.result['status']} after {daemon.options.wait_timeout:g} s "
                "(--wait-timeout); follow it with job_poll or job_status")
        result.content.append(mt.TextContent(text=note))
    return result


def finished_job(info: dict[str, Any]) -> mt.CallToolResult:
    """A job that ended, as ``job_status`` shows it: its JobInfo, a tool error
    (``job_failed``, ``job_cancelled``) unless it completed."""
    if info.get("status") == "complete":
        return tool_result(t.Success(result=info))
    err = info.get("error") or {}
    where = f" (line {err['line']})" if err.get("line") is not None else ""
    message = f"job {info.get('job_id')} {info.get('status')}: {err.get('kind', '')}: {err.get('message', '')}{where}"
    return tool_error(f"job_{info.get('status')}", message, info)


class Progress:
    """MCP progress for one call: values only ever grow (the spec's rule), a message of
    its own at the same percent nudges the value by a hair so it is still sent."""

    def __init__(self, send: Callable[[float, float | None, str | None], Awaitable[None]]) -> None:
        self._send = send
        self._last = -1.0

    async def __call__(self, percent: float, message: str) -> None:
        value = max(min(percent, 100.0), self._last + 0.001) if self._last >= 0 else max(percent, 0.0)
        if value > 100.0:
            value = 100.0
            if self._last >= 100.0:
                return
        self._last = value
        await self._send(round(value, 3), 100.0, message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("luanette")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


# --- the server -------------------------------------------------------------------------


def build_server(options: Options) -> Server[Any]:
    """The MCP server object, its handlers bound to a :class:`Daemon` for ``options``."""
    daemon = Daemon(options)

    async def list_tools(ctx: Ctx, params: mt.PaginatedRequestParams | None) -> mt.ListToolsResult:
        try:
            reply = await daemon.request(t.ListTools())
            infos = reply.tools if isinstance(reply, t.ToolList) else None
        except DaemonUnavailable:
            infos = None
        if infos is None:
            infos = local_tools()
        return mt.ListToolsResult(tools=[mcp_tool(i) for i in infos if i.name not in options.hidden])

    async def call_tool(ctx: Ctx, params: mt.CallToolRequestParams) -> mt.CallToolResult:
        arguments = dict(params.arguments or {})
        if params.name in options.hidden:
            return tool_error("not_offered", f"{params.name} is not offered by this MCP server (--hide)")
        wait = arguments.pop(WAIT_FIELD, None) if params.name == "job_execute" else None
        if wait is not None and not isinstance(wait, bool):
            return tool_error("invalid_params", "invalid arguments: wait must be true or false")
        try:
            request = build_request(params.name, arguments)
        except ValueError as e:
            return tool_error("invalid_params", str(e))
        token = (ctx.meta or {}).get("progress_token")
        follow = wait if wait is not None else token is not None
        try:
            async with daemon.connect() as client:
                reply = await daemon.ask(client, request)
                if not (follow and isinstance(request, t.JobExecute) and isinstance(reply, t.Success)):
                    return tool_result(reply)
                job_id = reply.result["job_id"]
                report = Progress(ctx.session.report_progress)
                await report(0.0, f"job {job_id} started")
                try:
                    return await follow_job(daemon, client, job_id, report)
                except anyio.get_cancelled_exc_class():
                    # the client gave up on the call (notifications/cancelled): the job
                    # it started should not go on unseen
                    with anyio.CancelScope(shield=True), anyio.move_on_after(options.connect_within):
                        await daemon.ask(client, t.JobCancel(job_id=job_id))
                    raise
        except DaemonUnavailable as e:
            return tool_error(e.code, e.message)

    async def resources(kind: str) -> list[ResourceInfo]:
        try:
            result = _success(await daemon.request(t.ListResources()), "list_resources")
        except DaemonUnavailable as e:
            raise _unavailable(e) from None
        infos: list[ResourceInfo] = _convert(result, list[ResourceInfo], "list_resources")
        return [i for i in infos if getattr(i, kind) is not None]

    async def list_resources(
        ctx: Ctx, params: mt.PaginatedRequestParams | None
    ) -> mt.ListResourcesResult:
        return mt.ListResourcesResult(resources=[
            mt.Resource(uri=i.uri or "", name=i.name, description=i.description, mime_type=i.mime_type)
            for i in await resources("uri")
        ])  # fmt: skip

    async def list_resource_templates(
        ctx: Ctx, params: mt.PaginatedRequestParams | None
    ) -> mt.ListResourceTemplatesResult:
        return mt.ListResourceTemplatesResult(resource_templates=[
            mt.ResourceTemplate(uri_template=i.uri_template or "", name=i.name, description=i.description,
                                mime_type=i.mime_type)
            for i in await resources("uri_template")
        ])  # fmt: skip

    async def read_resource(ctx: Ctx, params: mt.ReadResourceRequestParams) -> mt.ReadResourceResult:
        uri = str(params.uri)
        try:
            result = _success(await daemon.request(t.ReadResource(uri=uri)), f"read_resource {uri}")
        except DaemonUnavailable as e:
            raise _unavailable(e) from None
        try:
            read = msgspec.convert(result, ResourceRead)
        except msgspec.ValidationError:
            # luanette://jobs/stats, the older name, answers the bare JobStoreStats
            return mt.ReadResourceResult(
                contents=[mt.TextResourceContents(uri=uri, mime_type="application/json", text=_json(result))]
            )
        return mt.ReadResourceResult(contents=[
            mt.TextResourceContents(uri=c.uri, mime_type=c.mime_type, text=c.text) for c in read.contents
        ])  # fmt: skip

    async def list_prompts(
        ctx: Ctx, params: mt.PaginatedRequestParams | None
    ) -> mt.ListPromptsResult:
        try:
            result = _success(await daemon.request(t.ListPrompts()), "list_prompts")
        except DaemonUnavailable as e:
            raise _unavailable(e) from None
        prompts: PromptList = _convert(result, PromptList, "list_prompts")
        return mt.ListPromptsResult(prompts=[
            mt.Prompt(name=p.name, description=p.description, arguments=[
                mt.PromptArgument(name=a.name, description=a.description, required=a.required) for a in p.arguments
            ])
            for p in prompts.prompts
        ])  # fmt: skip

    async def get_prompt(ctx: Ctx, params: mt.GetPromptRequestParams) -> mt.GetPromptResult:
        request = t.GetPrompt(name=params.name, arguments=dict(params.arguments or {}))
        try:
            result = _success(await daemon.request(request), f"get_prompt {params.name}")
        except DaemonUnavailable as e:
            raise _unavailable(e) from None
        prompt: PromptResult = _convert(result, PromptResult, "get_prompt")
        return mt.GetPromptResult(description=prompt.description, messages=[
            mt.PromptMessage(role=m.role, content=mt.TextContent(text=m.content.text))  # type: ignore[arg-type]
            for m in prompt.messages
        ])  # fmt: skip

    async def complete(ctx: Ctx, params: mt.CompleteRequestParams) -> mt.CompleteResult:
        ref = params.ref
        where = f"prompt:{ref.name}" if isinstance(ref, mt.PromptReference) else ref.uri
        request = t.Complete(context=f"{where}#{params.argument.name}", partial=params.argument.value)
        try:
            result = _success(await daemon.request(request), "complete")
        except DaemonUnavailable as e:
            raise _unavailable(e) from None
        done: CompletionResult = _convert(result, CompletionResult, "complete")
        return mt.CompleteResult(completion=mt.Completion(values=done.values, total=done.total, has_more=done.has_more))

    return Server(
        SERVER_NAME,
        version=_version(),
        title="Luanette",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_resource_templates,
        on_read_resource=read_resource,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_completion=complete,
    )


async def serve_stdio(options: Options) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    from mcp.server.stdio import stdio_server

    server = build_server(options)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


async def serve_http(options: Options, host: str, port: int, *, path: str = "/mcp") -> None:
    """Serve MCP over streamable HTTP at ``http://host:port/path`` until interrupted."""
    import uvicorn

    app = build_server(options).streamable_http_app(streamable_http_path=path, host=host)
    # asyncio, not uvloop: the hooteproto client is zmq.asyncio
    config = uvicorn.Config(app, host=host, port=port, loop="asyncio", log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve()
