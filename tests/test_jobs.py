"""Stored scripts and jobs over real sockets: store, describe, search, execute, poll,
cancel, limits, broadcasts, and persistence across a killed daemon."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import zmq
import zmq.asyncio

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import decode_broadcast
from tests.waiting import TIMED, until

pytestmark = pytest.mark.timeout(90)

DESCRIBED = """
function describe()
  return {
    name = "transpose_melody",
    description = "Shift a dark minor melody up or down",
    params = {
      semitones = {type = "integer", required = true, description = "how far"},
      label = {type = "string", default = "untitled"},
    },
  }
end
function main(p) return {shifted = p.semitones, label = p.label} end
"""

SPIN = "while true do end"
SLOW = "local s = os.clock() + (params and params.s or 0.3) while os.clock() < s do end return 'slow done'"


async def store(c: Client, content: str, **kw) -> str:
    reply = await c.request(t.ScriptStore(content=content, **kw))
    assert isinstance(reply, t.Success), reply
    return reply.result["hash"]


async def run(c: Client, script_hash: str, params=None) -> dict:
    reply = await c.request(t.JobExecute(script_hash=script_hash, params=params))
    assert isinstance(reply, t.Success), reply
    return reply.result


async def wait_done(c: Client, job_id: str, timeout_ms: int = 30000) -> dict:
    reply = await c.request(t.JobPoll(job_ids=[job_id], timeout_ms=timeout_ms, mode=t.PollMode.ALL),
                            timeout=timeout_ms / 1000 + 15)
    assert isinstance(reply, t.Success) and not reply.result["timed_out"], reply
    return reply.result["completed"][0]


async def status_of(c: Client, job_id: str) -> str:
    return (await c.request(t.JobStatusRequest(job_id=job_id))).result["status"]


async def until_running(c: Client, job_id: str) -> None:
    async def running() -> bool:
        return await status_of(c, job_id) == "running"

    await until(running, f"{job_id} running")


async def subscribed(sub: zmq.asyncio.Socket, c: Client) -> None:
    """Return once ``sub`` (connected to the daemon's PUB socket) gets broadcasts.

    PUB drops what it sends before a subscription reaches it, so store fresh probe
    scripts until a probe's ``script_invalidate`` comes through, then read up to the
    last probe's: what ``sub`` receives next is the test's own.  (``sub`` is left
    subscribed to ``script_invalidate`` too.)"""
    sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"script_invalidate"')
    probes: list[str] = []
    while True:
        assert len(probes) < 2000, "the subscription never reached the publisher"
        probes.append(await store(c, f"return 'subscription probe {len(probes)}'"))
        try:
            frame = await asyncio.wait_for(sub.recv(), 0.05)
            break
        except TimeoutError:
            pass
    while decode_broadcast(frame) != t.ScriptInvalidate(hash=probes[-1]):
        frame = await asyncio.wait_for(sub.recv(), 30)


# --- scripts -------------------------------------------------------------------------


async def test_script_store_puts_lua_in_the_cas_and_indexes_describe(server, client):
    reply = await client.request(t.ScriptStore(content=DESCRIBED, tags=["melody"], creator="ada"))
    assert isinstance(reply, t.Success)
    digest = reply.result["hash"]
    assert len(digest) == 32 and reply.result["name"] == "transpose_melody"
    assert reply.result["described"] is True
    cas = server.server.cas
    assert cas.retrieve(digest) == DESCRIBED.encode()
    assert cas.inspect(digest).mime_type == "text/x-lua"
    record = server.server.store.get_script(digest)
    assert record.tags == ["melody", "type:lua"] and record.creator == "ada"
    assert record.params_schema["semitones"]["required"] is True


async def test_script_that_does_not_compile_is_refused_and_not_stored(server, client):
    reply = await client.request(t.ScriptStore(content="function main(\n  return 1"))
    assert isinstance(reply, t.Error) and reply.code == "lua_error"
    assert reply.details["kind"] == "lua_syntax" and reply.details["line"] == 2
    assert list((server.server.cas.root / "objects").rglob("*")) == []


async def test_script_search_by_tag_creator_and_vibe(client):
    await store(client, DESCRIBED, tags=["melody"], creator="ada")
    other = await store(client, "return 'drums'", tags=["drums"], creator="bob")
    by_tag = (await client.request(t.ScriptSearch(tag="drums"))).result
    assert [s["hash"] for s in by_tag] == [other]
    by_creator = (await client.request(t.ScriptSearch(creator="ada"))).result
    assert [s["name"] for s in by_creator] == ["transpose_melody"]
    by_vibe = (await client.request(t.ScriptSearch(vibe="dark minor"))).result
    assert [s["name"] for s in by_vibe] == ["transpose_melody"]
    assert len((await client.request(t.ScriptSearch(tag="type:lua"))).result) == 2


async def test_lua_describe(client):
    described = await store(client, DESCRIBED)
    plain = await store(client, "return 1")
    reply = await client.request(t.LuaDescribe(script_hash=described))
    assert reply.result["name"] == "transpose_melody"
    none = await client.request(t.LuaDescribe(script_hash=plain))
    assert isinstance(none, t.Error) and none.code == "not_found" and "no describe" in none.message
    missing = await client.request(t.LuaDescribe(script_hash="0" * 32))
    assert isinstance(missing, t.Error) and missing.code == "not_found"


# --- jobs ----------------------------------------------------------------------------


async def test_job_runs_with_validated_params_and_defaults(client):
    digest = await store(client, DESCRIBED)
    job = await run(client, digest, {"semitones": 3})
    assert job["script_hash"] == digest
    done = await wait_done(client, job["job_id"])
    assert done["status"] == "complete"
    assert done["result"] == {"shifted": 3, "label": "untitled"}
    assert done["source"] == digest and done["completed_at"] >= done["created_at"]
    info = (await client.request(t.JobStatusRequest(job_id=job["job_id"]))).result
    assert info == done


@pytest.mark.parametrize(
    "params,fragment",
    [({}, "'semitones' is required"), ({"semitones": "three"}, "'semitones' must be an integer, got string"), ([1], "must be an object")],
)
async def test_invalid_params_are_refused_before_a_job_exists(server, client, params, fragment):
    digest = await store(client, DESCRIBED)
    reply = await client.request(t.JobExecute(script_hash=digest, params=params))
    assert isinstance(reply, t.Error) and reply.code == "invalid_params"
    assert fragment in reply.message
    assert server.server.store.stats().total == 0


@pytest.mark.parametrize("bad", ["../../etc/passwd", "AB" * 16, "0" * 31, "0" * 31 + "/", "cas:" + "z" * 32])
async def test_crafted_hashes_are_refused(server, client, bad):
    reply = await client.request(t.JobExecute(script_hash=bad, params=None))
    assert isinstance(reply, t.Error) and reply.code == "invalid_params"
    reply = await client.request(t.LuaDescribe(script_hash=bad))
    assert isinstance(reply, t.Error) and reply.code == "invalid_params"
    assert server.server.store.stats().total == 0


async def test_unknown_script_and_job(client):
    reply = await client.request(t.JobExecute(script_hash="f" * 32, params=None))
    assert isinstance(reply, t.Error) and reply.code == "not_found"
    for request in (t.JobStatusRequest(job_id="job_nope"), t.JobCancel(job_id="job_nope"),
                    t.JobPoll(job_ids=["job_nope"], timeout_ms=10, mode=t.PollMode.ANY)):
        reply = await client.request(request)
        assert isinstance(reply, t.Error) and reply.code == "not_found", request


async def test_failed_job_keeps_the_structured_error(client):
    digest = await store(client, "function main(p)\n  local x = nil\n  return x.y\nend")
    done = await wait_done(client, (await run(client, digest))["job_id"])
    assert done["status"] == "failed"
    assert done["error"]["kind"] == "lua_runtime" and done["error"]["line"] == 3
    assert "index a nil value" in done["error"]["message"]


@TIMED
async def test_execute_returns_at_once_and_poll_times_out(client, timed):
    digest = await store(client, SLOW)
    started = time.monotonic()
    job = await run(client, digest, {"s": 0.6})
    if timed:
        assert time.monotonic() - started < 0.3
    # what shows it returned before the job finished: the job is still going afterwards
    reply = await client.request(t.JobPoll(job_ids=[job["job_id"]], timeout_ms=100, mode=t.PollMode.ANY))
    assert reply.result == {"completed": [], "pending": [job["job_id"]], "timed_out": True}
    assert (await wait_done(client, job["job_id"]))["result"] == "slow done"


async def test_poll_any_returns_the_first_and_all_waits_for_every_one(client):
    fast_hash, slow_hash = await store(client, "return 'fast'"), await store(client, SLOW)
    slow = (await run(client, slow_hash, {"s": 0.5}))["job_id"]
    fast = (await run(client, fast_hash))["job_id"]
    any_reply = (await client.request(t.JobPoll(job_ids=[slow, fast], timeout_ms=5000, mode=t.PollMode.ANY))).result
    assert [j["job_id"] for j in any_reply["completed"]] == [fast] and any_reply["pending"] == [slow]
    all_reply = (await client.request(t.JobPoll(job_ids=[slow, fast], timeout_ms=5000, mode=t.PollMode.ALL))).result
    assert {j["job_id"] for j in all_reply["completed"]} == {slow, fast} and not all_reply["timed_out"]


async def test_poll_timeout_is_capped_at_30_s(client):
    from luanette.jobs import POLL_CAP_S

    assert POLL_CAP_S == 30.0
    digest = await store(client, SLOW)
    job = (await run(client, digest, {"s": 0.2}))["job_id"]
    reply = await client.request(t.JobPoll(job_ids=[job], timeout_ms=10**12, mode=t.PollMode.ALL), timeout=10)
    assert reply.result["completed"][0]["status"] == "complete"


@TIMED
async def test_cancel_stops_a_tight_loop_within_100_ms(make_server, timed):
    # no grace: a loop that never waits is stopped hard at once (tests/test_on_shutdown.py
    # covers the cooperative cancel that comes first with a grace)
    running = await make_server(cancel_grace=0)
    async with Client(running.endpoint) as client:
        await _cancel_a_tight_loop(client, timed)


async def _cancel_a_tight_loop(client: Client, timed: bool) -> None:
    digest = await store(client, SPIN)
    job = (await run(client, digest))["job_id"]
    await until_running(client, job)
    started = time.monotonic()
    reply = await client.request(t.JobCancel(job_id=job))
    assert reply.result["cancelled"] is True and reply.result["job_id"] == job
    done = await wait_done(client, job)
    if timed:
        assert time.monotonic() - started < 0.1 + 0.05  # 100 ms, plus the poll round trip
    assert done["status"] == "cancelled" and done["error"]["kind"] == "cancelled"
    again = await client.request(t.JobCancel(job_id=job))
    assert isinstance(again, t.Error) and again.code == "invalid_state" and "cancelled" in again.message
    await asyncio.sleep(0.2)  # a late finish must not relabel it (time for one to show)
    assert (await client.request(t.JobStatusRequest(job_id=job))).result["status"] == "cancelled"


async def test_cancel_a_queued_job(make_server):
    running = await make_server(max_jobs=1)
    async with Client(running.endpoint) as c:
        spin = await store(c, SPIN)
        first = (await run(c, spin))["job_id"]
        queued = (await run(c, spin))["job_id"]
        assert (await c.request(t.JobStatusRequest(job_id=queued))).result["status"] == "pending"
        await c.request(t.JobCancel(job_id=queued))
        info = (await c.request(t.JobStatusRequest(job_id=queued))).result
        assert info["status"] == "cancelled" and info["started_at"] is None
        await c.request(t.JobCancel(job_id=first))
        assert (await wait_done(c, first))["status"] == "cancelled"


async def test_job_list_and_stats(client):
    ok, bad = await store(client, "return 1"), await store(client, "error('no')")
    jobs = [(await run(client, ok))["job_id"], (await run(client, bad))["job_id"]]
    await client.request(t.JobPoll(job_ids=jobs, timeout_ms=5000, mode=t.PollMode.ALL))
    listed = (await client.request(t.JobList(status=None))).result
    assert {j["job_id"] for j in listed} == set(jobs)
    failed = (await client.request(t.JobList(status="failed"))).result
    assert [j["job_id"] for j in failed] == [jobs[1]]
    bad_status = await client.request(t.JobList(status="exploded"))
    assert isinstance(bad_status, t.Error) and bad_status.code == "invalid_params"
    stats = (await client.request(t.ReadResource(uri="luanette://jobs/stats"))).result
    assert stats == {"total": 2, "pending": 0, "running": 0, "completed": 1, "failed": 1, "cancelled": 0}


async def test_past_the_job_queue_clients_get_busy(make_server):
    running = await make_server(max_jobs=1, job_queue=1)
    async with Client(running.endpoint) as c:
        spin = await store(c, SPIN)
        first, second = (await run(c, spin))["job_id"], (await run(c, spin))["job_id"]
        third = await c.request(t.JobExecute(script_hash=spin, params=None))
        assert isinstance(third, t.Error) and third.code == "busy"
        for job in (first, second):
            await c.request(t.JobCancel(job_id=job))


async def test_two_hundred_jobs_at_once_all_complete(client):
    digest = await store(client, "return params.n * 2")
    replies = await asyncio.gather(*(client.request(t.JobExecute(script_hash=digest, params={"n": i})) for i in range(200)))
    ids = [r.result["job_id"] for r in replies]
    assert len(set(ids)) == 200
    done = (await client.request(t.JobPoll(job_ids=ids, timeout_ms=30000, mode=t.PollMode.ALL), timeout=40)).result
    assert not done["timed_out"] and len(done["completed"]) == 200
    assert sorted(j["result"] for j in done["completed"]) == [i * 2 for i in range(200)]


async def test_broadcasts_follow_a_job(server, client, zctx):
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(server.server.publisher.endpoint)
    await subscribed(sub, client)
    digest = await store(client, "return 'hi'")
    job = (await run(client, digest))["job_id"]
    await wait_done(client, job)
    frames = []
    while len(frames) < 4:
        frames.append(await asyncio.wait_for(sub.recv(), 30))
    assert all(f.startswith(b'{"type":') for f in frames)
    messages = [decode_broadcast(f) for f in frames]
    assert messages[0] == t.ScriptInvalidate(hash=digest)
    states = [(m.job_id, m.state, m.result) for m in messages[1:]]
    assert states == [(job, "pending", None), (job, "running", None), (job, "complete", "hi")]
    sub.close(0)


# --- persistence ---------------------------------------------------------------------


async def test_restart_keeps_results_and_marks_running_jobs_interrupted(daemon_process, tmp_path):
    first = daemon_process()
    async with Client(first.endpoint) as c:
        quick = await store(c, "return {answer = 42}")
        spin = await store(c, SPIN)
        done_id = (await run(c, quick))["job_id"]
        assert (await wait_done(c, done_id))["result"] == {"answer": 42}
        running_id = (await run(c, spin))["job_id"]
        await until_running(c, running_id)
    first.proc.send_signal(signal.SIGKILL)
    first.wait()

    from tests.conftest import DaemonProcess

    second = DaemonProcess(tmp_path)  # same state dir and CAS
    try:
        async with Client(second.endpoint) as c:
            kept = (await c.request(t.JobStatusRequest(job_id=done_id))).result
            assert kept["status"] == "complete" and kept["result"] == {"answer": 42}
            lost = (await c.request(t.JobStatusRequest(job_id=running_id))).result
            assert lost["status"] == "failed" and lost["error"]["kind"] == "interrupted"
            # The stored scripts are still there too.
            again = (await run(c, quick))["job_id"]
            assert (await wait_done(c, again))["result"] == {"answer": 42}
    finally:
        second.stop()
    assert json.loads(json.dumps(kept))  # plain JSON all the way


async def test_progress_is_reported_in_status_and_broadcast(server, client, zctx):
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"progress"')
    sub.connect(server.server.publisher.endpoint)
    await subscribed(sub, client)  # (so the progress subscription, sent before, is in too)
    script = """
    for i = 1, 20000 do progress.update(i / 200, "rendering") end  -- rate-limited
    progress.update(100, "done")
    local s = os.clock() + 0.3 while os.clock() < s do end
    return true
    """
    digest = await store(client, script)
    job = (await run(client, digest))["job_id"]

    # the script's 0-100 is scaled into the job's 10-90 (docs/jobs.md#progress)
    async def progress_done() -> bool:  # (the loop's last update is 100 % "rendering")
        seen = (await client.request(t.JobStatusRequest(job_id=job))).result.get("progress")
        return seen == {"percent": 90.0, "message": "done", "script_percent": 100.0}

    await until(progress_done, "the script's 100 % done in the job's status")
    ended = await wait_done(client, job)
    assert ended["progress"] == {"percent": 100.0, "message": "done", "script_percent": 100.0}
    final = t.Progress(job_id=job, percent=90.0, message="done", script_percent=100.0)
    messages: list[t.Progress] = []
    while final not in messages:  # sent before the job ended, so already on its way
        message = decode_broadcast(await asyncio.wait_for(sub.recv(), 30))
        if isinstance(message, t.Progress):
            messages.append(message)
    assert messages[-1] == final
    assert 2 <= len(messages) < 100  # far fewer than the 20,000 updates
    bad = await store(client, "progress.update(150)")
    failed = await wait_done(client, (await run(client, bad))["job_id"])
    assert "percent must be from 0 to 100" in failed["error"]["message"]
    sub.close(0)


async def test_finished_jobs_beyond_the_retention_count_are_pruned(make_server):
    running = await make_server(job_retention_count=3)
    async with Client(running.endpoint) as c:
        digest = await store(c, "return 1")
        ids = []
        for _ in range(5):  # one after the other, so completion order is known
            ids.append((await run(c, digest))["job_id"])
            await wait_done(c, ids[-1])
    await running.stop()
    from luanette.store import Store

    with Store.open(running.server.config.state_dir) as store_:
        assert store_.stats().total == 5  # pruning runs at start, not on every job
    again = await make_server(job_retention_count=3, state_dir=running.server.config.state_dir)
    assert again.server.store.stats().total == 3
    assert [again.server.store.get(i) is not None for i in ids] == [False, False, True, True, True]


async def test_a_job_reads_midi_from_the_cas_transposes_it_and_cleans_its_temp_dir(server, client):
    import io

    import mido

    song = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    for note in (60, 64, 67):
        track.append(mido.Message("note_on", note=note, velocity=90, time=0))
        track.append(mido.Message("note_off", note=note, velocity=0, time=480))
    song.tracks.append(track)
    buf = io.BytesIO()
    song.save(file=buf)
    source = server.server.cas.store(buf.getvalue(), "audio/midi")
    script = """
    function main(p)
      local song = midi.transpose(midi.read(p.source), p.semitones)
      local scratch = temp.path("song.mid")
      midi.write(song, scratch)
      assert(temp.exists(scratch))
      local stored = midi.write(song)
      return {hash = stored.hash, notes = midi.info(stored.hash).notes, dir = temp.dir(), scratch = scratch}
    end
    """
    digest = await store(client, script)
    done = await wait_done(client, (await run(client, digest, {"source": source, "semitones": 12}))["job_id"])
    assert done["status"] == "complete", done
    out = mido.MidiFile(file=io.BytesIO(server.server.cas.retrieve(done["result"]["hash"])))
    assert [m.note for m in out.tracks[0] if m.type == "note_on"] == [72, 76, 79]
    assert done["result"]["notes"] == 3
    from pathlib import Path

    # a script sees its paths relative to its own directory, never the host's
    assert (done["result"]["dir"], done["result"]["scratch"]) == (".", "song.mid")
    # the directory was under the temp directory of the worker process that ran it
    # (state/temp/job-worker-*/job-*), and was removed when the job ended
    temp_root = Path(server.server.config.state_dir) / "temp"
    assert all(w.name.startswith("job-worker-") for w in temp_root.iterdir())
    assert list(temp_root.glob("job-worker-*/job-*")) == []


async def test_a_burst_past_the_queue_gets_busy_never_internal(make_server):
    running = await make_server(max_jobs=2, job_queue=20)
    async with Client(running.endpoint) as c:
        digest = await store(c, "local s = os.clock() + 0.01 while os.clock() < s do end return 1")
        replies: list[t.Payload] = []

        async def keep_submitting() -> None:  # steady pressure while jobs complete
            for _ in range(60):
                replies.append(await c.request(t.JobExecute(script_hash=digest, params=None)))

        await asyncio.gather(*(keep_submitting() for _ in range(16)))
        codes = {r.code for r in replies if isinstance(r, t.Error)}
        assert codes <= {"busy"}, codes
        accepted = [r.result["job_id"] for r in replies if isinstance(r, t.Success)]
        assert len(accepted) >= 20
        done = (await c.request(t.JobPoll(job_ids=accepted, timeout_ms=20000, mode=t.PollMode.ALL), timeout=30)).result
        assert len(done["completed"]) == len(accepted) and not done["timed_out"]


async def test_a_job_knows_its_own_id_and_script(client):
    digest = await store(client, "return {job.id(), job.script_hash()}")
    job_id = (await run(client, digest))["job_id"]
    done = await wait_done(client, job_id)
    assert done["result"] == [job_id, digest]


async def test_a_burst_of_jobs_reads_its_script_from_the_cas_once(tmp_path):
    import asyncio

    from luanette import runtime
    from luanette.cas import Cas
    from luanette.scripts import Scripts
    from luanette.store import Store

    class CountingCas(Cas):
        reads = 0

        def retrieve(self, *args, **kwargs):
            CountingCas.reads += 1
            return super().retrieve(*args, **kwargs)

    cas = CountingCas(tmp_path / "cas")
    with Store.open(tmp_path / "state") as db:
        scripts = Scripts(cas, db, runtime.Limits())
        digest = cas.store(b"return 1", "text/x-lua")
        sources = await asyncio.gather(*[scripts.source(digest) for _ in range(50)])
        assert sources == ["return 1"] * 50 and CountingCas.reads == 1
        missing = "0" * 32
        results = await asyncio.gather(*[scripts.source(missing) for _ in range(3)], return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)  # each waiter learns it is missing
