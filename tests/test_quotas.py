"""Per-run quotas over real sockets: CAS bytes written (by the script and by its model
calls), result size, log lines and bytes; and how big a result a broadcast carries."""

from __future__ import annotations

import pytest
import zmq

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import decode_broadcast
from luanette.sim import run_models
from tests.test_jobs import run, store, subscribed, wait_done
from tests.test_models_e2e import settings_for

pytestmark = pytest.mark.timeout(90)


async def _eval(c: Client, code: str) -> t.Payload:
    return await c.request(t.LuaEval(code=code))


async def test_cas_writes_past_the_run_quota_fail_and_store_nothing(make_server):
    running = await make_server(run_cas_bytes=1000)
    async with Client(running.endpoint) as c:
        digest = await store(c, """
            local first = cas.store(string.rep("a", 600))
            local ok, err = pcall(cas.store, string.rep("b", 600))
            local again = cas.store(string.rep("c", 400))  -- what is left still fits
            return {first = first, caught = err, again = again}
        """)
        done = await wait_done(c, (await run(c, digest))["job_id"])
        assert done["status"] == "complete", done
        result = done["result"]
        assert "cas_quota_exceeded" in result["caught"] and "nothing was stored" in result["caught"]
        cas = running.server.cas
        assert cas.retrieve(result["first"]) == b"a" * 600 and cas.retrieve(result["again"]) == b"c" * 400
        assert not any(b"b" * 600 == cas.retrieve(h) for h in [result["first"], result["again"]])
        # uncaught, the job fails with the quota's own kind; the next run has its own quota
        over = await store(c, "cas.store(string.rep('x', 600)) cas.store(string.rep('y', 600))")
        failed = await wait_done(c, (await run(c, over))["job_id"])
        assert failed["status"] == "failed" and failed["error"]["kind"] == "cas_quota_exceeded"
        assert failed["error"]["line"] == 1


async def test_model_calls_count_against_the_cas_quota(make_server):
    async with run_models("all", seed=7) as sim:
        running = await make_server(settings=settings_for(sim.url), run_cas_bytes=2000)
        async with Client(running.endpoint) as c:
            digest = await store(c, "return musicgen.generate{prompt = 'pad', duration = 1}")
            done = await wait_done(c, (await run(c, digest))["job_id"])
    # one second of 32 kHz audio is ~64 KB: far past 2,000 bytes
    assert done["status"] == "failed" and done["error"]["kind"] == "cas_quota_exceeded", done


async def test_a_result_past_its_size_is_refused_with_its_own_kind(make_server):
    running = await make_server(run_result_bytes=1000)
    async with Client(running.endpoint) as c:
        small = await _eval(c, "return string.rep('x', 900)")
        assert isinstance(small, t.Success) and len(small.result["result"]) == 900
        big = await _eval(c, "return {data = string.rep('x', 2000)}")
        assert isinstance(big, t.Error) and big.details["kind"] == "result_too_large"
        assert "cas.store" in big.details["hints"][0]
        after = await _eval(c, "return 1")  # the state was sound: the next run is fine
        assert isinstance(after, t.Success) and after.result["result"] == 1


async def test_log_lines_and_bytes_past_the_quota_are_a_catchable_error(make_server):
    running = await make_server(run_log_lines=3, run_log_bytes=200)
    async with Client(running.endpoint) as c:
        lines = await _eval(c, """
            log.info("one") print("two") log.warn("three")
            local ok, err = pcall(log.info, "four")
            return err
        """)
        assert isinstance(lines, t.Success) and "log_quota_exceeded" in lines.result["result"]
        uncaught = await _eval(c, "for i = 1, 10 do print(i) end")
        assert isinstance(uncaught, t.Error) and uncaught.details["kind"] == "log_quota_exceeded"
        size = await _eval(c, "log.info(string.rep('z', 300))")
        assert isinstance(size, t.Error) and size.details["kind"] == "log_quota_exceeded"
        fresh = await _eval(c, "log.info('each run has its own quota') return true")
        assert isinstance(fresh, t.Success)


@pytest.mark.parametrize("limit", [100, 0])
async def test_broadcasts_carry_results_only_up_to_their_size(make_server, zctx, limit):
    running = await make_server(pub_results=limit)
    sub = zctx.socket(zmq.SUB)
    sub.connect(running.server.publisher.endpoint)
    async with Client(running.endpoint) as c:
        await subscribed(sub, c)
        sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"job_state_changed"')
        small = await store(c, "return 'tiny'")
        big = await store(c, "return string.rep('x', 500)")
        finished = {}
        for digest in (small, big):
            job = (await run(c, digest))["job_id"]
            await wait_done(c, job)
            while job not in finished:
                message = decode_broadcast(await sub.recv())
                if isinstance(message, t.JobStateChanged) and message.state == "complete":
                    finished[message.job_id] = message.result
        small_result, big_result = finished.values()
        assert big_result["omitted"] is True and big_result["fetch"]["type"] == "job_status"
        status = (await c.request(t.JobStatusRequest(job_id=big_result["fetch"]["job_id"]))).result
        assert status["result"] == "x" * 500  # fetched where the broadcast said
    if limit:
        assert small_result == "tiny" and big_result["size_bytes"] == 502
    else:
        assert small_result["omitted"] is True
    sub.close(0)
