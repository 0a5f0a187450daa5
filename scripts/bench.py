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
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

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
    out: mp.Queue = mp.Queue()
    proc = mp.Process(target=drive, args=(endpoint, payload, total, in_flight, out))
    proc.start()
    elapsed, p50, p99 = out.get(timeout=600)
    proc.join()
    return Row(name, in_flight, total, elapsed, p50, p99)


def start_daemon(endpoint: str) -> subprocess.Popen:
    exe = shutil.which("luanette", path=str(Path(sys.executable).parent)) or "luanette"
    proc = subprocess.Popen([exe, "serve", "--bind", endpoint, "--max-evals", os.environ.get("BENCH_MAX_EVALS", "16")],
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
    finally:
        daemon.terminate()
        daemon.wait(30)
        echo.terminate()

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
    ping64 = next(r for r, ref in rows if r.name == "Ping" and r.in_flight == 64)
    eval64 = next(r for r, ref in rows if r.name.startswith("LuaEval") and r.in_flight == 64)
    loaded = rows[-1][0]
    print()
    print(f"targets: pipelined Ping >= 30% of echo: {ping64.rate / base[64].rate:.0%}; "
          f"LuaEval >= 10%: {eval64.rate / base[64].rate:.0%}; "
          f"Ping p99 under load < 10 ms: {loaded.p99_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
