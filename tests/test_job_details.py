"""Issue 15, items 3 and 5, over the real socket: every script in the CAS is described
and validated before its first job (stored or not), params problems are structured,
undeclared params are refused or warned about; progress milestones kept after the end,
JobInfo.tags, and the shutdown broadcasts at the start and the end of a drain."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import decode_broadcast
from luanette.cas import Cas
from luanette.store import Store
from tests.test_jobs import run, status_of, store, subscribed, wait_done
from tests.waiting import until

pytestmark = pytest.mark.timeout(120)

TYPED = """
function describe()
  return {
    name = "typed",
    params = {
      semitones = {type = "integer", required = true},
      label = {type = "string", default = "untitled"},
      notes = {type = "array", required = true},
    },
    capabilities = {"midi"},
    tags = {"from-describe"},
  }
end
function main(p)
  return {semitones = p.semitones, label = p.label, extra = p.extra, cas = type(cas), midi = type(midi)}
end
"""


def written_by_another_process(root: str, content: str | bytes, mime: str = "text/x-lua") -> str:
    """Put ``content`` in the shared CAS the way hootenanny would: a Cas of its own."""
    return Cas(root).store(content.encode() if isinstance(content, str) else content, mime)


async def execute(c: Client, script_hash: str, params=None, tags=None) -> t.Payload:
    return await c.request(t.JobExecute(script_hash=script_hash, params=params, tags=tags))


# --- item 3: validation for every script ---------------------------------------------


async def test_a_script_written_into_the_cas_is_described_validated_and_indexed(server, client):
    digest = written_by_another_process(server.server.config.cas_root, TYPED)
    assert server.server.store.get_script(digest) is None

    bad = await execute(client, digest, {"semitones": "three"})
    assert isinstance(bad, t.Error) and bad.code == "invalid_params", bad
    problems = sorted(bad.details["problems"], key=lambda p: p["path"], reverse=True)
    assert problems == [
        {"path": "params.semitones", "expected": "integer", "got": "string",
         "message": "'semitones' must be an integer, got string"},
        {"path": "params.notes", "expected": "array", "got": "nothing", "message": "'notes' is required (array)"},
    ]
    assert bad.details["problem_count"] == 2
    # refused: no job, and the script did not enter the index
    assert server.server.store.stats().total == 0
    assert server.server.store.get_script(digest) is None

    done = await wait_done(client, (await run(client, digest, {"semitones": 2, "notes": [60]}))["job_id"])
    assert done["status"] == "complete", done
    # defaults filled in, and its declared capabilities (not the default grants) given
    assert done["result"] == {"semitones": 2, "label": "untitled", "cas": "nil", "midi": "table"}
    record = server.server.store.get_script(digest)
    assert record is not None and record.name == "typed" and record.capabilities == ["midi"]
    assert "source:cas" in record.tags and "type:lua" in record.tags and record.creator is None
    found = await client.request(t.ScriptSearch(tag="source:cas", creator=None, vibe=None))
    assert [s["hash"] for s in found.result] == [digest]


async def test_a_broken_script_in_the_cas_is_refused_with_its_error_and_the_describe_is_cached(
    make_server, tmp_path
):
    running = await make_server()
    cas_root = running.server.config.cas_root
    broken = written_by_another_process(cas_root, "function describe() return {name = 'x'} end\nlocal y = nil + 1")
    syntax = written_by_another_process(cas_root, "function main( return 1 end")
    async with Client(running.endpoint) as c:
        reply = await execute(c, broken)
        assert isinstance(reply, t.Error) and reply.code == "lua_error", reply
        assert reply.details["kind"] == "describe_failed"
        reply = await execute(c, syntax)
        assert isinstance(reply, t.Error) and reply.code == "lua_error" and reply.details["kind"] == "lua_syntax"
    assert running.server.store.stats().total == 0
    assert running.server.store.get_described(broken) is not None
    await running.stop()

    # after a restart the cached outcome answers: describe() is not run again
    again = await make_server(state_dir=running.server.config.state_dir)

    async def not_again(content: str):
        raise AssertionError("describe() ran again for a script whose outcome is cached")

    again.server.jobs.scripts.describe_source = not_again  # type: ignore[method-assign]
    async with Client(again.endpoint) as c:
        reply = await execute(c, broken)
        assert isinstance(reply, t.Error) and reply.details["kind"] == "describe_failed", reply


async def test_a_cas_object_that_is_not_a_script_is_refused(server, client):
    digest = written_by_another_process(server.server.config.cas_root, b"MThd\x00\x00\x00\x06\xff\xfe", "audio/midi")
    reply = await execute(client, digest)
    assert isinstance(reply, t.Error) and reply.code == "invalid_params", reply
    assert reply.details == {"reason": "not_a_script"} and digest in reply.message
    assert server.server.store.stats().total == 0


def test_the_describe_cache_is_bounded(tmp_path):
    with Store.open(tmp_path) as s:
        hashes = [f"{i:032x}" for i in range(5)]
        for i, h in enumerate(hashes):
            s.put_described(h, {"found": False, "n": i}, at=100.0 + i, keep=3)
        assert [s.get_described(h) is not None for h in hashes] == [False, False, True, True, True]
        assert s.get_described(hashes[4]) == {"found": False, "n": 4}
        with pytest.raises(ValueError):
            s.put_described("../x", {}, at=1.0, keep=3)


async def test_problems_are_all_listed_and_bounded(client):
    declared = ", ".join(f"p{i} = {{type = 'integer', required = true}}" for i in range(30))
    digest = await store(client, f"function describe() return {{params = {{{declared}}}}} end\nfunction main() end")
    reply = await execute(client, digest, {})
    assert isinstance(reply, t.Error) and reply.code == "invalid_params"
    assert reply.details["problem_count"] == 30 and len(reply.details["problems"]) == 20
    assert all(set(p) == {"path", "expected", "got", "message"} for p in reply.details["problems"])
    # params a script cannot be given get a problem too, naming the place
    reply = await client.request(t.JobExecute(script_hash=digest, params={"a": [1, {True: 1}]}))
    assert isinstance(reply, t.Error) and reply.code == "invalid_params"
    assert reply.details["problems"][0]["path"] == "params.a[2]"


ADDITIONAL = """
function describe()
  return {params = {semitones = {type = "integer", default = 0}}, additional_params = %s}
end
function main(p) return p end
"""


async def test_undeclared_params_are_refused_with_additional_params_false(server, client):
    digest = await store(client, ADDITIONAL % "false")
    reply = await execute(client, digest, {"semitonez": 3, "other": 1})
    assert isinstance(reply, t.Error) and reply.code == "invalid_params", reply
    by_path = {p["path"]: p for p in reply.details["problems"]}
    assert set(by_path) == {"params.semitonez", "params.other"}
    assert "did you mean 'semitones'?" in by_path["params.semitonez"]["message"]
    assert server.server.store.stats().total == 0
    ok = await execute(client, digest, {"semitones": 3})
    assert isinstance(ok, t.Success) and "warnings" not in ok.result


async def test_undeclared_params_are_accepted_with_a_warning_by_default(client):
    for flag in ("nil", "true"):
        digest = await store(client, ADDITIONAL % flag)
        reply = await execute(client, digest, {"semitones": 3, "extra": "x"})
        assert isinstance(reply, t.Success), reply
        [warning] = reply.result["warnings"]
        assert warning["code"] == "unknown_params" and warning["params"] == ["extra"]
        assert "extra" in warning["message"] and "additional_params = false" in warning["message"]
        done = await wait_done(client, reply.result["job_id"])
        assert done["result"] == {"semitones": 3, "extra": "x"}  # passed through
    # a script that declares no params table: nothing is known to be undeclared
    plain = await store(client, "return params.anything")
    reply = await execute(client, plain, {"anything": 1})
    assert isinstance(reply, t.Success) and "warnings" not in reply.result


async def test_a_malformed_params_schema_is_refused_at_store_with_problems(client):
    code = """
    function describe()
      return {
        name = "sloppy",
        params = {a = "number", b = {type = "integr"}, c = {type = "integer", default = "x"},
                  d = {type = "string", required = "yes"}},
        additional_params = "no",
        tags = {"ok", 3},
      }
    end
    """
    reply = await client.request(t.ScriptStore(content=code))
    assert isinstance(reply, t.Error) and reply.code == "invalid_params", reply
    paths = {p["path"]: p for p in reply.details["problems"]}
    assert set(paths) == {
        "describe().params.a", "describe().params.b.type", "describe().params.c.default",
        "describe().params.d.required", "describe().additional_params", "describe().tags[2]",
    }
    assert paths["describe().params.a"]["got"] == "string"
    assert '{type = "string"}' in paths["describe().params.a"]["message"]
    assert paths["describe().params.b.type"]["got"] == "'integr'"
    assert reply.details["reason"] == "describe"
    found = await client.request(t.ScriptSearch(tag=None, creator=None, vibe="sloppy"))
    assert found.result == []  # nothing was stored


# --- item 5: job details -------------------------------------------------------------


async def test_progress_milestones_and_the_last_progress_is_kept(make_server):
    running = await make_server(max_jobs=1)
    async with Client(running.endpoint) as c:
        spin = await store(c, "while true do end")
        half = await store(c, """
        progress.update(50, "half way")
        while true do clock.sleep(0.01) end
        """)
        first = (await run(c, spin))["job_id"]
        await until(lambda: running.server.jobs.is_live(first), "the first job queued")

        async def is_running() -> bool:
            return await status_of(c, first) == "running"

        await until(is_running, "the first job running")
        queued = (await run(c, half))["job_id"]  # the one worker is busy: it waits
        info = (await c.request(t.JobStatusRequest(job_id=queued))).result
        assert info["status"] == "pending"
        assert info["progress"] == {"percent": 0.0, "message": None, "script_percent": None}
        info = (await c.request(t.JobStatusRequest(job_id=first))).result
        assert info["progress"] == {"percent": 10.0, "message": None, "script_percent": None}

        await c.request(t.JobCancel(job_id=first))

        async def half_way() -> bool:
            seen = (await c.request(t.JobStatusRequest(job_id=queued))).result["progress"]
            return seen == {"percent": 50.0, "message": "half way", "script_percent": 50.0}

        await until(half_way, "the script's 50 % as the job's 50 %")
        await c.request(t.JobCancel(job_id=queued))
        ended = await wait_done(c, queued)
        # cancelled: where it got to stays (not 100: its work was not done)
        assert ended["status"] == "cancelled"
        assert ended["progress"] == {"percent": 50.0, "message": "half way", "script_percent": 50.0}
        quick = await store(c, "return 1")
        done_id = (await run(c, quick))["job_id"]
        done = await wait_done(c, done_id)
        assert done["progress"] == {"percent": 100.0, "message": None, "script_percent": None}
    await running.stop()
    # kept with the job's final state: a restart shows it too
    again = await make_server(state_dir=running.server.config.state_dir)
    async with Client(again.endpoint) as c:
        kept = (await c.request(t.JobStatusRequest(job_id=queued))).result
        assert kept["progress"] == {"percent": 50.0, "message": "half way", "script_percent": 50.0}
        assert (await c.request(t.JobStatusRequest(job_id=done_id))).result["progress"]["percent"] == 100.0


async def test_job_info_carries_the_job_tags_and_omits_them_when_none(server, client):
    tagged = await store(
        client, 'function describe() return {name = "t", tags = {"mood:dark", "b"}} end\nfunction main() return 1 end'
    )
    reply = await execute(client, tagged, tags=["b", "req"])
    done = await wait_done(client, reply.result["job_id"])
    assert done["tags"] == ["b", "req", "mood:dark"]  # the request's, then describe()'s
    listed = (await client.request(t.JobList(status=None))).result
    assert listed[0]["tags"] == ["b", "req", "mood:dark"]
    # describe()'s tags index the script too
    found = await client.request(t.ScriptSearch(tag="mood:dark", creator=None, vibe=None))
    assert [s["hash"] for s in found.result] == [tagged]
    plain = await store(client, "return 2")
    done = await wait_done(client, (await run(client, plain))["job_id"])
    assert "tags" not in done
    status = (await client.request(t.JobStatusRequest(job_id=done["job_id"]))).result
    assert "tags" not in status and status["progress"]["percent"] == 100.0


async def test_shutdown_is_broadcast_when_the_drain_starts_and_when_it_ends(make_server, zctx):
    running = await make_server(drain_timeout=3.0)
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"shutdown"')
    sub.connect(running.server.publisher.endpoint)
    async with Client(running.endpoint) as c:
        await subscribed(sub, c)
        # a job that goes on until the drain's deadline cancels it
        waits = await store(c, "while true do clock.sleep(0.01) end")
        job = (await run(c, waits))["job_id"]
        await until(lambda: running.server.jobs.is_live(job), "the job live")
        asked = time.time()
        reply = await c.request(t.Shutdown(reason="maintenance"))
        assert isinstance(reply, t.Success)
        notices = []
        while not notices:
            message = decode_broadcast(await asyncio.wait_for(sub.recv(), 30))
            if isinstance(message, t.ShutdownNotice):
                notices.append(message)
        first = notices[0]
        assert first.reason == "maintenance" and first.phase == "draining"
        assert first.deadline is not None and first.deadline >= asked + 3.0 - 0.01
        # sent at the start: the job is still there to be finished or saved
        assert running.server.jobs.is_live(job)
    await asyncio.wait_for(running.task, 60)
    while True:
        message = decode_broadcast(await asyncio.wait_for(sub.recv(), 30))
        if isinstance(message, t.ShutdownNotice):
            break
    assert message == t.ShutdownNotice(reason="maintenance", phase="stopped")
    sub.close(0)
