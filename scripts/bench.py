#!/usr/bin/env python3
"""Benchmark Luanette against a raw pyzmq echo measured in the same run.

Every row is driven by the same client: a synchronous pyzmq DEALER in its own process
that keeps a fixed number of HOOT01 requests in flight and times each one by its request
id. The baseline server is a plain synchronous ROUTER that echoes every message, also
in its own process, so the ratio column measures the daemon alone.

    python scripts/bench.py [--requests N] [--markdown]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from queue import Empty

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hooteproto import types as t  # noqa: E402
from hooteproto.codec import Encoding, payload_codec  # noqa: E402
from hooteproto.frames import Command, ContentType, Hoot01  # noqa: E402


class Row(msgspec.Struct):
    name: str
    in_flight: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def request_frames(payload: t.Payload) -> list[bytes]:
    return Hoot01(
        command=Command.REQUEST,
        content_type=ContentType.MSGPACK,
        request_id=uuid.uuid4(),
        service="luanette",
        body=payload_codec.encode(payload, Encoding.COMPACT),
    ).to_frames()


# --- processes -----------------------------------------------------------------------


def echo_server(endpoint: str) -> None:
    """The baseline: a plain synchronous ROUTER that sends every message back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def drive(endpoint: str, payload: t.Payload, total: int, in_flight: int, out: mp.Queue) -> None:
    """The client for every row: keep ``in_flight`` requests outstanding until ``total``
    have been answered; report wall time and per-request latencies."""
    template = request_frames(payload)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    sent = 0

    def send_one() -> None:
        nonlocal sent
        rid = uuid.uuid4().bytes
        frames = list(template)
        frames[3] = rid
        sent_at[rid] = time.perf_counter()
        sock.send_multipart(frames)
        sent += 1

    # Warm up the connection (and the daemon's code paths) before timing.
    for _ in range(min(50, total)):
        send_one()
        sock.recv_multipart()
    sent_at.clear()
    sent = 0
    started = time.perf_counter()
    while sent < min(in_flight, total):
        send_one()
    while len(latencies) < total:
        reply = sock.recv_multipart()
        latencies.append(time.perf_counter() - sent_at.pop(reply[3]))
        if sent < total:
            send_one()
    elapsed = time.perf_counter() - started
    latencies.sort()
    out.put((elapsed, latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000))


def measure(name: str, endpoint: str, payload: t.Payload, total: int, in_flight: int) -> Row:
    elapsed, p50, p99 = in_process(drive, endpoint, payload, total, in_flight)
    return Row(name, in_flight, total, elapsed, p50, p99)


def start_daemon(endpoint: str, *extra: str) -> subprocess.Popen:
    exe = shutil.which("luanette", path=str(Path(sys.executable).parent)) or "luanette"
    state = tempfile.mkdtemp(prefix="luanette-bench-")
    proc = subprocess.Popen([exe, "serve", "--bind", endpoint, "--pub", "none",
                             "--max-evals", os.environ.get("BENCH_MAX_EVALS", "16"),
                             "--state-dir", f"{state}/state", "--cas-root", f"{state}/cas", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = int(endpoint.rsplit(":", 1)[1])
    for _ in range(400):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.025)
    raise RuntimeError("daemon did not start")


SPIN = "local stop = os.clock() + params.s local n = 0 while os.clock() < stop do n = n + 1 end return n"


def load_scripts(endpoint: str, seconds: float, count: int, out: mp.Queue) -> None:
    """Keep ``count`` CPU-bound scripts running for about ``seconds``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(count):
        sock.send_multipart(request_frames(t.LuaEval(code=SPIN, params={"s": seconds})))
    out.put("started")
    for _ in range(count):
        sock.recv_multipart()


class Sync:
    """A blocking request/reply helper for the job rows (one request at a time)."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, payload: t.Payload) -> t.Payload:
        frames = request_frames(payload)
        self.sock.send_multipart(frames)
        while True:
            reply = self.sock.recv_multipart()
            if reply[3] == frames[3]:
                return payload_codec.decode(reply[6])

    def ask_all(self, payloads: list[t.Payload]) -> list[t.Payload]:
        """Send every request at once (pipelined), then collect the replies in order."""
        sent = [request_frames(p) for p in payloads]
        for frames in sent:
            self.sock.send_multipart(frames)
        replies: dict[bytes, t.Payload] = {}
        while len(replies) < len(sent):
            reply = self.sock.recv_multipart()
            replies[reply[3]] = payload_codec.decode(reply[6])
        return [replies[frames[3]] for frames in sent]


def job_throughput(endpoint: str, total: int, out: mp.Queue) -> None:
    """Submit ``total`` jobs of a trivial stored script (64 submissions in flight), then
    wait for all of them: jobs per second from first submit to last completion."""
    sync = Sync(endpoint)
    digest = sync.ask(t.ScriptStore(content="return 2+2")).result["hash"]
    frames = request_frames(t.JobExecute(script_hash=digest, params=None))
    started = time.perf_counter()
    ids, sent, answered = [], 0, 0
    while answered < total:
        while sent < total and sent - answered < 64:
            f = list(frames)
            f[3] = uuid.uuid4().bytes
            sync.sock.send_multipart(f)
            sent += 1
        reply = payload_codec.decode(sync.sock.recv_multipart()[6])
        answered += 1
        if isinstance(reply, t.Error):  # busy: the queue is full; the daemon said so
            assert reply.code == "busy", reply
            time.sleep(0.01)
            sent -= 1  # send that one again
            answered -= 1
            continue
        ids.append(reply.result["job_id"])
    pending = ids
    while pending:
        polled = sync.ask(t.JobPoll(job_ids=pending, timeout_ms=30000, mode=t.PollMode.ALL)).result
        pending = polled["pending"]
    out.put(time.perf_counter() - started)


def cancel_latency(endpoint: str, rounds: int, out: mp.Queue) -> None:
    """Time from sending JobCancel for a running tight loop to the job reading cancelled."""
    sync = Sync(endpoint)
    digest = sync.ask(t.ScriptStore(content="while true do end")).result["hash"]
    latencies = []
    for _ in range(rounds):
        job = sync.ask(t.JobExecute(script_hash=digest, params=None)).result["job_id"]
        while sync.ask(t.JobStatusRequest(job_id=job)).result["status"] != "running":
            time.sleep(0.005)
        time.sleep(0.05)
        started = time.perf_counter()
        sync.ask(t.JobCancel(job_id=job))
        done = sync.ask(t.JobPoll(job_ids=[job], timeout_ms=5000, mode=t.PollMode.ALL)).result
        latencies.append(time.perf_counter() - started)
        assert done["completed"][0]["status"] == "cancelled"
    latencies.sort()
    out.put(latencies)


def in_process(target, *args):
    """Run ``target(*args, out)`` in its own process and return what it put on ``out``."""
    out: mp.Queue = mp.Queue()
    proc = mp.Process(target=target, args=(*args, out))
    proc.start()
    deadline = time.monotonic() + 600
    while True:
        try:
            value = out.get(timeout=1)
            break
        except Empty:
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{target.__name__} ended without a result") from None
    proc.join()
    return value


# --- scale: many jobs waiting on a slow service ---------------------------------------

SCALE_JOBS = 1000
SCALE_SCRIPT = 'return backend.call("orpheus", {task = "generate", max_tokens = 3}, {raw = true}).task'


def start_model_sim(latency_ms: int) -> tuple[subprocess.Popen, str]:
    """``luanette-sim models`` in its own process, as the GPU services are; (proc, URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "luanette.sim.cli", "models", "--kind", "all", "--port", "0",
         "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"model simulator did not start: {line!r}")
    return proc, line.split()[1]


def raise_fd_limit(need: int) -> None:
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def scale_daemon(sim_url: str, out: mp.Queue) -> None:
    """SCALE_JOBS jobs through a real daemon (max_jobs and backend concurrency raised):
    submit them all, poll until all finish; wall time and the daemon's peak threads."""
    raise_fd_limit(8192)
    state = tempfile.mkdtemp(prefix="luanette-bench-scale-")
    settings = Path(state) / "luanette.toml"
    settings.write_text(f'[backends.orpheus]\nurl = "{sim_url}"\nconcurrency = {SCALE_JOBS}\ntimeout_s = 30\n')
    endpoint = free_endpoint()
    daemon = start_daemon(endpoint, "--config", str(settings), "--max-jobs", str(SCALE_JOBS),
                          "--job-queue", str(2 * SCALE_JOBS))
    try:
        sync = Sync(endpoint)
        digest = sync.ask(t.ScriptStore(content=SCALE_SCRIPT)).result["hash"]
        peak = [thread_count(daemon.pid)]
        sampling = threading.Event()

        def sample() -> None:  # the daemon's thread count every 5 ms, beside the client
            while not sampling.wait(0.005):
                peak[0] = max(peak[0], thread_count(daemon.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        submitted = sync.ask_all([t.JobExecute(script_hash=digest, params=None) for _ in range(SCALE_JOBS)])
        ids = [reply.result["job_id"] for reply in submitted]
        polled = sync.ask(t.JobPoll(job_ids=ids, timeout_ms=30000, mode=t.PollMode.ALL)).result
        wall = time.perf_counter() - started
        sampling.set()
        sampler.join()
        assert not polled["timed_out"]
        statuses = {job["status"] for job in polled["completed"]}
        assert statuses == {"complete"}, statuses
        out.put((wall, peak[0]))
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(state, ignore_errors=True)


def scale_threads(sim_url: str, out: mp.Queue) -> None:
    """The same work the way the Rust version did it: one OS thread per job, each with
    its own Lua runtime whose backend call blocks the thread for the request."""
    import json  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    import lupa.lua54 as lupa  # noqa: PLC0415

    raise_fd_limit(8192)
    threading.stack_size(512 * 1024)

    def call(body: str) -> str:
        request = urllib.request.Request(sim_url + "/predict", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["task"]

    results: list[str] = []

    def job() -> None:
        lua = lupa.LuaRuntime()
        lua.globals().call = call
        results.append(lua.execute('return call(\'{"task": "generate", "max_tokens": 3}\')'))

    threads = [threading.Thread(target=job) for _ in range(SCALE_JOBS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    peak = threading.active_count()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    assert results == ["generate"] * SCALE_JOBS
    out.put((wall, peak))


# --- main ----------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per row (LuaEval uses a fifth)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    n = args.requests

    echo_ep, daemon_ep = free_endpoint(), free_endpoint()
    echo = mp.Process(target=echo_server, args=(echo_ep,), daemon=True)
    echo.start()
    daemon = start_daemon(daemon_ep)
    rows: list[tuple[Row, Row | None]] = []
    try:
        base = {k: measure("raw pyzmq echo", echo_ep, t.Ping(), n, k) for k in (1, 64)}
        for k in (1, 64):
            rows.append((base[k], None))
        for k in (1, 64):
            rows.append((measure("Ping", daemon_ep, t.Ping(), n, k), base[k]))
        for k in (1, 64):
            rows.append((measure("LuaEval `return 2+2`", daemon_ep, t.LuaEval(code="return 2+2"), n // 5, k), base[k]))
        # Ping latency while two CPU-bound scripts run on the daemon.
        out: mp.Queue = mp.Queue()
        loader = mp.Process(target=load_scripts, args=(daemon_ep, 30.0, 2, out))
        loader.start()
        out.get(timeout=30)
        time.sleep(0.3)
        rows.append((measure("Ping, 2 CPU-bound scripts running", daemon_ep, t.Ping(), n // 4, 1), base[1]))
        loader.terminate()
        loader.join()
        time.sleep(0.5)
        jobs_total = max(n // 10, 100)  # more than the job queue holds: busy is retried
        jobs_seconds = in_process(job_throughput, daemon_ep, jobs_total)
        cancels = in_process(cancel_latency, daemon_ep, 20)
    finally:
        daemon.terminate()
        daemon.wait(30)
        echo.terminate()
    sim, sim_url = start_model_sim(1000)
    try:
        scale = in_process(scale_daemon, sim_url)
        time.sleep(1)
        threaded = in_process(scale_threads, sim_url)
    finally:
        sim.terminate()
        sim.wait(10)

    header = ("case", "in flight", "req/s", "p50 ms", "p99 ms", "req/s vs echo")
    lines = []
    for row, ref in rows:
        ratio = "baseline" if ref is None else f"{row.rate / ref.rate:.0%}"
        lines.append((row.name, str(row.in_flight), f"{row.rate:,.0f}", f"{row.p50_ms:.3f}", f"{row.p99_ms:.3f}", ratio))
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, requests per row: {n} (LuaEval {n // 5})")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
        for line in [header, *lines]:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print()
    print(f"jobs: {jobs_total} trivial jobs submitted (64 in flight) and completed in {jobs_seconds:.2f} s: "
          f"{jobs_total / jobs_seconds:,.0f} jobs/s")
    print(f"cancel of a running tight loop, {len(cancels)} rounds: p50 {cancels[len(cancels) // 2] * 1000:.1f} ms, "
          f"max {cancels[-1] * 1000:.1f} ms (JobCancel sent -> JobPoll sees cancelled)")
    print(f"scale: {SCALE_JOBS} jobs, each waiting 1 s on the model simulator: daemon {scale[0]:.2f} s wall, "
          f"peak {scale[1]} threads; one thread per job (Lua + blocking HTTP) {threaded[0]:.2f} s wall, "
          f"peak {threaded[1]} threads")
    ping64 = next(r for r, ref in rows if r.name == "Ping" and r.in_flight == 64)
    eval64 = next(r for r, ref in rows if r.name.startswith("LuaEval") and r.in_flight == 64)
    loaded = rows[-1][0]
    print()
    print(f"targets: pipelined Ping >= 30% of echo: {ping64.rate / base[64].rate:.0%}; "
          f"LuaEval >= 10%: {eval64.rate / base[64].rate:.0%}; "
          f"Ping p99 under load < 10 ms: {loaded.p99_ms:.2f} ms; "
          f"{SCALE_JOBS} x 1 s jobs < 3 s wall with < 20 threads: {scale[0]:.2f} s, {scale[1]} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
