"""Remote workers (issue 14): ``luanette worker`` processes joining a front's pool over
tcp loopback: registration, credit, routing by group and capabilities, a worker killed
mid-run, rejoining, hot reload, retry on worker loss, and the local supervisor's
scaling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import Encoding, decode_payload, encode_payload
from luanette.engine import channel as ch
from tests.waiting import until

BIN = Path(sys.executable).parent

LOOP = """
function describe() return {name = "spin"} end
function main(p)
  local n = 0
  while true do n = n + 1 end
end
"""


class Worker:
    """A ``luanette worker`` process."""

    def __init__(self, endpoint: str, cas: Path, name: str, *args: str) -> None:
        self.name = name
        self.args = (endpoint, cas, name, *args)
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        endpoint, cas, name, *args = self.args
        return subprocess.Popen(
            [str(BIN / "luanette"), "worker", "--connect", endpoint, "--name", name, "--cas", str(cas), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )

    def restart(self) -> None:
        self.proc = self._start()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def workers():
    started: list[Worker] = []

    def start(endpoint: str, cas: Path, name: str, *args: str) -> Worker:
        worker = Worker(endpoint, cas, name, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def ready(engine, name: str) -> bool:
    return any(w["name"] == name and w["state"] == "ready" for w in engine.workers())


def worker(engine, name: str) -> dict:
    (found,) = [w for w in engine.workers() if w["name"] == name]
    return found


async def store(c: Client, content: str) -> str:
    reply = await c.request(t.ScriptStore(content=content))
    assert isinstance(reply, t.Success), reply
    return reply.result["hash"]


async def submit(c: Client, script_hash: str, params=None) -> str:
    reply = await c.request(t.JobExecute(script_hash=script_hash, params=params or {}))
    assert isinstance(reply, t.Success), reply
    return reply.result["job_id"]


async def job(c: Client, job_id: str) -> dict:
    reply = await c.request(t.JobStatusRequest(job_id=job_id))
    assert isinstance(reply, t.Success), reply
    return reply.result


async def done(c: Client, job_id: str) -> dict:
    async def ended():
        return (await job(c, job_id))["status"] in ("complete", "failed", "cancelled")

    await until(ended, f"job {job_id} ends", step=0.05)
    return await job(c, job_id)


@pytest.fixture
async def front(make_server, tmp_path):
    running = await make_server(workers=0, pool="tcp://127.0.0.1:*", no_worker_timeout=60.0)
    return running, running.server.engine.pool_endpoint, tmp_path / "cas"


def test_register_payload_is_seed_001s():
    """The registration a worker sends is seed 001's Register(WorkerRegistration), as the
    wire vectors encode it."""
    import uuid

    reg = t.Register(
        worker_id=uuid.uuid4(), worker_type=t.WorkerType.LUANETTE, worker_name="w", capabilities=["*"],
        hostname="h", version="1",
    )
    message = ch.Register(registration=encode_payload(reg, Encoding.COMPACT), pid=1, capacity=4, group="g",
                          remote=True)
    back = ch.to_front.decode(ch.encoder.encode(message))
    assert isinstance(back, ch.Register) and decode_payload(back.registration, Encoding.COMPACT) == reg


async def test_two_remote_workers_share_200_jobs(front, workers):
    running, endpoint, cas = front
    engine = running.server.engine
    workers(endpoint, cas, "wa")
    workers(endpoint, cas, "wb")
    await until(lambda: ready(engine, "wa") and ready(engine, "wb"), "both workers registered")
    wa = worker(engine, "wa")
    assert wa["remote"] and wa["group"] == "default" and wa["capabilities"] == ["*"] and wa["hostname"]
    async with Client(running.endpoint) as c:
        h = await store(c, "function main(p) local s = 0 for i = 1, 2000 do s = s + i end return p.n end")
        ids = [await submit(c, h, {"n": i}) for i in range(200)]
        results = [await done(c, i) for i in ids]
    assert [r["status"] for r in results] == ["complete"] * 200
    assert [r["result"] for r in results] == list(range(200))
    served = {w["name"]: w["served"] for w in engine.workers()}
    assert served["wa"] > 0 and served["wb"] > 0, served
    assert served["wa"] + served["wb"] >= 200


async def test_killed_worker_loses_its_jobs_and_rejoins(front, workers):
    running, endpoint, cas = front
    engine = running.server.engine
    wa = workers(endpoint, cas, "wa", "--group", "ga")
    workers(endpoint, cas, "wb", "--group", "gb")
    await until(lambda: ready(engine, "wa") and ready(engine, "wb"), "both workers registered")
    async with Client(running.endpoint) as c:
        spin_a = await store(c, LOOP.replace('name = "spin"', 'name = "spin", group = "ga"'))
        quick_b = await store(c, 'function describe() return {group = "gb"} end function main(p) return p.n end')
        victim = await submit(c, spin_a)
        await until(lambda: worker(engine, "wa")["runs"] == 1, "the loop runs on wa")
        wa.kill()
        lost = await done(c, victim)
        assert lost["status"] == "failed" and lost["error"]["kind"] == "worker_lost", lost["error"]
        assert "heartbeat" in lost["error"]["message"]
        assert not any(w["name"] == "wa" for w in engine.workers())
        # the rest go on: wb serves its group
        others = [await submit(c, quick_b, {"n": i}) for i in range(5)]
        assert [(await done(c, i))["result"] for i in others] == list(range(5))
        # wa comes back and takes work again
        wa.restart()
        await until(lambda: ready(engine, "wa"), "wa registered again")
        again = await submit(c, await store(c, 'function describe() return {group = "ga"} end function main() return "a" end'))
        assert (await done(c, again))["result"] == "a"
    assert worker(engine, "wa")["served"] >= 1
    assert engine.stats.workers_lost == 1


async def test_group_jobs_run_only_on_their_group_and_wait_pending_with_a_reason(front, workers):
    running, endpoint, cas = front
    engine = running.server.engine
    workers(endpoint, cas, "plain")
    await until(lambda: ready(engine, "plain"), "plain registered")
    async with Client(running.endpoint) as c:
        gpu = await store(c, 'function describe() return {group = "gpu-host"} end function main() return "gpu" end')
        before = worker(engine, "plain")["served"]  # (describe() ran at script_store: any worker)
        waiting = await submit(c, gpu)

        async def pending_with_reason():
            info = await job(c, waiting)
            return info["status"] == "pending" and "gpu-host" in ((info.get("progress") or {}).get("message") or "")

        await until(pending_with_reason, "the gpu job pending with its reason", step=0.05)
        assert worker(engine, "plain")["served"] == before
        workers(endpoint, cas, "gpu1", "--group", "gpu-host")
        result = await done(c, waiting)
    assert result["status"] == "complete" and result["result"] == "gpu"
    assert worker(engine, "gpu1")["served"] == 1 and worker(engine, "plain")["served"] == before


async def test_capabilities_route_and_no_worker_fails_after_its_time(make_server, tmp_path, workers):
    running = await make_server(workers=0, pool="tcp://127.0.0.1:*", no_worker_timeout=1.0)
    engine = running.server.engine
    workers(engine.pool_endpoint, tmp_path / "cas", "midi-only", "--capability", "midi")
    await until(lambda: ready(engine, "midi-only"), "registered")
    assert worker(engine, "midi-only")["capabilities"] == ["midi"]
    async with Client(running.endpoint) as c:
        midi = await store(c, 'function describe() return {capabilities = {"midi"}} end function main() return 1 end')
        garden = await store(c, 'function describe() return {capabilities = {"garden.write"}} end function main() return 2 end')
        ok = await done(c, await submit(c, midi))
        refused = await done(c, await submit(c, garden))
    assert ok["status"] == "complete" and ok["result"] == 1
    assert refused["status"] == "failed" and refused["error"]["kind"] == "no_worker", refused["error"]
    assert "capabilities" in refused["error"]["message"]


async def test_retry_on_worker_loss_runs_the_job_again_once(front, workers):
    running, endpoint, cas = front
    engine = running.server.engine
    first = workers(endpoint, cas, "first")
    await until(lambda: ready(engine, "first"), "first registered")
    async with Client(running.endpoint) as c:
        # the run sleeps; its worker is killed; the job runs again on the other one
        h = await store(c, """
            function describe() return {retry = "on_worker_loss"} end
            function main(p)
              clock.sleep(60000)
              return "slept"
            end""")
        job_id = await submit(c, h)
        await until(lambda: worker(engine, "first")["runs"] == 1, "running on first")
        workers(endpoint, cas, "second")
        await until(lambda: ready(engine, "second"), "second registered")
        first.kill()
        await until(lambda: worker(engine, "second")["runs"] == 1, "the job runs again on second")
        info = await job(c, job_id)
        assert info["status"] == "running"
        await c.request(t.JobCancel(job_id=job_id))
        ended = await done(c, job_id)
    assert ended["status"] == "cancelled"  # not failed worker_lost: it was retried


async def test_worker_drops_runs_when_the_front_is_gone_and_registers_with_the_next(make_server, tmp_path, workers):
    import socket as socket_mod

    with socket_mod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    first = await make_server(workers=0, pool=endpoint)
    w = workers(endpoint, tmp_path / "cas", "survivor")
    await until(lambda: ready(first.server.engine, "survivor"), "registered with the first front")
    await first.stop()
    assert w.proc.poll() is None  # a remote worker outlives its front
    second = await make_server(workers=0, pool=endpoint, state_dir=str(tmp_path / "state2"))
    await until(lambda: ready(second.server.engine, "survivor"), "registered with the second front")
    async with Client(second.endpoint) as c:
        reply = await c.request(t.LuaEval(code="return 40 + 2"))
    assert isinstance(reply, t.Success) and reply.result["result"] == 42, reply


async def test_stored_again_under_the_same_name_is_seen_by_every_worker(front, workers):
    running, endpoint, cas = front
    engine = running.server.engine
    for name in ("wa", "wb"):
        workers(endpoint, cas, name)
    await until(lambda: ready(engine, "wa") and ready(engine, "wb"), "both registered")
    async with Client(running.endpoint) as c:
        for version in (1, 2):
            await store(c, f'function describe() return {{name = "lib"}} end return {{v = {version}}}')
            user = await store(c, f'-- {version}\nfunction main() return require("script:lib").v end')
            results = [(await done(c, await submit(c, user)))["result"] for _ in range(20)]
            assert results == [version] * 20
    assert all(w["served"] > 0 for w in engine.workers())


async def test_unknown_sender_is_told_to_register_and_its_late_results_are_counted(front, zctx):
    import zmq

    running, endpoint, _ = front
    engine = running.server.engine
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"stranger")
    sock.connect(endpoint)
    await sock.send(ch.encoder.encode(ch.Done(run=12345, result=1)))
    reply = ch.to_worker.decode(await asyncio.wait_for(sock.recv(), 10))
    assert isinstance(reply, ch.Unknown)
    assert engine.stats.late_results == 1
    # garbage is dropped, the pool goes on
    await sock.send(b"\xc1not msgpack")
    await sock.send(ch.encoder.encode(ch.Register(registration=b"junk", pid=1, capacity=1, remote=True)))
    async with Client(running.endpoint) as c:
        reply = await c.request(t.Ping())
    assert isinstance(reply, t.Pong)
    assert not any(w["name"] == "stranger" for w in engine.workers())
    sock.close(0)


async def test_local_supervisor_scales_between_min_and_max(make_server):
    running = await make_server(workers_min=1, workers_max=2, max_jobs=1, script_timeout=60.0)
    engine = running.server.engine
    engine.config = msgspec.structs.replace(engine.config, scale_down_idle_s=0.5)
    await until(lambda: sum(1 for w in engine.workers() if w["state"] == "ready") == 1, "one worker")
    async with Client(running.endpoint) as c:
        h = await store(c, LOOP)
        busy = await submit(c, h)
        await until(lambda: any(w["runs"] for w in engine.workers()), "the loop runs")
        queued = await submit(c, h)  # max_jobs=1: it waits in the queue
        await until(lambda: engine.stats.scaled_up >= 1, "scaled up")
        await until(lambda: sum(1 for w in engine.workers() if w["state"] == "ready") == 2, "two workers")
        for j in (queued, busy):
            await c.request(t.JobCancel(job_id=j))
        await done(c, busy)
        await done(c, queued)
    await until(lambda: engine.stats.scaled_down >= 1, "scaled down when idle")
    await until(lambda: sum(1 for w in engine.workers() if not w["leaving"]) == 1, "back to one worker")


async def test_with_curve_only_worker_keys_join_the_pool(make_server, tmp_path, workers):
    import shutil

    from luanette import auth

    keys = tmp_path / "keys"
    auth.init(keys)
    server = keys / "server"
    for name in ("good", "client-key"):
        home = keys / name
        auth.generate(home, "worker")
        shutil.copy(server / "server.key", home / "server.key")
    (server / auth.WORKERS_DIR).mkdir(exist_ok=True)
    shutil.copy(keys / "good" / "worker.key", server / auth.WORKERS_DIR / "good.key")
    # a client's pair presented as a worker's: allowed on :5570, not in the pool
    shutil.copy(keys / "client" / "client.key_secret", keys / "client-key" / "worker.key_secret")
    running = await make_server(workers=0, pool="tcp://127.0.0.1:*", curve=str(server))
    engine = running.server.engine
    cas = tmp_path / "cas"
    workers(engine.pool_endpoint, cas, "intruder", "--curve", str(keys / "client-key"))
    workers(engine.pool_endpoint, cas, "plain")  # no keys at all (loopback, so it may try)
    workers(engine.pool_endpoint, cas, "good", "--curve", str(keys / "good"))
    await until(lambda: ready(engine, "good"), "the worker with a worker key joined")
    async with Client(running.endpoint, curve=auth.load_client(keys / "client")) as c:
        reply = await c.request(t.LuaEval(code="return 6 * 7"))
    assert isinstance(reply, t.Success) and reply.result["result"] == 42
    assert worker(engine, "good")["served"] >= 1
    # the others had every chance to register meanwhile (they started first)
    assert sorted(w["name"] for w in engine.workers()) == ["good"]


def test_pool_off_loopback_needs_curve():
    from luanette.cli.daemon import exposure_problem
    from luanette.config import Config

    problem = exposure_problem(Config(pool="tcp://0.0.0.0:5571"))
    assert problem is not None and "tcp://0.0.0.0:5571" in problem
    assert exposure_problem(Config(pool="tcp://127.0.0.1:5571")) is None
    assert exposure_problem(Config(pool="tcp://0.0.0.0:5571", curve="keys")) is None


def test_worker_refuses_a_remote_front_without_curve(tmp_path):
    result = subprocess.run(
        [str(BIN / "luanette"), "worker", "--connect", "tcp://10.0.0.1:5571", "--cas", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--curve" in result.stderr
    bad = subprocess.run(
        [str(BIN / "luanette"), "worker", "--connect", "tcp://127.0.0.1:5571", "--group", "no spaces"],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "group" in bad.stderr


async def test_an_eval_on_a_lost_worker_gets_an_error_reply(front, workers):
    running, endpoint, cas = front
    engine = running.server.engine
    victim = workers(endpoint, cas, "victim")
    await until(lambda: ready(engine, "victim"), "registered")
    async with Client(running.endpoint) as c:
        pending = asyncio.ensure_future(c.request(t.LuaEval(code="clock.sleep(60000) return 1"), timeout=60))
        await until(lambda: worker(engine, "victim")["runs"] == 1, "the eval runs on the victim")
        victim.kill()
        reply = await pending
    assert isinstance(reply, t.Error) and reply.code == "lua_error", reply
    assert reply.details["kind"] == "worker_lost" and "heartbeat" in reply.message
