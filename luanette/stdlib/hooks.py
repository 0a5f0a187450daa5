"""The `hooks` namespace: a script's side of the plugin hooks (docs/plugins.md).

- ``hooks.emit(name, payload)``: fire the custom event ``name`` (``custom:`` is added
  when missing) with ``payload``; the handlers plugins subscribed to it run in the
  daemon after this call returns (a notification: the script does not wait for them),
  and subscribers of the PUB socket get a ``custom_event`` broadcast.  Returns nil.

The tool events (``tool:before``, ``tool:after``, ``tool:error``) need nothing from a
script: when a plugin subscribes to one, every async namespace call of a job or eval
reports it (see :class:`Hooked`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

import msgspec

from luanette.engine.api import LuaCallError, Namespace, RunContext

MAX_NAME: Final = 128
"""Longest custom event name."""
MAX_PAYLOAD_BYTES: Final = 64 * 2**10
"""Largest payload an event carries (MessagePack); a larger one is replaced by
``{omitted = true, size_bytes = N}``."""
UNHOOKED: Final = frozenset({"hooks", "log", "clock", "json", "otel", "context", "progress", "job", "core"})
"""Namespaces whose calls are not tool events: bookkeeping, not tools."""

_encoder = msgspec.msgpack.Encoder()


class HookService(Protocol):
    """The front's hook manager as a worker reaches it (luanette.engine.worker)."""

    async def before(self, name: str, args: list[Any]) -> dict[str, Any]:
        """Run the ``tool:before`` handlers: ``{cancel, reason}`` or ``{args}``."""
        ...

    def notify(self, event: str, subject: str, payload: Any) -> None:
        """Fire-and-forget: an after event (or a custom one) for the front to deliver."""
        ...


def bounded(payload: Any) -> Any:
    """``payload``, or a marker of its size when it is over :data:`MAX_PAYLOAD_BYTES`
    (or cannot be encoded at all)."""
    try:
        size = len(_encoder.encode(payload))
    except (TypeError, ValueError, OverflowError):
        return {"omitted": True, "reason": "not encodable"}
    if size > MAX_PAYLOAD_BYTES:
        return {"omitted": True, "size_bytes": size}
    return payload


def custom_name(name: Any) -> str:
    """A custom event's full name (``custom:`` prefixed); LuaCallError for a bad one."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise LuaCallError(f"an event name is a string of 1 to {MAX_NAME} characters, got {name!r}")
    return name if name.startswith("custom:") else f"custom:{name}"


class HooksNamespace:
    """Lua global `hooks` (jobs and evals)."""

    name = "hooks"

    def __init__(self, service: HookService | None, source: str) -> None:
        self._service = service
        self._source = source  # the subject of its custom events: the script's name

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        def emit(name: Any, payload: Any = None) -> None:
            """Fire the custom event ``name`` with ``payload`` (plugins' handlers run after)."""
            full = custom_name(name)
            if self._service is not None:
                self._service.notify(full, self._source, bounded(payload))

        return {"emit": emit}


class Hooked:
    """A namespace whose async calls report the tool events plugins subscribe to."""

    def __init__(self, inner: Namespace, service: HookService, events: Sequence[str]) -> None:
        self._inner = inner
        self._service = service
        self._events = frozenset(events)
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        # what the engine reads of a namespace besides its functions (lua_prelude, ...)
        if name == "_inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return _HookedFunctions(self._inner.functions(run), self)

    def wrap(self, qualname: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` with its tool events, when it is async (a sync call is not a tool)."""
        if not inspect.iscoroutinefunction(call):
            return call
        service, events = self._service, self._events

        async def hooked(*args: Any) -> Any:
            arguments = list(args)
            if "tool:before" in events:
                decision = await service.before(qualname, bounded(arguments))
                if decision.get("cancel"):
                    raise LuaCallError(f"cancelled_by_hook: {decision.get('reason') or 'a plugin cancelled the call'}")
                if isinstance(decision.get("args"), list):
                    arguments = decision["args"]
            try:
                result = await call(*arguments)
            except Exception as exc:
                if "tool:error" in events:
                    message = exc.message if isinstance(exc, LuaCallError) else type(exc).__name__
                    service.notify("tool:error", qualname, {"args": bounded(arguments), "error": message})
                raise
            if "tool:after" in events:
                service.notify("tool:after", qualname, {"args": bounded(arguments), "result": bounded(result)})
            return result

        # the engine checks a call's arguments against what inspect.signature finds
        hooked.__wrapped__ = call  # type: ignore[attr-defined]
        return hooked


class _HookedFunctions(Mapping[str, Callable[..., Any]]):
    def __init__(self, calls: Mapping[str, Callable[..., Any]], owner: Hooked) -> None:
        self._calls = calls
        self._owner = owner
        self._wrapped: dict[str, Callable[..., Any]] = {}

    def __getitem__(self, name: str) -> Callable[..., Any]:
        found = self._wrapped.get(name)
        if found is None:
            found = self._wrapped[name] = self._owner.wrap(f"{self._owner.name}.{name}", self._calls[name])
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)


def hooked(namespaces: Sequence[Namespace], service: HookService, events: Sequence[str]) -> list[Namespace]:
    """``namespaces`` with the tool namespaces wrapped to report ``events``."""
    return [ns if ns.name in UNHOOKED else Hooked(ns, service, events) for ns in namespaces]
