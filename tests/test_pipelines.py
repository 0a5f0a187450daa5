"""Generation pipelines (issue 13 item 4): jobs over the real socket against the model
simulator; streaming out as generation_chunk broadcasts; the definition's bounds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import zmq

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import decode_broadcast
from luanette.pipelines import (
    MAX_EXPANSION_DEPTH,
    MAX_FANOUT,
    MAX_STEPS,
    PipelineError,
    assemble,
    check_definition,
    estimate_tokens,
    expand,
    parse_definition,
)
from luanette.settings import parse_settings
from luanette.sim import run_models
from tests.conftest import free_port
from tests.test_jobs import run, store, subscribed, wait_done
from tests.test_models_e2e import settings_for
from tests.waiting import until

pytestmark = pytest.mark.timeout(120)


async def job(c: Client, script: str, params=None) -> dict:
    done = await wait_done(c, (await run(c, await store(c, script), params))["job_id"])
    return done


async def result_of(c: Client, script: str, params=None):
    done = await job(c, script, params)
    assert done["status"] == "complete", done.get("error")
    return done["result"]


async def error_of(c: Client, script: str) -> str:
    done = await job(c, script)
    assert done["status"] == "failed", done
    return done["error"]["message"]


@pytest.fixture
async def daemon(make_server):
    async with run_models("all", seed=5) as sim:
        running = await make_server(settings=settings_for(sim.url))
        async with Client(running.endpoint) as c:
            yield c, sim, running


# --- strategies ---------------------------------------------------------------------------


async def test_single_runs_one_llm_call_with_the_assembled_context(daemon):
    c, sim, _ = daemon
    r = await result_of(
        c,
        """
        return pipeline.run({
          id = "one",
          context = {system = "You are terse.", sources = {{type = "static_text", content = "Key: ${key}"}}},
          strategy = {type = "single", prompt = "Name a ${thing} in ${key}"},
        }, {thing = "tune", key = "D minor"})
        """,
    )
    assert r["pipeline_id"] == "one" and r["order"] == ["single"]
    assert r["final_result"].startswith("[sim-llm]") and "Name a tune in D minor" in r["final_result"]
    step = r["steps"]["single"]
    # the simulator reports usage: the model's own count, not an estimate
    assert step["tokens_used"] > 0 and step["tokens_estimated"] is False
    assert r["total_tokens_used"] == step["tokens_used"] and r["tokens_estimated"] is False
    assert r["context"]["sources_used"] == ["static_text"] and r["context"]["truncated"] is False
    assert r["context"]["total_tokens"] == estimate_tokens("You are terse.\n\nKey: D minor")
    sent = [rec.body for rec in sim.stats.records if rec.kind == "llm"][-1]
    assert sent["messages"][0] == {"role": "system", "content": "You are terse.\n\nKey: D minor"}


async def test_sequential_steps_see_earlier_results(daemon):
    c, _, _ = daemon
    r = await result_of(
        c,
        """
        pipeline.register{
          id = "seq",
          strategy = {type = "sequential", steps = {
            {id = "idea", prompt = "an idea about ${topic}"},
            {id = "title", prompt = "a title for: ${idea.result}", maxTokens = 4},
          }},
        }
        return pipeline.run("seq", {topic = "rain"})
        """,
    )
    assert r["order"] == ["idea", "title"]
    idea = r["steps"]["idea"]["result"]
    assert "an idea about rain" in idea
    assert r["final_result"] == r["steps"]["title"]["result"]
    assert r["total_tokens_used"] == sum(s["tokens_used"] for s in r["steps"].values())


@pytest.mark.parametrize(
    ("merge", "check"),
    [
        ('{type = "concatenate", separator = " | "}', lambda r: r["final_result"].count(" | ") == 2),
        ('{type = "pick_best", criteria = "longest"}', lambda r: r["steps"]["merge"]["data"]["picked"] == "c"),
        (
            '{type = "pick_best", criteria = "the most vivid"}',
            lambda r: r["steps"]["merge"]["data"]["picked"] in ("a", "b", "c"),
        ),
        (
            '{type = "summarize", prompt = "Summarise:\\n${results}"}',
            lambda r: r["final_result"].startswith("[sim-llm]") and r["steps"]["merge"]["tokens_used"] > 0,
        ),
    ],
    ids=["concatenate", "pick_best_longest", "pick_best_llm", "summarize"],
)
async def test_parallel_branches_are_merged(daemon, merge, check):
    c, sim, _ = daemon
    r = await result_of(
        c,
        f"""
        return pipeline.run{{
          id = "par",
          strategy = {{type = "parallel", merge = {merge}, branches = {{
            {{id = "a", prompt = "one"}},
            {{id = "b", prompt = "two words"}},
            {{id = "c", prompt = "three whole words and then some more"}},
          }}}},
        }}
        """,
    )
    assert set(r["steps"]) == {"a", "b", "c", "merge"}
    assert check(r), r


async def test_parallel_branches_are_in_flight_together(make_server):
    # the simulator holds requests until three are waiting at once: the pipeline only
    # finishes if its branches really run concurrently
    async with run_models("all", seed=5, hold_until=3) as sim:
        running = await make_server(settings=settings_for(sim.url, concurrency=3))
        async with Client(running.endpoint) as c:
            r = await result_of(
                c,
                """
                return pipeline.run{id = "p", strategy = {type = "parallel", branches = {
                  {id = "a", prompt = "x"}, {id = "b", prompt = "y"}, {id = "c", prompt = "z"}}}}
                """,
            )
    assert r["final_result"].count("[sim-llm]") == 3
    assert sim.stats.peak_in_flight >= 3


async def test_pick_best_with_the_classifier_over_orpheus_branches(daemon):
    c, sim, _ = daemon
    r = await result_of(
        c,
        """
        local r = pipeline.run{
          id = "midi",
          strategy = {type = "parallel", merge = {type = "pick_best", criteria = "classifier"}, branches = {
            {id = "a", kind = "orpheus", params = {max_tokens = 64, random_seed = 1}},
            {id = "b", kind = "orpheus", params = {max_tokens = 64, random_seed = 2}},
          }},
        }
        return r
        """,
    )
    merge = r["steps"]["merge"]["data"]
    assert merge["criteria"] == "classifier" and len(merge["scores"]) == 2
    best = 0 if merge["scores"][0] >= merge["scores"][1] else 1
    assert merge["picked"] == "ab"[best]
    assert r["final_result"] == r["steps"][merge["picked"]]["result"]
    assert len(r["final_result"]) == 32  # a CAS hash
    assert sim.stats.by_task["classify"] == 2
    # Orpheus reports its tokens itself
    assert r["steps"]["a"]["tokens_used"] > 0 and r["tokens_estimated"] is False


# --- the "done when": a chain with a parallel fan-out and streaming --------------


CHAIN = """
local seen = {}
local function on_chunk(chunk, ctx, is_final)
  seen[#seen + 1] = {step = ctx:current_step(), content = chunk, final = is_final}
  ctx:set("chunks", (ctx:get("chunks") or 0) + 1)
end

local def = {
  id = "sketch",
  context = {system = "You plan short MIDI sketches.", maxTokens = 500},
  strategy = {type = "chain", steps = {
    {id = "plan", prompt = "Plan three sections for a piece about ${mood}",
     parse = function(text)  -- three section names out of the plan
       local sections = {}
       for word in text:gmatch("%a+") do
         if #sections < 3 and #word > 3 then sections[#sections + 1] = word end
       end
       return {sections = sections}
     end},
    {id = "gen", kind = "orpheus", parallelOn = "plan.sections",
     params = {max_tokens = 64, random_seed = "${index}", tags = {"${item}"}},
     merge = {type = "pick_best", criteria = "classifier"}},
    {id = "describe", prompt = "Describe ${gen.result} for the sections: ${gen.results}", dependsOn = {"gen"}},
  }},
  streaming = {enabled = true, chunkHandler = on_chunk, bufferSize = 1},
}
local r = pipeline.run(def, {mood = "a slow river at dusk"})
return {result = r, seen = seen}
"""


async def test_chain_with_a_parallel_fan_out_and_streaming_runs_end_to_end(daemon, zctx):
    c, sim, running = daemon
    sub = zctx.socket(zmq.SUB)
    sub.connect(running.server.publisher.endpoint)
    await subscribed(sub, c)
    sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"generation_chunk"')
    out = await job(c, CHAIN)
    assert out["status"] == "complete", out.get("error")
    r, seen = out["result"]["result"], out["result"]["seen"]
    assert r["order"] == ["plan", "gen", "describe"]
    gen = r["steps"]["gen"]
    assert len(gen["results"]) == 3 and len(set(gen["results"])) == 3  # three generations, in parallel
    assert gen["result"] in gen["results"] and gen["merge"]["criteria"] == "classifier"
    assert sim.stats.by_task["generate"] == 3 and sim.stats.by_task["classify"] == 3
    assert gen["result"] in r["final_result"]  # the describe step saw the picked hash
    # every LLM step streamed; the handler saw each chunk, in order, the last one final
    assert {s["step"] for s in seen} == {"plan", "describe"}
    for step in ("plan", "describe"):
        mine = [s for s in seen if s["step"] == step]
        assert mine[-1]["final"] and not any(s["final"] for s in mine[:-1])
        assert "".join(s["content"] for s in mine) == r["steps"][step]["result"]
    assert r["chunks"] == len(seen) and len(seen) > 4
    # the same chunks went out on PUB, as they came
    chunks: list[t.GenerationChunk] = []
    while len(chunks) < len(seen):
        frame = await asyncio.wait_for(sub.recv(), 30)
        message = decode_broadcast(frame)
        if isinstance(message, t.GenerationChunk):
            chunks.append(message)
    assert {m.job_id for m in chunks} == {out["job_id"]} and {m.pipeline_id for m in chunks} == {"sketch"}
    for step in ("plan", "describe"):
        mine = [m for m in chunks if m.step_id == step]
        assert [m.index for m in mine] == list(range(len(mine)))
        assert "".join(m.content for m in mine) == r["steps"][step]["result"] and mine[-1].is_final
    sub.close(0)


async def test_complete_and_custom_cas_and_job_result_sources(daemon):
    c, _, running = daemon
    first = await job(c, "return 'the earlier answer'")
    midi_hash = running.server.cas.store(_tiny_midi(), "audio/midi")
    text_hash = running.server.cas.store(b"notes from the CAS", "text/plain")
    r = await result_of(
        c,
        f"""
        local text, whole = pipeline.complete("hello ${{not a reference}}", {{system = "be brief", max_tokens = 50}})
        local ctx = pipeline.assemble({{
          system = "S",
          sources = {{
            {{type = "cas", hash = "{text_hash}"}},
            {{type = "cas", hash = "{midi_hash}", name = "midi"}},
            {{type = "job_result", job_id = "{first["job_id"]}"}},
            {{type = "custom", handler = function(config, ctx) return "custom says " .. config.word end,
              config = {{word = "hi"}}}},
            {{type = "script_search", query = "nothing matches this zzz"}},
          }},
        }})
        return {{text = text, steps = whole.order, ctx = ctx, n = pipeline.count_tokens("abcdefgh")}}
        """,
    )
    assert "hello ${not a reference}" in r["text"] and r["steps"] == ["single"]
    system = r["ctx"]["system_prompt"]
    assert "notes from the CAS" in system and "the earlier answer" in system and "custom says hi" in system
    assert f"MIDI {midi_hash}: " in system and " notes in " in system
    assert "(no stored scripts match)" in system
    assert r["ctx"]["sources_used"] == ["cas", "midi", "job_result", "custom", "script_search"]
    assert r["ctx"]["tokens_estimated"] is True and r["n"] == 2


# --- bounds -------------------------------------------------------------------------------


async def test_limits_are_named_errors(daemon):
    c, _, _ = daemon
    many = ", ".join(f'{{id = "s{i}", prompt = "x"}}' for i in range(MAX_STEPS + 1))
    message = await error_of(c, f'pipeline.run{{id = "big", strategy = {{type = "sequential", steps = {{{many}}}}}}}')
    assert "pipeline: pipeline_limit:" in message and "steps" in message
    message = await error_of(
        c,
        """
        pipeline.run{id = "cyc", strategy = {type = "chain", steps = {
          {id = "a", prompt = "${b.result}"}, {id = "b", prompt = "x", depends_on = {"a"}}}}}
        """,
    )
    assert "pipeline_cycle" in message
    items = ", ".join(str(i) for i in range(MAX_FANOUT + 1))
    message = await error_of(
        c,
        f"""
        pipeline.run({{id = "wide", strategy = {{type = "chain", steps = {{
          {{id = "g", kind = "orpheus", parallel_on = "vars.items", params = {{max_tokens = 8}}}}}}}}}},
          {{items = {{{items}}}}})
        """,
    )
    assert "pipeline_limit" in message and "fans out" in message
    message = await error_of(
        c,
        """
        pipeline.run({id = "tok", max_total_tokens = 5,
                      strategy = {type = "single", prompt = "a fairly long prompt of many words"}})
        """,
    )
    assert "pipeline_limit" in message and "max_total_tokens" in message
    message = await error_of(
        c, 'pipeline.run({id = "loop", strategy = {type = "single", prompt = "${a}"}}, {a = "${a}"})'
    )
    assert "pipeline_limit" in message and "nested" in message
    message = await error_of(c, 'pipeline.run{id = "bad", strategy = {type = "single", prompt = "x", bogus = 1}}')
    assert "pipeline_invalid" in message and "bogus" in message
    message = await error_of(c, 'pipeline.run("nobody")')
    assert "not_found" in message


async def test_streaming_needs_the_llm_capability(daemon):
    c, _, _ = daemon
    script = """
    function describe() return {name = "no_llm", capabilities = {"model:orpheus"}} end
    function main()
      return pipeline.run{id = "s", strategy = {type = "single", prompt = "x"}, streaming = {enabled = true}}
    end
    """
    message = await error_of(c, script)
    assert "permission_denied" in message


def test_definition_checks_without_a_daemon():
    d = parse_definition(
        {
            "id": "c",
            "strategy": {
                "type": "chain",
                "steps": [
                    {"id": "a", "prompt": "x"},
                    {"id": "b", "prompt": "${a.result}"},
                    {"id": "c", "prompt": "y"},
                    {"id": "d", "prompt": "z", "dependsOn": ["b", "c"]},
                ],
            },
        }
    )
    assert check_definition(d)["layers"] == [["a", "c"], ["b"], ["d"]]
    with pytest.raises(PipelineError, match="pipeline_invalid"):
        check_definition(parse_definition({"id": "x", "strategy": {"type": "sequential", "steps": []}}))
    scope = {"vars": {"a": "${b}", "b": "deep"}, "steps": {"s": {"result": "has ${weird} text"}}}
    assert expand("${a} / ${s.result} / $${a}", scope) == "deep / has ${weird} text / ${a}"
    chain = {f"v{i}": f"${{v{i + 1}}}" for i in range(MAX_EXPANSION_DEPTH + 2)}
    with pytest.raises(PipelineError, match="pipeline_limit"):
        expand("${v0}", {"vars": chain})
    parts = [
        {"name": "system", "text": "s" * 40},
        {"name": "low", "text": "l" * 400},
        {"name": "high", "text": "h" * 40},
    ]
    out = assemble(parts, 25, {"high": 90, "low": 10})
    assert out["truncated"] and out["sources_used"] == ["low", "high"]
    assert out["total_tokens"] <= 25 + 1 and "h" * 40 in out["system_prompt"]


def _tiny_midi() -> bytes:
    from luanette.sim.models import make_midi

    return make_midi([(0, 60, 240, 90), (240, 64, 240, 80)])


async def test_the_example_pipeline(daemon):
    c, sim, running = daemon
    source = (Path(__file__).resolve().parents[1] / "examples" / "plugins" / "generation_pipeline.lua").read_text()
    r = await result_of(c, source, {"sections": 4})
    assert r["order"] == ["plan", "sketch", "describe"]
    assert len(r["sketches"]) == 4 and r["best"] in r["sketches"] and len(r["scores"]) == 4
    assert all(running.server.cas.exists(h) for h in r["sketches"])
    assert r["best"] in r["description"] and r["chunks"] > 2 and r["tokens"] > 0
    assert sim.stats.by_task["classify"] == 4


# --- a real streaming server: LitServe's OpenAI spec ----------------------------------------


@pytest.fixture
async def litserve_url():
    pytest.importorskip("litserve")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("litserve_echo.py")), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # LitServe forks workers: stopped as a group
    )
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        assert server.poll() is None, "the LitServe server exited"
        try:
            async with httpx.AsyncClient() as h:
                return (await h.get(f"{url}/health", timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        await until(healthy, "LitServe up", timeout=60, step=0.1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


async def test_streaming_from_a_litserve_openai_server(make_server, litserve_url, zctx):
    settings = parse_settings({"backends": {"llm": {"url": litserve_url, "kind": "openai"}}})
    running = await make_server(settings=settings)
    async with Client(running.endpoint) as c:
        sub = zctx.socket(zmq.SUB)
        sub.connect(running.server.publisher.endpoint)
        await subscribed(sub, c)
        sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"generation_chunk"')
        script = """
        local got = {}
        local text, r = pipeline.complete("hello from a pipeline", {
          stream = true, buffer_size = 1,
          chunk_handler = function(chunk) got[#got + 1] = chunk end})
        return {text = text, got = got, r = r}
        """
        out = await result_of(c, script)
        assert out["text"].strip() == "echo: hello from a pipeline"
        assert "".join(out["got"]) == out["text"] and len(out["got"]) >= 4
        step = out["r"]["steps"]["single"]
        # LitServe reports usage as zeros: the count is an estimate, and says so
        assert step["tokens_used"] > 0 and step["tokens_estimated"] is True and out["r"]["tokens_estimated"]
        chunks = []
        while not chunks or not chunks[-1].is_final:
            message = decode_broadcast(await asyncio.wait_for(sub.recv(), 30))
            if isinstance(message, t.GenerationChunk):
                chunks.append(message)
        assert "".join(m.content for m in chunks) == out["text"]
        sub.close(0)


# --- Backends.stream itself -----------------------------------------------------------------


async def test_backends_stream_reads_events_coalesces_chunks_and_fails_cleanly(monkeypatch):
    from aiohttp import web

    from luanette.backends import Backends, BackendUnavailable
    from luanette.settings import BackendSettings

    async def plain(request: web.Request) -> web.StreamResponse:
        return web.json_response({"choices": [{"message": {"content": "all at once"}, "finish_reason": "stop"}]})

    async def failing(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "partial "}}]}\n\n')
        await response.write(b'data: {"error": {"message": "model crashed"}}\n\n')
        return response

    app = web.Application()
    app.router.add_post("/plain/v1/chat/completions", plain)
    app.router.add_post("/failing/v1/chat/completions", failing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with run_models("llm", seed=1) as sim:
        settings = {
            name: BackendSettings(url=url, kind="openai", retries=0)
            for name, url in [
                ("sim", sim.url),
                ("plain", f"http://127.0.0.1:{port}/plain"),
                ("failing", f"http://127.0.0.1:{port}/failing"),
            ]
        }
        body = {"messages": [{"role": "user", "content": "one two three four five six seven"}]}
        async with Backends(settings) as backends:
            seen: list[tuple[str, bool]] = []
            fine = await backends.stream(
                "sim", "/v1/chat/completions", body, deadline=None, on_chunk=lambda c, f: seen.append((c, f))
            )
            coarse = await backends.stream("sim", "/v1/chat/completions", body, deadline=None, buffer_size=1000)
            whole = await backends.call("sim", "/v1/chat/completions", body, deadline=None)
            assert fine["content"] == coarse["content"] == whole["choices"][0]["message"]["content"]
            assert fine["chunks"] == [c for c, _ in seen] and [f for _, f in seen] == [False] * (len(seen) - 1) + [True]
            assert len(fine["chunks"]) > 5 and coarse["chunks"] == [coarse["content"]]
            assert fine["usage"] == whole["usage"] and fine["finish_reason"] == "stop"
            one = await backends.stream("plain", "/v1/chat/completions", body, deadline=None)
            assert one["content"] == "all at once" and one["chunks"] == ["all at once", ""]  # (final: empty)
            with pytest.raises(BackendUnavailable, match="model crashed"):
                await backends.stream("failing", "/v1/chat/completions", body, deadline=None)
            monkeypatch.setattr("luanette.backends.MAX_STREAM_CHUNKS", 3)
            with pytest.raises(BackendUnavailable, match="more than 3 chunks"):
                await backends.stream("sim", "/v1/chat/completions", body, deadline=None)
    await runner.cleanup()
