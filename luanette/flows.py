"""Flows: state machines whose guards and handlers are Lua (seed 004, section 2;
docs/plugins.md, "Flows").

A flow definition (``FlowDefinition``: ``id``, ``initial``, ``states`` with ``on``,
``type``, ``enter``, ``exit``, ``guards``, and a starting ``context``) comes from the
``define()`` of a plugin or a stored script and is registered by its id.  Guards and
enter/exit handlers are functions of that module, named in the definition.  They run
as plugin hooks do: statelessly, each call one sandboxed run (kind ``plugin``, granted
the module's declared capabilities) that loads the module again and calls the function
with a ``FlowContext``.  What a handler sets with ``ctx:set_context`` is kept with the
transition.

Definitions (with their module's source), instances and every transition are in the
job database (``luanette.store``, schema v7), so flows survive a restart.  Each
transition is broadcast on PUB as ``flow_transition``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Final, Literal

import anyio
import msgspec
import structlog

from hooteproto import types as t
from luanette.capabilities import CapabilityError, Policy, declared_capabilities
from luanette.engine.api import CancelToken, Limits, ScriptError
from luanette.engine.channel import RunInfo
from luanette.engine.pool import Engine, RunHooks
from luanette.errors import RequestError
from luanette.lua import module_driver
from luanette.stdlib.hooks import bounded, custom_name
from luanette.store import Store

log = structlog.get_logger("luanette.flows")

MAX_DEFINITIONS: Final = 256
MAX_STATES: Final = 64
"""States of one definition."""
MAX_INSTANCES: Final = 10_000
MAX_HISTORY: Final = 1000
"""Transitions one instance may make."""
MAX_CONTEXT_BYTES: Final = 64 * 2**10
"""An instance's context, as JSON."""
MAX_EMITS: Final = 16
"""Events one handler run may emit."""
HANDLER_TIMEOUT_S: Final = 2.0
"""Default time budget of one guard or handler run (the daemon passes `--hook-timeout`)."""
QUERY_LIMIT: Final = 1000

_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# The one chunk every flow run executes (luanette/lua/): the module prologue, then what
# params.op asks.
DRIVER: Final = module_driver("flow_driver.lua")


class FlowError(RequestError):
    """A flow request that cannot be honoured."""


class StateDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One state: ``on`` maps an action to the target state; ``guards`` an action to
    the module function that must allow it."""

    on: dict[str, str] = {}
    type: Literal["normal", "final", "parallel"] = "normal"
    enter: str | None = None
    exit: str | None = None
    guards: dict[str, str] = {}


class FlowDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Seed 004's ``FlowDefinition``."""

    id: str
    initial: str
    states: dict[str, StateDefinition]
    context: dict[str, Any] = {}


class Registered(msgspec.Struct, kw_only=True):
    """A definition with what its handlers' runs need: the module and its capabilities."""

    definition: FlowDefinition
    source: str
    chunk: str
    origin: str
    capabilities: list[str]
    registered_at: float

    def view(self) -> dict[str, Any]:
        """What ``flow_register`` answers (no source)."""
        return {
            **msgspec.to_builtins(self.definition),
            "origin": self.origin,
            "capabilities": self.capabilities,
            "registered_at": self.registered_at,
        }


def _maps(value: Any) -> Any:
    # an empty Lua table arrives as a list: where the definition wants maps, make it one
    return {} if value == [] else value


def parse_definition(raw: Any) -> FlowDefinition:
    """Check what ``define()`` returned; :class:`FlowError` ``flow_invalid`` says why not."""
    if not isinstance(raw, dict):
        raise FlowError("flow_invalid", "define() must return a table")
    raw = dict(raw)
    raw["context"] = _maps(raw.get("context", {}))
    states = _maps(raw.get("states"))
    if isinstance(states, dict):
        raw["states"] = {
            k: {**v, "on": _maps(v.get("on", {})), "guards": _maps(v.get("guards", {}))} if isinstance(v, dict)
            else _maps(v)
            for k, v in states.items()
        }  # fmt: skip
    try:
        definition = msgspec.convert(raw, FlowDefinition)
    except msgspec.ValidationError as e:
        raise FlowError("flow_invalid", f"not a flow definition: {e}") from None
    if not _ID.fullmatch(definition.id):
        raise FlowError("flow_invalid", f"the flow id must match {_ID.pattern}, got {definition.id!r}")
    if not 0 < len(definition.states) <= MAX_STATES:
        raise FlowError("flow_invalid", f"a flow has 1 to {MAX_STATES} states, got {len(definition.states)}")
    if definition.initial not in definition.states:
        raise FlowError("flow_invalid", f"the initial state {definition.initial!r} is not one of the states")
    for name, state in definition.states.items():
        for action, target in state.on.items():
            if target not in definition.states:
                raise FlowError("flow_invalid", f"states.{name}.on.{action}: no state {target!r}")
        if state.type == "final" and state.on:
            raise FlowError("flow_invalid", f"states.{name}: a final state has no transitions")
        for action in state.guards:
            if action not in state.on:
                raise FlowError("flow_invalid", f"states.{name}.guards.{action}: no such action in on")
    return definition


def transition_result(kind: str, **fields: Any) -> dict[str, Any]:
    """Seed 004's ``TransitionResult``: ``{type = kind, ...}``."""
    return {"type": kind, **fields}


class FlowManager:
    """The daemon's flows: definitions, instances, and the runs of their Lua functions."""

    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        store: Store,
        *,
        policy: Policy | None = None,
        publish: Callable[[Any], None] | None = None,
        notify: Callable[..., None] | None = None,
        handler_timeout_s: float = HANDLER_TIMEOUT_S,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._store = store
        self._policy = policy or Policy()
        self._publish = publish
        # Plugins.notify: custom events the handlers emit reach plugins (and PUB)
        self.notify = notify
        self.handler_timeout_s = handler_timeout_s
        self._locks: dict[str, anyio.Lock] = {}

    # --- definitions -----------------------------------------------------------------

    async def register(
        self, source: str, origin: str, *, chunk: str, creator: str | None = None, tags: list[str] | None = None
    ) -> dict[str, Any]:
        """Run the module's ``define()`` and register (or replace) the definition by id."""
        registered = Registered(
            definition=FlowDefinition(id="?", initial="?", states={}), source=source, chunk=chunk, origin=origin,
            capabilities=[], registered_at=time.time(),
        )  # fmt: skip
        described = await self._module_run(registered, "describe", {}, capabilities=[])
        manifest = described.get("value") if described.get("found") else None
        try:
            declared = declared_capabilities(manifest) or []
        except CapabilityError as e:
            raise FlowError("invalid_manifest", f"describe().capabilities: {e}") from None
        refused = self._policy.refused(declared, creator, tags or ["plugin"])
        if refused:
            raise FlowError("permission_denied", f"the policy does not allow {', '.join(refused)} to this module")
        registered.capabilities = declared
        defined = await self._module_run(registered, "define", {}, capabilities=declared)
        problems = defined.get("problems")
        if isinstance(problems, list) and problems:
            raise FlowError("flow_invalid", "; ".join(str(p) for p in problems))
        registered.definition = parse_definition(defined.get("definition"))
        flow_id = registered.definition.id
        with self._store._write() as conn:
            known = conn.execute("SELECT 1 FROM flow_definitions WHERE flow_id = ?", (flow_id,)).fetchone()
            count = conn.execute("SELECT COUNT(*) FROM flow_definitions").fetchone()[0]
            if known is None and count >= MAX_DEFINITIONS:
                raise FlowError("too_many_flow_definitions", f"at most {MAX_DEFINITIONS} flows may be registered")
            conn.execute(
                "INSERT OR REPLACE INTO flow_definitions (flow_id, definition, source, chunk, origin, capabilities,"
                " registered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (flow_id, msgspec.json.encode(registered.definition).decode(), source, chunk, origin,
                 json.dumps(declared), registered.registered_at),
            )  # fmt: skip
        log.info("flow.registered", flow=flow_id, origin=origin, states=len(registered.definition.states))
        return registered.view()

    def definition(self, flow_id: str) -> Registered | None:
        """A registered definition, or None."""
        rows = self._store._read(
            "SELECT definition, source, chunk, origin, capabilities, registered_at FROM flow_definitions"
            " WHERE flow_id = ?",
            (flow_id,),
        )
        if not rows:
            return None
        definition, source, chunk, origin, capabilities, at = rows[0]
        return Registered(
            definition=msgspec.json.decode(definition, type=FlowDefinition), source=source, chunk=chunk,
            origin=origin, capabilities=json.loads(capabilities), registered_at=at,
        )  # fmt: skip

    def definitions(self) -> list[dict[str, Any]]:
        """Every registered definition (without sources), by id."""
        rows = self._store._read("SELECT flow_id FROM flow_definitions ORDER BY flow_id")
        return [d.view() for (flow_id,) in rows if (d := self.definition(flow_id)) is not None]

    # --- instances -------------------------------------------------------------------

    async def start(
        self, flow_id: str, context: Any = None, subject: str = "", user: str = "local"
    ) -> dict[str, Any]:
        """A new instance of ``flow_id`` in its initial state (whose enter handler runs),
        its context the definition's with ``context`` over it."""
        registered = self.definition(flow_id)
        if registered is None:
            raise FlowError("not_found", f"no flow {flow_id!r} is registered")
        if context is not None and not isinstance(_maps(context), dict):
            raise FlowError("invalid_params", "a flow's context is a table (a map)")
        # checked before the enter handler too: its effects should not happen for nothing
        if self._store._read("SELECT COUNT(*) FROM flow_instances")[0][0] >= MAX_INSTANCES:
            raise FlowError("too_many_flow_instances", f"at most {MAX_INSTANCES} flow instances may exist")
        definition = registered.definition
        merged = {**definition.context, **(_maps(context) or {})}
        now = _now_ms()
        instance_id = str(uuid.uuid4())
        initial = definition.initial
        event = {"type": "start", "action": "start", "from": None, "to": initial, "user": user}
        emits: list[Any] = []
        enter = definition.states[initial].enter
        if enter is not None:
            merged = await self._handler(
                registered, enter, instance_id=instance_id, state=initial, context=merged, subject=subject,
                user=user, event=event, emits=emits,
            )  # fmt: skip
        encoded = _context_json(merged)
        with self._store._write() as conn:
            count = conn.execute("SELECT COUNT(*) FROM flow_instances").fetchone()[0]
            if count >= MAX_INSTANCES:
                raise FlowError("too_many_flow_instances", f"at most {MAX_INSTANCES} flow instances may exist")
            conn.execute(
                "INSERT INTO flow_instances (instance_id, flow_id, current_state, context, subject, transitions,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (instance_id, flow_id, initial, encoded, subject, now, now),
            )
        log.info("flow.started", flow=flow_id, instance=instance_id, subject=subject, state=initial)
        self._announce(instance_id, flow_id, subject, None, initial, "start", user, now)
        self._emitted(instance_id, emits)
        found = self.get(instance_id)
        assert found is not None
        return found

    async def send(self, instance_id: str, action: str, data: Any = None, user: str = "local") -> dict[str, Any]:
        """Try ``action`` on an instance: a ``TransitionResult`` (success, guard_failed,
        invalid_action, invalid_state); :class:`FlowError` for an unknown instance, a
        failing handler, or a bound."""
        lock = self._locks.setdefault(instance_id, anyio.Lock())
        async with lock:
            try:
                return await self._send(instance_id, action, data, user)
            finally:
                if not lock.statistics().tasks_waiting:
                    self._locks.pop(instance_id, None)

    async def _send(self, instance_id: str, action: str, data: Any, user: str) -> dict[str, Any]:
        row = self._instance_row(instance_id)
        if row is None:
            raise FlowError("not_found", f"no flow instance {instance_id!r}")
        flow_id, current, context_text, subject, transitions = row[1], row[2], row[3], row[4], row[5]
        registered = self.definition(flow_id)
        if registered is None:
            return transition_result("invalid_state", state=current, instance_id=instance_id)
        definition = registered.definition
        state = definition.states.get(current)
        if state is None:
            return transition_result("invalid_state", state=current, instance_id=instance_id)
        target = state.on.get(action)
        if target is None:
            return transition_result("invalid_action", action=action, current_state=current, instance_id=instance_id)
        if target not in definition.states:
            return transition_result("invalid_state", state=target, instance_id=instance_id)
        if transitions >= MAX_HISTORY:
            raise FlowError("flow_history_full", f"a flow instance makes at most {MAX_HISTORY} transitions")
        context = json.loads(context_text)
        event: dict[str, Any] = {}
        if isinstance(data, dict):
            event.update(data)
        event.update({"type": action, "action": action, "from": current, "to": target, "user": user, "data": data})
        common = {"instance_id": instance_id, "context": context, "subject": subject, "user": user, "event": event}
        guard = state.guards.get(action)
        if guard is not None:
            allowed, reason = await self._guard(registered, guard, state=current, **common)
            if not allowed:
                log.info("flow.guard_failed", flow=flow_id, instance=instance_id, guard=guard, reason=reason)
                return transition_result("guard_failed", guard=guard, reason=reason, instance_id=instance_id)
        emits: list[Any] = []
        if state.exit is not None:
            common["context"] = await self._handler(registered, state.exit, state=current, emits=emits, **common)
        enter = definition.states[target].enter
        if enter is not None:
            common["context"] = await self._handler(registered, enter, state=target, emits=emits, **common)
        encoded = _context_json(common["context"])
        now = _now_ms()
        with self._store._write() as conn:
            conn.execute(
                "UPDATE flow_instances SET current_state = ?, context = ?, transitions = transitions + 1,"
                " updated_at = ? WHERE instance_id = ?",
                (target, encoded, now, instance_id),
            )
            conn.execute(
                "INSERT INTO flow_history (instance_id, seq, from_state, to_state, action, user, timestamp, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (instance_id, transitions + 1, current, target, action, user, now,
                 None if data is None else json.dumps(bounded(data))),
            )  # fmt: skip
        log.info("flow.transition", flow=flow_id, instance=instance_id, action=action, from_state=current, to=target)
        self._announce(instance_id, flow_id, subject, current, target, action, user, now)
        self._emitted(instance_id, emits)
        return transition_result(
            "success", new_state=target, from_state=current, action=action, instance_id=instance_id,
            final=definition.states[target].type == "final",
        )  # fmt: skip

    def _instance_row(self, instance_id: str) -> tuple | None:
        rows = self._store._read(
            "SELECT instance_id, flow_id, current_state, context, subject, transitions, created_at, updated_at"
            " FROM flow_instances WHERE instance_id = ?",
            (instance_id,),
        )
        return rows[0] if rows else None

    def get(self, instance_id: str) -> dict[str, Any] | None:
        """An instance with its history (seed 004's ``FlowInstance``), or None."""
        row = self._instance_row(instance_id)
        if row is None:
            return None
        history = [
            {"from": f, "to": to, "action": a, "user": u, "timestamp": ts, "data": None if d is None else json.loads(d)}
            for f, to, a, u, ts, d in self._store._read(
                "SELECT from_state, to_state, action, user, timestamp, data FROM flow_history"
                " WHERE instance_id = ? ORDER BY seq",
                (instance_id,),
            )
        ]
        return {**self._view(row), "history": history}

    def query(
        self, *, subject: str | None = None, state: str | None = None, definition: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Instances (without history, newest first) matching every filter given."""
        sql = (
            "SELECT instance_id, flow_id, current_state, context, subject, transitions, created_at, updated_at"
            " FROM flow_instances"
        )
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("subject", subject), ("current_state", state), ("flow_id", definition)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, instance_id LIMIT ?"
        args.append(max(1, min(int(limit), QUERY_LIMIT)))
        known: dict[str, Registered | None] = {}
        return [self._view(row, known) for row in self._store._read(sql, args)]

    def _view(self, row: tuple, known: dict[str, Registered | None] | None = None) -> dict[str, Any]:
        instance_id, flow_id, current, context, subject, transitions, created, updated = row
        known = {} if known is None else known
        if flow_id not in known:
            known[flow_id] = self.definition(flow_id)
        registered = known[flow_id]
        state = registered.definition.states.get(current) if registered is not None else None
        return {
            "id": instance_id, "definition_id": flow_id, "current_state": current, "context": json.loads(context),
            "subject": subject, "transitions": transitions, "final": state is not None and state.type == "final",
            "created_at": created, "updated_at": updated,
        }  # fmt: skip

    # --- the front's service for runs (flow.* in Lua) --------------------------------

    async def call(self, args: list[Any]) -> dict[str, Any]:
        """A worker's ``flow`` service call: ``[op, arguments, user]``; ``{ok, value}``
        or ``{ok = false, code, message}`` (the script sees a Lua error)."""
        op, arguments, user = args
        arguments = arguments if isinstance(arguments, dict) else {}
        user = str(user or "local")
        try:
            if op == "start":
                value: Any = await self.start(
                    str(arguments.get("definition")), arguments.get("context"), str(arguments.get("subject") or ""),
                    user,
                )  # fmt: skip
            elif op == "send":
                value = await self.send(
                    str(arguments.get("instance")), str(arguments.get("action")), arguments.get("data"), user
                )
            elif op == "get":
                value = self.get(str(arguments.get("instance")))
            elif op == "list":
                value = self.query(
                    subject=arguments.get("subject"), state=arguments.get("state"),
                    definition=arguments.get("definition"), limit=int(arguments.get("limit") or 100),
                )  # fmt: skip
            else:
                raise FlowError("invalid_params", f"no flow operation {op!r}")
        except FlowError as e:
            return {"ok": False, "code": e.code, "message": e.message}
        return {"ok": True, "value": value}

    # --- runs ------------------------------------------------------------------------

    async def _guard(self, registered: Registered, guard: str, **call: Any) -> tuple[bool, str]:
        try:
            done = await self._call(registered, guard, **call)
        except FlowError as e:
            # a guard that cannot decide refuses: failing closed is the safe way round
            return False, e.message
        ok, reason = done.get("ok"), done.get("reason")
        if ok is not None and ok is not False:
            return True, ""
        return False, reason if isinstance(reason, str) else f"{guard} returned {json.dumps(ok)}"

    async def _handler(self, registered: Registered, name: str, *, emits: list[Any], **call: Any) -> dict[str, Any]:
        done = await self._call(registered, name, **call)
        made = done.get("emits")
        emits.extend(made if isinstance(made, list) else [])
        context = _maps(done.get("context"))
        return context if isinstance(context, dict) else {}

    async def _call(
        self, registered: Registered, handler: str, *, instance_id: str, state: str, context: Any, subject: str,
        user: str, event: Any,
    ) -> dict[str, Any]:
        extra = {"handler": handler, "flow": registered.definition.id, "instance": instance_id, "state": state,
                 "context": context, "subject": subject, "user": user, "event": event}  # fmt: skip
        try:
            return await self._module_run(
                registered, "call", extra, capabilities=registered.capabilities, timeout_s=self.handler_timeout_s,
                user=user,
            )  # fmt: skip
        except ScriptError as e:
            log.warning("flow.handler_failed", flow=registered.definition.id, instance=instance_id, handler=handler,
                        kind=e.detail.kind, error=e.detail.message)  # fmt: skip
            raise FlowError(
                "flow_handler_failed", f"{handler}: {e.detail.kind}: {e.detail.message}",
                {"handler": handler, "error": msgspec.to_builtins(e.detail)},
            ) from None  # fmt: skip

    async def _module_run(
        self, registered: Registered, op: str, extra: dict[str, Any], *, capabilities: list[str],
        timeout_s: float | None = None, user: str | None = None,
    ) -> dict[str, Any]:
        limits = self._limits if timeout_s is None else msgspec.structs.replace(self._limits, timeout_s=timeout_s)
        params = {"source": registered.source, "chunk": registered.chunk, "op": op, "what": "flow module",
                  "now": _now_ms(), **extra}  # fmt: skip
        try:
            outcome = await self._engine.run(
                DRIVER,
                params,
                limits=limits,
                # garden edits of a handler are the transition's effect: applied at once
                info=RunInfo("plugin", capabilities=capabilities, user=user, execution_mode="autoCommit"),
                cancel=CancelToken(),
                hooks=RunHooks(lambda: log.bind(flow=registered.definition.id, op=op)),
                chunk_name="flow",
            )
        except ScriptError as e:
            if op == "call":
                raise
            raise FlowError("flow_invalid", f"{op}: {e.detail.kind}: {e.detail.message}",
                            msgspec.to_builtins(e.detail)) from None  # fmt: skip
        result = outcome.result
        return result if isinstance(result, dict) else {}

    def _announce(
        self, instance_id: str, flow_id: str, subject: str, from_state: str | None, to_state: str, action: str,
        user: str, at: int,
    ) -> None:
        if self._publish is not None:
            self._publish(t.FlowTransition(
                instance_id=instance_id, definition_id=flow_id, subject=subject, from_state=from_state,
                to_state=to_state, action=action, user=user, timestamp=at,
            ))  # fmt: skip

    def _emitted(self, instance_id: str, emits: list[Any]) -> None:
        if len(emits) > MAX_EMITS:
            log.warning("flow.emits_dropped", instance=instance_id, emitted=len(emits), limit=MAX_EMITS)
            emits = emits[:MAX_EMITS]
        for emit in emits:
            if not isinstance(emit, dict):
                continue
            try:
                name = custom_name(emit.get("name"))
            except Exception as e:
                log.warning("flow.bad_emit", instance=instance_id, error=str(e))
                continue
            payload = bounded(emit.get("payload"))
            if self.notify is not None:
                self.notify(name, f"flow:{instance_id}", payload, {"name": name}, depth=1)
            elif self._publish is not None:
                self._publish(t.CustomEvent(name=name, subject=f"flow:{instance_id}", payload=payload))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _context_json(context: Any) -> str:
    try:
        encoded = json.dumps(context, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise FlowError("invalid_params", f"a flow's context must be JSON-encodable: {e}") from None
    if len(encoded.encode()) > MAX_CONTEXT_BYTES:
        raise FlowError(
            "flow_context_too_large", f"a flow's context is at most {MAX_CONTEXT_BYTES} bytes of JSON",
            {"size_bytes": len(encoded.encode())},
        )  # fmt: skip
    return encoded


__all__ = ["FlowDefinition", "FlowError", "FlowManager", "StateDefinition", "parse_definition"]
