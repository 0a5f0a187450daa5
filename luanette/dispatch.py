"""Route each request Payload to its handler and turn the outcome into a reply Payload.

Handlers never raise to the server: every failure becomes an ``Error`` payload with a
stable code (see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from hooteproto import types as t
from luanette import apiref, cas, poolview
from luanette import params as params_mod
from luanette.auth import ANYONE, Caller
from luanette.broadcast import Publisher
from luanette.capabilities import CapabilityError, Policy
from luanette.completions import Completions
from luanette.config import Config
from luanette.engine.api import CancelToken, ErrorDetail, Limits, ScriptError
from luanette.engine.channel import RunInfo
from luanette.engine.pool import Engine, RunHooks
from luanette.errors import RequestError
from luanette.faults import StorageFault
from luanette.flows import FlowError, FlowManager
from luanette.jobs import Jobs
from luanette.plugins import Plugin, PluginError, Plugins, is_hash
from luanette.prompts import Prompts
from luanette.resources import Resources
from luanette.scripts import ManifestError, ScriptProblem, Scripts
from luanette.sessions import SessionError, Sessions
from luanette.settings import Settings
from luanette.store import ScriptRecord
from luanette.telemetry import Span, Telemetry, script_attributes, span_ids, traceparent_of
from luanette.tooldocs import describe_schema
from luanette.triggers import Triggers

log = structlog.get_logger("luanette.dispatch")

MAX_REGISTRATIONS = 256
"""Registrations kept (the latest per worker id); past it the oldest is forgotten."""
MAX_REGISTRATION_BYTES = 16 * 2**10
"""The largest registration accepted (its MessagePack size)."""


class RequestContext:
    """What a handler knows about the request besides its payload. Hashed by identity,
    so the server can keep a set of the ones in flight."""

    __slots__ = ("_log", "caller", "cancel", "counted", "kind", "received", "request_id", "span", "traceparent")

    def __init__(
        self, request_id: uuid.UUID, kind: str, traceparent: str | None = None, received: float | None = None
    ) -> None:
        self.request_id = request_id
        self.kind = kind
        self.traceparent = traceparent
        # when the socket loop read the request (time.monotonic()): admission is by time
        self.received = time.monotonic() if received is None else received
        self.cancel = CancelToken()
        self.span: Span | None = None  # the request's luanette.dispatch span, once it runs
        self.counted = False  # an eval the socket loop let in (see Dispatcher.let_in)
        self.caller: Caller = ANYONE  # who sent it (their key under CURVE)
        self._log: Any = None

    @property
    def log(self) -> Any:
        """A logger bound to this request and its trace (bound on first use: most
        requests never log)."""
        if self._log is None:
            ids = span_ids(self.span) if self.span is not None else {}
            self._log = log.bind(request_id=str(self.request_id), type=self.kind, **ids)
        return self._log


Handler = Callable[[Any, RequestContext], Awaitable[t.Payload]]


def error(code: str, message: str, details: Any = None) -> t.Error:
    """An Error reply. ``code`` is one of the stable codes in docs/protocol.md."""
    return t.Error(code=code, message=message, details=details)


def input_schema(cls: type[t.Variant]) -> dict[str, Any]:
    """JSON Schema of a request's parameters: its fields without the ``type`` tag."""
    schema = msgspec.json.schema(cls)
    defs = schema.pop("$defs", {})
    name = schema["$ref"].rsplit("/", 1)[1]
    body = dict(defs.pop(name))
    body.pop("title", None)
    props = {k: v for k, v in body.get("properties", {}).items() if k != "type"}
    body["properties"] = props
    body["required"] = [r for r in body.get("required", []) if r != "type"]
    if not body["required"]:
        del body["required"]
    if defs:
        body["$defs"] = defs
    return body


class _Capacity:
    """How many evals finish per second while evals are waiting (the engine's measured
    capacity), and from it how many may wait: those that can start within the queue's
    target.  An eval let in beyond that would wait past the target and then be refused
    anyway, after costing a task, a span and a late reply (under a flood that cost was
    most of the front's time)."""

    WINDOW_S = 0.1
    MIN_WAITING = 8

    def __init__(self) -> None:
        self.rate = 0.0  # evals/s; 0 until measured under load
        self._count = 0
        self._since = time.monotonic()

    def finished(self, *, saturated: bool) -> None:
        """An eval finished; ``saturated``: others were waiting for its slot (only then
        does the rate measure capacity rather than the offered load)."""
        now = time.monotonic()
        if not saturated:
            self._count, self._since = 0, now
            return
        self._count += 1
        elapsed = now - self._since
        if elapsed >= self.WINDOW_S:
            sample = self._count / elapsed
            self.rate = sample if not self.rate else 0.7 * self.rate + 0.3 * sample
            self._count, self._since = 0, now

    def queue_limit(self, configured: int, target_s: float) -> int:
        """Waiting evals allowed: ``configured`` at most, half what can start within
        ``target_s`` at the measured rate (configured until there is a measure)."""
        if not self.rate:
            return configured
        return min(configured, max(self.MIN_WAITING, int(self.rate * target_s / 2)))


class Dispatcher:
    """Holds the handlers and the state they share (worker id, registrations, limits)."""

    def __init__(
        self,
        config: Config,
        *,
        limits: Limits,
        jobs: Jobs,
        scripts: Scripts,
        publisher: Publisher,
        on_shutdown: Callable[[str], None],
        telemetry: Telemetry,
        triggers: Triggers | None = None,
        engine: Engine,
        policy: Policy | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.triggers = triggers
        self.sessions = sessions
        self.plugins: Plugins | None = None  # set by the server (luanette.plugins)
        self.flows: FlowManager | None = None  # set by the server (luanette.flows)
        self.config = config
        self._telemetry = telemetry
        self.jobs = jobs
        self.scripts = scripts
        self._publisher = publisher
        self.worker_id = uuid.uuid4()
        self.started = time.monotonic()
        self.registrations: dict[uuid.UUID, t.WorkerRegistration] = {}
        self._on_shutdown = on_shutdown
        self._engine = engine
        self._eval_slots = asyncio.Semaphore(config.max_evals)
        self._evals_waiting: collections.deque[RequestContext] = collections.deque()
        self._capacity = _Capacity()
        # what every lua_eval is granted ([policy] eval)
        self._eval_capabilities = (policy or Policy()).eval_grants().texts()
        self._evals_starting = 0  # let in by the socket loop, their tasks not yet admitted
        self._evals_running = 0  # holding a slot
        # one reply serves every refusal: they are all alike
        self._busy_reply = error(
            "busy",
            f"{config.max_evals} scripts are running and more are waiting than can start within "
            f"{config.queue_target_s:g} s; try again shortly",
            {"retry_after_ms": int(config.queue_target_s * 1000)},
        )
        self._limits = limits
        self._reference: apiref.Reference | None = None
        # resources, prompts and completions (luanette/resources.py, ...): what AI clients read
        self.resources = Resources(jobs=jobs, scripts=scripts, tools=self.tools, reference=self.reference)
        self.resources.pool = lambda: poolview.snapshot(engine)  # lua://workers
        self.prompts = Prompts(jobs=jobs, scripts=scripts, reference=self.reference)
        self.completions = Completions(jobs=jobs, scripts=scripts, reference=self.reference)
        self._handlers: dict[type, Handler] = {
            t.Ping: self.ping,
            t.Register: self.register,
            t.Shutdown: self.shutdown,
            t.ListTools: self.list_tools,
            t.LuaEval: self.lua_eval,
            t.ScriptStore: self.script_store,
            t.ScriptSearch: self.script_search,
            t.LuaDescribe: self.lua_describe,
            t.JobExecute: self.job_execute,
            t.JobStatusRequest: self.job_status,
            t.JobList: self.job_list,
            t.JobPoll: self.job_poll,
            t.JobCancel: self.job_cancel,
            t.ReadResource: self.read_resource,
            t.ListResources: self.list_resources,
            t.ListPrompts: self.list_prompts,
            t.GetPrompt: self.get_prompt,
            t.Complete: self.complete,
            t.TimelineEvent: self.timeline_event,
            t.SessionList: self.session_list,
            t.SessionShow: self.session_show,
            t.SessionCommit: self.session_commit,
            t.SessionDiscard: self.session_discard,
            t.PluginList: self.plugin_list,
            t.PluginLoad: self.plugin_load,
            t.PluginUnload: self.plugin_unload,
            t.PluginReload: self.plugin_reload,
            t.FlowRegister: self.flow_register,
            t.FlowStart: self.flow_start,
            t.FlowSend: self.flow_send,
            t.FlowGet: self.flow_get,
            t.FlowList: self.flow_list,
        }

    async def dispatch(self, payload: t.Payload, ctx: RequestContext) -> t.Payload:
        """Answer one request. Never raises (except cancellation)."""
        handler = self._handlers.get(type(payload))
        if handler is None:
            tag = t.tag_of(type(payload))
            return error("unsupported", f"luanette does not serve '{tag}' requests", {"type": tag})
        try:
            return await handler(payload, ctx)
        except RequestError as e:  # jobs, triggers, sessions, plugins, flows, resources, prompts
            return error(e.code, e.message, e.details)
        except cas.InvalidHash as e:
            return error("invalid_params", f"not a script hash: {e}")
        except cas.NotFound as e:
            return error("not_found", str(e))
        except StorageFault as e:  # named by the store that failed (luanette/faults.py)
            ctx.log.warning("handler.storage_fault", code=e.code, error=str(e))
            return error(e.code, str(e))
        except Exception:
            ctx.log.exception("handler.failed")
            return error("internal", "internal error while handling the request; see the daemon log")

    def tools(self) -> list[t.ToolInfo]:
        """A ToolInfo for each request type this dispatcher serves."""
        tools = []
        for cls in self._handlers:
            tag, schema = t.tag_of(cls), input_schema(cls)
            try:
                description, schema = describe_schema(tag, schema)
            except KeyError:  # undocumented (tests/test_tool_docs.py fails): say at least what it is
                description = (cls.__doc__ or tag).strip().splitlines()[0]
            tools.append(t.ToolInfo(name=tag, description=description, input_schema=schema))
        return tools

    # --- handlers --------------------------------------------------------------------

    async def ping(self, _: t.Ping, ctx: RequestContext) -> t.Payload:
        return t.Pong(worker_id=self.worker_id, uptime_secs=int(time.monotonic() - self.started))

    async def register(self, p: t.Register, ctx: RequestContext) -> t.Payload:
        registration = t.WorkerRegistration(**{f: getattr(p, f) for f in t.WorkerRegistration.__struct_fields__})
        size = len(msgspec.msgpack.encode(registration))
        if size > MAX_REGISTRATION_BYTES:
            return error(
                "invalid_params",
                f"a registration is at most {MAX_REGISTRATION_BYTES} bytes; this one is {size}",
                {"limit": MAX_REGISTRATION_BYTES, "size": size},
            )
        self.registrations.pop(p.worker_id, None)  # the latest goes last: the oldest is first out
        self.registrations[p.worker_id] = registration
        while len(self.registrations) > MAX_REGISTRATIONS:
            del self.registrations[next(iter(self.registrations))]
        ctx.log.info("worker.registered", worker=p.worker_name, kind=p.worker_type.value)
        return t.Success(result={"registered": True, "worker_id": str(p.worker_id)})

    async def shutdown(self, p: t.Shutdown, ctx: RequestContext) -> t.Payload:
        self._on_shutdown(p.reason or "shutdown requested")
        return t.Success(result={"shutting_down": True, "reason": p.reason})

    async def list_tools(self, _: t.ListTools, ctx: RequestContext) -> t.Payload:
        return t.ToolList(tools=self.tools())

    async def lua_eval(self, p: t.LuaEval, ctx: RequestContext) -> t.Payload:
        if isinstance(p.params, (dict, list)):
            try:
                params_mod.check_representable(p.params)
            except params_mod.InvalidParams as e:  # a nil key, an extension, ...
                self._uncount(ctx)
                return error("invalid_params", str(e), e.details())
        refusal = await self._admit(ctx)
        if refusal is not None:
            return refusal
        try:
            with self._run_span(ctx) as span:
                recording = span.is_recording()
                if recording:
                    span.set_attributes(script_attributes(p.code, "eval"))
                outcome = await self._engine.run(
                    p.code,
                    p.params,
                    limits=self._limits,
                    info=RunInfo(
                        "eval",
                        traceparent=traceparent_of(span),
                        sampled=recording,
                        capabilities=self._eval_capabilities,
                        user=user_of(ctx.caller),
                        tool_hooks=self.plugins.tool_events() if self.plugins is not None else [],
                    ),
                    cancel=ctx.cancel,
                    hooks=RunHooks(lambda: ctx.log.bind(run="eval"), span=span),
                    chunk_name="eval",
                )
        except ScriptError as e:
            return lua_error(e.detail)
        finally:
            self._capacity.finished(saturated=bool(self._evals_waiting))
            self._release_slot()
        return t.Success(result={"result": outcome.result, "duration_ms": outcome.duration_ms})

    def _run_span(self, ctx: RequestContext) -> contextlib.AbstractContextManager[Span]:
        """The span of an eval's run: a child of the request's span, unless that one
        records nothing, when nothing would record a child either (the sampler follows
        the parent): the request's span then carries the run's ids, and the front saves
        a nested span per eval (~5% of its time at 64 in flight, measured)."""
        if ctx.span is not None and not ctx.span.is_recording():
            return contextlib.nullcontext(ctx.span)
        return self._telemetry.span("luanette.script.execute")

    def let_in(self) -> t.Error | None:
        """The socket loop's check of a new eval, before it makes a task for it: the
        ``busy`` reply, or None, and then the eval is counted until its task is admitted
        (the caller marks its RequestContext ``counted``)."""
        refusal = self.refuse_at_once()
        if refusal is None:
            self._evals_starting += 1
        return refusal

    def refuse_at_once(self) -> t.Error | None:
        """``busy`` for a new eval when the queue is standing (its oldest eval has waited
        past the target) or full (counting the evals let in whose tasks have not run
        yet: a receive batch lets hundreds in before any of them queues); None when it
        may queue.  Cheap: the socket loop asks it before it makes a task."""
        waiting = self._evals_waiting
        if waiting and time.monotonic() - waiting[0].received > self.config.queue_target_s:
            return self._busy_reply
        limit = self._capacity.queue_limit(self.config.eval_queue, self.config.queue_target_s)
        if self._evals_starting + len(waiting) + self._evals_running >= self.config.max_evals + limit:
            return self._busy_reply
        return None

    def _take_slot(self) -> None:
        self._evals_running += 1

    def _release_slot(self) -> None:
        self._evals_running -= 1
        self._eval_slots.release()

    def _uncount(self, ctx: RequestContext) -> None:
        """An eval the socket loop let in has reached its handler (see let_in)."""
        if ctx.counted:
            ctx.counted = False
            self._evals_starting -= 1

    async def _admit(self, ctx: RequestContext) -> t.Payload | None:
        """Take an eval slot, or the ``busy`` reply.  Admission is by time: an eval that
        waited past the queue's target is refused without running (its caller has likely
        given up, and running it would only make the next ones wait longer), and while
        the oldest waiting eval is past the target, new ones are refused at once."""
        self._uncount(ctx)
        if not self._eval_slots.locked():
            await self._eval_slots.acquire()  # (a free slot: returns without waiting)
            self._take_slot()
            return None
        waiting = self._evals_waiting
        if waiting and time.monotonic() - waiting[0].received > self.config.queue_target_s:
            return self._busy_reply
        if len(waiting) >= self._capacity.queue_limit(self.config.eval_queue, self.config.queue_target_s):
            return self._busy_reply
        waiting.append(ctx)
        try:
            await self._eval_slots.acquire()
        finally:
            waiting.remove(ctx)  # (at or near the head: the scan is short)
        self._take_slot()
        if time.monotonic() - ctx.received > self.config.queue_target_s:
            self._release_slot()
            return self._busy_reply
        return None

    async def script_store(self, p: t.ScriptStore, ctx: RequestContext) -> t.Payload:
        try:
            record, described = await self.scripts.save(p.content, p.tags, p.creator)
        except ScriptProblem as e:
            return lua_error(e.detail)
        except CapabilityError as e:
            return error("invalid_params", f"describe().capabilities: {e}", {"reason": "capabilities"})
        except ManifestError as e:
            return error("invalid_params", str(e), e.details())
        self._publisher.publish(t.ScriptInvalidate(hash=record.hash))
        if self._engine is not None:  # hot reload: every worker, local or remote, drops its compiled chunks
            self._engine.invalidate([record.hash])
        if self.plugins is not None:
            about = {"hash": record.hash, "name": record.name, "tags": record.tags, "creator": record.creator}
            self.plugins.notify("script:stored", record.name or record.hash, about, about)
        result: dict[str, Any] = {
            "hash": record.hash,
            "artifact_id": f"script:{record.hash}",
            "name": record.name,
            "described": described.found,
        }
        if described.problem is not None:
            result["describe_error"] = msgspec.to_builtins(described.problem)
        return t.Success(result=result)

    async def script_search(self, p: t.ScriptSearch, ctx: RequestContext) -> t.Payload:
        found = self.scripts.store.search(tag=p.tag, creator=p.creator, vibe=p.vibe)
        return t.Success(result=[_script_view(r) for r in found])

    async def lua_describe(self, p: t.LuaDescribe, ctx: RequestContext) -> t.Payload:
        described = await self.scripts.describe(cas.parse_hash(p.script_hash))
        if described.problem is not None:
            return lua_error(described.problem)
        if not described.found:
            return error("not_found", f"script {p.script_hash} defines no describe()", {"reason": "no_describe"})
        return t.Success(result=described.value)

    async def job_execute(self, p: t.JobExecute, ctx: RequestContext) -> t.Payload:
        priority = None if p.priority is msgspec.UNSET else p.priority  # (Luanette's extension)
        done = await self.jobs.submit_checked(
            cas.parse_hash(p.script_hash), p.params, p.tags, user=user_of(ctx.caller), priority=priority
        )
        result: dict[str, Any] = {"job_id": done.info.job_id, "script_hash": done.info.source}
        if done.warnings:  # (absent when there are none: the reply stays as it was)
            result["warnings"] = done.warnings
        return t.Success(result=result)

    async def job_status(self, p: t.JobStatusRequest, ctx: RequestContext) -> t.Payload:
        return t.Success(result=msgspec.to_builtins(self.jobs.status(p.job_id)))

    async def job_list(self, p: t.JobList, ctx: RequestContext) -> t.Payload:
        return t.Success(result=msgspec.to_builtins(self.jobs.list(p.status)))

    async def job_poll(self, p: t.JobPoll, ctx: RequestContext) -> t.Payload:
        polled = await self.jobs.poll(p.job_ids, p.timeout_ms / 1000, p.mode)
        return t.Success(result=msgspec.to_builtins(polled))

    async def job_cancel(self, p: t.JobCancel, ctx: RequestContext) -> t.Payload:
        info = self.jobs.cancel(p.job_id)
        return t.Success(result={"cancelled": True, "job_id": p.job_id, "status": info.status.value})

    async def timeline_event(self, p: t.TimelineEvent, ctx: RequestContext) -> t.Payload:
        if self.plugins is not None and self.plugins.wants("garden:timeline_event"):
            metadata = p.metadata
            try:
                params_mod.check_representable(metadata)
            except params_mod.InvalidParams:  # what Lua cannot hold is left out (as triggers do)
                metadata = None
            event = {"event_type": p.event_type.value, "position_beats": p.position_beats, "tempo": p.tempo,
                     "metadata": metadata}  # fmt: skip
            self.plugins.notify("garden:timeline_event", p.event_type.value, event, event)
        if self.triggers is None:
            return t.Success(result={"job_id": None, "rule": None, "matched": False})
        return t.Success(result=await self.triggers.handle(p, user=user_of(ctx.caller)))

    def _sessions(self) -> Sessions:
        if self.sessions is None:
            raise SessionError("unsupported", "this daemon keeps no sessions")
        return self.sessions

    async def session_list(self, p: t.SessionList, ctx: RequestContext) -> t.Payload:
        return t.Success(result=self._sessions().list(p.job_id))

    async def session_show(self, p: t.SessionShow, ctx: RequestContext) -> t.Payload:
        return t.Success(result=self._sessions().show(p.session_id))

    async def session_commit(self, p: t.SessionCommit, ctx: RequestContext) -> t.Payload:
        done = await self._sessions().commit_pending(p.session_id, user_of(ctx.caller), ctx.caller.admin)
        ctx.log.info("session.committed", session_id=p.session_id, operations=done["operations"])
        return t.Success(result=done)

    async def session_discard(self, p: t.SessionDiscard, ctx: RequestContext) -> t.Payload:
        done = self._sessions().discard_pending(p.session_id, user_of(ctx.caller), ctx.caller.admin)
        ctx.log.info("session.discarded", session_id=p.session_id, operations=done["operations"])
        return t.Success(result=done)

    def _plugins(self) -> Plugins:
        if self.plugins is None:
            raise PluginError("unsupported", "this daemon has no plugins")
        return self.plugins

    async def plugin_list(self, p: t.PluginList, ctx: RequestContext) -> t.Payload:
        return t.Success(result=self._plugins().views())

    async def plugin_load(self, p: t.PluginLoad, ctx: RequestContext) -> t.Payload:
        plugins = self._plugins()
        if not is_hash(p.plugin):
            loaded = await plugins.load_file(plugins.file_named(p.plugin))
        else:
            loaded = await self.load_stored_plugin(p.plugin)
            if loaded.state == "loaded":
                plugins.remember(p.plugin)  # loaded again at the next start
        ctx.log.info("plugin.load_requested", plugin=loaded.name, state=loaded.state)
        return t.Success(result=loaded.view())

    async def load_stored_plugin(self, script_hash: str) -> Plugin:
        """Load the stored script ``script_hash`` (tagged ``plugin``) as a plugin."""
        record = self.scripts.record(script_hash)
        if record is None or "plugin" not in [*record.tags, *(record.declared_tags or [])]:
            raise PluginError(
                "invalid_params",
                f"{script_hash} is not a stored script tagged 'plugin' (store it with --tag plugin, or "
                "describe().tags = {'plugin'})",
            )
        source = await self.scripts.source(script_hash)
        return await self._plugins().load_source(
            source, f"script:{script_hash}", default_name=record.name or script_hash, chunk=record.name or script_hash
        )

    async def load_remembered_plugins(self) -> None:
        """At start-up: load again the stored-script plugins loaded before (one that no
        longer loads is listed as failed, or logged, and forgotten)."""
        plugins = self._plugins()
        for script_hash in plugins.remembered():
            try:
                loaded = await self.load_stored_plugin(script_hash)
            except (PluginError, cas.CasError) as e:
                log.error("plugin.remembered_not_loaded", script_hash=script_hash, error=str(e))
                plugins.forget(script_hash)
                continue
            if loaded.state != "loaded":
                plugins.forget(script_hash)

    async def plugin_unload(self, p: t.PluginUnload, ctx: RequestContext) -> t.Payload:
        unloaded = await self._plugins().unload(p.name)
        kind, _, script_hash = unloaded.origin.partition(":")
        if kind == "script":
            self._plugins().forget(script_hash)
        return t.Success(result={"unloaded": True, "name": p.name})

    async def plugin_reload(self, p: t.PluginReload, ctx: RequestContext) -> t.Payload:
        return t.Success(result=(await self._plugins().reload(p.name)).view())

    # --- flows (luanette.flows, docs/plugins.md#flows) ---------------------------------

    def _flows(self) -> FlowManager:
        if self.flows is None:
            raise FlowError("unsupported", "this daemon has no flows")
        return self.flows

    @staticmethod
    def _acting_user(asked: str | None, ctx: RequestContext) -> str:
        """Who an action is taken as: the caller, or the ``user`` an admin (a front end
        acting for its own users) names."""
        caller = user_of(ctx.caller)
        if asked is None or asked == caller:
            return caller
        if not ctx.caller.admin:
            raise FlowError("forbidden", "only an admin may act as another user", {"reason": "not_admin"})
        return asked

    async def flow_register(self, p: t.FlowRegister, ctx: RequestContext) -> t.Payload:
        flows = self._flows()
        if is_hash(p.source):
            record = self.scripts.record(p.source)
            if record is None:
                raise FlowError("not_found", f"no stored script {p.source}")
            source = await self.scripts.source(p.source)
            tags = [*record.tags, *(record.declared_tags or [])]
            registered = await flows.register(
                source, f"script:{p.source}", chunk=record.name or p.source, creator=record.creator, tags=tags
            )
        else:
            plugin = self.plugins.plugins.get(p.source) if self.plugins is not None else None
            if plugin is None or plugin.state != "loaded":
                raise FlowError("not_found", f"{p.source!r} is neither a stored script's hash nor a loaded plugin")
            registered = await flows.register(plugin.source, f"plugin:{plugin.name}", chunk=plugin.chunk)
        ctx.log.info("flow.register_requested", flow=registered["id"])
        return t.Success(result=registered)

    async def flow_start(self, p: t.FlowStart, ctx: RequestContext) -> t.Payload:
        user = self._acting_user(p.user, ctx)
        return t.Success(result=await self._flows().start(p.definition, p.context, p.subject, user))

    async def flow_send(self, p: t.FlowSend, ctx: RequestContext) -> t.Payload:
        user = self._acting_user(p.user, ctx)
        return t.Success(result=await self._flows().send(p.instance, p.action, p.data, user))

    async def flow_get(self, p: t.FlowGet, ctx: RequestContext) -> t.Payload:
        found = self._flows().get(p.instance)
        if found is None:
            raise FlowError("not_found", f"no flow instance {p.instance!r}")
        return t.Success(result=found)

    async def flow_list(self, p: t.FlowList, ctx: RequestContext) -> t.Payload:
        flows = self._flows()
        if p.definitions:
            return t.Success(result=flows.definitions())
        return t.Success(
            result=flows.query(subject=p.subject, state=p.state, definition=p.definition, limit=p.limit)
        )

    def reference(self) -> apiref.Reference:
        """The Lua API reference (built on first use from the registry the workers bind)."""
        if self._reference is None:
            settings = getattr(getattr(self._engine, "config", None), "settings", None)
            self._reference = apiref.build(settings if settings is not None else Settings(), self.scripts.cas)
        return self._reference

    async def read_resource(self, p: t.ReadResource, ctx: RequestContext) -> t.Payload:
        if p.uri == STATS_URI:  # the older name, in its older shape: the bare counts
            return t.Success(result=msgspec.to_builtins(self.jobs.stats()))
        return t.Success(result=await self.resources.read(p.uri))

    async def list_resources(self, p: t.ListResources, ctx: RequestContext) -> t.Payload:
        return t.Success(result=self.resources.list())

    async def list_prompts(self, p: t.ListPrompts, ctx: RequestContext) -> t.Payload:
        return t.Success(result=self.prompts.list())

    async def get_prompt(self, p: t.GetPrompt, ctx: RequestContext) -> t.Payload:
        return t.Success(result=await self.prompts.get(p.name, p.arguments))

    async def complete(self, p: t.Complete, ctx: RequestContext) -> t.Payload:
        return t.Success(result=self.completions.complete(p.context, p.partial))


STATS_URI = "luanette://jobs/stats"


def user_of(caller: Caller) -> str:
    """Who asked for a run, as ``context.user()`` gives it: the client's public key (z85)
    under CURVE, ``"local"`` without CURVE (nobody is authenticated: loopback clients, or
    anyone who reaches a daemon started with ``--insecure``)."""
    return caller.key if caller.key is not None else "local"


def _script_view(record: ScriptRecord) -> dict[str, Any]:
    return {
        "hash": record.hash,
        "name": record.name,
        "description": record.description,
        "tags": record.tags,
        "creator": record.creator,
        "params": record.params_schema,
    }


def lua_error(detail: ErrorDetail) -> t.Error:
    """The Error reply for a failed script: one readable line, the structure in details."""
    where = f" (line {detail.line})" if detail.line is not None else ""
    hint = f"; {detail.hints[0]}" if detail.hints else ""
    return error("lua_error", f"{detail.kind}: {detail.message}{where}{hint}", msgspec.to_builtins(detail))
