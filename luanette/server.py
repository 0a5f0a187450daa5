"""The ROUTER socket loop: read messages, run each request as its own task, reply.

The loop never awaits a request before reading the next one (the Rust version did, so a
30 s script froze every caller). Sends never block the loop: each reply is tried without
waiting and retried with backoff for up to ``send_timeout``; a reply that cannot be
delivered is logged and counted, never silently lost (``ROUTER_MANDATORY`` is set, so
libzmq reports an unroutable peer instead of dropping the message).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import platformdirs
import structlog
import zmq
import zmq.asyncio

from hooteproto import frames
from hooteproto import types as t
from hooteproto.codec import (
    DecodeError,
    Encoding,
    detect,
    envelope_codec,
    payload_codec,
    peek_envelope_id,
)
from hooteproto.frames import Command, Hoot01
from luanette.auth import ANYONE, POOL_DOMAIN, AuthError, Caller, Gate, secure_server_socket
from luanette.backends import Backends
from luanette.broadcast import Publisher
from luanette.cas import Cas
from luanette.config import Config
from luanette.dispatch import Dispatcher, RequestContext, error
from luanette.engine.api import Limits
from luanette.engine.pool import Engine, EngineConfig
from luanette.flows import FlowManager
from luanette.garden import GardenClient
from luanette.jobs import Jobs
from luanette.modules import Modules
from luanette.pipelines import PipelineSources
from luanette.plugins import Plugins
from luanette.poolview import pool_stats
from luanette.scripts import MAX_SCRIPT_BYTES, ScriptProblem, Scripts
from luanette.sessions import Sessions
from luanette.settings import Settings, load_settings
from luanette.store import Store
from luanette.telemetry import SpanKind, StatusCode, Telemetry, observe_pool, parent_context
from luanette.triggers import TriggerError, Triggers
from luanette.zmqloop import LoopSocket

log = structlog.get_logger("luanette.server")

NIL_ID = uuid.UUID(int=0)


def default_state_dir() -> Path:
    """Where the job database lives when ``--state-dir`` is not given."""
    return Path(platformdirs.user_state_dir("luanette"))


def default_lua_memory_total() -> int:
    """Half of the machine's RAM (4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError):
        return 4 * 2**30


# Requests read from the socket before the loop lets other tasks run: how the front
# shares its turns between new messages and the work it already admitted (the workers'
# answers, replies).  Under a flood most new messages are refusals; at 64 the evals
# already admitted got ~70% of the peak rate through, at 16 over 90% (Ping unchanged).
RECV_BATCH = 16
PRUNE_EVERY_S = 3600.0


class ServerStats(msgspec.Struct):
    """Counters an operator reads to see what the loop has done."""

    received: int = 0
    replies_sent: int = 0
    replies_unroutable: int = 0
    """The peer was gone when its reply was ready."""
    replies_dropped: int = 0
    """The peer did not read for ``send_timeout``."""
    malformed: int = 0
    refused: int = 0
    """LuaEvals answered ``busy`` at once, under overload."""
    forbidden: int = 0
    """Requests refused for their key (revoked, or not an admin's)."""
    internal_errors: int = 0
    in_flight: int = 0


class _Reply(msgspec.Struct):
    """Where and how to answer one request."""

    route: list[bytes]
    request_id: uuid.UUID
    encoding: Encoding
    hoot01: bool


class Server:
    """Luanette's ROUTER front end. Call :meth:`serve` inside an anyio event loop."""

    def __init__(
        self,
        config: Config,
        *,
        settings: Settings | None = None,
        context: zmq.asyncio.Context | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self._owns_telemetry = telemetry is None
        self.telemetry = telemetry or Telemetry(otlp_endpoint=config.otlp_endpoint)
        self.stats = ServerStats()
        self.endpoint: str | None = None
        self._context = context or zmq.asyncio.Context.instance()
        # read the keys first: a key directory that cannot be used stops the start
        self.gate = Gate(self._context, config.curve) if config.curve else None
        self.cas = Cas.from_config(config.cas_root)
        state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
        # --state (a PostgreSQL URL) moves the database; state_dir keeps the files
        self.store = Store.open(state_dir, url=config.state)
        self.publisher = Publisher(context=self._context)
        settings = settings or load_settings(None)
        self.backends = Backends(settings.backends, telemetry=self.telemetry)
        self.garden = GardenClient(settings.garden, context=self._context, telemetry=self.telemetry)
        # garden edits of runs in session mode: commits, and sessions pending review
        self.sessions = Sessions(self.garden, self.store, self.publisher.publish)
        workers = config.workers if config.workers is not None else os.cpu_count() or 1
        if config.workers_min is not None:
            workers = config.workers_min
        scaled = max(workers, config.workers_max or 0, 1)
        share = (config.lua_memory_total or default_lua_memory_total()) // scaled
        # one run may not take more than its worker's share of the budget
        limits = Limits(
            timeout_s=config.script_timeout,
            cancel_grace_s=config.cancel_grace,
            memory_bytes=min(config.script_memory, share),
            cas_write_bytes=config.run_cas_bytes,
            result_bytes=config.run_result_bytes,
            log_lines=config.run_log_lines,
            log_bytes=config.run_log_bytes,
        )
        self.engine = Engine(
            EngineConfig(
                workers=workers,
                memory_share=share,
                temp_root=str(state_dir / "temp"),
                cas_root=str(self.cas.root),
                settings=settings,
                log_json=config.log_json,
                pool_endpoint=config.pool,
                no_worker_timeout_s=config.no_worker_timeout,
                workers_min=config.workers_min or 0,
                workers_max=config.workers_max or 0,
            ),
            backends=self.backends,
            garden=self.garden,
            telemetry=self.telemetry,
            context=self._context,
            sessions=self.sessions,
        )
        # the worker pool's gauges (luanette.workers.*, luanette.pool.*), read at each collection
        observe_pool(self.telemetry, lambda: pool_stats(self.engine))
        # generation pipelines: streamed chunks go out on PUB; sources read the index, jobs
        self.engine.publish = self.publisher.publish
        self.engine.pipeline_sources = PipelineSources(self.store)
        scripts = Scripts(self.cas, self.store, limits, self.engine)
        self.engine.modules = Modules(config.modules, scripts, max_bytes=MAX_SCRIPT_BYTES)
        self.jobs = Jobs(
            store=self.store,
            scripts=scripts,
            publisher=self.publisher,
            limits=limits,
            engine=self.engine,
            max_jobs=config.max_jobs,
            queue_size=config.job_queue,
            temp_root=state_dir / "temp",
            telemetry=self.telemetry,
            pub_results=config.pub_results,
            policy=settings.policy,
        )
        # the local supervisor scales on it (--workers-min/--workers-max)
        self.engine.queue_depth = lambda: self.jobs.queue_stats()["queue_depth"]
        self.triggers = Triggers(
            settings.triggers,
            submit=lambda script_hash, params, **about: self.jobs.submit(script_hash, params, ["trigger"], **about),
            find_script=lambda name: getattr(self.store.find_script_by_name(name), "hash", None),
            is_live=self.jobs.is_live,
            base_dir=Path(settings.config_dir) if settings.config_dir else None,
            cancel=self.jobs.cancel,
        )
        self._scripts = scripts
        self.dispatcher = Dispatcher(
            config,
            limits=limits,
            jobs=self.jobs,
            scripts=scripts,
            publisher=self.publisher,
            on_shutdown=self.request_shutdown,
            telemetry=self.telemetry,
            triggers=self.triggers,
            engine=self.engine,
            policy=settings.policy,
            sessions=self.sessions,
        )
        self.plugins = Plugins(
            self.engine,
            limits,
            directory=config.plugins,
            policy=settings.policy,
            publish=self.publisher.publish,
            handler_timeout_s=config.hook_timeout,
        )
        # every part that fires or answers hooks reaches the same plugins
        self.engine.plugins = self.jobs.plugins = self.dispatcher.plugins = self.plugins
        self.plugins.remember_file = state_dir / "plugins.json"
        self.dispatcher.resources.plugins = self.plugins.views
        # flows: their guards and handlers run like plugin hooks; instances live in the store
        self.flows = FlowManager(
            self.engine,
            limits,
            self.store,
            policy=settings.policy,
            publish=self.publisher.publish,
            notify=self.plugins.notify,
            handler_timeout_s=config.hook_timeout,
        )
        self.engine.flows = self.dispatcher.flows = self.flows
        self._socket: zmq.asyncio.Socket | None = None
        self._in_flight: set[RequestContext] = set()
        self._io: LoopSocket | None = None  # the socket's traffic, once serving
        self._tg: anyio.abc.TaskGroup | None = None
        self._requests: set[asyncio.Task[None]] = set()  # the requests being handled
        self._reply_templates: dict[tuple[int, Encoding], tuple[t.Payload, list[Any]]] = {}
        self._idle = anyio.Event()
        self._idle.set()
        self._draining: anyio.Event | None = None
        self.shutdown_reason: str | None = None
        self.lost_front: str | None = None
        """The front this one took the PostgreSQL store's lease over from (luanette.lease):
        the jobs it left end ``worker_lost`` instead of ``interrupted``."""

    # --- lifecycle -------------------------------------------------------------------

    def bind(self) -> str:
        """Create and bind the ROUTER socket; returns the bound endpoint. Raises
        ``zmq.ZMQError`` when the address is in use or malformed."""
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, int(self.config.send_timeout * 1000))
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        keys = None
        if self.gate is not None:
            self.gate.start()  # before the first peer can connect
            keys = self.gate.keys
            secure_server_socket(sock, keys)
            gate = self.gate
            self.engine.secure_pool = lambda pool: secure_server_socket(pool, gate.keys, POOL_DOMAIN)
        try:
            sock.bind(self.config.bind)
            if self.config.pub:
                self.publisher.bind(self.config.pub, keys)
            self.engine.bind()  # a pool endpoint in use stops the start, as the others do
        except zmq.ZMQError:
            sock.close(0)
            self.publisher.close()
            if self.gate is not None:
                self.gate.stop()
            raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info(
            "server.listening",
            endpoint=self.endpoint,
            pub=self.publisher.endpoint,
            pool=self.engine.pool_endpoint,
            cas=str(self.cas.root),
            state=self.store.location,
            worker_id=str(self.dispatcher.worker_id),
            curve=None if self.gate is None else f"{len(keys.ring.clients) if keys else 0} keys",
        )
        return self.endpoint

    def reload_keys(self) -> None:
        """Re-read the client and admin keys (SIGHUP); a key no longer there is refused
        from its next request on.  Keeps the old keys when the new ones cannot be read."""
        if self.gate is None:
            log.info("auth.reload_skipped", reason="the daemon runs without --curve")
            return
        try:
            ring = self.gate.reload()
        except AuthError as e:
            log.error("auth.reload_failed", error=str(e))
            return
        log.info("auth.reloaded", clients=len(ring.clients), admins=len(ring.admins))

    async def serve(self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless :meth:`bind` was called), answer requests until shut down, drain,
        and return."""
        self._draining = anyio.Event()
        endpoint = self.bind() if self._socket is None else self.endpoint
        sock = self._socket
        assert sock is not None and endpoint is not None
        # Served in batches through a plain socket on the same handle (luanette.zmqloop):
        # the asyncio socket's future per call cost more than many a request.
        self._io = LoopSocket(zmq.Socket.shadow(sock.underlying))
        self._io.on_failed = self._send_failed
        self.jobs.recover(self.lost_front)
        trigger_error: TriggerError | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.engine.serve)
                try:
                    await self.load_trigger_scripts()
                except TriggerError as e:  # raised after the group, not wrapped by it
                    trigger_error = e
                if trigger_error is None:
                    # a plugin that fails to load is listed with its error: never a reason not to start
                    await self.plugins.load_directory()
                    await self.dispatcher.load_remembered_plugins()
                    tg.start_soon(self.plugins.serve)
                    tg.start_soon(self._receive_loop)
                    tg.start_soon(self.jobs.run)
                    tg.start_soon(self._prune_periodically)
                    task_status.started(endpoint)
                    await self._draining.wait()
                    await self._drain()
                    with anyio.move_on_after(self.config.drain_timeout, shield=True):
                        await self.plugins.close()  # their cleanup(ctx), while the workers still run
                tg.cancel_scope.cancel()
                await self._stop_requests()
            if trigger_error is not None:
                raise trigger_error
            await self.backends.aclose()
            await self.garden.aclose()
            if self._owns_telemetry and self.telemetry.exporting:
                with anyio.move_on_after(self.config.drain_timeout, shield=True):
                    # flushing posts to the collector: a blocking call, so off the loop
                    await anyio.to_thread.run_sync(self.telemetry.shutdown, abandon_on_cancel=True)
        finally:
            for task in self._requests:  # (serve itself was cancelled)
                task.cancel()
            self._tg = None  # (a reply the socket refuses now is dropped and counted)
            self._io.flush()  # the last replies
            self._io.close()
            sock.close()
            self.publisher.publish(t.ShutdownNotice(reason=self.shutdown_reason or "stopped", phase="stopped"))
            self.publisher.close()
            if self.gate is not None:
                self.gate.stop()
            self.store.close()
            log.info("server.stopped", reason=self.shutdown_reason, **msgspec.to_builtins(self.stats))

    async def load_trigger_scripts(self) -> None:
        """Store the scripts trigger rules name by file (:meth:`serve` does it too),
        then check the rules for cycles. Raises :class:`TriggerError` for a file that is
        missing or does not compile, or rules that could fire each other in a circle."""
        await self.triggers.load_files(self._store_trigger_script)
        self.triggers.check_cycles(self.store.get_script)

    async def _store_trigger_script(self, text: str) -> str:
        try:
            record, _ = await self._scripts.save(text, ["trigger"], "luanette")
        except ScriptProblem as e:
            raise TriggerError("lua_error", f"a trigger's script_file does not compile: {e.detail.message}") from None
        return record.hash

    async def _prune_periodically(self) -> None:
        while True:
            pruned = self.jobs.prune(self.config.job_retention_s, self.config.job_retention_count)
            if pruned:
                log.info("jobs.pruned", count=pruned)
            await anyio.sleep(PRUNE_EVERY_S)

    def request_shutdown(self, reason: str) -> None:
        """Stop taking new work and drain; safe to call more than once."""
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            log.info("server.draining", reason=reason, in_flight=len(self._in_flight))
        if self._draining is not None:
            self._draining.set()

    async def _drain(self) -> None:
        # subscribers hear of it as it starts, while their jobs can still finish: what
        # is still running at the deadline is cancelled (a final notice says "stopped")
        deadline = round(time.time() + self.config.drain_timeout, 3)
        reason = self.shutdown_reason or "stopped"
        self.publisher.publish(t.ShutdownNotice(reason=reason, phase="draining", deadline=deadline))
        with anyio.move_on_after(self.config.drain_timeout):
            await self._idle.wait()
            while self.jobs.active:
                await anyio.sleep(0.02)
        if self._in_flight or self.jobs.active:
            log.warning("server.cancelling", requests=len(self._in_flight), jobs=self.jobs.active)
            for ctx in list(self._in_flight):
                ctx.cancel.cancel("the daemon is shutting down")
            self.jobs.cancel_all("the daemon is shutting down")
            # Cancelled scripts have their grace to end by themselves (their waits fail)
            # and stop hard after it; give their replies time to go.
            if not await self._quiet_within(self.config.cancel_grace + 2.0):
                # A second cancel stops what is left at once, on_shutdown included.
                for ctx in list(self._in_flight):
                    ctx.cancel.cancel("the daemon is shutting down")
                self.jobs.cancel_all("the daemon is shutting down")
                await self._quiet_within(2.0)

    async def _stop_requests(self) -> None:
        # What the drain left running (the task group does not own these tasks).
        for task in self._requests:
            task.cancel()
        if self._requests:
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*self._requests, return_exceptions=True)

    async def _quiet_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` until no request or job is in flight; whether none is."""
        with anyio.move_on_after(seconds):
            await self._idle.wait()
            while self.jobs.active:
                await anyio.sleep(0.02)
        return not (self._in_flight or self.jobs.active)

    @property
    def draining(self) -> bool:
        return self.shutdown_reason is not None

    # --- receiving -------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._io is not None
        io = self._io
        # Under CURVE each message is read as frames, whose properties name its sender.
        copy = self.gate is None
        while True:
            batch = await io.receive(RECV_BATCH, copy=copy)
            for raw in batch:
                self._on_message(raw)
            if len(batch) == RECV_BATCH:
                # More may be waiting.  A receive that finds messages does not give the
                # loop back, so under a flood this loop would starve every other task
                # (running requests, the workers' answers, replies): yield.
                await asyncio.sleep(0)

    def _on_message(self, raw: list[Any]) -> None:
        self.stats.received += 1
        caller: Caller | None = ANYONE
        if self.gate is not None:  # zmq.Frame objects: the ZAP User-Id is the sender's key
            caller = self.gate.caller(raw[0].get("User-Id"))
            raw = [frame.bytes for frame in raw]
        route, message = frames.split_route(raw)
        try:
            if message and message[0] == frames.PROTOCOL:
                self._on_hoot01(route, message, caller)
            else:
                self._on_envelope(route, message[0] if message else b"", caller)
        except Exception:
            # A bug in handling one message must not stop the loop for everyone.
            self.stats.internal_errors += 1
            log.exception("loop.message_failed", frames=len(raw))

    def _on_hoot01(
        self, route: list[bytes], message: list[bytes], caller: Caller | None
    ) -> None:
        try:
            msg = frames.parse(message)
        except DecodeError as e:
            rid = frames.request_id_of(message) or NIL_ID
            self._malformed(_Reply(route, rid, Encoding.COMPACT, True), e, "bad_frame")
            return
        reply = _Reply(route, msg.request_id, Encoding.COMPACT, True)
        if msg.command is Command.HEARTBEAT:
            beat = Hoot01(command=Command.HEARTBEAT, request_id=msg.request_id, service=self.config.worker_name)
            self._queue(route + beat.to_frames())
        elif msg.command is Command.REQUEST:
            try:
                reply.encoding = msg.body_encoding()
                payload = payload_codec.decode(msg.body, reply.encoding)
            except DecodeError as e:
                self._malformed(reply, e, "bad_request")
                return
            self._start(reply, payload, msg.traceparent, caller)
        else:
            # Ready/Disconnect announce a peer; a Reply is not ours to answer (answering
            # it with an Error could start an endless exchange between two daemons).
            log.info("hoot01.peer_command", command=msg.command.name.lower(), service=msg.service)

    def _on_envelope(self, route: list[bytes], body: bytes, caller: Caller | None) -> None:
        try:
            envelope = envelope_codec.decode(body)
        except DecodeError as e:
            rid, encoding = peek_envelope_id(body)
            self._malformed(_Reply(route, rid or NIL_ID, encoding or Encoding.COMPACT, False), e, "bad_request")
            return
        reply = _Reply(route, envelope.id, detect(body), False)
        self._start(reply, envelope.payload, envelope.traceparent, caller)

    def _malformed(self, reply: _Reply, e: DecodeError, code: str) -> None:
        self.stats.malformed += 1
        log.warning("request.malformed", code=code, reason=str(e), path=e.path, request_id=str(reply.request_id))
        details = {"reason": str(e)} | ({"path": e.path} if e.path else {})
        self._answer(reply, error(code, f"malformed message: {e}", details))

    # --- handling --------------------------------------------------------------------

    def _start(
        self, reply: _Reply, payload: t.Payload, traceparent: str | None, caller: Caller | None
    ) -> None:
        refusal = _forbidden(payload, caller)
        if refusal is not None:
            self.stats.forbidden += 1
            self._answer(reply, refusal)
            return
        assert caller is not None  # (a revoked key was refused above)
        if self.draining and not isinstance(payload, t.Ping):
            self._answer(reply, error("shutting_down", "the daemon is shutting down; no new work is taken"))
            return
        counted = False
        if isinstance(payload, t.LuaEval):
            refusal = self.dispatcher.let_in()
            if refusal is not None:  # overload: refused here, without a task or a span
                self.stats.refused += 1
                self._reply_now(reply, refusal)
                return
            counted = True
        ctx = RequestContext(reply.request_id, t.tag_of(type(payload)), traceparent)
        ctx.counted = counted
        ctx.caller = caller
        self._in_flight.add(ctx)
        self._idle = anyio.Event() if len(self._in_flight) == 1 else self._idle
        self.stats.in_flight = len(self._in_flight)
        # A plain asyncio task (kept in _requests): an anyio task group's start_soon
        # cost a tenth of the front's time per request.  _handle never raises.
        task = asyncio.get_running_loop().create_task(self._handle(reply, payload, ctx))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _handle(self, reply: _Reply, payload: t.Payload, ctx: RequestContext) -> None:
        try:
            with self.telemetry.span(
                "luanette.dispatch", parent=parent_context(ctx.traceparent), kind=SpanKind.SERVER
            ) as span:
                ctx.span = span
                answer = await self.dispatcher.dispatch(payload, ctx)
                if span.is_recording():
                    _annotate(span, ctx, answer)
        finally:
            self._in_flight.discard(ctx)
            self.stats.in_flight = len(self._in_flight)
            if not self._in_flight:
                self._idle.set()
        try:
            self._answer(reply, answer)
        except Exception:  # (an answer the codec cannot encode: a bug, never a hang)
            log.exception("reply.failed", request_id=str(reply.request_id))
            self._answer(reply, error("internal", "internal error while replying; see the daemon log"))
        if not self._in_flight and self._io is not None:
            # No other request to share a send with: the reply goes now, not at the end
            # of the loop's next turn (~0.1 ms of a lone eval's latency, measured).
            self._io.flush()

    # --- replying --------------------------------------------------------------------

    def _reply_now(self, reply: _Reply, payload: t.Payload) -> None:
        """Reply from the loop without a task, with the rest of this turn's replies.  A
        refusal is the same reply every time but for its request id: its frames are made
        once (under a flood refusing is most of what the loop does)."""
        if reply.hoot01:
            key = (id(payload), reply.encoding)
            template = self._reply_templates.get(key)
            if template is None:
                if len(self._reply_templates) >= 16:
                    self._reply_templates.clear()
                template = self._reply_templates[key] = (payload, self._encode(reply, payload))
            frames = template[1].copy()
            frames[3] = reply.request_id.bytes
            self._queue(reply.route + frames)
            return
        self._answer(reply, payload)

    def _queue(self, message: list[Any]) -> None:
        """Send ``message`` with the rest of this turn's replies (see _send_failed)."""
        assert self._io is not None
        self.stats.replies_sent += 1
        self._io.send_soon(message)

    def _send_failed(self, message: list[Any], error: zmq.ZMQError) -> None:
        # A queued reply the socket refused: a peer that is not reading gets it through
        # the patient path of _send; one that is gone is counted.
        self.stats.replies_sent -= 1
        if isinstance(error, zmq.Again) and self._tg is not None:
            self._tg.start_soon(self._send, message)
        elif error.errno == errno.EHOSTUNREACH:
            self.stats.replies_unroutable += 1
            log.warning("reply.unroutable", reason="peer went away", peer=message[0].hex())
        else:
            self.stats.replies_dropped += 1
            log.warning("reply.dropped", reason=str(error), peer=message[0].hex())

    def _encode(self, reply: _Reply, payload: t.Payload) -> list[Any]:
        if reply.hoot01:
            return Hoot01(
                command=Command.REPLY,
                content_type=frames.content_type_for(reply.encoding),
                request_id=reply.request_id,
                body=payload_codec.encode(payload, reply.encoding),
            ).to_frames()
        envelope = t.Envelope(id=reply.request_id, payload=payload)
        return [envelope_codec.encode(envelope, reply.encoding)]

    def _answer(self, reply: _Reply, payload: t.Payload) -> None:
        """Send ``payload`` as the reply, with the rest of this turn's replies."""
        self._queue(reply.route + self._encode(reply, payload))

    async def _send(self, message: list[Any]) -> bool:
        """The patient path: retry a reply whose peer is not reading, for up to
        ``send_timeout``."""
        assert self._io is not None
        deadline = time.monotonic() + self.config.send_timeout
        delay = 0.001
        while True:
            try:
                self._io.send_now(message)
                self.stats.replies_sent += 1
                return True
            except zmq.Again:
                if time.monotonic() >= deadline:
                    self.stats.replies_dropped += 1
                    log.warning("reply.dropped", reason="peer is not reading", peer=message[0].hex())
                    return False
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
            except zmq.ZMQError as e:
                if e.errno != errno.EHOSTUNREACH:
                    raise
                self.stats.replies_unroutable += 1
                log.warning("reply.unroutable", reason="peer went away", peer=message[0].hex())
                return False


ADMIN_REQUESTS = (t.Shutdown, t.Register, t.PluginLoad, t.PluginUnload, t.PluginReload)
"""Requests only an admin key may make under CURVE (any local caller may without it)."""


def _forbidden(payload: t.Payload, caller: Caller | None) -> t.Error | None:
    """The ``forbidden`` reply for a caller whose key was revoked, or who is not an admin
    and asks for an admin request; None when it may go on."""
    if caller is None:
        return error(
            "forbidden",
            "this client's key is no longer allowed (it was removed from the daemon's key directory)",
            {"reason": "key_revoked"},
        )
    if isinstance(payload, ADMIN_REQUESTS) and not caller.admin:
        return error(
            "forbidden",
            f"{t.tag_of(type(payload))} needs an admin key; this client's key is not in the daemon's admins/",
            {"reason": "not_admin"},
        )
    return None


def _annotate(span: Any, ctx: RequestContext, answer: t.Payload) -> None:
    """Attributes of a recorded dispatch span (skipped when it is not recorded: they
    cost more than the span itself)."""
    span.set_attributes(
        {"rpc.system": "hooteproto", "rpc.method": ctx.kind, "luanette.request_id": str(ctx.request_id)}
    )
    if isinstance(answer, t.Error):
        span.set_attribute("luanette.error.code", answer.code)
        span.set_status(StatusCode.ERROR, answer.message[:200])
