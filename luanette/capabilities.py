"""What a script may touch: seed 003's capabilities, and the policy that grants them.

A script declares what it needs in ``describe().capabilities`` as ``name`` or
``name:scope`` strings (``model:orpheus``, ``garden.write``, ``fs.read:samples:drums/*``,
``net.http.client:llm``). A run gets only the namespaces its grants reach; a call
outside a granted scope fails with a Lua error ``permission_denied: ...`` naming the
capability it needed. ``[policy]`` in the config file says what scripts may declare at
all (per creator or tag), what a script that declares nothing gets, and what
``lua_eval`` gets.

The tables below are the whole mapping from capabilities to namespaces and functions:
data, read top to bottom, one small function per check (as Redis's ``script_lua.c``
keeps its allow lists).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import msgspec

from luanette.engine.api import LuaCallError, Namespace, RunContext
from luanette.stdlib.fs import check_glob

# --- the tables ------------------------------------------------------------------------

ALWAYS: Final = frozenset(
    {"log", "clock", "json", "otel", "progress", "context", "job", "core", "hootenanny", "hooks", "pipeline", "flow"}
)
"""Namespaces every run gets, declared or not (seed 003's always-available modules, with
our clock, otel, progress and job; ``params``/``args`` and ``require`` are not namespaces).
``hootenanny`` (the upstream tool bridge, luanette.stdlib.upstream) only forwards to
other namespaces, so what it reaches is what the run was granted; so does ``pipeline``
(its steps call the script's own llm/orpheus/musicgen/cas/midi, and its one direct call,
a streamed LLM answer, is gated as ``model:llm`` by CALL_SCOPE).  ``flow`` only asks the
front to move flows any client may move over the socket; their handlers run with the
defining module's capabilities, never the caller's (luanette.flows)."""

SCOPED: Final = frozenset({"model", "fs.read", "fs.write", "net.http.client"})
"""Capabilities that take a scope (``name:scope``); a missing scope means ``*``."""

PLAIN: Final = frozenset({"garden.read", "garden.write", "cas.read", "cas.write", "midi", "abc", "audio", "temp"})
"""Capabilities without a scope.  ``abc`` and ``audio`` (upstream's namespaces) are like
``midi``: the namespace reads and writes its own files in the CAS and the temp directory
(its CAS writes count against the run's quota), so it needs neither cas.* nor temp."""

GROUP_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A worker group's name (``describe().group``, a trigger's ``group``, ``luanette worker
--group``): the pool sends a run of a group only to that group's workers."""

MODEL_NAMESPACES: Final = frozenset({"orpheus", "musicgen", "llm"})
"""Namespaces granted by ``model:<name>`` (``model:*`` grants them all)."""

NAMESPACE_NEEDS: Final[Mapping[str, tuple[str, ...]]] = {
    # a namespace is present when any one of these is granted
    "cas": ("cas.read", "cas.write"),
    "garden": ("garden.read", "garden.write"),
    "midi": ("midi",),
    "abc": ("abc",),
    "audio": ("audio",),
    "temp": ("temp",),
    "fs": ("fs.read", "fs.write"),
    "backend": ("net.http.client",),
}

FUNCTION_NEEDS: Final[Mapping[str, Mapping[str, str]]] = {
    # per function, the capability a call needs ("*": every other function)
    "cas": {"store": "cas.write", "store_file": "cas.write", "*": "cas.read"},
    "garden": {
        name: "garden.write"
        for name in (
            "play", "pause", "stop", "seek", "set_tempo", "create_region", "delete_region", "move_region",
            "latent_started", "latent_progress", "latent_resolved", "latent_failed", "approve", "reject",
        )
    }  # fmt: skip
    | {"*": "garden.read"},
}

CALL_SCOPE: Final[Mapping[tuple[str, str], tuple[str, int]]] = {
    # functions whose argument N names the scope they touch: (capability, argument index)
    ("backend", "call"): ("net.http.client", 0),
    # a streamed LLM step of a pipeline (luanette.stdlib.pipeline): the scope is "llm"
    ("pipeline", "_stream"): ("model", 0),
}

LEGACY: Final = (
    "model:*", "garden.read", "garden.write", "cas.read", "cas.write", "net.http.client:*", "midi", "temp",
    "abc", "audio",
)  # fmt: skip
"""What a job of a script that declares nothing gets by default: every namespace jobs had
before capabilities (so today's examples run unchanged), and upstream's abc and audio;
not ``fs``."""

EVAL_DEFAULT: Final = LEGACY
"""What ``lua_eval`` gets by default: the job stdlib (upstream's eval had all of it);
``[policy] eval`` narrows it."""


class CapabilityError(ValueError):
    """A capability string that is not one (unknown name, missing or stray scope)."""


# --- capabilities ------------------------------------------------------------------------


class Capability(msgspec.Struct, frozen=True):
    """One capability: ``name`` and an optional ``scope`` glob."""

    name: str
    scope: str | None = None

    def __str__(self) -> str:
        return self.name if self.scope is None else f"{self.name}:{self.scope}"

    def covers(self, name: str, target: str | None) -> bool:
        """Whether this grants ``name`` on ``target`` (None: on anything at all)."""
        if self.name != name:
            return False
        if self.scope is None or self.scope in ("*", "**"):
            return True
        return target is not None and fnmatch.fnmatchcase(target, self.scope)


def parse(text: Any) -> Capability:
    """A capability from its string form; :class:`CapabilityError` says what is wrong."""
    if not isinstance(text, str) or not text:
        raise CapabilityError(f"a capability is a non-empty string, got {text!r}")
    name, sep, scope = text.partition(":")
    if name in SCOPED:
        if name in ("fs.read", "fs.write") and scope:
            try:
                check_glob(scope)
            except ValueError as e:
                raise CapabilityError(f"{text!r}: {e}") from None
        return Capability(name, scope if sep and scope else None)
    if name in PLAIN:
        if sep:
            raise CapabilityError(f"{name!r} takes no scope, got {text!r}")
        return Capability(name)
    known = ", ".join(sorted(SCOPED | PLAIN))
    raise CapabilityError(f"unknown capability {text!r}; known: {known}")


class Grants(msgspec.Struct, frozen=True):
    """The capabilities a run has."""

    capabilities: tuple[Capability, ...] = ()

    @classmethod
    def of(cls, texts: Iterable[str]) -> Grants:
        """Grants from capability strings (:class:`CapabilityError` for a bad one)."""
        return _grants_of(tuple(texts)) if cls is Grants else cls(tuple(parse(text) for text in texts))

    def texts(self) -> list[str]:
        return [str(c) for c in self.capabilities]

    def allows(self, name: str, target: str | None = None) -> bool:
        """Whether ``name`` is granted on ``target``."""
        return any(c.covers(name, target) for c in self.capabilities)

    def has(self, name: str) -> bool:
        """Whether ``name`` is granted with any scope."""
        return any(c.name == name for c in self.capabilities)

    def scopes(self, name: str) -> list[str]:
        """The scopes ``name`` is granted with (``*`` for an unscoped grant)."""
        return [c.scope or "*" for c in self.capabilities if c.name == name]


@functools.lru_cache(maxsize=256)
def _grants_of(texts: tuple[str, ...]) -> Grants:
    # every run parses its grants, and a daemon's scripts declare a few distinct lists
    return Grants(tuple(parse(text) for text in texts))


# --- which namespaces, which calls -------------------------------------------------------


def admits(grants: Grants, namespace: str) -> bool:
    """Whether a run with ``grants`` gets the namespace called ``namespace``."""
    if namespace in ALWAYS:
        return True
    if namespace in MODEL_NAMESPACES:
        return grants.allows("model", namespace)
    return any(grants.has(need) for need in NAMESPACE_NEEDS.get(namespace, ()))


def _denied(needed: str, grants: Grants) -> LuaCallError:
    name = needed.partition(":")[0]
    held = grants.scopes(name)
    having = f" (this script has {', '.join(f'{name}:{s}' for s in held)})" if held else ""
    return LuaCallError(
        f"permission_denied: {needed} is not granted{having}; declare it in describe().capabilities"
    )


def _check_call(grants: Grants, namespace: str, function: str, args: tuple[Any, ...]) -> None:
    needs = FUNCTION_NEEDS.get(namespace)
    if needs is not None:
        needed = needs.get(function, needs.get("*"))
        if needed is not None and not grants.allows(needed):
            raise _denied(needed, grants)
    scoped = CALL_SCOPE.get((namespace, function))
    if scoped is not None:
        capability, index = scoped
        target = args[index] if len(args) > index and isinstance(args[index], str) else None
        if not grants.allows(capability, target):
            raise _denied(f"{capability}:{target if target is not None else '?'}", grants)


def _gated(grants: Grants, namespace: str, function: str, call: Callable[..., Any]) -> Callable[..., Any]:
    # __wrapped__: the engine checks a call's arguments against the signature of what it
    # calls (inspect.signature follows it); without it every gated call would accept any
    # arguments and fail inside as an internal error.  (Not functools.wraps: that copies
    # half a dozen attributes, for every function of every gated namespace of every run.)
    if inspect.iscoroutinefunction(call):

        async def checked_async(*args: Any) -> Any:
            _check_call(grants, namespace, function, args)
            return await call(*args)

        checked_async.__wrapped__ = call  # type: ignore[attr-defined]
        return checked_async

    def checked(*args: Any) -> Any:
        _check_call(grants, namespace, function, args)
        return call(*args)

    checked.__wrapped__ = call  # type: ignore[attr-defined]
    return checked


class Gated:
    """A namespace whose calls are checked against a run's grants (the calls that need
    no more than the namespace's presence are passed through untouched)."""

    def __init__(self, inner: Namespace, grants: Grants) -> None:
        self._inner = inner
        self._grants = grants
        self.name = inner.name
        prelude = getattr(inner, "lua_prelude", None)
        if prelude is not None:
            self.lua_prelude = prelude
            self.lua_prelude_lazy = getattr(inner, "lua_prelude_lazy", False)

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return _GatedFunctions(self._inner.functions(run), self._grants, self.name)


class _GatedFunctions(Mapping[str, Callable[..., Any]]):
    """A namespace's functions, each gated when it is first asked for (a run calls few of
    the forty-odd functions it could)."""

    def __init__(self, calls: Mapping[str, Callable[..., Any]], grants: Grants, namespace: str) -> None:
        self._calls = calls
        self._grants = grants
        self._namespace = namespace
        self._gated: dict[str, Callable[..., Any]] = {}

    def __getitem__(self, name: str) -> Callable[..., Any]:
        gated = self._gated.get(name)
        if gated is None:
            gated = self._gated[name] = _gated(self._grants, self._namespace, name, self._calls[name])
        return gated

    def __iter__(self) -> Iterator[str]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)


def namespaces(candidates: Sequence[Namespace], grants: Grants) -> list[Namespace]:
    """The namespaces of a run with ``grants``: the ones it is admitted to, gated where
    their functions need more than presence."""
    chosen: list[Namespace] = []
    plan = _plan(grants, tuple(namespace.name for namespace in candidates))
    for namespace, (admitted, gated) in zip(candidates, plan, strict=True):
        if admitted:
            chosen.append(Gated(namespace, grants) if gated else namespace)
    return chosen


@functools.lru_cache(maxsize=256)
def _plan(grants: Grants, names: tuple[str, ...]) -> tuple[tuple[bool, bool], ...]:
    # (admitted, gated) per namespace: every run asks, with one of a few grants
    return tuple(
        (admits(grants, name), name in FUNCTION_NEEDS or any(ns == name for ns, _ in CALL_SCOPE)) for name in names
    )


# --- policy ---------------------------------------------------------------------------


class RolePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[policy.creators.NAME]`` or ``[policy.tags.TAG]``: more that scripts of that
    creator or tag may declare."""

    allowed: list[str] = []


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[policy]``: what scripts may declare, get by default, and what ``lua_eval`` gets."""

    allowed: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """What any script may declare (``*``: anything)."""
    default: list[str] = msgspec.field(default_factory=lambda: list(LEGACY))
    """What a job of a script that declares no capabilities gets."""
    eval: list[str] = msgspec.field(default_factory=lambda: list(EVAL_DEFAULT))
    """What ``lua_eval`` gets."""
    creators: dict[str, RolePolicy] = {}
    tags: dict[str, RolePolicy] = {}

    def check(self) -> None:
        """:class:`CapabilityError` for any capability string in the policy that is not one."""
        for text in [*self.default, *self.eval]:
            parse(text)
        for text in [*self.allowed, *(t for r in [*self.creators.values(), *self.tags.values()] for t in r.allowed)]:
            if text != "*":
                parse(text)

    def refused(self, declared: Sequence[str], creator: str | None, tags: Sequence[str]) -> list[str]:
        """The declared capabilities this policy does not let a script of ``creator``
        with ``tags`` have (empty: all are allowed)."""
        allowed = list(self.allowed)
        if creator is not None and creator in self.creators:
            allowed += self.creators[creator].allowed
        for tag in tags:
            if tag in self.tags:
                allowed += self.tags[tag].allowed
        if "*" in allowed:
            return []
        permitted = [parse(text) for text in allowed]
        return [text for text in declared if not _permitted(parse(text), permitted)]

    def grants_for(self, declared: Sequence[str] | None) -> Grants:
        """A job's grants: what it declared, else the policy's default."""
        return Grants.of(self.default if declared is None else declared)

    def eval_grants(self) -> Grants:
        return Grants.of(self.eval)


def permitted(wanted: Capability, permitted: Sequence[Capability]) -> bool:
    """Whether ``wanted`` is within one of ``permitted`` (also: whether a worker that
    offers ``permitted`` may run a script granted ``wanted``, luanette.engine.pool)."""
    return _permitted(wanted, permitted)


def _permitted(wanted: Capability, permitted: Sequence[Capability]) -> bool:
    # a declared scope is permitted when a permitted capability of the same name has no
    # scope, or its glob matches the declared scope taken literally
    return any(
        p.name == wanted.name
        and (p.scope in (None, "*", "**") or (wanted.scope is not None and fnmatch.fnmatchcase(wanted.scope, p.scope)))
        for p in permitted
    )


def declared_capabilities(described: Any) -> list[str] | None:
    """``describe().capabilities`` of a script (None when it declares none);
    :class:`CapabilityError` for a declaration that is not a list of capabilities."""
    value = manifest_list(described, "capabilities", CapabilityError)
    for text in value or ():
        parse(text)
    return value


def manifest_list(described: Any, key: str, error: type[ValueError] = ValueError) -> list[Any] | None:
    """``describe()[key]`` as a list (an empty Lua table reads as ``{}``: an empty list);
    None when absent; ``error`` when it is not a list."""
    if not isinstance(described, dict) or key not in described:
        return None
    value = described[key]
    if isinstance(value, dict) and not value:
        return []
    if not isinstance(value, list):
        raise error(f"describe().{key} must be a list, got {type(value).__name__}")
    return list(value)
