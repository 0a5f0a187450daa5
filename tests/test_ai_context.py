"""What AI clients get besides running code, over real sockets: tool descriptions,
resources (lua://...), prompts and completions (issue 12, items 1-3)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import msgspec
import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette import apiref, completions
from luanette.cas import Cas
from luanette.dispatch import input_schema
from luanette.resources import example_names, examples_root
from luanette.settings import load_settings
from luanette.stdlib.registry import namespaces_for
from luanette.tooldocs import TOOL_DOCS

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]

FAILING = """
function describe() return {name = "failing", description = "always fails", params = {}} end
function main(p)
  local x = nil
  return x.field
end
"""


async def ok(c: Client, payload: t.Payload) -> object:
    reply = await c.request(payload)
    assert isinstance(reply, t.Success), reply
    return reply.result


async def err(c: Client, payload: t.Payload) -> t.Error:
    reply = await c.request(payload)
    assert isinstance(reply, t.Error), reply
    return reply


async def store(c: Client, content: str, **kw) -> str:
    return (await ok(c, t.ScriptStore(content=content, **kw)))["hash"]


async def finished_job(c: Client, script_hash: str, params=None) -> dict:
    job_id = (await ok(c, t.JobExecute(script_hash=script_hash, params=params or {})))["job_id"]
    polled = await ok(c, t.JobPoll(job_ids=[job_id], timeout_ms=30000, mode=t.PollMode.ALL))
    assert not polled["timed_out"]
    return polled["completed"][0]


async def read(c: Client, uri: str) -> list[dict]:
    return (await ok(c, t.ReadResource(uri=uri)))["contents"]


# --- 1. tool metadata --------------------------------------------------------------------


async def test_every_tool_and_every_field_has_a_real_description(client):
    reply = await client.request(t.ListTools())
    assert isinstance(reply, t.ToolList)
    for tool in reply.tools:
        assert tool.name in TOOL_DOCS, f"{tool.name} has no entry in luanette/tooldocs.py"
        assert len(tool.description) >= 60 and tool.description != tool.name, tool.name
        assert "newtype" not in tool.description and "``" not in tool.description, tool.name
        for field, schema in tool.input_schema.get("properties", {}).items():
            assert len(schema.get("description", "")) >= 10, f"{tool.name}.{field} has no description"


def test_tool_docs_name_only_fields_that_exist():
    by_tag = {t.tag_of(cls): cls for cls in t.variants(t.Payload)}
    for tag, doc in TOOL_DOCS.items():
        assert tag in by_tag, f"tooldocs documents {tag}, which is no request"
        stale = set(doc.fields) - set(input_schema(by_tag[tag]).get("properties", {}))
        assert not stale, f"tooldocs documents {tag}.{sorted(stale)}, which it does not have"


# --- 2. resources ------------------------------------------------------------------------


async def test_list_resources_names_every_resource_and_template(client):
    listed = await ok(client, t.ListResources())
    uris = {r["uri"]: r for r in listed if "uri" in r}
    templates = {r["uri_template"]: r for r in listed if "uri_template" in r}
    assert {"lua://namespaces", "lua://examples", "lua://jobs", "lua://jobs/stats", "lua://tools"} <= set(uris)
    assert {"lua://plugins", "lua://workers"} <= set(uris)
    assert set(templates) == {
        "lua://scripts/{hash}", "lua://jobs/{id}", "lua://examples/{name}", "lua://namespaces/{name}"
    }  # fmt: skip
    assert "lua://examples/hello" in uris and "lua://namespaces/midi" in uris
    for entry in listed:
        assert entry["mime_type"] in ("application/json", "text/x-lua") and entry["description"] and entry["name"]


async def test_every_listed_resource_reads(client, server):
    listed = await ok(client, t.ListResources())
    cas_root = str(server.server.cas.root)
    for entry in listed:
        if "uri" not in entry:
            continue
        contents = await read(client, entry["uri"])
        assert contents and all(c["uri"] == entry["uri"] for c in contents)
        assert contents[0]["mime_type"] == entry["mime_type"]
        for content in contents:
            if content["mime_type"] == "application/json":
                json.loads(content["text"])
            assert cas_root not in content["text"] and str(ROOT) not in content["text"]


async def test_examples_are_served_from_the_package(client):
    listing = json.loads((await read(client, "lua://examples"))[0]["text"])
    names = {e["name"] for e in listing}
    on_disk = {p.stem for p in (ROOT / "examples").glob("*.lua")} | {
        f"modules/{p.stem}" for p in (ROOT / "examples" / "modules").glob("*.lua")
    }
    assert names == on_disk == set(example_names())
    hello = next(e for e in listing if e["name"] == "hello")
    assert hello["summary"].startswith("The smallest useful job")
    (content,) = await read(client, "lua://examples/hello")
    assert content["mime_type"] == "text/x-lua"
    assert content["text"] == (ROOT / "examples" / "hello.lua").read_text()
    (module,) = await read(client, "lua://examples/modules/variations")
    assert module["text"] == (ROOT / "examples" / "modules" / "variations.lua").read_text()
    for bad in ("lua://examples/../pyproject", "lua://examples/nope", "lua://examples/modules/../hello"):
        assert (await err(client, t.ReadResource(uri=bad))).code == "not_found"


def test_the_package_ships_the_examples():
    """An installed daemon finds them: luanette/examples is the repository's examples/
    (a link) and pyproject's package data copies them into the package."""
    assert Path(str(examples_root())).resolve() == (ROOT / "examples").resolve()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["luanette"]
    assert {"examples/*.lua", "examples/modules/*.lua"} <= set(patterns)


async def test_namespaces_are_those_the_runtime_binds(client, tmp_path):
    summary = json.loads((await read(client, "lua://namespaces"))[0]["text"])
    names = {ns["name"] for ns in summary}
    reference = apiref.build(load_settings(None), Cas.from_config(tmp_path / "cas"))
    toolbox = apiref._toolbox(load_settings(None), Cas.from_config(tmp_path / "cas"))
    bound = set()
    for kind in apiref.RUN_KINDS:
        runset = namespaces_for(kind, toolbox)
        bound |= {ns.name for ns in runset.namespaces}
        runset.close()
    assert bound <= names == set(reference.names())
    assert names - bound <= {"fs"}  # fs is only ever granted by a declaration
    midi = json.loads((await read(client, "lua://namespaces/midi"))[0]["text"])
    functions = {f["name"]: f for f in midi["functions"]}
    assert {"read", "write", "transpose", "quantize"} <= set(functions)
    assert "job" in midi["runs"] and midi["doc"].startswith("The `midi` namespace")
    clock = json.loads((await read(client, "lua://namespaces/clock"))[0]["text"])
    kinds = {f["name"]: f["kind"] for f in clock["functions"]}
    assert kinds["sleep"] == "async" and kinds["now"] == "sync"
    cas_ns = json.loads((await read(client, "lua://namespaces/cas"))[0]["text"])
    assert {f["name"]: f["needs"] for f in cas_ns["functions"]}["store"] == "cas.write"
    assert (await err(client, t.ReadResource(uri="lua://namespaces/nope"))).code == "not_found"


async def test_script_and_job_resources(client):
    script_hash = await store(client, FAILING, tags=["debugging"])
    source, about = await read(client, f"lua://scripts/{script_hash}")
    assert source["mime_type"] == "text/x-lua" and source["text"] == FAILING
    described = json.loads(about["text"])
    assert described["described"] and described["describe"]["name"] == "failing"
    assert "debugging" in described["tags"]
    job = await finished_job(client, script_hash)
    assert job["status"] == "failed"
    (one,) = await read(client, f"lua://jobs/{job['job_id']}")
    assert json.loads(one["text"])["error"]["kind"] == "lua_runtime"
    listed = json.loads((await read(client, "lua://jobs"))[0]["text"])
    assert job["job_id"] in {j["job_id"] for j in listed}
    stats = json.loads((await read(client, "lua://jobs/stats"))[0]["text"])
    assert stats["failed"] >= 1
    # the autoscaling signals in one place: the queue's and the pool's
    assert stats["queue_depth"] == 0 and stats["pool"]["groups"]["local"]["workers"] >= 1
    assert (await ok(client, t.ReadResource(uri="luanette://jobs/stats")))["failed"] == stats["failed"]
    tools = json.loads((await read(client, "lua://tools"))[0]["text"])
    assert "read_resource" in {tool["name"] for tool in tools}


WORKER_KEYS = {
    "name", "group", "capabilities", "hostname", "pid", "version", "remote", "state", "runs", "capacity",
    "rss_bytes", "last_heartbeat_s", "inline_steps",
}  # fmt: skip


async def test_workers_resource_lists_the_pool(client, server):
    (content,) = await read(client, "lua://workers")
    assert content["mime_type"] == "application/json"
    view = json.loads(content["text"])
    workers, pool = view["workers"], view["pool"]
    assert workers and 0 <= pool["workers"] <= len(workers)  # the pool counts the ready ones
    for worker in workers:
        assert WORKER_KEYS <= set(worker), worker
        assert worker["state"] in ("starting", "ready", "leaving")
        assert worker["pid"] > 0 or worker["state"] == "starting"  # (its pid comes with its start)
    local = [w for w in workers if not w["remote"]]
    assert local and {w["group"] for w in local} == {"local"}
    groups = pool["groups"]
    assert groups.get("local", {}).get("workers", 0) <= len(local)
    assert sum(g["busy"] + g["idle"] for g in groups.values()) == pool["workers"]
    assert pool["waiting"] >= 0
    assert pool["oldest_waiting_s"] is None or pool["oldest_waiting_s"] >= 0
    # the resource is the engine's own view, filled in
    engine_names = {w["name"] for w in server.server.engine.workers()}
    assert {w["name"] for w in workers} == engine_names


async def test_unknown_and_bad_uris(client):
    missing = await err(client, t.ReadResource(uri="lua://nothing/here"))
    assert missing.code == "not_found" and "lua://jobs/{id}" in missing.details["templates"]
    assert "lua://scripts/{hash}" in missing.message
    assert (await err(client, t.ReadResource(uri="lua://scripts/xyz"))).code == "invalid_params"
    assert (await err(client, t.ReadResource(uri="lua://scripts/" + "ab" * 16))).code == "not_found"
    assert (await err(client, t.ReadResource(uri="lua://jobs/no-such-job"))).code == "not_found"
    assert (await err(client, t.ReadResource(uri="lua://" + "x" * 5000))).code == "invalid_params"


# --- 3. prompts ---------------------------------------------------------------------------


async def test_list_prompts(client):
    prompts = {p["name"]: p for p in (await ok(client, t.ListPrompts()))["prompts"]}
    assert set(prompts) == {"write-script", "debug-script", "explain-script", "midi-workflow"}
    args = {name: {a["name"]: a["required"] for a in p["arguments"]} for name, p in prompts.items()}
    assert args["write-script"] == {"task": True, "style": False}
    assert args["debug-script"]["hash"] is True and args["midi-workflow"]["operation"] is True
    assert all(p["description"] for p in prompts.values())


async def test_get_prompt_fills_in_live_context(client):
    arguments = {"task": "double a melody", "style": "production"}
    got = await ok(client, t.GetPrompt(name="write-script", arguments=arguments))
    (message,) = got["messages"]
    assert message["role"] == "user" and message["content"]["type"] == "text"
    text = message["content"]["text"]
    assert "double a melody" in text and "pcall" in text and "- midi [" in text and "function main" in text

    script_hash = await store(client, FAILING)
    job = await finished_job(client, script_hash)
    got = await ok(client, t.GetPrompt(name="debug-script", arguments={"hash": script_hash, "job_id": job["job_id"]}))
    text = got["messages"][0]["content"]["text"]
    assert FAILING.strip() in text and "attempt to index a nil value" in text

    got = await ok(client, t.GetPrompt(name="explain-script", arguments={"hash": script_hash}))
    assert '"name": "failing"' in got["messages"][0]["content"]["text"]

    got = await ok(client, t.GetPrompt(name="midi-workflow", arguments={"operation": "transpose"}))
    text = got["messages"][0]["content"]["text"]
    assert "midi.transpose" in text and "### orpheus" in text and "lua://examples/midi_process" in text


async def test_prompt_errors_are_named(client):
    cases = [
        ("nope", {}, "not_found"),
        ("write-script", {}, "invalid_params"),
        ("write-script", {"task": "x", "colour": "red"}, "invalid_params"),
        ("write-script", {"task": "x", "style": "baroque"}, "invalid_params"),
        ("write-script", {"task": "x" * 20000}, "invalid_params"),
        ("midi-workflow", {"operation": "explode"}, "invalid_params"),
        ("explain-script", {"hash": "not-a-hash"}, "invalid_params"),
        ("explain-script", {"hash": "cd" * 16}, "not_found"),
    ]
    for name, arguments, code in cases:
        reply = await err(client, t.GetPrompt(name=name, arguments=arguments))
        assert reply.code == code, (name, arguments, reply)


# --- 3. completions -----------------------------------------------------------------------


async def complete(c: Client, context: str, partial: str = "") -> list[str]:
    result = await ok(c, t.Complete(context=context, partial=partial))
    assert result["total"] >= len(result["values"])
    return result["values"]


async def test_completions_of_each_kind(client):
    script_hash = await store(client, FAILING, tags=["debugging"])
    job = await finished_job(client, script_hash)
    assert script_hash in await complete(client, "script_hash", script_hash[:3])
    assert script_hash in await complete(client, "prompt:debug-script#hash", script_hash[:5])
    assert script_hash in await complete(client, "lua://scripts/{hash}#hash")
    assert await complete(client, "script_hash", "zz") == []
    assert job["job_id"] in await complete(client, "job_id")
    assert job["job_id"] in await complete(client, "lua://jobs/{id}#id", job["job_id"][:4])
    assert job["job_id"] in await complete(client, "tool:job_status#job_id")
    assert await complete(client, "status", "c") == ["complete", "cancelled"]
    assert await complete(client, "tool:job_list#status", "f") == ["failed"]
    assert "debugging" in await complete(client, "tag", "deb")
    assert await complete(client, "example", "hel") == ["hello"]
    assert "midi" in await complete(client, "lua://namespaces/{name}#name", "MI")
    assert await complete(client, "prompt:write-script#style", "p") == ["production"]
    assert await complete(client, "prompt:midi-workflow#operation", "tr") == ["transpose"]
    assert await complete(client, "tool:get_prompt#name", "deb") == ["debug-script"]
    assert "lua://examples/hello" in await complete(client, "tool:read_resource#uri", "lua://ex")
    assert await complete(client, "prompt:write-script#task", "anything") == []


async def test_completion_errors_are_named(client):
    for context, partial in [
        ("colour", ""),
        ("prompt:nope#x", ""),
        ("prompt:write-script#nope", ""),
        ("tool:nope#job_id", ""),
        ("lua://jobs/{id}#name", ""),
        ("lua://other/{x}#x", ""),
        ("status", "x" * 300),
    ]:
        reply = await err(client, t.Complete(context=context, partial=partial))
        assert reply.code == "invalid_params", (context, reply)


class _Record(msgspec.Struct):
    hash: str
    tags: list[str] = []


class _Store:
    def search(self, limit: int) -> list[_Record]:
        return [_Record(f"{n:032x}") for n in range(250)][:limit]


class _Scripts:
    store = _Store()


def test_completions_are_bounded():
    service = completions.Completions(jobs=None, scripts=_Scripts(), reference=lambda: None)  # type: ignore[arg-type]
    result = service.complete("script_hash", "")
    assert len(result["values"]) == completions.MAX_VALUES and result["total"] == 250 and result["has_more"]
    narrow = service.complete("script_hash", "0" * 30 + "f")
    assert narrow == {"values": [f"{n:032x}" for n in range(240, 250)], "total": 10, "has_more": False}


async def test_results_decode_as_the_hooteproto_result_types(client):
    """The contract an MCP server builds on: every result converts to its Struct."""
    from hooteproto import results as r

    listed = msgspec.convert(await ok(client, t.ListResources()), list[r.ResourceInfo])
    assert all((entry.uri is None) != (entry.uri_template is None) for entry in listed)
    read_back = msgspec.convert(await ok(client, t.ReadResource(uri="lua://examples/hello")), r.ResourceRead)
    assert read_back.contents[0].mime_type == "text/x-lua"
    prompts = msgspec.convert(await ok(client, t.ListPrompts()), r.PromptList)
    assert prompts.prompts[0].arguments[0].required
    got = await ok(client, t.GetPrompt(name="midi-workflow", arguments={"operation": "bridge"}))
    assert msgspec.convert(got, r.PromptResult).messages[0].content.type == "text"
    done = msgspec.convert(await ok(client, t.Complete(context="status", partial="")), r.CompletionResult)
    assert done.total == 5 and not done.has_more
