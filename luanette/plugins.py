"""Plugins and their event hooks (seed 004, section 1; docs/plugins.md).

A plugin is a Lua module (a file in ``--plugins DIR``, or a stored script tagged
``plugin``) with ``describe()`` (its name and the capabilities it needs), ``init(ctx)``
and optionally ``cleanup(ctx)``.  Plugin code never runs in the front and keeps no
state between runs: every run is an ordinary sandboxed run of kind ``plugin`` in a
worker, granted the plugin's declared capabilities.

- Loading a plugin is one run that calls ``init(ctx)`` with a recording ``ctx``: its
  ``ctx:on(event, handler, {priority, pattern, once})`` calls come back as the
  subscriptions the front keeps (handlers named by the order of their ``ctx:on``).
- Delivering an event is one run that loads the module again, calls ``init(ctx)`` to
  rebuild its handlers (its side effects are dropped), then calls the subscribed
  handler with the event, within the handler time budget.  A handler that fails or
  overruns is logged and skipped, never fatal.
- Unloading (and shutting down) is one run of ``cleanup(ctx)``.

Before events (``job:before_execute``, ``tool:before``) wait for their handlers, in
priority order, and may be modified or cancelled; the others are notifications,
delivered in the background from a bounded queue.  ``ctx:emit`` fires ``custom:*``
events (to a bounded depth, so handlers emitting to each other stop), which are also
broadcast on PUB as ``custom_event``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

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

log = structlog.get_logger("luanette.plugins")

FIRST: Final = -100
EARLY: Final = -50
NORMAL: Final = 0
LATE: Final = 50
LAST: Final = 100
"""Priorities (seed 004's ``Priority``): lower runs earlier."""

MAX_PLUGINS: Final = 64
MAX_SUBSCRIPTIONS: Final = 64
"""Subscriptions one plugin may hold."""
MAX_EMITS: Final = 16
"""Events one hook run may emit."""
MAX_EMIT_DEPTH: Final = 4
"""How deep events emitted by handlers of emitted events may go."""
MAX_QUEUED: Final = 1000
"""Notifications waiting for delivery; past it new ones are dropped (and counted)."""
DELIVERERS: Final = 4
"""Notifications delivered at once (each one's handlers in priority order).  Each
deliverer has its own lane, chosen by the notification's subject: notifications about
one subject (a script's ``job:started`` and ``job:completed``) arrive in order."""
HANDLER_TIMEOUT_S: Final = 2.0
"""Default time budget of one handler run (``--hook-timeout``)."""
CLEANUP_TIMEOUT_S: Final = 5.0

BEFORE_EVENTS: Final = frozenset({"job:before_execute", "tool:before"})
"""The events whose handlers may modify their payload or cancel them."""
EVENTS: Final = (
    "job:before_execute", "job:started", "job:completed", "job:failed", "job:cancelled",
    "tool:before", "tool:after", "tool:error", "script:stored", "garden:timeline_event",
)  # fmt: skip
"""The daemon's events; ``custom:*`` come from ``ctx:emit`` and ``hooks.emit``."""
TOOL_EVENTS: Final = ("tool:before", "tool:after", "tool:error")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASH = re.compile(r"[0-9a-f]{32}")

# The one chunk every plugin run executes (luanette/lua/): the module prologue, then
# what params.op asks.
DRIVER: Final = module_driver("plugin_driver.lua")


class PluginError(RequestError):
    """A plugin request that cannot be honoured."""


class Subscription(msgspec.Struct, kw_only=True):
    """One ``ctx:on``: ``index`` is its place among the plugin's ``ctx:on`` calls."""

    id: str
    plugin: str
    index: int
    event: str
    priority: int = NORMAL
    pattern: str | None = None
    once: bool = False
    handler: str | None = None  # the module's field holding the handler, when it has one
    delivered: int = 0
    failed: int = 0


class Plugin(msgspec.Struct, kw_only=True):
    """A plugin the daemon knows: loaded, or failed to load (with its error)."""

    name: str
    origin: str  # "file:PATH" or "script:HASH"
    state: str = "loaded"  # "loaded" or "failed"
    error: dict[str, Any] | None = None
    capabilities: list[str] = []
    description: str | None = None
    subscriptions: list[Subscription] = []
    order: int = 0
    source: str = ""
    chunk: str = "plugin"

    def view(self) -> dict[str, Any]:
        """What ``plugin_list`` and ``lua://plugins`` show (no source)."""
        shown = msgspec.to_builtins(self)
        del shown["source"], shown["order"], shown["chunk"]
        return shown


class HookOutcome(msgspec.Struct):
    """What the handlers of a before event decided."""

    payload: Any
    modified: bool = False
    cancelled: bool = False
    reason: str | None = None
    plugin: str | None = None


class _Event(msgspec.Struct):
    name: str
    subject: str
    payload: Any
    about: dict[str, Any]
    depth: int


class Plugins:
    """The front's plugins: their subscriptions, and the runs that deliver events."""

    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        *,
        directory: str | Path | None = None,
        policy: Policy | None = None,
        publish: Callable[[Any], None] | None = None,
        handler_timeout_s: float = HANDLER_TIMEOUT_S,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self.directory = Path(directory).expanduser() if directory else None
        self._policy = policy or Policy()
        self._publish = publish
        self.handler_timeout_s = handler_timeout_s
        self.plugins: dict[str, Plugin] = {}
        self._order = 0
        self._by_event: dict[str, list[Subscription]] = {}
        self._globbed: list[Subscription] = []  # subscriptions whose event is a glob
        self._tool_events: list[str] = []  # (see tool_events)
        self._lanes = [
            anyio.create_memory_object_stream[_Event](MAX_QUEUED // DELIVERERS) for _ in range(DELIVERERS)
        ]
        self.dropped = 0  # notifications the full queue refused
        # the stored-script plugins loaded by request (luanette-cli plugin load HASH)
        self.remember_file: Path | None = None

    # --- loading ---------------------------------------------------------------------

    # --- stored-script plugins loaded by request, remembered across restarts ---------

    def remembered(self) -> list[str]:
        """Hashes of the stored-script plugins to load at start-up."""
        if self.remember_file is None:
            return []
        try:
            hashes = json.loads(self.remember_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.error("plugins.remembered_unreadable", file=str(self.remember_file), error=str(e))
            return []
        if not isinstance(hashes, list):
            return []
        return [h for h in hashes if isinstance(h, str) and is_hash(h)][:MAX_PLUGINS]

    def remember(self, script_hash: str) -> None:
        """Load ``script_hash`` again at the next start."""
        hashes = self.remembered()
        if script_hash not in hashes:
            self._write_remembered([*hashes, script_hash])

    def forget(self, script_hash: str) -> None:
        """Stop loading ``script_hash`` at start-up."""
        hashes = self.remembered()
        if script_hash in hashes:
            self._write_remembered([h for h in hashes if h != script_hash])

    def _write_remembered(self, hashes: list[str]) -> None:
        assert self.remember_file is not None
        # written whole and renamed: a crash leaves the old list or the new one
        tmp = self.remember_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(hashes), encoding="utf-8")
            os.replace(tmp, self.remember_file)
        except OSError as e:
            log.error("plugins.remember_failed", file=str(self.remember_file), error=str(e))

    async def load_directory(self) -> list[Plugin]:
        """Load every ``*.lua`` of the plugins directory (by name); a plugin that fails
        is recorded as failed and logged, and the others load."""
        if self.directory is None:
            return []
        try:
            files = sorted(p for p in self.directory.glob("*.lua") if p.is_file())
        except OSError as e:
            log.error("plugins.directory_unreadable", directory=str(self.directory), error=str(e))
            return []
        loaded = []
        for path in files:
            try:
                loaded.append(await self.load_file(path))
            except PluginError as e:
                log.error("plugin.load_refused", file=str(path), code=e.code, error=e.message)
        return loaded

    async def load_file(self, path: Path) -> Plugin:
        """Load (or load again) the plugin in ``path``."""
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PluginError("not_found", f"cannot read plugin {path}: {e}") from None
        return await self.load_source(source, f"file:{path}", default_name=path.stem, chunk=path.name)

    def file_named(self, name: str) -> Path:
        """The file of plugin ``name`` in the plugins directory (``not_found`` if none)."""
        if self.directory is None or not _NAME.fullmatch(name):
            raise PluginError("not_found", f"no plugin file {name!r} (the daemon has no --plugins directory)"
                              if self.directory is None else f"not a plugin name: {name!r}")
        path = self.directory / f"{name}.lua"
        if not path.is_file():
            raise PluginError("not_found", f"no plugin file {name}.lua in {self.directory}")
        return path

    async def load_source(self, source: str, origin: str, *, default_name: str, chunk: str) -> Plugin:
        """Describe and initialise a plugin.  A plugin whose describe or init fails is
        kept as failed (listed with its error) and returned; :class:`PluginError` for a
        name already loaded or too many plugins."""
        if len(self.plugins) >= MAX_PLUGINS and not any(p.origin == origin for p in self.plugins.values()):
            raise PluginError("too_many_plugins", f"at most {MAX_PLUGINS} plugins may be loaded")
        self._order += 1
        plugin = Plugin(name=default_name, origin=origin, source=source, chunk=chunk, order=self._order)
        try:
            described = await self._run(plugin, "describe", {}, capabilities=[])
            manifest = described.get("value") if described.get("found") else None
            if isinstance(manifest, dict):
                name = manifest.get("name")
                if name is not None:
                    if not isinstance(name, str) or not _NAME.fullmatch(name):
                        raise _Failed("invalid_manifest", f"describe().name must match {_NAME.pattern}, got {name!r}")
                    plugin.name = name
                if isinstance(manifest.get("description"), str):
                    plugin.description = manifest["description"]
            try:
                declared = declared_capabilities(manifest) or []
            except CapabilityError as e:
                raise _Failed("invalid_manifest", f"describe().capabilities: {e}") from None
            refused = self._policy.refused(declared, None, ["plugin"])
            if refused:
                raise _Failed("permission_denied", f"the policy does not allow {', '.join(refused)} to plugins")
            plugin.capabilities = declared
            self._check_name(plugin)
            done = await self._run(plugin, "init", {}, capabilities=declared)
            plugin.subscriptions = self._subscriptions(plugin, done)
        except _Failed as e:
            plugin.state, plugin.error = "failed", {"kind": e.kind, "message": e.message}
        except ScriptError as e:
            plugin.state, plugin.error = "failed", msgspec.to_builtins(e.detail)
        if plugin.state == "failed":
            log.error("plugin.load_failed", plugin=plugin.name, origin=origin, error=plugin.error)
            self._forget_origin(origin)
            if plugin.name in self.plugins:  # never hide a loaded plugin behind a failed one
                plugin.name = f"{plugin.name}~{plugin.order}"
            self.plugins[plugin.name] = plugin
            return plugin
        self._forget_origin(origin)
        self.plugins[plugin.name] = plugin
        self._index()
        log.info("plugin.loaded", plugin=plugin.name, origin=origin, subscriptions=len(plugin.subscriptions))
        self._emitted(plugin, done, 0)
        return plugin

    def _check_name(self, plugin: Plugin) -> None:
        known = self.plugins.get(plugin.name)
        if known is not None and known.origin != plugin.origin and known.state == "loaded":
            raise PluginError(
                "already_loaded",
                f"a plugin named {plugin.name} is loaded already (from {known.origin}); unload it first",
            )

    def _forget_origin(self, origin: str) -> None:
        for name, known in list(self.plugins.items()):
            if known.origin == origin:
                del self.plugins[name]

    def _subscriptions(self, plugin: Plugin, done: dict[str, Any]) -> list[Subscription]:
        made = _list(done.get("subscriptions"))
        if len(made) > MAX_SUBSCRIPTIONS:
            raise _Failed("too_many_subscriptions", f"init made {len(made)} subscriptions; at most {MAX_SUBSCRIPTIONS}")
        offs = set(_list(done.get("offs")))
        subscriptions = []
        for entry in made:
            try:
                sub = msgspec.convert({**entry, "plugin": plugin.name}, Subscription)
            except msgspec.ValidationError as e:
                raise _Failed("invalid_subscription", f"a subscription is malformed: {e}") from None
            if not (sub.event in EVENTS or sub.event.startswith("custom:") or _is_glob(sub.event)):
                raise _Failed(
                    "unknown_event",
                    f"ctx:on({sub.event!r}): no such event; the events are {', '.join(EVENTS)} and custom:*",
                )
            if sub.id not in offs:
                subscriptions.append(sub)
        return subscriptions

    async def unload(self, name: str, *, cleanup: bool = True) -> Plugin:
        """Remove plugin ``name`` (running its ``cleanup(ctx)`` first if it loaded)."""
        plugin = self.plugins.get(name)
        if plugin is None:
            raise PluginError("not_found", f"no plugin {name!r} is loaded")
        del self.plugins[name]
        self._index()
        if cleanup and plugin.state == "loaded":
            await self._cleanup(plugin)
        log.info("plugin.unloaded", plugin=name)
        return plugin

    async def reload(self, name: str) -> Plugin:
        """Unload plugin ``name`` and load it again from where it came from (a file is
        read again)."""
        plugin = self.plugins.get(name)
        if plugin is None:
            raise PluginError("not_found", f"no plugin {name!r} is loaded")
        await self.unload(name)
        kind, _, where = plugin.origin.partition(":")
        if kind == "file":
            return await self.load_file(Path(where))
        return await self.load_source(plugin.source, plugin.origin, default_name=plugin.name, chunk=plugin.chunk)

    async def close(self) -> None:
        """Run every loaded plugin's ``cleanup(ctx)`` (at shutdown)."""
        plugins = [p for p in self.plugins.values() if p.state == "loaded"]
        self.plugins.clear()
        self._index()
        async with anyio.create_task_group() as tg:
            for plugin in plugins:
                tg.start_soon(self._cleanup, plugin)

    async def _cleanup(self, plugin: Plugin) -> None:
        try:
            done = await self._run(plugin, "cleanup", {}, capabilities=plugin.capabilities, timeout_s=CLEANUP_TIMEOUT_S)
        except ScriptError as e:
            log.warning("plugin.cleanup_failed", plugin=plugin.name, kind=e.detail.kind, error=e.detail.message)
            return
        self._emitted(plugin, done, 0)

    def views(self) -> list[dict[str, Any]]:
        """Every plugin, loaded or failed, in load order."""
        return [p.view() for p in sorted(self.plugins.values(), key=lambda p: p.order)]

    # --- subscriptions ---------------------------------------------------------------

    def _index(self) -> None:
        by_event: dict[str, list[Subscription]] = {}
        globbed: list[Subscription] = []
        for plugin in self.plugins.values():
            if plugin.state != "loaded":
                continue
            for sub in plugin.subscriptions:
                (globbed if _is_glob(sub.event) else by_event.setdefault(sub.event, [])).append(sub)
        self._by_event, self._globbed = by_event, globbed
        self._tool_events = [event for event in TOOL_EVENTS if self.wants(event)]

    def wants(self, event: str) -> bool:
        """Whether any plugin subscribes to ``event`` (nothing else is worth doing)."""
        return event in self._by_event or any(fnmatch.fnmatchcase(event, s.event) for s in self._globbed)

    def tool_events(self) -> list[str]:
        """The tool events some plugin subscribes to (for a run's ``RunInfo``; every job
        asks, so the answer is kept from one change of the subscriptions to the next)."""
        return self._tool_events

    def _matching(self, event: str, subject: str) -> list[Subscription]:
        found = [*self._by_event.get(event, ()), *(s for s in self._globbed if fnmatch.fnmatchcase(event, s.event))]
        found = [s for s in found if s.pattern is None or fnmatch.fnmatchcase(subject, s.pattern)]
        order = {name: p.order for name, p in self.plugins.items()}
        found.sort(key=lambda s: (s.priority, order.get(s.plugin, 0), s.index))
        return found

    def _remove(self, plugin_name: str, ids: set[str]) -> None:
        plugin = self.plugins.get(plugin_name)
        if plugin is None or not ids:
            return
        plugin.subscriptions = [s for s in plugin.subscriptions if s.id not in ids]
        self._index()

    # --- delivery --------------------------------------------------------------------

    async def before(self, event: str, subject: str, payload: Any, about: dict[str, Any] | None = None) -> HookOutcome:
        """Run the handlers of a before event in priority order: each sees the payload
        as the earlier ones left it; the first ``cancel`` ends it."""
        outcome = HookOutcome(payload)
        for sub in self._matching(event, subject):
            result = await self._deliver(sub, _Event(event, subject, outcome.payload, about or {}, 0))
            if not isinstance(result, dict):
                continue
            kind = result.get("type")
            if kind == "cancel":
                reason = result.get("reason")
                outcome.cancelled, outcome.plugin = True, sub.plugin
                outcome.reason = reason if isinstance(reason, str) else f"cancelled by plugin {sub.plugin}"
                return outcome
            if kind == "continue_modified":
                outcome.payload, outcome.modified = _normal(result.get("payload")), True
        return outcome

    def notify(
        self, event: str, subject: str, payload: Any, about: dict[str, Any] | None = None, *, depth: int = 0
    ) -> None:
        """Queue a notification for delivery (custom events are broadcast too); dropped,
        counted and logged when the queue is full."""
        if event.startswith("custom:") and self._publish is not None:
            self._publish(t.CustomEvent(name=event, subject=subject, payload=payload))
        if not self.wants(event):
            return
        try:
            lane = self._lanes[zlib.crc32(subject.encode("utf-8", "replace")) % DELIVERERS][0]
            lane.send_nowait(_Event(event, subject, payload, about or {}, depth))
        except anyio.WouldBlock:
            self.dropped += 1
            log.warning("plugin.event_dropped", hook_event=event, queued=MAX_QUEUED, dropped=self.dropped)

    async def serve(self) -> None:
        """Deliver notifications until cancelled."""
        async with anyio.create_task_group() as tg:
            for _, receive in self._lanes:
                tg.start_soon(self._deliverer, receive)

    async def _deliverer(self, receive: Any) -> None:
        async for event in receive:
            for sub in self._matching(event.name, event.subject):
                result = await self._deliver(sub, event)
                if isinstance(result, dict) and result.get("type") in ("cancel", "continue_modified"):
                    log.warning("plugin.result_ignored", plugin=sub.plugin, hook_event=event.name,
                                reason="only before events may be cancelled or modified")  # fmt: skip

    async def call(self, args: list[Any]) -> dict[str, Any]:
        """A worker's service call: ``["tool:before", name, args]``."""
        event, name, arguments = args
        if event != "tool:before":
            raise ValueError(f"not a before event: {event!r}")
        outcome = await self.before("tool:before", str(name), arguments, {"name": name, "args": arguments})
        if outcome.cancelled:
            return {"cancel": True, "reason": outcome.reason}
        if outcome.modified:
            return {"args": _list(outcome.payload)}
        return {}

    def note(self, data: list[Any]) -> None:
        """A worker's note: ``[event, subject, payload]`` of an after or custom event."""
        event, subject, payload = data
        if not isinstance(event, str) or not (event in TOOL_EVENTS or event.startswith("custom:")):
            return
        self.notify(event, str(subject), payload, _about(event, str(subject), payload))

    async def _deliver(self, sub: Subscription, event: _Event) -> Any:
        """One handler run: its result table, or None when it failed (logged)."""
        plugin = self.plugins.get(sub.plugin)
        if plugin is None or plugin.state != "loaded":
            return None
        if sub.once:
            self._remove(sub.plugin, {sub.id})
        table = {**event.about, "type": event.name, "subject": event.subject, "payload": event.payload}
        try:
            done = await self._run(
                plugin, "deliver", {"index": sub.index, "event": table}, capabilities=plugin.capabilities,
                timeout_s=self.handler_timeout_s,
            )
        except ScriptError as e:
            sub.failed += 1
            log.warning("plugin.handler_skipped", plugin=sub.plugin, subscription=sub.id, hook_event=event.name,
                        kind=e.detail.kind, error=e.detail.message)  # fmt: skip
            return None
        sub.delivered += 1
        self._remove(sub.plugin, set(_list(done.get("offs"))))
        self._emitted(plugin, done, event.depth + 1 if event.name.startswith("custom:") else 1)
        return done.get("result")

    def _emitted(self, plugin: Plugin, done: dict[str, Any], depth: int) -> None:
        emits = _list(done.get("emits"))
        if len(emits) > MAX_EMITS:
            log.warning("plugin.emits_dropped", plugin=plugin.name, emitted=len(emits), limit=MAX_EMITS)
            emits = emits[:MAX_EMITS]
        for emit in emits:
            if not isinstance(emit, dict):
                continue
            try:
                name = custom_name(emit.get("name"))
            except Exception as e:
                log.warning("plugin.bad_emit", plugin=plugin.name, error=str(e))
                continue
            if depth > MAX_EMIT_DEPTH:
                log.warning("plugin.emit_depth_exceeded", plugin=plugin.name, hook_event=name, limit=MAX_EMIT_DEPTH)
                continue
            payload = bounded(emit.get("payload"))
            self.notify(name, plugin.name, payload, {"name": name}, depth=depth)

    async def _run(
        self, plugin: Plugin, op: str, extra: dict[str, Any], *, capabilities: list[str],
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        limits = self._limits if timeout_s is None else msgspec.structs.replace(self._limits, timeout_s=timeout_s)
        params = {"source": plugin.source, "chunk": plugin.chunk, "plugin": plugin.name, "op": op,
                  "what": "plugin", "now": int(time.time() * 1000), **extra}  # fmt: skip
        outcome = await self._engine.run(
            DRIVER,
            params,
            limits=limits,
            info=RunInfo("plugin", capabilities=capabilities, user=f"plugin:{plugin.name}"),
            cancel=CancelToken(),
            hooks=RunHooks(lambda: log.bind(plugin=plugin.name, op=op)),
            chunk_name="plugin",
        )
        result = outcome.result
        return result if isinstance(result, dict) else {}


class _Failed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _is_glob(event: str) -> bool:
    return any(c in event for c in "*?[")


def _list(value: Any) -> list[Any]:
    # an empty Lua table arrives as {} (no way to tell an empty array from an empty map)
    return list(value) if isinstance(value, list) else []


def _normal(value: Any) -> Any:
    return [] if isinstance(value, dict) and not value else value


def _about(event: str, subject: str, payload: Any) -> dict[str, Any]:
    """The event's own fields next to ``type``, ``subject`` and ``payload`` (seed 004's
    ``tool:after {name, result}`` and the like)."""
    if event in TOOL_EVENTS and isinstance(payload, dict):
        return {"name": subject, **{k: payload[k] for k in ("args", "result", "error") if k in payload}}
    return {"name": event}


def is_hash(text: str) -> bool:
    """Whether ``text`` is a stored script's hash (32 lowercase hex)."""
    return bool(_HASH.fullmatch(text))
