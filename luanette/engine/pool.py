"""The front's side of the engine: a supervised pool of worker processes.

:class:`Engine` starts ``workers`` worker processes (forked by the preloaded
launcher, ``luanette.engine.zygote``, so a replacement is ready in milliseconds), gives each run to the worker with
the fewest runs, forwards cancels, answers the workers' service calls with the front's
backends and garden client, and turns their notes into log lines, progress and span
events.

Supervision: a run whose worker has not answered ``grace_s`` after the run's deadline
(or after its cancel) is answered as timed out (or cancelled) at once, and its worker is
*quarantined*: it takes no new runs, a replacement starts at once, and it is killed
(SIGKILL) as soon as its other runs have ended, or ``stuck_drain_s`` later, whichever
comes first; runs still on it then end as ``worker_lost``.  A worker that dies (a
segfault, the OOM killer) fails its runs with ``worker_lost`` and is replaced the same
way.  A worker that grew past its memory share retires by itself between runs and is
replaced too.  See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
import structlog
import zmq
import zmq.asyncio
from opentelemetry import context as otel_context

from hooteproto import garden as g
from hooteproto.codec import DecodeError, Encoding, decode_payload
from hooteproto.depth import check_value
from hooteproto.types import GenerationChunk, Register
from luanette import capabilities as caps
from luanette.backends import Backends
from luanette.cas import env_read_only_why
from luanette.engine import channel as ch
from luanette.engine.api import CancelToken, ErrorDetail, Limits, Outcome, ScriptError, emit_script_log
from luanette.engine.errors import stopped_detail
from luanette.engine.services import error_to_wire
from luanette.engine.worker import WorkerConfig
from luanette.engine.zygote import FrameReader, write_frame
from luanette.garden import GardenClient, GardenUnavailable
from luanette.modules import ModuleError, Modules
from luanette.settings import Settings
from luanette.stdlib.otel import MAX_METRICS
from luanette.stdlib.temp import DIR_PREFIX as TEMP_DIR_PREFIX
from luanette.telemetry import record_error
from luanette.zmqloop import LoopSocket, Outbox

log = structlog.get_logger("luanette.engine")

# Seconds a run may overstay its deadline (or its cancel) before its worker is replaced.
GRACE_S: Final = 1.0
# How long a quarantined worker's other runs may go on before it is killed.
STUCK_DRAIN_S: Final = 5.0
# A worker with runs that has sent nothing for this long gets no new runs (it beats
# every second).
SILENT_AFTER_S: Final = 2.5
# Longest a run waits for a worker to take it (at start-up, or while all are replaced).
WORKER_WAIT_S: Final = 30.0
# Seconds between restarts of workers that keep dying at once.
MAX_RESTART_BACKOFF_S: Final = 5.0
# Seconds a stopping worker may take to finish before it is killed.
STOP_TIMEOUT_S: Final = 5.0
RECEIVE_BATCH: Final = 256  # messages taken from the pool socket before other tasks may run
# Seconds between heartbeats, both ways; a remote worker silent for LOST_AFTER_BEATS of
# them is lost (Paranoid Pirate).
BEAT_S: Final = 1.0
LOST_AFTER_BEATS: Final = 3
# Longest a run waits for a worker that can serve it to join (its group, its
# capabilities) before it fails ``no_worker``.
NO_WORKER_WAIT_S: Final = 30.0
# How long a local worker beyond --workers-min may stay idle before it is stopped.
SCALE_DOWN_IDLE_S: Final = 30.0


class EngineConfig(msgspec.Struct, kw_only=True, frozen=True):
    """How the pool is run."""

    workers: int
    memory_share: int = 0  # bytes of RSS per worker past which it is recycled; 0: never
    grace_s: float = GRACE_S
    stuck_drain_s: float = STUCK_DRAIN_S
    capacity: int = 1024  # runs per worker at once
    temp_root: str
    cas_root: str | None = None
    settings: Settings = Settings()
    log_json: bool = False
    # the pool endpoint remote workers join (seed 001's :5571); None: local workers only
    pool_endpoint: str | None = None
    no_worker_timeout_s: float = NO_WORKER_WAIT_S
    # the local supervisor scales its processes between these on queue depth; 0: fixed
    workers_min: int = 0
    workers_max: int = 0
    scale_down_idle_s: float = SCALE_DOWN_IDLE_S
    beat_s: float = BEAT_S


class RunHooks:
    """What the front does with a run's news: its log lines, progress and span."""

    __slots__ = ("_logger", "_make_logger", "context", "progress", "span")

    def __init__(
        self,
        make_logger: Callable[[], Any],
        *,
        span: Any = None,
        progress: Callable[[float, str | None], None] | None = None,
    ) -> None:
        # most runs never log: their logger is bound on first use
        self._make_logger = make_logger
        self._logger: Any = None
        self.span = span
        self.progress = progress
        # service calls run in the context where the run started (its span is current)
        self.context = otel_context.get_current()

    @property
    def logger(self) -> Any:
        """The logger of the run's script log lines."""
        if self._logger is None:
            self._logger = self._make_logger()
        return self._logger


class EngineStats(msgspec.Struct):
    """Counters an operator reads (and tests check)."""

    runs: int = 0
    workers_started: int = 0
    workers_lost: int = 0  # died without being asked
    workers_quarantined: int = 0  # replaced because a run did not come back
    workers_recycled: int = 0  # retired past their memory share
    late_results: int = 0  # answers for runs already given up on
    service_calls: int = 0
    remote_joined: int = 0  # registrations of remote workers (a rejoin counts again)
    scaled_up: int = 0  # local workers the supervisor added past --workers-min
    scaled_down: int = 0  # and stopped again when idle


class _Worker:
    """The front's view of one worker process."""

    def __init__(self, name: str, send: Callable[[_Worker, list[bytes]], object], *, remote: bool = False) -> None:
        self.name = name
        self.identity = name.encode()
        self.pid = 0
        self.remote = remote  # joined over the pool endpoint: known only by its beats
        self.group = "local"
        self.capabilities: tuple[caps.Capability, ...] | None = None  # None: every one
        self.capability_texts: list[str] = ["*"]
        self.hostname = ""
        self.version = ""
        self.worker_id = ""
        self.idle_since = time.monotonic()
        self.served = 0  # runs it answered
        self.ready = False
        self.leaving = False  # takes no new runs (quarantined, retiring or stopping)
        self.runs: set[int] = set()
        self.capacity = 0
        self.rss_bytes = 0
        self.kill_timer: asyncio.TimerHandle | None = None
        self.quarantined = False  # a run of it did not come back: killed, not stopped
        self.last_heard = time.monotonic()  # its last message (it beats every second)
        self.inline_steps = 0  # as of its last beat
        # what it is sent in one turn of the loop goes as one multipart message
        self.outbox = Outbox(functools.partial(send, self), ch.FLUSH_AT)
        self.exited = False


class _Pending:
    """A run the front waits for."""

    __slots__ = ("cancel", "future", "hooks", "limits", "listener", "number", "timer", "worker")

    def __init__(
        self,
        number: int,
        future: asyncio.Future[Outcome],
        worker: _Worker,
        hooks: RunHooks,
        cancel: CancelToken,
        limits: Limits,
    ) -> None:
        self.number = number
        self.future = future
        self.worker = worker
        self.hooks = hooks
        self.cancel = cancel
        self.limits = limits
        self.timer: asyncio.TimerHandle | None = None
        self.listener: Callable[[], object] | None = None


class _Launcher:
    """The front's end of the worker launcher (``luanette.engine.zygote``): one per
    process, shared by its engines and moved to a new event loop when the old one has
    ended (tests run many daemons, one loop after another, in one process).  It lives as
    long as the process; when the process ends, the launcher reads end-of-file on its
    stdin and exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        lifeline, self._lifeline = os.pipe()  # (see luanette.engine.zygote)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "luanette.engine.zygote", str(lifeline)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                pass_fds=(lifeline,),
            )
        finally:
            os.close(lifeline)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._requests = self._process.stdin.fileno()
        self._replies = self._process.stdout.fileno()
        os.set_blocking(self._replies, False)
        self._reader = FrameReader()
        # one entry per request not yet answered, in order (None: nobody waits any more)
        self._starting: collections.deque[asyncio.Future[int] | None] = collections.deque()
        self._on_exit: dict[int, Callable[[int], None]] = {}
        self._exited: dict[int, int] = {}  # exits reported before their pid was watched
        self.alive = True
        loop.add_reader(self._replies, self._readable)

    async def spawn(self, config: WorkerConfig, on_exit: Callable[[int], None]) -> int:
        """Start a worker; ``on_exit(code)`` is called on the loop when it ends."""
        future: asyncio.Future[int] = self.loop.create_future()
        self._starting.append(future)
        write_frame(self._requests, ch.encoder.encode(config))
        pid = await future
        if pid in self._exited:
            self.loop.call_soon(on_exit, self._exited.pop(pid))
        else:
            self._on_exit[pid] = on_exit
        return pid

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``loop`` from now on.  What the old loop waited for is forgotten: its
        engines are gone (they stopped their workers), and a worker still being started
        for one of them is killed when it is reported."""
        if not self.loop.is_closed():
            self.loop.remove_reader(self._replies)
        self._starting = collections.deque(None for _ in self._starting)
        self._on_exit.clear()
        self._exited.clear()
        self.loop = loop
        loop.add_reader(self._replies, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._replies, 65536)
        except BlockingIOError:
            return
        if not data:
            self._lost()
            return
        for frame in self._reader.feed(data):
            message = msgspec.msgpack.decode(frame)
            if message[0] == "started":
                future = self._starting.popleft()
                if future is None or future.done():  # its spawn was cancelled: nobody will use it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(message[1], signal.SIGKILL)
                else:
                    future.set_result(message[1])
            elif message[0] == "exited":
                callback = self._on_exit.pop(message[1], None)
                if callback is None:
                    if len(self._exited) > 1000:  # exits of workers nobody watches any more
                        self._exited.clear()
                    self._exited[message[1]] = message[2]
                else:
                    callback(message[2])

    def _lost(self) -> None:
        # The launcher died: nothing more will be reported; its workers watch their front.
        self.alive = False
        self.loop.remove_reader(self._replies)
        for future in self._starting:
            if future is not None and not future.done():
                future.set_exception(RuntimeError("the worker launcher exited"))
        log.error("engine.launcher_lost")

_launcher_now: _Launcher | None = None


def _launcher() -> _Launcher:
    """The process's launcher, moved to the running loop if an earlier loop has ended
    (tests run one loop after another; starting a launcher costs a second of imports)."""
    global _launcher_now
    loop = asyncio.get_running_loop()
    launcher = _launcher_now
    if launcher is not None and launcher.alive and launcher.loop is not loop:
        if launcher.loop.is_closed() or not launcher.loop.is_running():
            launcher.move_to(loop)
        else:  # two loops at once: each gets its own
            launcher = None
    if launcher is None or not launcher.alive:
        launcher = _launcher_now = _Launcher(loop)
    return launcher


class Engine:
    """The pool of worker processes. Run :meth:`serve` in a task group; call :meth:`run`
    from request handlers on the same loop."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        backends: Backends | None = None,
        garden: GardenClient | None = None,
        telemetry: Any = None,
        context: zmq.asyncio.Context | None = None,
        modules: Modules | None = None,
        sessions: Any = None,
    ) -> None:
        self.config = config
        self._sessions = sessions  # luanette.sessions.Sessions: commits and pending sessions
        # resolves require() for every worker (the front owns the script index)
        self.modules = modules
        # luanette.plugins.Plugins: answers the runs' tool:before calls and takes their
        # hook notes (set by the server; None: no plugins)
        self.plugins: Any = None
        # luanette.flows.FlowManager: answers the runs' flow.* calls (set by the server)
        self.flows: Any = None
        self.stats = EngineStats()
        self._backends = backends
        self._garden = garden
        self._telemetry = telemetry
        # the front's context when given: one libzmq I/O thread for all its sockets
        # wakes less often than one per context
        self._owns_ctx = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._io: LoopSocket | None = None  # the pool socket's traffic, once serving
        self._calls: set[asyncio.Task[None]] = set()  # service calls being served
        self._dir: str | None = None
        self.endpoint: str | None = None
        self._workers: dict[bytes, _Worker] = {}
        self._pending: dict[int, _Pending] = {}
        self._numbers = itertools.count(1)
        self._names = itertools.count(1)
        self._ready = asyncio.Event()
        self._waiting: dict[int, float] = {}  # runs waiting for a worker: when they began
        self._unknown_told: dict[bytes, float] = {}  # senders told to register, and when
        self._pool_sock_endpoint: str | None = None
        self.queue_depth: Callable[[], int] | None = None  # jobs queued (set by the server)
        self.secure_pool: Callable[[zmq.Socket[Any]], None] | None = None  # CURVE for :5571
        self._exits = anyio.Event()  # set when a worker exits
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: Any = None
        self._restart_backoff = 0.0
        self._garden_replies = msgspec.msgpack.Encoder()
        self._garden_requests = msgspec.msgpack.Decoder(g.ShellRequest)
        # set by the server: where generation_chunk broadcasts go, and what answers a
        # pipeline's script_search / job_result sources (luanette.pipelines)
        self.publish: Callable[[Any], None] | None = None
        self.pipeline_sources: Any = None

    # --- lifecycle -------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the pool socket (ipc in a private temporary directory)."""
        self._dir = tempfile.mkdtemp(prefix="luanette-pool-")
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        # a worker that joins again under its name (a new socket after a partition)
        # takes its identity over instead of being refused
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(f"ipc://{self._dir}/pool")
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.pool_endpoint:
            # Options are taken per endpoint when it is bound: the local workers' ipc
            # endpoint above stays plain, the pool endpoint gets CURVE when it is on.
            if self.secure_pool is not None:
                self.secure_pool(sock)
            try:
                sock.bind(self.config.pool_endpoint)
            except zmq.ZMQError:
                sock.close(0)
                self._sock = None
                shutil.rmtree(self._dir, ignore_errors=True)
                raise
            self._pool_sock_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    @property
    def pool_endpoint(self) -> str | None:
        """The endpoint remote workers join, as bound (a tcp port 0 resolved)."""
        return self._pool_sock_endpoint

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the workers and serve them until cancelled; then stop them."""
        if self._sock is None:
            self.bind()
        self._loop = asyncio.get_running_loop()
        assert self._sock is not None
        self._io = LoopSocket(zmq.Socket.shadow(self._sock.underlying))
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.config.workers):  # runs wait for the first to be ready
                    tg.start_soon(self._spawn)
                tg.start_soon(self._receive_loop)
                tg.start_soon(self._pulse_loop)
                if self.config.workers_max > self.config.workers_min:
                    tg.start_soon(self._autoscale_loop)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all()

    async def _stop_all(self) -> None:
        self._stopping = True
        for task in self._calls:  # their runs are ending with the daemon
            task.cancel()
        for pending in list(self._pending.values()):
            self._fail(pending, ErrorDetail("cancelled", "the daemon is shutting down"))
        for worker in list(self._workers.values()):
            if worker.remote:  # it outlives this front: it registers with the next one
                self._workers.pop(worker.identity, None)
            elif worker.ready:
                self._send(worker, ch.Stop())
            else:  # not connected yet: a Stop would not reach it, and it holds nothing
                self._kill(worker)
        for worker in list(self._workers.values()):
            worker.outbox.flush()
        with anyio.move_on_after(STOP_TIMEOUT_S):
            await self._all_exited()
        for worker in list(self._workers.values()):
            self._kill(worker)
        with anyio.move_on_after(1.0):
            await self._all_exited()
        for worker in list(self._workers.values()):
            self._forget(worker)
        if self._io is not None:
            self._io.close()
        if self._sock is not None:
            self._sock.close(0)
        if self._owns_ctx:
            self._ctx.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _all_exited(self) -> None:
        while self._workers:
            self._exits = anyio.Event()
            with anyio.move_on_after(0.1):
                await self._exits.wait()
            # A launcher that died reports no exits: look for the processes themselves.
            for worker in list(self._workers.values()):
                if worker.pid and not _exists(worker.pid):
                    self._on_exit(worker, -signal.SIGKILL)

    # --- runs ------------------------------------------------------------------------

    async def run(
        self,
        code: str,
        params: Any,
        *,
        limits: Limits,
        info: ch.RunInfo,
        cancel: CancelToken,
        hooks: RunHooks,
        chunk_name: str = "script",
    ) -> Outcome:
        """Run a script in a worker. Raises ScriptError as ``run_script`` does, and with
        kind ``worker_lost`` when its worker died under it; the error is also an event
        on ``hooks.span`` (see telemetry.record_error)."""
        try:
            return await self._run(code, params, limits=limits, info=info, cancel=cancel, hooks=hooks,
                                   chunk_name=chunk_name)
        except ScriptError as e:
            record_error(hooks.span, e.detail)
            raise

    async def _run(
        self,
        code: str,
        params: Any,
        *,
        limits: Limits,
        info: ch.RunInfo,
        cancel: CancelToken,
        hooks: RunHooks,
        chunk_name: str,
    ) -> Outcome:
        # describe() gets no capability whatever the script declares: any worker will do
        needs = info.capabilities if info.kind != "describe" else []
        worker = self._choose(info.group, needs)
        if worker is None:  # starting up, or every worker is full or being replaced
            worker = await self._wait_for_worker(info.group, needs, cancel)
        # the run's time starts now, as it does in the worker
        deadline = time.monotonic() + limits.timeout_s
        self.stats.runs += 1
        number = next(self._numbers)
        loop = self._loop or asyncio.get_running_loop()
        pending = _Pending(number, loop.create_future(), worker, hooks, cancel, limits)
        try:
            check_value(params)  # a worker must be able to decode what it is sent
            frame = ch.encoder.encode(
                ch.Run(run=number, code=code, params=params, chunk_name=chunk_name, limits=limits, info=info)
            )
        except (TypeError, ValueError, OverflowError) as exc:  # TooDeepError is a ValueError
            raise ScriptError(ErrorDetail("invalid_params", f"params cannot be passed to Lua: {exc}")) from None
        self._pending[number] = pending
        worker.runs.add(number)
        worker.outbox.put(frame)
        if len(self._pending) == 1:  # nothing to batch it with: send it now
            worker.outbox.flush()
        pending.timer = loop.call_at(
            loop.time() + (deadline - time.monotonic()) + self.config.grace_s, self._overdue, pending
        )
        pending.listener = lambda: loop.call_soon_threadsafe(self._on_cancel, pending)
        cancel.listen(pending.listener)
        if cancel.cancelled:
            self._on_cancel(pending)
        try:
            return await pending.future
        finally:
            cancel.unlisten(pending.listener)
            if not pending.future.done():  # the caller was cancelled: stop the run too
                self._send(worker, ch.Cancel(run=number, reason="the request was abandoned"))
            self._settle(pending)

    def _choose(self, group: str | None = None, needs: list[str] | None = None) -> _Worker | None:
        best: _Worker | None = None
        # a worker with runs that has gone quiet is stuck (say, inside one C call on its
        # event loop): send it nothing more until it speaks again
        quiet = time.monotonic() - SILENT_AFTER_S
        for worker in self._workers.values():
            if worker.runs and worker.last_heard < quiet:
                continue
            if worker.ready and not worker.leaving and len(worker.runs) < worker.capacity:
                if (group is not None or worker.capabilities is not None) and not _serves(worker, group, needs):
                    continue
                # fewest runs; on a tie, the one that served least (sequential runs
                # take turns, so every worker's caches warm up)
                if best is None or (len(worker.runs), worker.served) < (len(best.runs), best.served):
                    best = worker
        return best

    def eligible(self, group: str | None, needs: list[str] | None) -> bool:
        """Whether some worker now in the pool (busy or not) can serve a run of
        ``group`` with the capabilities ``needs`` (None: everything its kind offers)."""
        return any(w.ready and not w.leaving and _serves(w, group, needs) for w in self._workers.values())

    def why_no_worker(self, group: str | None, needs: list[str] | None) -> str:
        """Why no worker can take such a run, for a job's status and its error."""
        if not any(w.ready and not w.leaving for w in self._workers.values()):
            return "no worker process has joined the pool yet"
        wanted = "every capability" if needs is None else (", ".join(needs) or "no capability")
        if group is not None:
            in_group = [w for w in self._workers.values() if w.group == group and w.ready and not w.leaving]
            if not in_group:
                return f"no worker of group {group!r} is in the pool"
            return f"no worker of group {group!r} has the capabilities the script needs ({wanted})"
        return f"no worker has the capabilities the script needs ({wanted})"

    async def wait_eligible(self, group: str | None, needs: list[str] | None, timeout_s: float,
                            cancel: CancelToken | None = None) -> bool:
        """Wait until :meth:`eligible` (True) or ``timeout_s`` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        while not self.eligible(group, needs):
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping or (cancel is not None and cancel.cancelled):
                return False
            self._ready.clear()
            with anyio.move_on_after(min(left, 0.25)):
                await self._ready.wait()
        return True

    async def _wait_for_worker(self, group: str | None, needs: list[str] | None, cancel: CancelToken) -> _Worker:
        started = time.monotonic()
        self._waiting[id(cancel)] = started
        try:
            while True:
                self._ready.clear()
                now = time.monotonic()
                # full workers free up within a run; one that can serve it may never come
                limit = WORKER_WAIT_S if self.eligible(group, needs) else self.config.no_worker_timeout_s
                left = started + limit - now
                if left <= 0 or cancel.cancelled or self._stopping:
                    if cancel.cancelled:
                        raise ScriptError(ErrorDetail("cancelled", "the run was cancelled before a worker took it"))
                    if not self.eligible(group, needs):
                        raise ScriptError(
                            ErrorDetail(
                                "no_worker",
                                f"no worker could take the script within {limit:g} s: "
                                + self.why_no_worker(group, needs),
                                hints=[
                                    "start a worker that can serve it (luanette worker --connect ... "
                                    "--group NAME --capability CAP), or change the script's group"
                                ],
                            )
                        )
                    raise ScriptError(
                        ErrorDetail(
                            "busy",
                            f"no worker process could take the script within {limit:g} s",
                            hints=["the daemon's workers keep failing or are all full; see its log, and try again"],
                        )
                    )
                with anyio.move_on_after(min(left, 0.1)):
                    await self._ready.wait()
                worker = self._choose(group, needs)
                if worker is not None:
                    return worker
        finally:
            self._waiting.pop(id(cancel), None)

    def _on_cancel(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        self._send(pending.worker, ch.Cancel(run=pending.number, reason=pending.cancel.reason or "cancelled"))
        loop = self._loop
        assert loop is not None
        # a first cancel leaves the script its grace (on_shutdown announces itself)
        grace = pending.limits.cancel_grace_s if pending.cancel.count < 2 else 0.0
        when = loop.time() + grace + self.config.grace_s
        if pending.timer is None or when < pending.timer.when():
            if pending.timer is not None:
                pending.timer.cancel()
            pending.timer = loop.call_at(when, self._overdue, pending)

    def _shutdown_started(self, pending: _Pending, timeout_s: Any) -> None:
        """The run's on_shutdown began: it may take ``timeout_s``, even past the run's
        deadline or after a cancel (a cancel from now on stops it at once)."""
        loop = self._loop
        if pending.future.done() or loop is None or not isinstance(timeout_s, int | float):
            return
        if pending.timer is not None:
            pending.timer.cancel()
        pending.timer = loop.call_at(loop.time() + float(timeout_s) + self.config.grace_s, self._overdue, pending)

    def _overdue(self, pending: _Pending) -> None:
        """The run's worker did not answer in time: answer for it, replace the worker."""
        if pending.future.done():
            return
        reason = "cancelled" if pending.cancel.cancelled else "timeout"
        detail = stopped_detail(reason, pending.cancel, pending.limits, [])
        detail = msgspec.structs.replace(
            detail,
            message=detail.message + " (it did not stop in time, inside one long library call such as a "
            "pattern match, so its worker process was replaced)",
            hints=[
                *detail.hints,
                "avoid patterns that backtrack without bound (e.g. '(.-)*x') and very large string.rep results",
            ],
        )
        self._fail(pending, detail)
        worker = pending.worker
        self.stats.workers_quarantined += 1
        log.warning("engine.worker_quarantined", worker=worker.name, run=pending.number, reason=reason)
        self._retire(worker, kill_after=self.config.stuck_drain_s)

    def _settle(self, pending: _Pending) -> None:
        self._pending.pop(pending.number, None)
        if pending.timer is not None:
            pending.timer.cancel()
        worker = pending.worker
        worker.runs.discard(pending.number)
        if not worker.runs:
            worker.idle_since = time.monotonic()
        if worker.leaving and not worker.runs and not worker.exited:
            self._leave_now(worker)

    def _fail(self, pending: _Pending, detail: ErrorDetail) -> None:
        if not pending.future.done():
            pending.future.set_exception(ScriptError(detail))
        self._settle(pending)

    # --- workers ---------------------------------------------------------------------

    def _temp_of(self, name: str) -> Path:
        # named like a job's directory, so a start-up after a crash removes it too
        return Path(self.config.temp_root) / f"{TEMP_DIR_PREFIX}worker-{name}"

    async def _spawn(self) -> None:
        if self._stopping:
            return
        assert self.endpoint is not None
        name = f"w{next(self._names)}.{os.getpid()}"
        config = WorkerConfig(
            endpoint=self.endpoint,
            name=name,
            capacity=self.config.capacity,
            memory_share=self.config.memory_share,
            temp_root=str(self._temp_of(name)),
            cas_root=self.config.cas_root,
            cas_read_only=env_read_only_why(),
            settings=self.config.settings,
            log_json=self.config.log_json,
        )
        handle = _Worker(name, self._send_frames)
        self._workers[handle.identity] = handle  # before it starts: its Register may come first
        try:
            handle.pid = await _launcher().spawn(config, lambda code: self._on_exit(handle, code))
        except BaseException:
            self._workers.pop(handle.identity, None)
            self._exits.set()
            raise
        self.stats.workers_started += 1
        log.debug("engine.worker_started", worker=name, pid=handle.pid)

    def _replace(self) -> None:
        if self._stopping or self._tg is None:
            return
        backoff = self._restart_backoff

        async def later() -> None:
            if backoff:
                await anyio.sleep(backoff)
            await self._spawn()

        self._tg.start_soon(later)

    def _retire(self, worker: _Worker, *, kill_after: float | None) -> None:
        """Take no new runs on ``worker``; start its replacement; stop it when its runs
        are done (or kill it ``kill_after`` seconds from now)."""
        if worker.leaving:
            return
        worker.leaving = True
        if worker.remote:
            if kill_after is not None:
                # Not ours to kill or replace: it is told to stop (its own supervisor, a
                # container runtime say, starts it again) and forgotten; its runs end now.
                self._lose_runs(worker, f"the worker {worker.name} was stopped (a run of it did not come back)")
                self._leave_now(worker)
            elif not worker.runs:  # it leaves by itself: once its runs are done
                self._leave_now(worker)
            return
        self._replace()
        worker.quarantined = kill_after is not None
        if kill_after is not None and self._loop is not None:
            worker.kill_timer = self._loop.call_later(kill_after, self._kill, worker)
        if not worker.runs:
            self._leave_now(worker)

    def _leave_now(self, worker: _Worker) -> None:
        if worker.remote:
            self._send(worker, ch.Stop())
            worker.outbox.flush()
            self._workers.pop(worker.identity, None)
            self._exits.set()
            return
        if worker.quarantined:
            self._kill(worker)
        else:
            self._send(worker, ch.Stop())

    def _kill(self, worker: _Worker) -> None:
        if not worker.exited and worker.pid and not worker.remote:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def _on_exit(self, worker: _Worker, code: int) -> None:
        """The worker process ended (the launcher said so)."""
        worker.exited = True
        if worker.kill_timer is not None:
            worker.kill_timer.cancel()
        expected = worker.leaving or self._stopping
        log.debug("engine.worker_exited", worker=worker.name, code=code, expected=expected)
        if not expected:
            self.stats.workers_lost += 1
            log.error("engine.worker_lost", worker=worker.name, exitcode=code, runs=len(worker.runs))
            # a worker that dies before it ever served is likely to die again: back off
            self._restart_backoff = (
                min(max(self._restart_backoff * 2, 0.1), MAX_RESTART_BACKOFF_S) if not worker.ready else 0.0
            )
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited (code {code})"
        for number in list(worker.runs):
            pending = self._pending.get(number)
            if pending is not None:
                self._fail(
                    pending,
                    ErrorDetail(
                        "worker_lost",
                        f"the worker process running the script {how} before the script finished",
                        hints=[
                            "if it happens again with this script, it may use more memory than the machine has; "
                            "otherwise run it again"
                        ],
                    ),
                )
        self._forget(worker)
        self._exits.set()
        if not expected:
            self._replace()

    def _forget(self, worker: _Worker) -> None:
        self._workers.pop(worker.identity, None)
        temp = self._temp_of(worker.name)
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)

    # --- the socket ------------------------------------------------------------------

    def _send(self, worker: _Worker, message: ch.Message) -> None:
        worker.outbox.put(ch.encoder.encode(message))

    def _send_frames(self, worker: _Worker, frames: list[bytes]) -> None:
        assert self._io is not None
        try:
            self._io.send_now([worker.identity, *frames])
        except zmq.ZMQError as problem:  # not connected yet, or gone: its exit is handled apart
            log.debug("engine.send_failed", worker=worker.name, error=str(problem))

    async def _receive_loop(self) -> None:
        assert self._io is not None
        io = self._io
        while True:
            batch = await io.receive(RECEIVE_BATCH)
            for identity, *frames in batch:
                for frame in frames:
                    self._on_message(identity, frame)
            if len(batch) == RECEIVE_BATCH:
                await asyncio.sleep(0)  # more may wait: let the other tasks run (see Server)

    def _on_message(self, identity: bytes, frame: bytes) -> None:
        try:
            self._handle_message(identity, frame)
        except Exception:  # a bug in handling one message must not stop the pool
            log.exception("engine.message_failed", size=len(frame))

    def _handle_message(self, identity: bytes, frame: bytes) -> None:
        worker = self._workers.get(identity)
        try:
            message = ch.to_front.decode(frame)
        except (msgspec.DecodeError, RecursionError):  # values are checked at their source: see channel
            log.warning("engine.bad_message", worker=worker.name if worker else identity[:64], size=len(frame))
            return
        if isinstance(message, ch.Register):
            self._on_register(identity, worker, message)
            return
        if worker is None or not worker.ready:
            self._on_stranger(identity, message)
            return
        worker.last_heard = time.monotonic()
        if isinstance(message, ch.Done):
            self._on_done(message)
        elif isinstance(message, ch.Note):
            self._on_note(message)
        elif isinstance(message, ch.Call):
            self.stats.service_calls += 1
            pending = self._pending.get(message.run)
            context = pending.hooks.context if pending is not None else otel_context.get_current()
            assert self._loop is not None
            # the call runs as part of its run: the run's span is its parent (a task
            # runs in a copy of the context it was made in)
            token = otel_context.attach(context)
            try:
                # a plain task, kept in _calls (a task group's start_soon cost more than
                # the rest of handing a model call to aiohttp)
                task = self._loop.create_task(self._serve_call(worker, message))
            finally:
                otel_context.detach(token)
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        elif isinstance(message, ch.Beat):
            worker.rss_bytes = message.rss_bytes
            worker.inline_steps = message.inline_steps
        elif isinstance(message, ch.Retiring):
            if worker.remote:  # stopped by its own operator: it finishes its runs
                log.info("engine.worker_leaving", worker=worker.name, runs=len(worker.runs))
            else:
                self.stats.workers_recycled += 1
                log.info("engine.worker_recycled", worker=worker.name, rss=message.rss_bytes)
            self._retire(worker, kill_after=None)

    def _on_register(self, identity: bytes, worker: _Worker | None, message: ch.Register) -> None:
        try:
            reg = decode_payload(message.registration, Encoding.COMPACT)
            if not isinstance(reg, Register):
                raise DecodeError("not a Register payload")
            needs = None if "*" in reg.capabilities else tuple(caps.parse(c) for c in reg.capabilities)
        except (DecodeError, caps.CapabilityError) as exc:
            log.warning("engine.bad_registration", worker=identity[:64], error=str(exc))
            return
        if worker is None:
            if not message.remote:  # a local worker we no longer know (it was given up)
                return
            worker = _Worker(identity.decode("utf-8", "replace"), self._send_frames, remote=True)
            self._workers[identity] = worker
        elif worker.ready:
            # It registers again on a new socket: it dropped what it ran for us.
            self._lose_runs(worker, f"the worker {worker.name} restarted its connection to the front")
        worker.remote = message.remote
        worker.pid = message.pid
        worker.capacity = max(1, message.capacity)
        worker.group = message.group
        worker.capabilities = needs
        worker.capability_texts = list(reg.capabilities)
        worker.hostname = reg.hostname
        worker.version = reg.version
        worker.worker_id = str(reg.worker_id)
        worker.last_heard = worker.idle_since = time.monotonic()
        worker.ready = True
        self._unknown_told.pop(identity, None)
        if worker.remote:
            self.stats.remote_joined += 1
            log.info("engine.worker_joined", worker=worker.name, host=worker.hostname, group=worker.group,
                     capabilities=worker.capability_texts, capacity=worker.capacity)
        else:
            self._restart_backoff = 0.0
        self._ready.set()

    def _on_stranger(self, identity: bytes, message: ch.Message) -> None:
        # A worker the front does not know (the front restarted, or gave it up after a
        # partition): what it sends is dropped, and it is told to register again.
        if isinstance(message, ch.Done):
            self.stats.late_results += 1
        now = time.monotonic()
        if now - self._unknown_told.get(identity, 0.0) < self.config.beat_s:
            return
        if len(self._unknown_told) > 1000:
            self._unknown_told.clear()
        self._unknown_told[identity] = now
        assert self._io is not None
        with contextlib.suppress(zmq.ZMQError):  # it went away again: nothing to tell
            self._io.send_now([identity, ch.encoder.encode(ch.Unknown())])

    async def _pulse_loop(self) -> None:
        # Beats go out once a beat; silence is looked for four times as often, so a
        # dead remote worker's runs end within 3 beats of its last one (not 4).
        beat = self.config.beat_s
        pulse = ch.encoder.encode(ch.Pulse())
        for tick in itertools.count():
            await anyio.sleep(beat / 4)
            lost_before = time.monotonic() - LOST_AFTER_BEATS * beat
            for worker in list(self._workers.values()):
                if not worker.ready:
                    continue
                if worker.remote and worker.last_heard < lost_before:
                    self._lose(worker, f"sent no heartbeat for {LOST_AFTER_BEATS * beat:g} s")
                elif tick % 4 == 0:
                    worker.outbox.put(pulse)

    def _lose(self, worker: _Worker, why: str) -> None:
        """A remote worker is gone (no beats): its runs end ``worker_lost``."""
        self.stats.workers_lost += 1
        log.error("engine.worker_lost", worker=worker.name, host=worker.hostname, reason=why, runs=len(worker.runs))
        self._lose_runs(worker, f"the worker {worker.name} on {worker.hostname or 'its host'} {why}")
        self._workers.pop(worker.identity, None)
        self._exits.set()

    def _lose_runs(self, worker: _Worker, how: str) -> None:
        for number in list(worker.runs):
            pending = self._pending.get(number)
            if pending is not None:
                self._fail(pending, ErrorDetail(
                    "worker_lost",
                    f"{how} before the script finished",
                    hints=["run it again; a script that is safe to repeat can declare retry = \"on_worker_loss\""],
                ))
        worker.runs.clear()

    async def _autoscale_loop(self) -> None:
        # The local supervisor: one more process while work waits and every local
        # process is busy; one fewer when one has been idle for a while.
        while True:
            config = self.config
            await anyio.sleep(config.beat_s)
            local = [w for w in self._workers.values() if not w.remote and not w.leaving]
            waiting = len(self._waiting) + (self.queue_depth() if self.queue_depth is not None else 0)
            now = time.monotonic()
            if waiting and len(local) < config.workers_max and all(w.ready and w.runs for w in local):
                self.stats.scaled_up += 1
                log.info("engine.scale_up", workers=len(local) + 1, waiting=waiting)
                assert self._tg is not None
                self._tg.start_soon(self._spawn)
                continue
            if len(local) > config.workers_min and not waiting:
                idle = [w for w in local if w.ready and not w.runs and now - w.idle_since >= config.scale_down_idle_s]
                if idle:
                    self.stats.scaled_down += 1
                    log.info("engine.scale_down", workers=len(local) - 1)
                    victim = idle[-1]
                    victim.leaving = True
                    self._leave_now(victim)

    def invalidate(self, hashes: list[str]) -> None:
        """Scripts stored again or removed: every worker drops its cached chunks."""
        for worker in self._workers.values():
            if worker.ready:
                self._send(worker, ch.Invalidate(hashes=hashes))

    def _on_done(self, message: ch.Done) -> None:
        pending = self._pending.get(message.run)
        if pending is None:
            self.stats.late_results += 1
            return
        pending.worker.served += 1
        if not pending.future.done():
            if message.error is not None:
                pending.future.set_exception(ScriptError(message.error))
            else:
                pending.future.set_result(Outcome(message.result, message.duration_ms))
        self._settle(pending)

    def _on_note(self, message: ch.Note) -> None:
        if message.kind == "hook":
            if self.plugins is not None:
                with contextlib.suppress(Exception):  # a note is news, never a reason to fail
                    self.plugins.note(message.data)
            return
        if message.kind == "metric":
            name, value, attributes = message.data
            if self._telemetry is not None and (
                name in self._telemetry.histograms or len(self._telemetry.histograms) < MAX_METRICS
            ):
                with contextlib.suppress(Exception):
                    self._telemetry.histogram(name).record(value, attributes)
            return
        pending = self._pending.get(message.run)
        if pending is None:
            return
        if message.kind == "shutdown":  # the script's on_shutdown runs, for its own time limit
            self._shutdown_started(pending, message.data[0])
            return
        hooks = pending.hooks
        with contextlib.suppress(Exception):  # a note is news, never a reason to fail
            if message.kind == "log":
                level, text, fields = message.data
                emit_script_log(hooks.logger, level, text, fields)
            elif message.kind == "progress" and hooks.progress is not None:
                hooks.progress(*message.data)
            elif message.kind == "event" and hooks.span is not None:
                hooks.span.add_event(message.data[0], message.data[1])
            elif message.kind == "attribute" and hooks.span is not None:
                hooks.span.set_attribute(message.data[0], message.data[1])

    async def _serve_call(self, worker: _Worker, message: ch.Call) -> None:
        try:
            value = await self._service(message)
            answer = ch.Answer(call=message.call, ok=True, value=value)
        except Exception as exc:  # every failure goes back to the script as its error
            answer = ch.Answer(call=message.call, ok=False, error=error_to_wire(exc))
        if not worker.exited:
            self._send(worker, answer)

    async def _service(self, message: ch.Call) -> Any:
        if message.service == "backend":
            if self._backends is None:
                raise RuntimeError("no backends")
            name, path, body, left, method = message.args
            deadline = None if left is None else time.monotonic() + left
            return await self._backends.call(name, path, body, deadline=deadline, method=method)
        if message.service == "backend_stream":
            return await self._stream(message)
        if message.service == "pipeline_source":
            if self.pipeline_sources is None:
                raise RuntimeError("pipeline sources are not available to this daemon's runs")
            kind, args = message.args
            return await self.pipeline_sources.fetch(kind, args)
        if message.service == "garden":
            if self._garden is None:
                raise GardenUnavailable("no garden configured (set endpoint in the [garden] section of the config)")
            packed, timeout = message.args
            reply = await self._garden.request(self._garden_requests.decode(packed), timeout=timeout)
            return self._garden_replies.encode(reply)
        if message.service == "hook":
            if self.plugins is None:  # no plugins since the run started: nothing to ask
                return {}
            return await self.plugins.call(message.args)
        if message.service == "flow":
            if self.flows is None:
                raise RuntimeError("flows are not available to this daemon's runs")
            return await self.flows.call(message.args)
        if message.service == "module":
            if self.modules is None:
                raise ModuleError("module not found: modules are not available to this daemon's runs")
            name, base = message.args
            return await self.modules.resolve(name, base)
        if message.service == "session":
            if self._sessions is None:
                raise GardenUnavailable("no session service in this daemon")
            action, ops, *about = message.args
            if action == "commit":
                return await self._sessions.commit(ops)
            if action == "keep":
                job_id, user, script_hash = about
                return self._sessions.keep(ops, job_id=job_id, user=user, script_hash=script_hash)
        raise RuntimeError(f"unknown service {message.service!r}")

    async def _stream(self, message: ch.Call) -> Any:
        # The front reads the stream and publishes each chunk as it comes; the worker
        # gets the whole answer with its chunk list (docs/plugins.md, "Pipelines").
        if self._backends is None:
            raise RuntimeError("no backends")
        name, path, body, left, meta = message.args
        deadline = None if left is None else time.monotonic() + left
        publish = self.publish
        index = itertools.count()

        def on_chunk(text: str, final: bool) -> None:
            if publish is not None:
                publish(
                    GenerationChunk(
                        job_id=meta.get("job_id"),
                        pipeline_id=meta.get("pipeline_id"),
                        step_id=meta.get("step_id", ""),
                        index=next(index),
                        content=text,
                        is_final=final,
                    )
                )

        return await self._backends.stream(
            name, path, body, deadline=deadline, on_chunk=on_chunk, buffer_size=int(meta.get("buffer_size", 1))
        )

    def workers(self) -> list[Mapping[str, Any]]:
        """The workers now: name, group, capabilities, host, load, last heartbeat."""
        now = time.monotonic()
        return [
            {
                "name": w.name,
                "group": w.group,
                "capabilities": list(w.capability_texts),
                "hostname": w.hostname,
                "pid": w.pid,
                "version": w.version,
                "remote": w.remote,
                "state": "leaving" if w.leaving else "ready" if w.ready else "starting",
                "runs": len(w.runs),
                "capacity": w.capacity,
                "rss_bytes": w.rss_bytes,
                "last_heartbeat_s": round(now - w.last_heard, 3),
                "ready": w.ready,
                "leaving": w.leaving,
                "inline_steps": w.inline_steps,
                "served": w.served,
            }
            for w in self._workers.values()
        ]

    def pool_stats(self) -> dict[str, Any]:
        """Autoscaling signals: workers busy and idle per group, runs waiting for one."""
        groups: dict[str, dict[str, int]] = {}
        for w in self._workers.values():
            if not w.ready or w.leaving:
                continue
            g_ = groups.setdefault(w.group, {"workers": 0, "busy": 0, "idle": 0, "runs": 0, "capacity": 0})
            g_["workers"] += 1
            g_["busy" if w.runs else "idle"] += 1
            g_["runs"] += len(w.runs)
            g_["capacity"] += w.capacity
        oldest = min(self._waiting.values(), default=None)
        return {
            "workers": sum(g_["workers"] for g_ in groups.values()),
            "groups": groups,
            "waiting": len(self._waiting),
            "oldest_waiting_s": None if oldest is None else round(time.monotonic() - oldest, 3),
        }


def _serves(worker: _Worker, group: str | None, needs: list[str] | None) -> bool:
    """Whether ``worker`` may run a script of ``group`` that has the capabilities
    ``needs`` (None: everything its kind offers, which only an all-capable worker has)."""
    if group is not None and worker.group != group:
        return False
    if worker.capabilities is None:
        return True
    if needs is None:
        return False
    try:
        return all(caps.permitted(caps.parse(text), worker.capabilities) for text in needs)
    except caps.CapabilityError:
        return False


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
