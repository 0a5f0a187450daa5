"""The bench's compiled load generator (scripts/zload.c) against real ROUTER sockets:
it must count every reply, match each to its request and tell busy from success.
(Timing figures are the bench's business; nothing here is timed.)"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench  # noqa: E402

from hooteproto import types as t  # noqa: E402
from hooteproto.codec import Encoding, payload_codec  # noqa: E402


@pytest.fixture(scope="module")
def zload() -> Path:
    exe = bench.build_zload()
    if exe is None:
        pytest.skip("no C compiler or libzmq here: the bench falls back to its Python clients")
    return exe


def _server(answer: Callable[[list[bytes], int], list[bytes]]) -> Iterator[str]:
    """A ROUTER on a free loopback port answering each request with ``answer``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        count = 0
        while not stop.is_set():
            if sock.poll(50):
                request = sock.recv_multipart()
                count += 1
                sock.send_multipart(answer(request, count))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join()
        sock.close(linger=0)
        ctx.term()


@pytest.fixture
def echo() -> Iterator[str]:
    yield from _server(lambda request, _: request)


@pytest.fixture
def every_third_busy() -> Iterator[str]:
    busy = payload_codec.encode(t.Error(code="busy", message="try later"), Encoding.COMPACT)
    failed = payload_codec.encode(t.Error(code="lua_error", message="boom"), Encoding.COMPACT)

    def answer(request: list[bytes], count: int) -> list[bytes]:
        # (route, then HOOT01 frames: the body is frame 6 of the message)
        reply = list(request)
        if count % 3 == 0:
            reply[1 + 6] = busy
        elif count == 5:
            reply[1 + 6] = failed
        return reply

    yield from _server(answer)


def test_zload_closed_loop_counts_every_reply(zload: Path, echo: str) -> None:
    load = bench.run_zload(zload, echo, t.Ping(), bench.Plan(8, requests=300, warmup=3), 1)
    assert len(load.latencies) == 300
    assert (load.busy, load.errors, load.client) == (0, 0, "zload")
    assert all(latency > 0 for latency in load.latencies)
    assert load.latencies == sorted(load.latencies)
    assert load.seconds > 0


def test_zload_splits_a_plan_over_processes(zload: Path, echo: str) -> None:
    load = bench.run_zload(zload, echo, t.LuaEval(code="return 1"), bench.Plan(9, requests=301, warmup=1), 3)
    assert (load.clients, len(load.latencies), load.busy, load.errors) == (3, 301, 0, 0)


def test_zload_tells_busy_and_errors_from_success(zload: Path, every_third_busy: str) -> None:
    # 2 warm-up requests are answered first (counts 1-2); then 90 counted: 3..92
    load = bench.run_zload(zload, every_third_busy, t.Ping(), bench.Plan(1, requests=90, warmup=2), 1)
    busy = sum(1 for n in range(3, 93) if n % 3 == 0)
    assert load.busy == busy
    assert load.errors == 1 and load.error_sample == "lua_error: boom"
    assert len(load.latencies) == 90 - busy - 1


def test_zload_open_loop_sends_on_its_clock_and_collects_what_is_due(zload: Path, echo: str) -> None:
    load = bench.run_zload(zload, echo, t.Ping(), bench.Plan(50, seconds=0.3, warmup=1, offered_rate=1000), 1)
    # 1,000/s for 0.3 s: about 300 sent, every one answered by the echo
    assert 1 < len(load.latencies) <= 301
    assert (load.busy, load.errors) == (0, 0)


def test_bench_falls_back_to_python_clients_without_zload(echo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "ZLOAD", None)
    row = bench.measure("echo", echo, t.Ping(), 40, 2, 2)
    assert row.client == "2 procs" and row.rate > 0 and row.errors == 0


@pytest.mark.parametrize("use_zload", [False, True])
def test_floor_fronts_relay_every_request_back_to_its_sender(
    use_zload: bool, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # both floor fronts, their workers in their own processes: every request comes back
    # whole to the client that sent it (a lost or misrouted one fails the row)
    monkeypatch.setattr(bench, "ZLOAD", request.getfixturevalue("zload") if use_zload else None)
    results = bench.Results()
    bench.measure_floor(results, 300, 2, warm=50)
    assert [(row.name, row.in_flight) for row in results.floor] == [
        (name, k) for name, _ in bench.FLOOR_FRONTS for k in (1, 64)
    ]
    for row in results.floor:
        assert row.rate > 0 and (row.busy, row.errors) == (0, 0), row
