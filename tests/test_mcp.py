"""``luanette mcp`` (issue 12, item 4) driven by the MCP SDK's own client, over stdio
(the server spawned as a desktop client would) and over streamable HTTP, against a real
daemon: every tool kind, every resource URI kind, every prompt, completions, progress
notifications, and a daemon that is down."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import mcp_types as mt
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from luanette import auth
from luanette.cli import mcp as mcp_cli
from luanette.cli.daemon import build_parser
from luanette.mcpserver import Progress, build_request
from tests.conftest import BIN, free_port

pytestmark = pytest.mark.timeout(180)

# generous: the spawned server imports the SDK (seconds on a loaded machine)
STEP_S = 60

SLOW = """
function describe()
  return {name = "slow", description = "counts to n with progress", params = {n = {type = "number"}}}
end
function main(p)
  for i = 1, p.n do
    progress.update(100 * i / p.n, "step " .. i)
    clock.sleep(200)
  end
  return {counted = p.n}
end
"""

FAILING = """
function describe() return {name = "failing", description = "always fails", params = {}} end
function main(p) error("boom") end
"""


def server_args(endpoint: str, *extra: str) -> list[str]:
    return ["mcp", "--endpoint", endpoint, *extra]


@asynccontextmanager
async def over_stdio(endpoint: str, *extra: str, env: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized SDK client session with ``luanette mcp`` spawned over stdio."""
    params = StdioServerParameters(command=str(BIN / "luanette"), args=server_args(endpoint, *extra), env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        with anyio.fail_after(STEP_S):
            await session.initialize()
        yield session


class HttpServer:
    """``luanette mcp --http 127.0.0.1:PORT`` as a process."""

    def __init__(self, endpoint: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        # a file, not a pipe: nobody reads the server's stderr while it runs
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(BIN / "luanette"), *server_args(endpoint, "--http", f"127.0.0.1:{self.port}", *extra)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )

    def wait_listening(self) -> None:
        deadline = time.monotonic() + STEP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stderr.seek(0)
                raise RuntimeError(f"luanette mcp exited: {self.stderr.read().decode()}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("luanette mcp --http did not start listening")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture
def http_server():
    """Factory: ``http_server(endpoint, *extra)`` -> a listening HttpServer (stopped at teardown)."""
    started: list[HttpServer] = []

    def make(endpoint: str, *extra: str) -> HttpServer:
        server = HttpServer(endpoint, *extra)
        started.append(server)
        server.wait_listening()
        return server

    yield make
    for server in started:
        server.stop()


@asynccontextmanager
async def over_http(url: str) -> AsyncIterator[ClientSession]:
    """An initialized SDK client session with a ``luanette mcp --http`` server."""
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        with anyio.fail_after(STEP_S):
            await session.initialize()
        yield session


def structured(result: mt.CallToolResult) -> dict:
    assert not result.is_error, result.content
    assert isinstance(result.content[0], mt.TextContent)
    # the JSON text and the structured content say the same
    text = json.loads(result.content[0].text)
    assert result.structured_content == (text if isinstance(text, dict) else {"result": text})
    return result.structured_content


async def call(session: ClientSession, name: str, arguments: dict, **kw) -> mt.CallToolResult:
    with anyio.fail_after(STEP_S):
        return await session.call_tool(name, arguments, **kw)


async def exercise_everything(session: ClientSession) -> None:
    """List and call every tool kind, read every resource kind, get every prompt,
    complete arguments: what issue 12 asks of an MCP client."""
    with anyio.fail_after(STEP_S):
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    for name in ("ping", "lua_eval", "script_store", "job_execute", "job_status", "job_poll", "read_resource",
                 "list_prompts", "get_prompt", "complete", "job_cancel"):
        assert name in tools, name
    assert "success" not in tools and "error" not in tools
    for tool in tools.values():
        assert tool.description and len(tool.description) >= 60, tool.name
        assert tool.input_schema["type"] == "object"
    assert tools["job_execute"].input_schema["properties"]["wait"]["type"] == "boolean"
    assert tools["ping"].annotations is not None and tools["ping"].annotations.read_only_hint
    assert tools["shutdown"].annotations is not None and tools["shutdown"].annotations.destructive_hint

    # tools: ping, lua_eval (ok and failing), script_store, job_execute, job_status
    assert structured(await call(session, "ping", {}))["type"] == "pong"
    assert structured(await call(session, "lua_eval", {"code": "return params.a + 1", "params": {"a": 41}}))[
        "result"] == 42
    failed = await call(session, "lua_eval", {"code": "return nil + 1"})
    assert failed.is_error
    assert failed.structured_content["code"] == "lua_error"
    assert failed.structured_content["details"]["kind"] == "lua_runtime"
    assert "error [lua_error]" in failed.content[0].text
    bad = await call(session, "job_status", {"job_id": 7})
    assert bad.is_error and bad.structured_content["code"] == "invalid_params"
    assert "arguments.job_id" in bad.structured_content["message"]

    script = structured(await call(session, "script_store", {"content": SLOW, "tags": ["mcp-test"]}))["hash"]
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    # a progress token: the call follows the job and reports its progress
    done = structured(await call(session, "job_execute", {"script_hash": script, "params": {"n": 10}},
                                 progress_callback=on_progress))
    assert done["status"] == "complete" and done["result"] == {"counted": 10}
    assert len(updates) >= 3, updates
    values = [u[0] for u in updates]
    assert values == sorted(values) and len(set(values)) == len(values), "progress must only grow"
    assert values[-1] == 100 and all(u[1] == 100 for u in updates)
    assert any(u[2] and "step" in u[2] for u in updates), updates

    # no token: answered at once with the job id, which job_status then shows
    started = structured(await call(session, "job_execute", {"script_hash": script, "params": {"n": 1}}))
    job_id = started["job_id"]
    assert structured(await call(session, "job_status", {"job_id": job_id}))["job_id"] == job_id
    polled = structured(await call(session, "job_poll", {"job_ids": [job_id], "timeout_ms": 20000, "mode": "all"}))
    assert polled["completed"][0]["status"] == "complete"

    # wait=true without a token; a failing job is a tool error carrying its JobInfo
    failing = structured(await call(session, "script_store", {"content": FAILING}))["hash"]
    ended = await call(session, "job_execute", {"script_hash": failing, "params": {}, "wait": True})
    assert ended.is_error and ended.structured_content["code"] == "job_failed"
    assert ended.structured_content["details"]["status"] == "failed"
    assert "boom" in ended.structured_content["message"]
    failed_job = ended.structured_content["details"]["job_id"]

    # resources: every URI kind, fixed and templated
    with anyio.fail_after(STEP_S):
        listed = {str(r.uri): r for r in (await session.list_resources()).resources}
        templates = {r.uri_template for r in (await session.list_resource_templates()).resource_templates}
    assert {"lua://namespaces", "lua://examples", "lua://jobs", "lua://jobs/stats", "lua://tools"} <= set(listed)
    assert "lua://workers" in listed
    assert {"lua://scripts/{hash}", "lua://jobs/{id}", "lua://examples/{name}", "lua://namespaces/{name}"} <= templates
    assert listed["lua://examples"].mime_type == "application/json"
    reads = {
        "lua://namespaces": "application/json",
        "lua://namespaces/midi": "application/json",
        "lua://examples": "application/json",
        "lua://examples/hello": "text/x-lua",
        f"lua://scripts/{script}": "text/x-lua",
        "lua://jobs": "application/json",
        f"lua://jobs/{job_id}": "application/json",
        "lua://jobs/stats": "application/json",
        "lua://tools": "application/json",
        "lua://workers": "application/json",
        "luanette://jobs/stats": "application/json",
    }
    for uri, mime in reads.items():
        with anyio.fail_after(STEP_S):
            contents = (await session.read_resource(uri)).contents
        assert contents and contents[0].mime_type == mime, uri
        assert isinstance(contents[0], mt.TextResourceContents) and contents[0].text, uri
    with anyio.fail_after(STEP_S):
        script_read = (await session.read_resource(f"lua://scripts/{script}")).contents
    assert "progress.update" in script_read[0].text
    assert json.loads(script_read[1].text)["describe"]["name"] == "slow"
    with pytest.raises(MCPError) as missing:
        with anyio.fail_after(STEP_S):
            await session.read_resource("lua://nothing/here")
    assert missing.value.code == -32602 and missing.value.data["code"] == "not_found"

    # prompts: every one, filled in with live context
    with anyio.fail_after(STEP_S):
        prompts = {p.name: p for p in (await session.list_prompts()).prompts}
    assert set(prompts) >= {"write-script", "debug-script", "explain-script", "midi-workflow"}
    assert any(a.name == "task" and a.required for a in prompts["write-script"].arguments or [])
    arguments = {
        "write-script": {"task": "transpose a melody up a fifth"},
        "debug-script": {"hash": failing, "job_id": failed_job},
        "explain-script": {"hash": script},
        "midi-workflow": {"operation": "transpose"},
    }
    for name, args in arguments.items():
        with anyio.fail_after(STEP_S):
            prompt = await session.get_prompt(name, args)
        assert prompt.messages and prompt.messages[0].role == "user", name
        assert isinstance(prompt.messages[0].content, mt.TextContent) and prompt.messages[0].content.text, name
    with anyio.fail_after(STEP_S):
        debug = await session.get_prompt("debug-script", arguments["debug-script"])
    assert isinstance(debug.messages[0].content, mt.TextContent) and "boom" in debug.messages[0].content.text
    with pytest.raises(MCPError) as no_task:
        with anyio.fail_after(STEP_S):
            await session.get_prompt("write-script", {})
    assert no_task.value.data["code"] == "invalid_params"

    # completions: prompt arguments and resource template variables
    async def complete(ref: mt.PromptReference | mt.ResourceTemplateReference, name: str, value: str) -> list[str]:
        with anyio.fail_after(STEP_S):
            return (await session.complete(ref, {"name": name, "value": value})).completion.values

    assert await complete(mt.PromptReference(name="midi-workflow"), "operation", "tr") == ["transpose"]
    assert script in await complete(mt.PromptReference(name="explain-script"), "hash", script[:6])
    assert job_id in await complete(mt.ResourceTemplateReference(uri="lua://jobs/{id}"), "id", job_id[:4])
    assert "hello" in await complete(mt.ResourceTemplateReference(uri="lua://examples/{name}"), "name", "he")
    assert "midi" in await complete(mt.ResourceTemplateReference(uri="lua://namespaces/{name}"), "name", "mi")


def sample_arguments(schema: dict, defs: dict | None = None) -> dict:
    """The smallest arguments a tool's JSON Schema accepts (required fields only, each a
    plain value of its type), so a call reaches the daemon whatever it then answers."""
    defs = schema.get("$defs", defs or {})

    def value(prop: dict) -> object:
        if "$ref" in prop:
            return value(defs[prop["$ref"].rsplit("/", 1)[1]])
        if "enum" in prop:
            return prop["enum"][0]
        for key in ("anyOf", "oneOf"):
            if key in prop:
                options = [o for o in prop[key] if o.get("type") != "null"]
                return value(options[0]) if options else None
        kind = prop.get("type")
        kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
        if prop.get("format") == "uuid":
            return "00000000-0000-0000-0000-000000000001"
        if kind == "object" and "properties" in prop:
            return sample_arguments(prop, defs)
        return {"string": "x", "integer": 1, "number": 1.0, "boolean": False, "array": [], "object": {}}.get(
            kind or "", None)

    props = schema.get("properties", {})
    return {name: value(props[name]) for name in schema.get("required", [])}


async def test_every_listed_tool_reaches_the_daemon(server):
    """Each tool the daemon lists is callable through MCP: the call arrives as its request
    and the daemon's own answer (a result, or its error code) comes back."""
    async with over_stdio(server.endpoint) as session:
        with anyio.fail_after(STEP_S):
            tools = (await session.list_tools()).tools
        answered = {}
        for tool in sorted(tools, key=lambda t: t.name == "shutdown"):  # shutdown last
            result = await call(session, tool.name, sample_arguments(tool.input_schema))
            if result.is_error:
                code = result.structured_content["code"]
                # refused by the MCP layer itself would mean the tool is not callable
                assert code not in ("invalid_params", "daemon_unavailable", "daemon_timeout", "unknown_tool") or \
                    "arguments." not in result.structured_content["message"], (tool.name, result.structured_content)
                answered[tool.name] = code
            else:
                answered[tool.name] = "ok"
    assert len(answered) == len(tools) >= 20
    assert answered["ping"] == "ok" and answered["list_tools"] == "ok"


async def test_stdio_client_uses_every_tool_resource_prompt_and_completion(server):
    async with over_stdio(server.endpoint) as session:
        await exercise_everything(session)


async def test_http_client_uses_every_tool_resource_prompt_and_completion(server, http_server):
    mcp = await anyio.to_thread.run_sync(http_server, server.endpoint)
    async with over_http(mcp.url) as session:
        await exercise_everything(session)


async def test_daemon_process_over_stdio_with_curve(daemon_process, tmp_path):
    keys = tmp_path / "keys"
    auth.init(keys)
    daemon = await anyio.to_thread.run_sync(daemon_process, "--curve", str(keys / "server"))
    client_dir = keys / "client"
    async with over_stdio(daemon.endpoint, "--curve", str(client_dir)) as session:
        assert structured(await call(session, "ping", {}))["type"] == "pong"
        assert structured(await call(session, "lua_eval", {"code": "return 'curve'"}))["result"] == "curve"
    # without keys the handshake fails: a clear tool error, not a hang
    async with over_stdio(daemon.endpoint) as session:
        refused = await call(session, "ping", {})
        assert refused.is_error and refused.structured_content["code"] == "daemon_unavailable"
        assert "CURVE" in refused.structured_content["message"]


async def test_daemon_down_gives_clear_errors_not_a_hang(http_server):
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    async with over_stdio(endpoint, "--connect-timeout", "1") as session:
        # the tools are still listed (from this version's tables), so a client that
        # started before the daemon knows them
        with anyio.fail_after(STEP_S):
            names = {tool.name for tool in (await session.list_tools()).tools}
        assert {"ping", "lua_eval", "job_execute"} <= names
        down = await call(session, "lua_eval", {"code": "return 1"})
        assert down.is_error and down.structured_content["code"] == "daemon_unavailable"
        assert endpoint in down.structured_content["message"]
        for attempt in (session.list_resources(), session.list_prompts(), session.read_resource("lua://jobs")):
            with pytest.raises(MCPError) as e:
                with anyio.fail_after(STEP_S):
                    await attempt
            assert e.value.data["code"] == "daemon_unavailable"
    mcp = await anyio.to_thread.run_sync(http_server, endpoint, "--connect-timeout", "1")
    async with over_http(mcp.url) as session:
        down = await call(session, "ping", {})
        assert down.is_error and down.structured_content["code"] == "daemon_unavailable"


async def test_hidden_tools_are_neither_listed_nor_callable(server):
    async with over_stdio(server.endpoint, "--hide", "shutdown", "--hide", "register") as session:
        with anyio.fail_after(STEP_S):
            names = {tool.name for tool in (await session.list_tools()).tools}
        assert "shutdown" not in names and "register" not in names and "ping" in names
        refused = await call(session, "shutdown", {"reason": "no"})
        assert refused.is_error and refused.structured_content["code"] == "not_offered"
        assert structured(await call(session, "ping", {}))["type"] == "pong"  # the daemon is still up


async def test_cancelling_a_waiting_call_cancels_its_job(server, client):
    from hooteproto import types as t

    async with over_stdio(server.endpoint) as session:
        script = structured(await call(session, "script_store", {"content": SLOW}))["hash"]
        with anyio.move_on_after(3):  # the SDK sends notifications/cancelled on the way out
            await session.call_tool("job_execute", {"script_hash": script, "params": {"n": 400}, "wait": True})
        # the job the abandoned call started is cancelled
        async def cancelled() -> bool:
            jobs = (await client.request(t.JobList(status="cancelled"))).result
            return any(j["source"] == script for j in jobs)

        with anyio.fail_after(STEP_S):
            while not await cancelled():
                await anyio.sleep(0.1)


def test_tool_arguments_become_the_request_of_that_name():
    from hooteproto import types as t

    assert build_request("job_status", {"job_id": "j1"}) == t.JobStatusRequest(job_id="j1")
    assert build_request("ping", {}) == t.Ping()
    for name, arguments, says in [
        ("no_such_tool", {}, "no such tool"),
        ("success", {"result": 1}, "reply"),
        ("job_status", {}, "job_id"),
        ("ping", {"type": "pong"}, "type"),
    ]:
        with pytest.raises(ValueError, match=says):
            build_request(name, arguments)


async def test_progress_values_only_grow():
    sent: list[float] = []

    async def send(progress: float, total: float | None, message: str | None) -> None:
        sent.append(progress)

    report = Progress(send)
    for percent, message in [(0, "a"), (10, "b"), (10, "c"), (5, "d"), (100, "e"), (100, "f")]:
        await report(percent, message)
    assert sent == sorted(sent) and len(set(sent)) == len(sent) and sent[-1] == 100


def test_http_refuses_a_non_loopback_address_without_insecure(capsys):
    args = build_parser().parse_args(["mcp", "--http", "0.0.0.0:8765"])
    assert mcp_cli.run(args) == 2
    assert "--insecure" in capsys.readouterr().err
    assert mcp_cli.http_address("[::1]:80") == ("::1", 80)
    with pytest.raises(Exception, match="HOST:PORT"):
        mcp_cli.http_address("8765")


def test_docs_show_the_client_configuration():
    text = (Path(__file__).resolve().parents[1] / "docs" / "mcp.md").read_text()
    config = json.loads(text.split("```json", 1)[1].split("```", 1)[0])
    server = config["mcpServers"]["luanette"]
    assert server["command"] == "luanette" and server["args"][0] == "mcp"
    assert "--http 127.0.0.1:" in text and "/mcp" in text
