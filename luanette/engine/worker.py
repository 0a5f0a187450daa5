"""A worker process: runs scripts for the front, many at once, and holds nothing else.

It connects a DEALER to the front's pool socket, sends ``Register``, and serves ``Run``
messages until told to ``Stop`` (or until the front goes away).  Each run gets the
globals the registry gives its kind; the services only the front holds (model
backends, the garden) are proxies that send a ``Call`` and wait for its ``Answer``, so
per-backend concurrency and the garden client stay daemon-wide.  A script's log lines,
progress and span events go to the front as ``Note`` messages, where they join the
request's or job's log context and span.

Memory: after a run, a worker that has grown past its share of the daemon's Lua memory
budget drops its idle states, and if it is still too big announces ``Retiring``, takes
no more runs and exits once the ones it has are done; the front starts a replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
import zmq
import zmq.asyncio
from opentelemetry import trace

from hooteproto import garden as g
from hooteproto.codec import Encoding, encode_payload
from hooteproto.types import Register, WorkerType
from luanette import gcpolicy, logs
from luanette.backends import UnknownBackend
from luanette.cas import Cas
from luanette.engine import channel as ch
from luanette.engine.api import CancelToken, ErrorDetail, ScriptError
from luanette.engine.lua import (
    forget_chunks,
    release_idle_states,
    run_script,
    set_idle_states,
    stats,
    trim_idle_states,
)
from luanette.engine.services import error_from_wire
from luanette.settings import BackendSettings, GardenSettings, Settings
from luanette.stdlib.garden import GardenNamespace
from luanette.stdlib.models import model_namespaces
from luanette.stdlib.registry import Toolbox, namespaces_for
from luanette.zmqloop import LoopSocket, Outbox

log = structlog.get_logger("luanette.worker")

# The run whose task (or Lua thread, which runs in a copy of its context) is calling:
# the service proxies tell the front whose call it is.
current_run: contextvars.ContextVar[int] = contextvars.ContextVar("current_run", default=0)

# How often an idle worker says it is alive and checks that its front still is.
BEAT_S = 1.0
LOST_AFTER_BEATS = 3  # beats a peer may miss before it is taken for dead
# An idle worker reads its RSS at most this often (a burst's end is caught by the beat).
MEMORY_CHECK_S = 0.05
# Idle Lua states kept after a burst (see luanette.engine.lua._StatePool): one holds
# ~350 KiB with a job's layout; together they may take a sixteenth of the memory share.
IDLE_STATE_BYTES = 512 * 2**10
MAX_BURST_STATES = 1024
RECEIVE_BATCH = 256  # messages taken from the socket before the runs they start may run


def burst_states(memory_share: int) -> int:
    """How many idle Lua states a worker with this share keeps after a burst."""
    if not memory_share:
        return MAX_BURST_STATES
    return min(MAX_BURST_STATES, memory_share // 16 // IDLE_STATE_BYTES)


class WorkerConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a worker is told when it starts."""

    endpoint: str  # the front's pool socket
    name: str  # DEALER identity, unique per front
    capacity: int = 1024  # runs at once
    memory_share: int = 0  # bytes the worker may grow past its start-up RSS before it retires; 0: never
    temp_root: str
    cas_root: str | None = None
    # why the CAS is read-only (the front's HOOTENANNY_CAS_READONLY), or None: writable
    cas_read_only: str | None = None
    settings: Settings = Settings()
    log_json: bool = False
    # a worker that joined over the pool endpoint (luanette worker --connect): it
    # outlives its front, and registers again with the next one
    remote: bool = False
    group: str = "local"
    capabilities: tuple[str, ...] = ("*",)  # seed 003 capabilities it may run; "*": every one
    # CURVE for a remote worker: the front's public key, its own public and secret key
    curve: tuple[str, str, str] | None = None


# --------------------------------------------------------------- front services


class _Calls:
    """Outstanding service calls of this worker, answered by the front."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._numbers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[ch.Answer]] = {}

    async def call(self, run: int, service: str, args: list[Any]) -> Any:
        """Ask the front; the answer's value, or the front's error raised as ours."""
        number = next(self._numbers)
        future: asyncio.Future[ch.Answer] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        try:
            self._send(ch.Call(call=number, run=run, service=service, args=args))
            answer = await future
        finally:
            self._waiting.pop(number, None)
        if answer.ok:
            return answer.value
        raise error_from_wire(answer.error or {})

    def answer(self, answer: ch.Answer) -> None:
        future = self._waiting.get(answer.call)
        if future is not None and not future.done():
            future.set_result(answer)


class RemoteBackends:
    """``Backends`` as the model namespaces use it, calling through the front."""

    def __init__(self, calls: _Calls, settings: dict[str, BackendSettings], run_of: Any) -> None:
        self._calls = calls
        self._settings = settings
        self._run_of = run_of

    def names(self) -> list[str]:
        return sorted(self._settings)

    def settings(self, name: str) -> BackendSettings:
        try:
            return self._settings[name]
        except KeyError:
            raise UnknownBackend(name, self.names()) from None

    async def call(
        self,
        name: str,
        path: str,
        body: Any,
        *,
        deadline: float | None,
        traceparent: str | None = None,
        method: str = "POST",
    ) -> Any:
        left = None if deadline is None else deadline - time.monotonic()
        return await self._calls.call(self._run_of(), "backend", [name, path, body, left, method])

    async def stream(
        self,
        name: str,
        path: str,
        body: Any,
        *,
        deadline: float | None,
        buffer_size: int = 1,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A streamed chat completion read by the front, which publishes its chunks;
        the whole answer with its chunk list (``Backends.stream``)."""
        left = None if deadline is None else deadline - time.monotonic()
        labels = {**(meta or {}), "buffer_size": buffer_size}
        return dict(await self._calls.call(self._run_of(), "backend_stream", [name, path, body, left, labels]))

    async def pipeline_source(self, kind: str, args: dict[str, Any]) -> Any:
        """A pipeline context source only the front can read (its script index, its jobs)."""
        return await self._calls.call(self._run_of(), "pipeline_source", [kind, args])


class RemoteGarden:
    """``GardenClient`` as the garden namespace uses it, calling through the front."""

    def __init__(self, calls: _Calls, settings: GardenSettings, run_of: Any) -> None:
        self._calls = calls
        self.settings = settings
        self._run_of = run_of
        self._replies = msgspec.msgpack.Decoder(g.ShellReply)

    @property
    def configured(self) -> bool:
        return self.settings.endpoint is not None

    async def request(self, content: Any, *, traceparent: str | None = None, timeout: float | None = None) -> Any:
        packed = await self._calls.call(self._run_of(), "garden", [msgspec.msgpack.encode(content), timeout])
        return self._replies.decode(packed)


class RemoteSessions:
    """The front's session service (``luanette.sessions.Sessions``) as a run's overlay
    uses it: commits and pending sessions happen in the front, in one place."""

    def __init__(self, calls: _Calls, run_of: Any) -> None:
        self._calls = calls
        self._run_of = run_of

    async def commit(self, ops: list[dict[str, Any]]) -> dict[str, str]:
        """Apply ``ops`` all-or-nothing; the created regions' real ids."""
        return dict(await self._calls.call(self._run_of(), "session", ["commit", ops]))

    async def keep(
        self, ops: list[dict[str, Any]], job_id: str | None, user: str | None, script_hash: str | None
    ) -> str:
        """Keep ``ops`` as a pending session; its id."""
        return str(await self._calls.call(self._run_of(), "session", ["keep", ops, job_id, user, script_hash]))


class RemoteHooks:
    """The front's plugin hooks (``luanette.plugins``) as a run's tool calls and
    ``hooks.emit`` reach them: a before event waits for the front's answer, the others
    are notes."""

    def __init__(self, calls: _Calls, send: Any, run_of: Any) -> None:
        self._calls = calls
        self._send = send
        self._run_of = run_of

    async def before(self, name: str, args: list[Any]) -> dict[str, Any]:
        """``{cancel, reason}`` or ``{args}`` (maybe modified) from the tool:before handlers."""
        return dict(await self._calls.call(self._run_of(), "hook", ["tool:before", name, args]))

    def notify(self, event: str, subject: str, payload: Any) -> None:
        """An after event or a custom one, delivered by the front without a reply."""
        self._send(ch.Note(run=self._run_of(), kind="hook", data=[event, subject, payload]))


class RemoteFlows:
    """The front's flows (``luanette.flows``) as a run's ``flow.*`` reaches them."""

    def __init__(self, calls: _Calls, run_of: Any) -> None:
        self._calls = calls
        self._run_of = run_of

    async def call(self, op: str, arguments: dict[str, Any], user: str | None) -> dict[str, Any]:
        """``{ok, value}`` or ``{ok = false, code, message}`` from the front."""
        return dict(await self._calls.call(self._run_of(), "flow", [op, arguments, user]))


class _RemoteSpan(trace.NonRecordingSpan):
    """The run's span in the front, as ``otel.*`` sees it: its ids here, its events and
    attributes sent to the front (only when the front records the span)."""

    def __init__(self, traceparent: str | None, note: Any, sampled: bool) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self._traceparent = traceparent
        self._parsed = False
        self._note = note
        self._sampled = sampled

    def get_span_context(self) -> trace.SpanContext:
        # parsed when asked for (a namespace function that calls out): most runs never do
        if not self._parsed:
            self._context = span_context_of(self._traceparent)
            self._parsed = True
        return self._context

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self._sampled:
            self._note("event", [name, dict(attributes or {})])

    def set_attribute(self, key: str, value: Any) -> None:
        if self._sampled:
            self._note("attribute", [key, value])


class _RemoteHistogram:
    def __init__(self, name: str, send: Any) -> None:
        self._name = name
        self._send = send

    def record(self, value: float, attributes: Any = None) -> None:
        self._send(ch.Note(run=0, kind="metric", data=[self._name, value, dict(attributes or {})]))


class RemoteMetrics:
    """The daemon's histograms as ``otel.record_metric`` uses them, recorded in the front."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.histograms: dict[str, _RemoteHistogram] = {}

    def histogram(self, name: str) -> _RemoteHistogram:
        found = self.histograms.get(name)
        if found is None:
            found = self.histograms[name] = _RemoteHistogram(name, self._send)
        return found


def span_context_of(traceparent: str | None) -> trace.SpanContext:
    """The SpanContext a W3C traceparent names (invalid when there is none)."""
    try:
        _, trace_id, span_id, flags = (traceparent or "").split("-")
        return trace.SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(int(flags, 16))
        )
    except ValueError:
        return trace.INVALID_SPAN_CONTEXT


# ----------------------------------------------------------------------- worker


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker:
    """One worker process's runs and its socket."""

    def __init__(self, config: WorkerConfig, lifeline: int | None = None) -> None:
        self.config = config
        self._lifeline = lifeline
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, config.name.encode())
        self._sock.setsockopt(zmq.SNDHWM, 0)  # both ends are ours; runs bound the flow
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 2000)
        if config.remote:
            # ZMTP heartbeats find a dead TCP connection (a partition) and reconnect;
            # the pool's own beats decide what happens to runs
            self._sock.setsockopt(zmq.HEARTBEAT_IVL, int(BEAT_S * 1000))
            self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LOST_AFTER_BEATS * BEAT_S * 1000))
            self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if config.curve is not None:
            server, public, secret = config.curve
            self._sock.curve_serverkey = server.encode()
            self._sock.curve_publickey = public.encode()
            self._sock.curve_secretkey = secret.encode()
        self._front_heard = time.monotonic()
        self._front_lost = False
        self._worker_id = uuid.uuid4()
        self._runs: dict[int, CancelToken] = {}
        self._calls = _Calls(self.send)
        self._retiring = False
        self._stopping = False
        self._baseline = 0  # RSS when it started serving
        self._memory_checked = 0.0  # (monotonic) reading /proc costs as much as a small run
        self._outbox = Outbox(self._send_frames, ch.FLUSH_AT)
        self._idle = anyio.Event()
        # The runs' tasks: plain asyncio tasks, kept here (the loop holds tasks weakly).
        # An anyio task group's start_soon cost a tenth of a small run.
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = log.bind()  # resolved once (logs.configure has run): bound per run
        # the front's environment decides, not the launcher's (started once per process)
        cas = Cas.from_config(
            config.cas_root, read_only=config.cas_read_only is not None, read_only_why=config.cas_read_only
        )
        settings = config.settings
        backends = RemoteBackends(self._calls, dict(settings.backends), current_run.get)
        garden = GardenNamespace(RemoteGarden(self._calls, settings.garden, current_run.get))  # type: ignore[arg-type]
        self.toolbox = Toolbox(
            cas=cas,
            temp_root=Path(config.temp_root),
            models=model_namespaces(backends, cas, settings.models),  # type: ignore[arg-type]
            garden=garden,
            metrics=RemoteMetrics(self.send),
            fs_roots=settings.fs_roots(),
            sessions=RemoteSessions(self._calls, current_run.get),
            hooks=RemoteHooks(self._calls, self.send, current_run.get),
            flows=RemoteFlows(self._calls, current_run.get),
        )

    def send(self, message: ch.Message) -> None:
        """Queue a message to the front (never blocks: the socket has no HWM); from any
        thread (a sync namespace function runs in a Lua thread)."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._send_now, message)
        else:
            self._send_now(message)

    def _send_now(self, message: ch.Message) -> None:
        # Everything sent in one turn of the loop goes as one multipart message.
        self._outbox.put(ch.encoder.encode(message))

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            self._io.send_now(frames)
        except zmq.ZMQError as e:  # the front is gone
            log.debug("worker.send_failed", error=str(e))

    async def serve(self) -> None:
        """Serve runs until stopped, then wait for the ones running and return."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._lifeline is not None:
            self._loop.add_reader(self._lifeline, _front_gone)
        if self.config.remote:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop_by_signal)
        self._sock.connect(self.config.endpoint)
        self._io = LoopSocket(zmq.Socket.shadow(self._sock.underlying), self._loop)
        self._baseline = rss_bytes()
        set_idle_states(burst_states(self.config.memory_share))
        self._register()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat)
            while not (self._stopping or self._retiring):
                try:
                    with anyio.fail_after(BEAT_S):
                        batch = await self._io.receive(RECEIVE_BATCH)
                except TimeoutError:
                    continue
                for frames in batch:
                    self._receive(frames)
                # let the runs just received start (a receive that finds messages does not yield)
                await asyncio.sleep(0)
            await self._drain()
            for task in self._tasks:  # (none, unless a run outlived its answer)
                task.cancel()
            tg.cancel_scope.cancel()
        self._outbox.flush()  # the last answers
        self._io.close()
        self._sock.close()
        self._ctx.term()

    def _stop_by_signal(self) -> None:
        # a remote worker asked to stop: no new runs (the front is told), finish these
        if not self._stopping:
            log.info("worker.stopping", runs=len(self._runs))
            self._stopping = True
            self.send(ch.Retiring(rss_bytes=rss_bytes()))
            self._outbox.flush()

    def _register(self) -> None:
        config = self.config
        registration = Register(
            worker_id=self._worker_id,
            worker_type=WorkerType.LUANETTE,
            worker_name=config.name,
            capabilities=list(config.capabilities),
            hostname=socket.gethostname(),
            version=_version(),
        )
        self.send(ch.Register(
            registration=encode_payload(registration, Encoding.COMPACT),
            pid=os.getpid(),
            capacity=max(1, config.capacity - len(self._runs)),
            group=config.group,
            remote=config.remote,
        ))

    def _drop_runs(self, reason: str) -> None:
        # The front gave these runs up (or is gone): stop them; their answers are dropped.
        for token in list(self._runs.values()):
            token.cancel(reason)

    async def _drain(self) -> None:
        # Runs still going get their answers; service calls still need the socket.
        while self._runs:
            self._idle = anyio.Event()
            with anyio.move_on_after(BEAT_S):
                while self._runs:
                    try:
                        batch = await self._io.receive(RECEIVE_BATCH)
                    except zmq.ZMQError:
                        return
                    for frames in batch:
                        self._receive(frames)

    def _receive(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._receive_one(frame)

    def _receive_one(self, frame: bytes) -> None:
        try:
            message = ch.to_worker.decode(frame)
        except (msgspec.DecodeError, RecursionError):  # values are checked at their source: see channel
            log.warning("worker.bad_message", size=len(frame))
            return
        self._front_heard = time.monotonic()
        if self._front_lost:
            self._front_lost = False
            log.info("worker.front_back")
        if isinstance(message, ch.Pulse):
            return
        if isinstance(message, ch.Run):
            token = CancelToken()
            self._runs[message.run] = token
            task = self._loop.create_task(self._run(message, token))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(message, ch.Cancel):
            running = self._runs.get(message.run)
            if running is not None:
                running.cancel(message.reason)
        elif isinstance(message, ch.Answer):
            self._calls.answer(message)
        elif isinstance(message, ch.Stop):
            self._stopping = True
        elif isinstance(message, ch.Unknown):
            # the front restarted, or gave us up: what runs here is nobody's any more
            log.info("worker.registering_again", runs=len(self._runs))
            self._drop_runs("the front no longer waits for this run")
            self._register()
        elif isinstance(message, ch.Invalidate):
            log.debug("worker.chunks_forgotten", count=forget_chunks(), scripts=len(message.hashes))

    async def _run(self, message: ch.Run, token: CancelToken) -> None:
        number = message.run
        info = message.info
        current_run.set(number)

        def note(kind: str, data: list[Any]) -> None:
            self.send(ch.Note(run=number, kind=kind, data=data))

        runset = None
        try:
            runset = namespaces_for(
                info.kind,
                self.toolbox,
                job_id=info.job_id,
                script_hash=info.script_hash,
                progress=lambda percent, text: note("progress", [percent, text]),
                capabilities=info.capabilities,
                info=info,
            )
            outcome = await run_script(
                message.code,
                message.params,
                limits=message.limits,
                cancel=token,
                namespaces=runset.namespaces,
                chunk_name=message.chunk_name,
                log=self._log.bind(run=number),
                span=_RemoteSpan(info.traceparent, note, info.sampled),
                log_sink=lambda level, text, fields: note("log", [level, text, fields]),
                on_shutdown_start=lambda timeout_s: note("shutdown", [timeout_s]),
                modules=lambda name, base: self._calls.call(number, "module", [name, base]),
            )
            result = outcome.result
            session = runset.session
            if session is not None:
                if session.pending_operations():
                    # the front's overdue timer must wait for the final commit
                    note("shutdown", [session.commit_budget_s(self.config.settings.garden.timeout_s)])
                result, kept = await session.finish(result)
                if kept is not None:
                    note("log", ["info", f"session {kept} kept for review (review = true)", {"session_id": kept}])
            done = ch.Done(run=number, result=result, duration_ms=outcome.duration_ms)
        except ScriptError as e:
            if runset is not None and runset.session is not None:
                runset.session.discard()
            done = ch.Done(run=number, error=e.detail)
        except Exception:  # a bug here must cost one run, not the worker and its others
            log.exception("worker.run_failed", run=number)
            done = ch.Done(
                run=number, error=ErrorDetail("internal", "internal error in the worker; see the daemon log")
            )
        finally:
            self._runs.pop(number, None)
            if runset is not None and runset.temp is not None and runset.temp.created:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(runset.close)
            elif runset is not None:
                runset.close()
        try:
            self.send(done)
        except (TypeError, ValueError, OverflowError) as exc:  # a result the channel cannot carry
            self.send(ch.Done(run=number, error=_unsendable(exc)))
        if not self._runs:
            # Nothing else is running to share a send with: the answer goes now, not
            # after the rest of this loop turn (most of a lone eval's latency).
            self._outbox.flush()
            self._idle.set()
            if time.monotonic() - self._memory_checked >= MEMORY_CHECK_S:
                self._check_memory()

    def _check_memory(self) -> None:
        self._memory_checked = time.monotonic()
        # The share is for Lua: what the worker has grown since it started (the
        # interpreter and its libraries, ~45 MiB, are not counted).
        share = self.config.memory_share
        if not share or self._retiring or rss_bytes() - self._baseline <= share:
            return
        release_idle_states()
        rss = rss_bytes()
        if rss - self._baseline > share:
            log.info("worker.retiring", rss=rss, baseline=self._baseline, share=share)
            self._retiring = True
            self.send(ch.Retiring(rss_bytes=rss))

    async def _beat(self) -> None:
        while True:
            await anyio.sleep(BEAT_S)
            if (
                self.config.remote
                and not self._front_lost
                and time.monotonic() - self._front_heard > LOST_AFTER_BEATS * BEAT_S
            ):
                # Paranoid Pirate: the front missed 3 beats.  Its runs are given up on
                # both sides; beats go on, and the front's Unknown makes us register.
                self._front_lost = True
                log.warning("worker.front_lost", runs=len(self._runs))
                self._drop_runs("the front stopped answering")
            if not self._runs:  # the end of a burst the idle checks skipped
                self._check_memory()
            trim_idle_states()  # (a few a beat, long after a burst: freeing holds the GIL)
            self.send(ch.Beat(rss_bytes=rss_bytes(), runs=len(self._runs), inline_steps=stats.inline_steps))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("luanette")
    except Exception:  # not installed as a distribution (a source checkout)
        return "0"


def _unsendable(exc: Exception) -> ErrorDetail:
    return ErrorDetail("result_not_serializable", f"the result cannot be sent: {exc}")


def _front_gone() -> None:
    # The lifeline pipe reads end-of-file: the front's process has ended.  Nobody will
    # read our answers, and a Lua thread may be stuck: leave at once.  (Whatever the
    # log does: stderr may be a pipe whose reader went with the front, and a callback
    # that raises would be called again and again while the fd stays readable.)
    try:
        log.warning("worker.front_gone")
    finally:
        os._exit(0)


def main(config: WorkerConfig, lifeline: int | None = None, remote: bool = False) -> None:
    """Entry point of a worker process (forked by ``luanette.engine.zygote``, or
    ``luanette worker`` with ``remote``: then SIGTERM and Ctrl-C stop it gracefully)."""
    if not remote:
        # the front decides when workers stop (Ctrl-C and SIGTERM reach the process group)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(json=config.log_json)
    worker = Worker(config, lifeline)
    gcpolicy.settle()
    try:
        anyio.run(worker.serve)
    except KeyboardInterrupt:
        pass
    sys.stderr.flush()
    if stats.abandoned_running:
        os._exit(0)  # a thread stuck in one C call would hold interpreter exit forever
    with contextlib.suppress(Exception):
        sys.stdout.flush()
