"""Shared fixtures: a real daemon on a random loopback port, in-process or as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from hooteproto.client import Client
from luanette.config import Config
from luanette.server import Server

BIN = Path(sys.executable).parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, never one handed out before
    in this process (the kernel may offer a just-closed port again, and two of a
    daemon's endpoints on one port fail its start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def config_for_tests(tmp: Path, **overrides) -> Config:
    """Config for tests: random ports, files under ``tmp``, short limits so failures
    show quickly."""
    base = dict(
        bind="tcp://127.0.0.1:*",
        pub="tcp://127.0.0.1:*",
        cas_root=str(tmp / "cas"),
        state_dir=str(tmp / "state"),
        script_timeout=5.0,
        drain_timeout=2.0,
        send_timeout=1.0,
        cancel_grace=0.5,  # cooperative cancel: short, so cancelled busy loops end quickly
    )
    return Config(**(base | overrides))


class _Started:
    """The ``task_status`` a server's serve() reports readiness to."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


class RunningServer:
    """An in-process server running in its own asyncio task."""

    def __init__(self, config: Config, settings=None, telemetry=None) -> None:
        self.server = Server(config, settings=settings, telemetry=telemetry)
        self.task: asyncio.Task | None = None

    @property
    def endpoint(self) -> str:
        assert self.server.endpoint is not None
        return self.server.endpoint

    async def start(self) -> RunningServer:
        ready = _Started()
        self.task = asyncio.create_task(self.server.serve(task_status=ready))
        waiting = asyncio.create_task(ready.event.wait())
        await asyncio.wait([waiting, self.task], return_when=asyncio.FIRST_COMPLETED)
        if not ready.event.is_set():
            waiting.cancel()
            self.task.result()  # raises what stopped the server
            raise RuntimeError("the server stopped before it was ready")
        return self

    async def stop(self) -> None:
        self.server.request_shutdown("test finished")
        assert self.task is not None
        await asyncio.wait_for(self.task, 15)


@pytest.fixture
async def make_server(tmp_path):
    """Factory: ``await make_server(**config_overrides)`` -> RunningServer."""
    started: list[RunningServer] = []

    async def make(settings=None, telemetry=None, **overrides) -> RunningServer:
        running = await RunningServer(config_for_tests(tmp_path, **overrides), settings, telemetry).start()
        started.append(running)
        return running

    yield make
    for running in started:
        if not running.task.done():
            await running.stop()


@pytest.fixture
async def server(make_server) -> RunningServer:
    return await make_server()


@pytest.fixture
async def client(server):
    async with Client(server.endpoint) as c:
        yield c


@pytest.fixture
def zctx():
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


class PortTaken(RuntimeError):
    """The daemon could not bind a port chosen free a moment before."""


class DaemonProcess:
    """``luanette serve`` started through its console script.

    A port chosen free can be taken by another process before the daemon binds it;
    the start is then tried again on new ports (a test about something else should
    not fail on that race)."""

    STARTS = 3

    def __init__(self, tmp: Path, *args: str) -> None:
        self.state_dir = tmp / "state"
        self.cas_root = tmp / "cas"
        for attempt in range(self.STARTS):
            self.port = free_port()
            self.endpoint = f"tcp://127.0.0.1:{self.port}"
            self.pub = f"tcp://127.0.0.1:{free_port()}"
            # the pool endpoint too (the default :5571 would be shared by every daemon)
            pool = () if "--pool" in args else ("--pool", f"tcp://127.0.0.1:{free_port()}")
            self.proc = self._spawn(
                [str(BIN / "luanette"), "serve", "--bind", self.endpoint, "--pub", self.pub,
                 "--cas-root", str(self.cas_root), "--state-dir", str(self.state_dir), *pool, *args])
            try:
                self._wait_listening()
                return
            except PortTaken:
                if attempt == self.STARTS - 1:
                    raise

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                if "Address already in use" in err:
                    raise PortTaken(err)
                raise RuntimeError(f"daemon exited: {err}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("daemon did not start listening")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon_process(tmp_path):
    """Factory: ``daemon_process(*extra_args)`` -> DaemonProcess (stopped at teardown)."""
    procs: list[DaemonProcess] = []

    def make(*args: str) -> DaemonProcess:
        p = DaemonProcess(tmp_path, *args)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def cli(endpoint: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``luanette-cli --endpoint ENDPOINT ARGS...`` and capture its output."""
    return subprocess.run(
        [str(BIN / "luanette-cli"), "--endpoint", endpoint, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
async def garden():
    """The chaosgarden simulator on a free loopback port."""
    from luanette.sim.garden import GardenSimServer

    server = await GardenSimServer().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gclient(garden):
    """A GardenClient connected to ``garden`` (2 s timeout)."""
    from luanette.garden import GardenClient, GardenSettings

    async with GardenClient(GardenSettings(endpoint=garden.endpoint, timeout_s=2.0)) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (tests/postgres.py); skips with the
    reason where no PostgreSQL binaries are installed."""
    from tests.postgres import SKIP_REASON, PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    server = PostgresServer(bin_dir, free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server) -> str:
    """The URL of a fresh database on the session's PostgreSQL server."""
    return postgres_server.create_database()
