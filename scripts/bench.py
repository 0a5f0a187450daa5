"""Benchmark Luanette beside baselines measured in the same run.

Load generator: every ZeroMQ row is driven by the same client, which keeps the in-flight
requests outstanding as pipelined HOOT01 requests on one DEALER socket, times each reply
by its request id and decodes it (Success, Error "busy", other Error); the rate is
counted from the common start to the last reply. By default that client is ``zload``
(scripts/zload.c), one process, compiled at the start of the run against the libzmq
pyzmq loads (cached in the temp directory): it costs ~15 us of CPU per request where a
Python client process costs 60-100 us, CPU the daemon's own processes need on a small
machine; it records the replies' bodies and this script decodes them after the row.
Without a C compiler, or with ``--python-client``, ``--clients`` Python processes
(default 4) share the in-flight requests instead, their latencies merged.

Baselines:

- raw pyzmq echo: a plain synchronous ROUTER that echoes every message, in its own
  process. The "vs echo" column divides a daemon row by it at the same in-flight count;
  a daemon row at >= 80% of it is flagged, as the client may then be the bottleneck.
- libzmq echo: a ROUTER proxied to itself, echoing inside libzmq: the ceiling of the
  generator itself, which the pyzmq echo server alone cannot show.
- the architecture's floor: the daemon's shape with nothing in it: a front process
  relaying each request over ipc to one of two worker processes that run ``return 2+2``
  on a warm lupa state and send the request back; once with an asyncio front, one
  message per request (the simple design), once with a blocking front that batches what
  it drained per worker (the cheapest Python front). No daemon row can beat them here.
- Redis (when ``redis-server`` is on PATH; started on a free loopback port, persisting
  nothing, stopped afterwards): PING and ``EVAL "return 2+2" 0`` at 1 and 64 in flight,
  5x ``--requests`` each, driven by ``redis-benchmark`` (compiled; one connection per
  in-flight request, ``-P 1``) when installed, else by this generator with a small RESP
  client (``--redis-python-client`` forces that). "vs Redis" divides Ping and LuaEval by
  them.

Daemon rows (``luanette serve`` with state and CAS in a temporary directory; ``--workers``
and ``--daemon-arg`` are passed through): Ping and LuaEval at 1 and 64 in flight, Ping
while two CPU-bound scripts run, trivial jobs/s, cancel latency, and overload: LuaEvals
offered open loop at 10x the peak row's rate (sent on a clock whatever the answers, as
an overloaded server sees its callers) for ``--overload-seconds``, reporting successful
evals/s against the peak row, the p99 of the successful ones and the busy count. Then the scale row: 1,000
jobs each waiting 1 s on the model simulator, beside one OS thread per job.

    python scripts/bench.py [--requests N] [--clients K] [--python-client] [--workers N]
                            [--daemon-arg ARG ...] [--skip SECTION ...] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any, Protocol, Self

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hooteproto import types as t
from hooteproto.codec import Encoding, payload_codec
from hooteproto.frames import Command, ContentType, Hoot01

EVAL_CODE = "return 2+2"
OK, BUSY, ERROR = "ok", "busy", "error"  # how a reply is counted
REPLY_TIMEOUT_MS = 30_000  # a client that waits this long for any reply gives up
CHILD_DEADLINE_S = 600  # a child process that reports nothing for this long has failed
CLIENT_BOTTLENECK = 0.8  # a daemon row at this share of echo is limited by the client
# Overload offers 10x the in-flight requests of the peak LuaEval row (64), i.e. 160 per
# client process by default; with "busy" answered at once, that offers far more than
# 10x the peak rate.
OVERLOAD_IN_FLIGHT = 5000  # open loop: a cap on what may be outstanding, rarely reached


# --- small helpers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def wait_for_port(port: int, proc: subprocess.Popen, what: str, seconds: float = 10.0) -> None:
    """Return once something accepts connections on ``port``; raise if ``proc`` exits or
    the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.025)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds:g} s")


def request_frames(payload: t.Payload) -> list[bytes]:
    """A HOOT01 request carrying ``payload`` in compact MsgPack, with a fresh id."""
    message = Hoot01(
        command=Command.REQUEST,
        content_type=ContentType.MSGPACK,
        request_id=uuid.uuid4(),
        service="luanette",
        body=payload_codec.encode(payload, Encoding.COMPACT),
    )
    return message.to_frames()


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nan when there are none)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# --- child processes -----------------------------------------------------------------
# Every measurement runs in a child process so the parent (which only orchestrates and
# never opens a ZeroMQ context) cannot steal its CPU or share its GIL. A child reports
# ("ready" | "result" | "failed", value) on a queue.


def _child(target: Callable[..., Any], args: tuple, out: mp.Queue) -> None:
    try:
        out.put(("result", target(*args)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        out.put(("failed", traceback.format_exc()))


def _collect(out: mp.Queue, procs: list[mp.Process], count: int, kind: str) -> list[Any]:
    """Wait for ``count`` messages of ``kind`` from ``procs``; raise on a failure."""
    values: list[Any] = []
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while len(values) < count:
        try:
            got, value = out.get(timeout=1)
        except Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"a child process ended without a {kind}") from None
            continue
        if got == "failed":
            raise RuntimeError(f"child process failed:\n{value}")
        if got == kind:
            values.append(value)
    return values


def _reap(procs: list[mp.Process]) -> None:
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def in_process(target: Callable[..., Any], *args: Any) -> Any:
    """Run ``target(*args)`` in its own process and return its result."""
    out: mp.Queue = mp.Queue()
    proc = mp.Process(target=_child, args=(target, args, out))
    proc.start()
    try:
        return _collect(out, [proc], 1, "result")[0]
    finally:
        _reap([proc])


# --- the load generator --------------------------------------------------------------


class Plan(msgspec.Struct, frozen=True):
    """What one measurement offers: ``in_flight`` outstanding requests until ``requests``
    replies came back, or for ``seconds``."""

    in_flight: int
    requests: int | None = None
    seconds: float | None = None
    warmup: int = 50  # sequential requests per client before timing starts
    # open loop: send at this many requests/s whatever the answers (``in_flight`` caps
    # what may be outstanding); None: closed loop, ``in_flight`` always outstanding
    offered_rate: float | None = None

    def split(self, clients: int) -> list[Plan]:
        """This plan shared by ``clients`` processes (shares differ by at most one)."""
        def share(total: int, i: int) -> int:
            return total // clients + (1 if i < total % clients else 0)

        return [
            msgspec.structs.replace(
                self,
                in_flight=share(self.in_flight, i),
                requests=None if self.requests is None else share(self.requests, i),
                offered_rate=None if self.offered_rate is None else self.offered_rate / clients,
            )
            for i in range(clients)
        ]


class Part(msgspec.Struct):
    """What one client process measured."""

    started: float  # time.perf_counter() is CLOCK_MONOTONIC, comparable across processes
    ended: float
    ok: bytes  # latencies of the successful replies, seconds, array("d")
    busy: int
    errors: int
    error_sample: str | None


class Load(msgspec.Struct):
    """The merged result of all client processes of one measurement."""

    clients: int
    seconds: float
    latencies: list[float]  # successful replies, sorted
    busy: int
    errors: int
    error_sample: str | None
    client: str = "python"  # what drove it: "python" processes or "zload"

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


class Transport(Protocol):
    """One client connection: ``send`` one request, ``receive`` at least one reply as
    (latency seconds, OK | BUSY | ERROR) pairs."""

    error_sample: str | None

    def send(self) -> None: ...
    def receive(self) -> list[tuple[float, str]]: ...
    def close(self) -> None: ...


class ZmqTransport:
    """HOOT01 requests over one DEALER socket, each reply matched by its request id."""

    def __init__(self, endpoint: str, payload: t.Payload) -> None:
        self.template = request_frames(payload)
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        self.sock.connect(endpoint)
        # Ids unique across processes without the cost of uuid4 per request.
        self.prefix = os.urandom(8)
        self.counter = itertools.count()
        self.sent_at: dict[bytes, float] = {}
        self.error_sample: str | None = None

    def send(self) -> None:
        rid = self.prefix + next(self.counter).to_bytes(8, "big")
        frames = self.template.copy()
        frames[3] = rid
        self.sent_at[rid] = time.perf_counter()
        self.sock.send_multipart(frames)

    def poll(self, timeout_ms: int) -> bool:
        """Whether a reply is ready within ``timeout_ms``."""
        return bool(self.sock.poll(timeout_ms, zmq.POLLIN))

    def receive(self) -> list[tuple[float, str]]:
        reply = self.sock.recv_multipart()
        latency = time.perf_counter() - self.sent_at.pop(reply[3])
        # Every reply is decoded, the echo's too, so each row pays the same client cost.
        kind, sample = classify(reply[6])
        self.error_sample = sample or self.error_sample
        return [(latency, kind)]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def classify(body: bytes) -> tuple[str, str | None]:
    """How a HOOT01 reply body counts (OK | BUSY | ERROR), and an error's text."""
    payload = payload_codec.decode(body)
    if not isinstance(payload, t.Error):
        return OK, None
    if payload.code == "busy":
        return BUSY, None
    return ERROR, f"{payload.code}: {payload.message}"


# --- the compiled client (scripts/zload.c) -------------------------------------------
# Each Python client process costs the machine ~60-100 us of CPU per request, a large
# share of what a LuaEval costs the daemon on two cores.  zload moves the same HOOT01
# frames in C; bench.py decodes and counts the replies it recorded, after the row.

ZLOAD_SOURCE = Path(__file__).with_name("zload.c")


def libzmq_path() -> Path | None:
    """The libzmq shared library pyzmq has loaded into this process (Linux), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[5:]
        if path and Path(path[0]).name.startswith("libzmq") and ".so" in path[0]:
            return Path(path[0])
    return None


def build_zload() -> Path | None:
    """zload compiled against pyzmq's libzmq (cached in the temp directory by source and
    library); None, with the reason on stderr, when it cannot be built."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    library = libzmq_path()
    if compiler is None or library is None:
        why = "no C compiler on PATH" if compiler is None else "libzmq not found in this process"
        print(f"note: {why}; the Python clients drive the rows", file=sys.stderr)
        return None
    key = hashlib.sha256(ZLOAD_SOURCE.read_bytes() + str(library).encode()).hexdigest()[:16]
    exe = Path(tempfile.gettempdir()) / f"luanette-zload-{key}"
    if exe.exists():
        return exe
    partial = exe.with_name(f"{exe.name}.{os.getpid()}")
    built = subprocess.run(
        [compiler, "-O2", "-o", str(partial), str(ZLOAD_SOURCE), str(library), f"-Wl,-rpath,{library.parent}"],
        capture_output=True, text=True, check=False,
    )
    if built.returncode != 0:
        print(f"note: zload did not build; the Python clients drive the rows:\n{built.stderr}", file=sys.stderr)
        return None
    partial.replace(exe)
    return exe


def run_zload(exe: Path, endpoint: str, payload: t.Payload, plan: Plan, clients: int) -> Load:
    """Run ``plan`` over ``clients`` zload processes started together; merge what they saw."""
    clients = max(1, min(clients, plan.in_flight))
    frames = request_frames(payload)
    with tempfile.TemporaryDirectory(prefix="zload-") as tmp:
        template = Path(tmp, "template")
        template.write_bytes(struct.pack("<I", len(frames))
                             + b"".join(struct.pack("<I", len(f)) + f for f in frames))
        outputs = [Path(tmp, f"out{i}") for i in range(clients)]
        procs = [
            subprocess.Popen(
                [str(exe), endpoint, str(template), str(out), str(part.in_flight), str(part.requests or 0),
                 repr(part.seconds or 0.0), repr(part.offered_rate or 0.0), str(part.warmup)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for part, out in zip(plan.split(clients), outputs, strict=True)
        ]
        try:
            for proc in procs:
                _expect(proc, "ready")
            for proc in procs:  # (started together, as run_clients does)
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            spans = [_expect(proc, "done") for proc in procs]
            for proc in procs:
                if proc.wait(CHILD_DEADLINE_S) != 0:
                    raise RuntimeError(f"zload failed: {proc.stderr.read() if proc.stderr else ''}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        ok = array("d")
        busy = errors = 0
        sample: str | None = None
        kinds: dict[bytes, tuple[str, str | None]] = {}  # most replies are alike
        for out in outputs:
            data, at = out.read_bytes(), 0
            while at < len(data):
                latency, size = struct.unpack_from("<dI", data, at)
                body = data[at + 12: at + 12 + size]
                at += 12 + size
                kind, text = kinds.get(body) or kinds.setdefault(body, classify(body))
                if kind == OK:
                    ok.append(latency)
                elif kind == BUSY:
                    busy += 1
                else:
                    errors, sample = errors + 1, text
    return Load(
        clients=clients,
        seconds=max(end for _, end in spans) - min(start for start, _ in spans),
        latencies=sorted(ok),
        busy=busy,
        errors=errors,
        error_sample=sample,
        client="zload",
    )


def _expect(proc: subprocess.Popen, word: str) -> tuple[float, float]:
    """Read zload's next line, which must start with ``word``; its two numbers, if any."""
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if line[:1] != [word]:
        proc.kill()
        raise RuntimeError(f"zload said {line!r}, not {word!r}: {proc.stderr.read() if proc.stderr else ''}")
    return (float(line[1]), float(line[2])) if len(line) == 3 else (0.0, 0.0)


# Set by main: the compiled client, unless it could not be built or --python-client.
ZLOAD: Path | None = None


def drive(endpoint: str, payload: t.Payload, plan: Plan, clients: int) -> Load:
    """A HOOT01 load: by zload when it was built, else by Python client processes."""
    if ZLOAD is not None:  # one process: more cost the machine more than they add
        return run_zload(ZLOAD, endpoint, payload, plan, 1)
    return run_clients(functools.partial(ZmqTransport, endpoint, payload), plan, clients)


def resp_command(*args: str) -> bytes:
    """A RESP array of bulk strings, as redis-cli sends a command."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespTransport:
    """Pipelined RESP requests on one TCP connection (the fallback Redis client when
    redis-benchmark is missing). Redis answers a connection in order, so a FIFO of send
    times matches replies. Only one-line replies are parsed, which PING (``+PONG``) and
    ``EVAL "return 2+2" 0`` (``:4``) give."""

    def __init__(self, port: int, command: Sequence[str]) -> None:
        self.request = resp_command(*command)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(REPLY_TIMEOUT_MS / 1000)
        self.sent_at: deque[float] = deque()
        self.buffer = b""
        self.error_sample: str | None = None

    def send(self) -> None:
        self.sent_at.append(time.perf_counter())
        self.sock.sendall(self.request)

    def receive(self) -> list[tuple[float, str]]:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("redis closed the connection")
        now = time.perf_counter()
        *lines, self.buffer = (self.buffer + data).split(b"\r\n")
        replies = []
        for line in lines:
            kind = OK
            if line.startswith(b"-"):
                kind, self.error_sample = ERROR, line[1:].decode(errors="replace")
            replies.append((now - self.sent_at.popleft(), kind))
        return replies

    def close(self) -> None:
        self.sock.close()


def pump(make_transport: Callable[[], Transport], plan: Plan, go: Any, out: mp.Queue) -> Part:
    """One client process: warm up, say ready, wait for ``go``, then keep
    ``plan.in_flight`` requests outstanding until the plan is done."""
    transport = make_transport()
    try:
        for _ in range(plan.warmup):  # connection set up, daemon code paths warm
            transport.send()
            while not transport.receive():
                pass
        out.put(("ready", None))
        go.wait()
        return _timed_loop(transport, plan)
    finally:
        transport.close()


def _open_loop(transport: ZmqTransport, plan: Plan) -> Part:
    """Send at ``plan.offered_rate`` for ``plan.seconds`` whatever comes back (the load
    an overloaded server really sees), then collect what is still due."""
    assert plan.offered_rate and plan.seconds
    interval = 1.0 / plan.offered_rate
    started = now = time.perf_counter()
    deadline = started + plan.seconds
    due = started
    ok = array("d")
    busy = errors = outstanding = 0
    while now < deadline or (outstanding and now < deadline + 5):
        while now < deadline and due <= now and outstanding < plan.in_flight:
            transport.send()
            outstanding += 1
            due += interval
        # At the in-flight cap nothing can be sent before a reply comes: block on the
        # socket (a generator spinning here took the CPU the daemon needed).
        can_send = now < deadline and outstanding < plan.in_flight
        wait_ms = max(0, int((min(due, deadline) - now) * 1000)) if can_send else 100
        if transport.poll(wait_ms):
            for latency, kind in transport.receive():
                outstanding -= 1
                if kind == OK:
                    ok.append(latency)
                elif kind == BUSY:
                    busy += 1
                else:
                    errors += 1
        now = time.perf_counter()
    return Part(started, min(now, deadline), ok.tobytes(), busy, errors, transport.error_sample)


def _timed_loop(transport: Transport, plan: Plan) -> Part:
    if plan.offered_rate is not None:
        assert isinstance(transport, ZmqTransport)
        return _open_loop(transport, plan)
    limit = math.inf if plan.requests is None else plan.requests
    started = now = time.perf_counter()
    deadline = math.inf if plan.seconds is None else started + plan.seconds
    ok = array("d")
    busy = errors = sent = answered = 0
    while answered < limit and now < deadline:
        # Refill first: a "busy" answer is followed at once by the next request, so the
        # load stays offered continuously.
        while sent - answered < plan.in_flight and sent < limit:
            transport.send()
            sent += 1
        for latency, kind in transport.receive():
            answered += 1
            if kind == OK:
                ok.append(latency)
            elif kind == BUSY:
                busy += 1
            else:
                errors += 1
        now = time.perf_counter()
    return Part(started, now, ok.tobytes(), busy, errors, transport.error_sample)


def run_clients(make_transport: Callable[[], Transport], plan: Plan, clients: int) -> Load:
    """Run ``plan`` over ``clients`` processes started together; merge what they saw."""
    clients = max(1, min(clients, plan.in_flight))
    go = mp.Event()
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_child, args=(pump, (make_transport, part, go, out), out))
             for part in plan.split(clients)]
    for proc in procs:
        proc.start()
    try:
        _collect(out, procs, clients, "ready")
        go.set()
        parts: list[Part] = _collect(out, procs, clients, "result")
    finally:
        _reap(procs)
    latencies = array("d")
    for part in parts:
        latencies.frombytes(part.ok)
    return Load(
        clients=clients,
        seconds=max(p.ended for p in parts) - min(p.started for p in parts),
        latencies=sorted(latencies),
        busy=sum(p.busy for p in parts),
        errors=sum(p.errors for p in parts),
        error_sample=next((p.error_sample for p in parts if p.error_sample), None),
    )


# --- rows ----------------------------------------------------------------------------


class Row(msgspec.Struct):
    name: str
    in_flight: int
    client: str  # what drove it: "4 procs" or "redis-benchmark"
    rate: float  # successful replies per second
    p50_ms: float
    p99_ms: float
    note: str = ""
    busy: int = 0
    errors: int = 0


def row_from(name: str, in_flight: int, load: Load, note: str = "") -> Row:
    notes = [note] if note else []
    if load.busy:
        notes.append(f"{load.busy:,} busy")
    if load.errors:
        notes.append(f"{load.errors:,} errors ({load.error_sample})")
    kind = "zload" if load.client == "zload" else "proc"
    return Row(name, in_flight, f"{load.clients} {kind}{'s' if load.clients > 1 else ''}", load.rate,
               percentile(load.latencies, 0.5) * 1000, percentile(load.latencies, 0.99) * 1000,
               "; ".join(notes), load.busy, load.errors)


def measure(name: str, endpoint: str, payload: t.Payload, requests: int, in_flight: int,
            clients: int) -> Row:
    """A HOOT01 row: ``requests`` replies with ``in_flight`` outstanding."""
    return row_from(name, in_flight, drive(endpoint, payload, Plan(in_flight, requests=requests), clients))


# --- echo baseline -------------------------------------------------------------------


def echo_server(endpoint: str) -> None:
    """The baseline: a plain synchronous ROUTER that sends every message back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def libzmq_echo_server(endpoint: str) -> None:
    """The load generator's ceiling: zmq.proxy from a ROUTER to itself sends every
    message back to its sender inside libzmq, so no Python on the server side limits the
    rate. A daemon row near the pyzmq echo but far below this one is not client-bound."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    zmq.proxy(sock, sock)


# --- the architecture's floor -----------------------------------------------------------
# The daemon's shape (a front process that owns the sockets, Lua in worker processes
# behind a ZeroMQ channel) costs two more hops and a process than the echo.  These rows
# measure that shape with nothing else in it: a front that relays each request to a
# worker and the reply back, and workers that run EVAL_CODE on one warm lupa state and
# send the request back as its reply (no decoding, no sandbox, no admission).  The
# daemon's LuaEval rows cannot beat them on the same machine; the targets read beside
# them say how much of the gap is the shape and how much is the daemon.

FLOOR_WORKERS = 2  # the daemon's default on the 2-core VM (one per core)


def floor_packed(request: list[bytes]) -> list[bytes]:
    """A request as the floor's channel carries it: its frame count, then its frames
    (the client's route first); a message carries one or more."""
    return [bytes([len(request)]), *request]


def floor_requests(frames: list[bytes], start: int = 0) -> Iterator[list[bytes]]:
    """The requests packed in ``frames`` from ``start`` on (see floor_packed)."""
    i = start
    while i < len(frames):
        count = frames[i][0]
        yield frames[i + 1:i + 1 + count]
        i += 1 + count


def floor_worker(endpoint: str) -> None:
    """Run EVAL_CODE for each relayed request and send the request back as its answer,
    the answers to what one receive drained in one message."""
    import lupa.lua54 as lupa

    run = lupa.LuaRuntime().execute(f"return function() {EVAL_CODE} end")
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"ready")
    while True:
        frames, out = sock.recv_multipart(), []
        while True:
            for request in floor_requests(frames):
                run()
                out += floor_packed(request)
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        sock.send_multipart(out)


def floor_front_asyncio(endpoint: str, pool_endpoint: str, workers: int) -> None:
    """The simple front: pyzmq asyncio sockets (as the daemon's), one message per
    request each way, workers taken in turn."""
    import asyncio

    import zmq.asyncio

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        clients, pool = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        clients.bind(endpoint)
        pool.bind(pool_endpoint)
        ids = [(await pool.recv_multipart())[0] for _ in range(workers)]
        turn = itertools.cycle(ids)

        async def up() -> None:
            while True:
                frames = await clients.recv_multipart()
                await pool.send_multipart([next(turn), *floor_packed(frames)])

        async def down() -> None:
            while True:
                for answer in floor_requests(await pool.recv_multipart(), 1):
                    await clients.send_multipart(answer)

        await asyncio.gather(up(), down())

    asyncio.run(serve())


def floor_front_batched(endpoint: str, pool_endpoint: str, workers: int) -> None:
    """The cheapest front Python allows: a blocking poll loop that drains what has
    arrived and sends each worker its share as one message."""
    ctx = zmq.Context()
    clients, pool = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    clients.bind(endpoint)
    pool.bind(pool_endpoint)
    ids = [pool.recv_multipart()[0] for _ in range(workers)]
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(pool, zmq.POLLIN)
    turn = 0
    while True:
        ready = dict(poller.poll())
        if clients in ready:
            shares: list[list[bytes]] = [[] for _ in ids]
            with contextlib.suppress(zmq.Again):
                for _ in range(256):
                    frames = clients.recv_multipart(zmq.NOBLOCK)
                    turn = (turn + 1) % len(ids)
                    shares[turn] += floor_packed(frames)
            for worker, share in zip(ids, shares, strict=True):
                if share:
                    pool.send_multipart([worker, *share])
        if pool in ready:
            with contextlib.suppress(zmq.Again):
                for _ in range(64):
                    for answer in floor_requests(pool.recv_multipart(zmq.NOBLOCK), 1):
                        clients.send_multipart(answer)


FLOOR_FRONTS = (
    ("floor: asyncio relay + lupa", floor_front_asyncio),
    ("floor: batched relay + lupa", floor_front_batched),
)


def measure_floor(results: Results, n: int, clients: int, warm: int = 2000) -> None:
    """The floor rows (see above), each front with FLOOR_WORKERS workers over ipc;
    ``warm`` requests first, untimed (they also wait for the workers to connect)."""
    for name, front in FLOOR_FRONTS:
        endpoint = free_endpoint()
        with tempfile.TemporaryDirectory(prefix="luanette-floor-") as tmp:
            pool_endpoint = f"ipc://{tmp}/pool"
            procs = [mp.Process(target=front, args=(endpoint, pool_endpoint, FLOOR_WORKERS), daemon=True)]
            procs += [mp.Process(target=floor_worker, args=(pool_endpoint,), daemon=True)
                      for _ in range(FLOOR_WORKERS)]
            for proc in procs:
                proc.start()
            try:
                measure(name, endpoint, t.Ping(), warm, 64, clients)
                for k in (1, 64):
                    results.floor.append(measure(name, endpoint, t.Ping(), n, k, clients))
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.join()


# --- the daemon ----------------------------------------------------------------------


def luanette_exe() -> str:
    return shutil.which("luanette", path=str(Path(sys.executable).parent)) or "luanette"


@functools.cache
def serve_supports(flag: str) -> bool:
    """Whether ``luanette serve --help`` lists ``flag`` (flags come and go while the
    daemon is restructured; the bench must run before and after)."""
    result = subprocess.run([luanette_exe(), "serve", "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    return flag in result.stdout.split()


class Daemon:
    """``luanette serve`` as a process, its state and CAS in a temporary directory."""

    def __init__(self, endpoint: str, *args: str, source: Path | None = None) -> None:
        self.endpoint = endpoint
        self.state = Path(tempfile.mkdtemp(prefix="luanette-bench-"))
        self.log = (self.state / "daemon.log").open("wb")
        # ``source``: run the daemon of another checkout (an A/B against older code)
        command = [luanette_exe(), "serve"]
        if source is not None:
            command = [sys.executable, "-m", "luanette.cli.daemon", "serve"]
        env = None if source is None else os.environ | {"PYTHONPATH": str(source)}
        self.proc = subprocess.Popen(
            [*command, "--bind", endpoint, "--pub", "none",
             "--state-dir", str(self.state / "state"), "--cas-root", str(self.state / "cas"),
             *(("--pool", "none") if source is None and "--pool" not in args and serve_supports("--pool") else ()),
             *args],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=source,
        )
        try:
            wait_for_port(int(endpoint.rsplit(":", 1)[1]), self.proc, "luanette serve", 30)
        except RuntimeError as e:
            self.stop()
            tail = self.log_tail()
            shutil.rmtree(self.state, ignore_errors=True)
            raise RuntimeError(f"{e}; its log ends:\n{tail}") from None

    def log_tail(self, lines: int = 20) -> str:
        text = (self.state / "daemon.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)


SPIN_JOB = "local n = 0 while true do n = n + 1 end"


def start_spinners(endpoint: str, count: int) -> list[str]:
    """Start ``count`` CPU-bound jobs and return their ids once all are running."""
    sync = Sync(endpoint)
    digest = sync.ask(t.ScriptStore(content=SPIN_JOB))["hash"]
    jobs = [sync.ask(t.JobExecute(script_hash=digest, params=None))["job_id"] for _ in range(count)]
    while any(sync.ask(t.JobStatusRequest(job_id=j))["status"] != "running" for j in jobs):
        time.sleep(0.01)
    return jobs


def stop_spinners(endpoint: str, jobs: list[str]) -> None:
    """Cancel the jobs and wait until they have ended."""
    sync = Sync(endpoint)
    for job in jobs:
        sync.ask(t.JobCancel(job_id=job))
    sync.ask(t.JobPoll(job_ids=jobs, timeout_ms=30000, mode=t.PollMode.ALL))


def measure_under_scripts(endpoint: str, requests: int) -> Row:
    """Ping at 1 in flight while two CPU-bound scripts run.  They are jobs, cancelled
    (and waited for) after the row: until 2026-11-30 they were evals that went on
    burning both cores for up to 30 s, under the jobs row that follows."""
    jobs = in_process(start_spinners, endpoint, 2)
    try:
        time.sleep(0.3)  # let them reach the Lua engine
        return measure("Ping, 2 CPU-bound scripts running", endpoint, t.Ping(), requests, 1, 1)
    finally:
        in_process(stop_spinners, endpoint, jobs)


def measure_overload(endpoint: str, in_flight: int, seconds: float, clients: int, peak: float) -> Row:
    """Offer 10x the peak rate of LuaEvals for ``seconds``, open loop (sent on a clock
    whatever the answers, at most ``in_flight`` outstanding); the row's rate and latencies
    are those of the successful replies, the note compares with ``peak``."""
    offered = 10 * peak
    load = drive(endpoint, t.LuaEval(code=EVAL_CODE), Plan(in_flight, seconds=seconds, warmup=5, offered_rate=offered),
                 clients)
    note = f"{load.rate / peak:.0%} of peak; offered {offered:,.0f}/s"
    return row_from(f"LuaEval overload (10x), {seconds:g} s", in_flight, load, note)


def success(payload: t.Payload) -> Any:
    """The result of a Success reply; any other reply fails the bench step."""
    if isinstance(payload, t.Success):
        return payload.result
    raise RuntimeError(f"expected Success, got {payload!r}")


class Sync:
    """A blocking request/reply helper for the job rows (one request at a time)."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, payload: t.Payload) -> Any:
        """Send ``payload``; return the result of its Success reply."""
        frames = request_frames(payload)
        self.sock.send_multipart(frames)
        while True:
            reply = self.sock.recv_multipart()
            if reply[3] == frames[3]:
                return success(payload_codec.decode(reply[6]))

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


def job_throughput(endpoint: str, total: int) -> float:
    """Submit ``total`` jobs of a trivial stored script (64 submissions in flight), then
    wait for all of them: seconds from first submit to last completion."""
    sync = Sync(endpoint)
    digest = sync.ask(t.ScriptStore(content=EVAL_CODE))["hash"]
    frames = request_frames(t.JobExecute(script_hash=digest, params=None))
    started = time.perf_counter()
    ids, sent, answered = [], 0, 0
    while answered < total:
        while sent < total and sent - answered < 64:
            f = list(frames)
            f[3] = os.urandom(16)
            sync.sock.send_multipart(f)
            sent += 1
        reply = payload_codec.decode(sync.sock.recv_multipart()[6])
        if isinstance(reply, t.Error):  # busy: the queue is full; send that one again
            assert reply.code == "busy", reply
            time.sleep(0.01)
            sent -= 1
            continue
        answered += 1
        ids.append(success(reply)["job_id"])
    pending = ids
    while pending:
        polled = sync.ask(t.JobPoll(job_ids=pending, timeout_ms=30000, mode=t.PollMode.ALL))
        pending = polled["pending"]
    return time.perf_counter() - started


def cancel_latency(endpoint: str, rounds: int) -> list[float]:
    """Seconds from sending JobCancel for a running tight loop to the job reading
    cancelled, sorted."""
    sync = Sync(endpoint)
    digest = sync.ask(t.ScriptStore(content="while true do end"))["hash"]
    latencies = []
    for _ in range(rounds):
        job = sync.ask(t.JobExecute(script_hash=digest, params=None))["job_id"]
        while sync.ask(t.JobStatusRequest(job_id=job))["status"] != "running":
            time.sleep(0.005)
        time.sleep(0.05)
        started = time.perf_counter()
        sync.ask(t.JobCancel(job_id=job))
        done = sync.ask(t.JobPoll(job_ids=[job], timeout_ms=5000, mode=t.PollMode.ALL))
        latencies.append(time.perf_counter() - started)
        assert done["completed"][0]["status"] == "cancelled", done
    return sorted(latencies)


# --- Redis ---------------------------------------------------------------------------

REDIS_FACTOR = 5  # Redis rows send this many times --requests
REDIS_CASES = (("Redis PING", ("PING",)), ("Redis EVAL `return 2+2` 0", ("EVAL", EVAL_CODE, "0")))


class RedisServer:
    """``redis-server`` on a free loopback port, persisting nothing."""

    def __init__(self, exe: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="luanette-bench-redis-")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc, "redis-server")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_benchmark_row(exe: str, port: int, name: str, command: Sequence[str], in_flight: int,
                        requests: int) -> Row:
    """One redis-benchmark run: ``in_flight`` connections, one request each (-P 1)."""
    result = subprocess.run(
        [exe, "-h", "127.0.0.1", "-p", str(port), "-c", str(in_flight), "-n", str(requests),
         "-P", "1", "--csv", *command],
        capture_output=True, text=True, timeout=300, check=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith('"')]
    record = list(csv.DictReader(io.StringIO("\n".join(lines))))[-1]
    # Versions before 6.2 print only the rate; their latency columns are missing.
    return Row(name, in_flight, "redis-benchmark", float(record["rps"]),
               float(record.get("p50_latency_ms") or "nan"), float(record.get("p99_latency_ms") or "nan"))


def redis_rows(requests: int, clients: int, python_client: bool) -> list[Row]:
    """PING and EVAL at 1 and 64 in flight against a fresh redis-server."""
    exe = shutil.which("redis-benchmark")
    with RedisServer(shutil.which("redis-server") or "redis-server") as redis:
        rows = []
        for name, command in REDIS_CASES:
            for k in (1, 64):
                if exe and not python_client:
                    rows.append(redis_benchmark_row(exe, redis.port, name, command, k, requests))
                else:
                    make = functools.partial(RespTransport, redis.port, command)
                    rows.append(row_from(name, k, run_clients(make, Plan(k, requests=requests), clients)))
        return rows


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
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def thread_count(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (the daemon's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: parse after the last ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def scale_daemon(sim_url: str, daemon_args: Sequence[str]) -> tuple[float, int, int, float]:
    """SCALE_JOBS jobs through a real daemon (max_jobs and backend concurrency raised):
    submit them all, poll until all finish; (wall seconds, peak threads, processes) of
    the daemon with its child processes, and the wall seconds of a second burst right
    after (a daemon that has been running meets it with the Lua states the first left)."""
    raise_fd_limit(8192)
    config = Path(tempfile.mkdtemp(prefix="luanette-bench-scale-"))
    settings = config / "luanette.toml"
    settings.write_text(f'[backends.orpheus]\nurl = "{sim_url}"\nconcurrency = {SCALE_JOBS}\ntimeout_s = 30\n')
    endpoint = free_endpoint()
    try:
        with Daemon(endpoint, "--config", str(settings), "--max-jobs", str(SCALE_JOBS),
                    "--job-queue", str(2 * SCALE_JOBS), *daemon_args) as daemon:
            sync = Sync(endpoint)
            digest = sync.ask(t.ScriptStore(content=SCALE_SCRIPT))["hash"]
            peak = [0, 0]  # threads, processes
            sampling = threading.Event()

            def sample() -> None:  # the daemon tree's threads every 10 ms, beside the client
                while True:
                    tree = process_tree(daemon.proc.pid)
                    peak[0] = max(peak[0], sum(thread_count(pid) for pid in tree))
                    peak[1] = max(peak[1], len(tree))
                    if sampling.wait(0.01):
                        return

            def burst() -> float:
                started = time.perf_counter()
                submitted = sync.ask_all([t.JobExecute(script_hash=digest, params=None) for _ in range(SCALE_JOBS)])
                ids = [success(reply)["job_id"] for reply in submitted]
                polled = sync.ask(t.JobPoll(job_ids=ids, timeout_ms=30000, mode=t.PollMode.ALL))
                wall = time.perf_counter() - started
                assert not polled["timed_out"]
                statuses = {job["status"] for job in polled["completed"]}
                assert statuses == {"complete"}, statuses
                return wall

            sampler = threading.Thread(target=sample)
            sampler.start()
            wall = burst()
            sampling.set()
            sampler.join()
            again = burst()
        return wall, peak[0], peak[1], again
    finally:
        shutil.rmtree(config, ignore_errors=True)


def scale_threads(sim_url: str) -> tuple[float, int]:
    """The same work the way the Rust version did it: one OS thread per job, each with
    its own Lua runtime whose backend call blocks the thread for the request."""
    import json
    import urllib.request

    import lupa.lua54 as lupa

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
    return wall, peak


def scale_floor(sim_url: str) -> tuple[float, float]:
    """The burst's HTTP alone, its floor: SCALE_JOBS concurrent aiohttp requests to the
    simulator from one process (as the daemon's front makes them), on new connections,
    then again on the kept ones; (cold, warm) seconds."""
    import asyncio

    import aiohttp

    raise_fd_limit(8192)
    body = {"task": "generate", "max_tokens": 3}

    async def burst(session: aiohttp.ClientSession) -> float:
        async def one() -> str:
            async with session.post(sim_url + "/predict", json=body) as response:
                return str((await response.json())["task"])

        started = time.perf_counter()
        answers = await asyncio.gather(*(one() for _ in range(SCALE_JOBS)))
        assert answers == ["generate"] * SCALE_JOBS
        return time.perf_counter() - started

    async def both() -> tuple[float, float]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await burst(session), await burst(session)

    return asyncio.run(both())


# --- the run -------------------------------------------------------------------------


@dataclass
class Results:
    """Everything one run measured; None where a section was skipped."""

    echo: dict[int, Row] = field(default_factory=dict)  # by in-flight count
    ceiling: dict[int, Row] = field(default_factory=dict)
    floor: list[Row] = field(default_factory=list)  # the architecture's floor (see floor_worker)
    redis: list[Row] = field(default_factory=list)
    daemon: list[Row] = field(default_factory=list)
    overload: Row | None = None
    jobs: tuple[int, float] | None = None  # (jobs, seconds)
    cancels: list[float] | None = None
    scale: tuple[float, int, int, float] | None = None  # daemon: wall, threads, processes, second burst's wall
    threaded: tuple[float, int] | None = None  # one thread per job: wall, threads
    scale_floor: tuple[float, float] | None = None  # the burst's HTTP alone: cold, warm
    pool: dict[int, float] | None = None  # remote workers -> CPU-bound jobs/s
    worker_loss: list[float] | None = None  # seconds from kill -9 to worker_lost

    def daemon_row(self, prefix: str, in_flight: int) -> Row:
        return next(r for r in self.daemon if r.name.startswith(prefix) and r.in_flight == in_flight)

    def redis_row(self, prefix: str, in_flight: int) -> Row | None:
        return next((r for r in self.redis if r.name.startswith(prefix) and r.in_flight == in_flight), None)


PING, EVAL = "Ping", f"LuaEval `{EVAL_CODE}`"
REDIS_OF = {PING: "Redis PING", EVAL: "Redis EVAL"}  # the Redis row each compares with


def measure_echo(results: Results, n: int, clients: int) -> None:
    """The baselines: the pyzmq echo (the ratio column) and the libzmq echo (the
    generator's ceiling), each in its own process."""
    for server, name, into in ((echo_server, "raw pyzmq echo", results.echo),
                               (libzmq_echo_server, "libzmq echo (generator ceiling)", results.ceiling)):
        endpoint = free_endpoint()
        echo = mp.Process(target=server, args=(endpoint,), daemon=True)
        echo.start()
        try:
            for k in (1, 64):
                into[k] = measure(name, endpoint, t.Ping(), n, k, clients)
        finally:
            echo.terminate()
            echo.join()


def measure_daemon(results: Results, args: argparse.Namespace, daemon_args: Sequence[str]) -> None:
    n, clients, skip = args.requests, args.clients, set(args.skip)
    endpoint = free_endpoint()
    # --cancel-grace 0: the cancel row measures the hard stop of a tight loop (with the
    # default grace a loop that ignores the cancel runs on for 5 s, by design)
    with Daemon(endpoint, "--cancel-grace", "0", *daemon_args):
        # warm first (not timed): a daemon just started may still be starting its workers
        measure(EVAL, endpoint, t.LuaEval(code=EVAL_CODE), 2000, 64, clients)
        for k in (1, 64):
            results.daemon.append(measure(PING, endpoint, t.Ping(), n, k, clients))
        for k in (1, 64):
            results.daemon.append(measure(EVAL, endpoint, t.LuaEval(code=EVAL_CODE), n // 5, k, clients))
        results.daemon.append(measure_under_scripts(endpoint, n // 4))
        if "jobs" not in skip:
            total = max(n // 10, 100)  # more than the job queue holds: busy is retried
            results.jobs = (total, in_process(job_throughput, endpoint, total))
            results.cancels = in_process(cancel_latency, endpoint, 20)
        if "overload" not in skip:  # last: it leaves a queue behind
            peak = results.daemon_row(EVAL, 64)
            results.overload = measure_overload(endpoint, OVERLOAD_IN_FLIGHT, args.overload_seconds, clients, peak.rate)


# --- scale-out: remote workers --------------------------------------------------------

POOL_JOBS = 200
POOL_SCRIPT = "function main() local s = 0 for i = 1, 2000000 do s = s + i % 7 end return s end"
"""A CPU-bound job (~40-80 ms of Lua): the pool row measures Lua capacity, not the front."""


def _wait_registered(sync: Sync, workers: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        text = sync.ask(t.ReadResource(uri="lua://workers"))["contents"][0]["text"]
        ready = [w for w in json.loads(text)["workers"] if w.get("state") == "ready"]
        if len(ready) >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(ready)} of {workers} workers registered")
        time.sleep(0.02)


def _remote_worker(pool: str, name: str, cas: Path, core: int | None = None) -> subprocess.Popen:
    # ``core``: pinned to that one CPU, as if it were a one-core machine of its own (a
    # worker runs Lua in several threads at once and would take every core here)
    pin = None if core is None else (lambda: os.sched_setaffinity(0, {core % (os.cpu_count() or 1)}))
    return subprocess.Popen([luanette_exe(), "worker", "--connect", pool, "--name", name, "--cas", str(cas)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)


def worker_loss_seconds(rounds: int = 3) -> list[float]:
    """Seconds from kill -9 of a remote worker to its running job reading ``failed``
    (kind ``worker_lost``): the heartbeat failover."""
    out = []
    for _ in range(rounds):
        endpoint, pool = free_endpoint(), f"tcp://127.0.0.1:{free_port()}"
        with Daemon(endpoint, "--workers", "0", "--pool", pool) as daemon:
            victim = _remote_worker(pool, "victim", daemon.state / "cas")
            sync = Sync(endpoint)
            _wait_registered(sync, 1)
            digest = sync.ask(t.ScriptStore(content="function main() clock.sleep(60000) end"))["hash"]
            job = sync.ask(t.JobExecute(script_hash=digest, params=None))["job_id"]
            while sync.ask(t.JobStatusRequest(job_id=job))["status"] != "running":
                time.sleep(0.005)
            started = time.perf_counter()
            victim.kill()
            victim.wait()
            while (status := sync.ask(t.JobStatusRequest(job_id=job)))["status"] == "running":
                time.sleep(0.005)
            out.append(time.perf_counter() - started)
            assert status["error"]["kind"] == "worker_lost", status
    return sorted(out)


def pool_throughput(workers: int) -> float:
    """Jobs/s of :data:`POOL_JOBS` CPU-bound jobs on a front with no local workers and
    ``workers`` ``luanette worker`` processes joined over tcp loopback, each pinned to
    one core (standing in for one machine each)."""
    endpoint = free_endpoint()
    pool = f"tcp://127.0.0.1:{free_port()}"
    with Daemon(endpoint, "--workers", "0", "--pool", pool) as daemon:
        procs = [_remote_worker(pool, f"bench{i}", daemon.state / "cas", core=i) for i in range(workers)]
        try:
            sync = Sync(endpoint)
            _wait_registered(sync, workers)
            digest = sync.ask(t.ScriptStore(content=POOL_SCRIPT))["hash"]
            started = time.perf_counter()
            replies = sync.ask_all([t.JobExecute(script_hash=digest, params=None) for _ in range(POOL_JOBS)])
            pending = [success(r)["job_id"] for r in replies]
            while pending:
                pending = sync.ask(t.JobPoll(job_ids=pending, timeout_ms=30000, mode=t.PollMode.ALL))["pending"]
            return POOL_JOBS / (time.perf_counter() - started)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)


def measure_pool(results: Results) -> None:
    if not serve_supports("--pool"):
        return
    results.pool = {n: in_process(pool_throughput, n) for n in (1, 2)}
    results.worker_loss = in_process(worker_loss_seconds)


def measure_scale(results: Results, daemon_args: Sequence[str]) -> None:
    sim, sim_url = start_model_sim(1000)
    try:
        results.scale = in_process(scale_daemon, sim_url, list(daemon_args))
        time.sleep(1)
        results.threaded = in_process(scale_threads, sim_url)
        time.sleep(1)
        results.scale_floor = in_process(scale_floor, sim_url)
    finally:
        sim.terminate()
        sim.wait(10)


# --- the report ----------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {system}"


def ratio(row: Row, ref: Row | None) -> str:
    return "" if ref is None else f"{row.rate / ref.rate:.0%}"


def table_rows(results: Results) -> list[Row]:
    """Echo first, then each daemon row followed by the Redis rows it is compared with."""
    ordered = [results.echo[k] for k in sorted(results.echo)]
    ordered += [results.ceiling[k] for k in sorted(results.ceiling)]
    ordered += results.floor
    placed: set[int] = set()
    for row in [*results.daemon, *([results.overload] if results.overload else [])]:
        ordered.append(row)
        for prefix in (p for name, p in REDIS_OF.items() if row.name == name):
            ref = results.redis_row(prefix, row.in_flight)
            if ref is not None and id(ref) not in placed:
                ordered.append(ref)
                placed.add(id(ref))
    return ordered + [r for r in results.redis if id(r) not in placed]


def print_table(results: Results, markdown: bool) -> None:
    header = ("case", "in flight", "client", "req/s", "p50 ms", "p99 ms", "vs echo", "vs Redis", "notes")
    daemon_rows = {id(r) for r in [*results.daemon, results.overload] if r is not None}
    echo_rows = {id(r) for r in results.echo.values()}
    floor_rows = {id(r) for r in results.floor}
    lines = []
    for row in table_rows(results):
        is_daemon = id(row) in daemon_rows
        vs_echo = "baseline" if id(row) in echo_rows else ""
        vs_redis = ""
        if is_daemon or id(row) in floor_rows:
            vs_echo = ratio(row, results.echo.get(row.in_flight))
            vs_redis = ratio(row, results.redis_row(REDIS_OF.get(row.name, "-"), row.in_flight))
        lines.append((row.name, str(row.in_flight), row.client, f"{row.rate:,.0f}", f"{row.p50_ms:.3f}",
                      f"{row.p99_ms:.3f}", vs_echo, vs_redis, row.note))
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    for line in [header, *lines]:
        print("  ".join(c.ljust(w) if i in (0, len(line) - 1) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())


def print_details(results: Results) -> None:
    if results.jobs:
        total, seconds = results.jobs
        print(f"jobs: {total:,} trivial jobs submitted (64 in flight) and completed in {seconds:.2f} s: "
              f"{total / seconds:,.0f} jobs/s")
    if results.cancels:
        c = results.cancels
        print(f"cancel of a running tight loop, {len(c)} rounds: p50 {c[len(c) // 2] * 1000:.1f} ms, "
              f"max {c[-1] * 1000:.1f} ms (JobCancel sent -> JobPoll sees cancelled)")
    if results.overload:
        o = results.overload
        print(f"overload: {o.in_flight} LuaEvals in flight (10x the peak row's 64): {o.rate:,.0f} successful/s, "
              f"p99 of those {o.p99_ms:.1f} ms, {o.busy:,} answered busy, {o.errors:,} other errors")
    if results.pool:
        one, two = results.pool[1], results.pool[2]
        print(f"pool: {POOL_JOBS} CPU-bound jobs on remote workers (luanette worker over tcp loopback, one core "
              f"each, --workers 0): 1 worker {one:,.0f} jobs/s, 2 workers {two:,.0f} jobs/s ({two / one:.2f}x)")
    if results.worker_loss:
        print("worker loss: kill -9 of a remote worker -> its job failed worker_lost after "
              + ", ".join(f"{x:.2f}" for x in results.worker_loss) + " s (3 heartbeats of 1 s)")
    if results.scale and results.threaded:
        wall, threads, procs, again = results.scale
        print(f"scale: {SCALE_JOBS} jobs, each waiting 1 s on the model simulator: daemon {wall:.2f} s wall "
              f"(a second burst right after: {again:.2f} s), "
              f"peak {threads} threads in {procs} process{'es' if procs > 1 else ''}; one thread per job "
              f"(Lua + blocking HTTP) {results.threaded[0]:.2f} s wall, peak {results.threaded[1]} threads")
    if results.scale_floor:
        cold, warm = results.scale_floor
        print(f"scale floor: the burst's HTTP alone ({SCALE_JOBS} concurrent aiohttp requests to the simulator "
              f"from one process, nothing else): {cold:.2f} s on new connections, {warm:.2f} s on kept ones")


def client_warnings(results: Results) -> list[str]:
    """Daemon rows close to the echo rate: there the client, not the daemon, is measured."""
    warnings = []
    for row in results.daemon:
        echo = results.echo.get(row.in_flight)
        if echo and row.rate >= CLIENT_BOTTLENECK * echo.rate:
            ceiling = results.ceiling.get(row.in_flight)
            beside = f" (libzmq echo: {ceiling.rate:,.0f} req/s)" if ceiling else ""
            warnings.append(f"WARNING: {row.name} at {row.in_flight} in flight reaches {row.rate / echo.rate:.0%} "
                            f"of the pyzmq echo rate{beside}: the load generator may be the bottleneck "
                            f"(try more --clients)")
        if row.errors:
            warnings.append(f"WARNING: {row.name} at {row.in_flight} in flight: {row.errors} error replies "
                            f"({row.note})")
    return warnings


def floor_of(results: Results, in_flight: int, ping: Row | None = None) -> str:
    """The floor rows at ``in_flight``, as the target compares them: their share of
    ``ping`` when given, else their p50."""
    rows = [r for r in results.floor if r.in_flight == in_flight]
    if not rows:
        return ""
    figures = [f"{r.rate / ping.rate:.0%}" if ping else f"{r.p50_ms:.3f} ms" for r in rows]
    return f"; floor rows: {', '.join(figures)}"


def targets(results: Results) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured, what was measured)."""
    out: list[tuple[str, bool | None, str]] = []
    ping64, eval64, eval1 = results.daemon_row(PING, 64), results.daemon_row(EVAL, 64), results.daemon_row(EVAL, 1)
    share = eval64.rate / ping64.rate
    out.append(("LuaEval@64 >= 50% of Ping@64", share >= 0.5,
                f"{share:.0%} ({eval64.rate:,.0f} vs {ping64.rate:,.0f} req/s){floor_of(results, 64, ping64)}"))
    out.append(("LuaEval p50 at 1 in flight <= 0.5 ms", eval1.p50_ms <= 0.5,
                f"{eval1.p50_ms:.3f} ms{floor_of(results, 1)}"))
    if results.scale:
        floor = f"; floor (HTTP alone) {results.scale_floor[0]:.2f} s" if results.scale_floor else ""
        out.append((f"{SCALE_JOBS:,} x 1 s jobs < 2 s wall", results.scale[0] < 2.0,
                    f"{results.scale[0]:.2f} s (second burst {results.scale[3]:.2f} s){floor}"))
    else:
        out.append((f"{SCALE_JOBS:,} x 1 s jobs < 2 s wall", None, "skipped"))
    if results.jobs:
        rate = results.jobs[0] / results.jobs[1]
        out.append(("trivial jobs >= 2,000/s", rate >= 2000, f"{rate:,.0f}/s"))
    else:
        out.append(("trivial jobs >= 2,000/s", None, "skipped"))
    if results.overload:
        o, share = results.overload, results.overload.rate / eval64.rate
        out.append(("overload: successful >= 80% of peak, p99 < 1 s", share >= 0.8 and o.p99_ms < 1000,
                    f"{share:.0%} of {eval64.rate:,.0f}/s, p99 {o.p99_ms:.1f} ms"))
    else:
        out.append(("overload: successful >= 80% of peak, p99 < 1 s", None, "skipped"))
    return out


def print_targets(results: Results, markdown: bool) -> None:
    verdict = {True: "PASS", False: "MISS", None: "n/a"}
    rows = targets(results)
    if markdown:
        print("| target | result | verdict |\n|---|---|---|")
        for name, met, measured in rows:
            print(f"| {name} | {measured} | {verdict[met]} |")
        return
    width = max(len(name) for name, _, _ in rows)
    for name, met, measured in rows:
        print(f"{verdict[met]:4}  {name.ljust(width)}  {measured}")


def report(results: Results, args: argparse.Namespace, daemon_args: Sequence[str]) -> None:
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; requests per row: {args.requests:,} "
          f"(LuaEval {args.requests // 5:,}); client: "
          f"{'zload (1 process)' if ZLOAD is not None else f'{args.clients} Python processes'}; "
          f"daemon args: {' '.join(daemon_args) or '(defaults)'}")
    print()
    print_table(results, args.markdown)
    print()
    print_details(results)
    warnings = client_warnings(results)
    if warnings:
        print()
        print("\n".join(warnings))
    print()
    print_targets(results, args.markdown)


def daemon_arguments(args: argparse.Namespace) -> list[str]:
    """The extra ``luanette serve`` arguments: ``--workers`` when this daemon has it."""
    extra = []
    if args.workers is not None:
        if serve_supports("--workers"):
            extra += ["--workers", str(args.workers)]
        else:
            print("note: 'luanette serve' has no --workers; running without it", file=sys.stderr)
    return extra + list(args.daemon_arg)


SECTIONS = ("floor", "redis", "jobs", "overload", "scale", "pool")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per row (LuaEval uses a fifth)")
    parser.add_argument("--clients", type=int, default=4, help="client processes sharing the in-flight requests")
    parser.add_argument("--workers", type=int, help="passed as 'luanette serve --workers N' if the daemon has it")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="an extra 'luanette serve' argument (repeat it; --daemon-arg=--max-evals=4)")
    parser.add_argument("--overload-seconds", type=float, default=5.0, help="how long the overload row runs")
    parser.add_argument("--python-client", action="store_true",
                        help="drive the ZeroMQ rows with Python client processes even when zload builds")
    parser.add_argument("--redis-python-client", action="store_true",
                        help="drive Redis with this script's generator even when redis-benchmark is installed")
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="leave a section out")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    return parser.parse_args(argv)


def main() -> int:
    global ZLOAD
    args = parse_args()
    ZLOAD = None if args.python_client else build_zload()
    daemon_args = daemon_arguments(args)
    results = Results()
    measure_echo(results, args.requests, args.clients)
    if "floor" not in args.skip:
        measure_floor(results, args.requests, args.clients)
    if "redis" not in args.skip and shutil.which("redis-server"):
        # Five times the requests: Redis is an order of magnitude faster, and a row of
        # a few milliseconds would be noise.
        results.redis = redis_rows(REDIS_FACTOR * args.requests, args.clients, args.redis_python_client)
    measure_daemon(results, args, daemon_args)
    if "scale" not in args.skip:
        measure_scale(results, daemon_args)
    if "pool" not in args.skip:
        measure_pool(results)
    report(results, args, daemon_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
