"""The Lua API reference, read off the namespaces a run really gets.

``lua://namespaces`` and the prompts describe the Lua API to AI clients.  Written by
hand, such a reference drifts from the code; so it is built here from the same
:func:`luanette.stdlib.registry.namespaces_for` a worker calls for each run, over a
:class:`~luanette.stdlib.registry.Toolbox` made the way a worker makes its own (with
the worker's proxies of the front's services, which are never called: building a run's
function table calls nothing).  A namespace added to the registry appears here with no
further edit; its documentation is its module's docstring and its functions' own.
"""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import math
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from luanette.capabilities import FUNCTION_NEEDS, NAMESPACE_NEEDS
from luanette.cas import Cas
from luanette.engine.api import CancelToken, Limits, Namespace, RunContext
from luanette.settings import Settings
from luanette.stdlib.registry import KINDS, Toolbox, namespaces_for

RUN_KINDS: Final = tuple(kind for kind in KINDS if kind != "describe")
"""Kinds of run whose globals are documented (``describe`` gets none)."""

_FS_GRANTS: Final = ("fs.read:*:**", "fs.write:*:**")  # to see fs's functions (it is only ever declared)


class Function(msgspec.Struct, frozen=True):
    """One function of a namespace as a script calls it."""

    name: str
    kind: str
    """``sync`` (returns at once), ``async`` (the script waits, other work goes on) or
    ``lua`` (defined in the namespace's Lua half)."""
    doc: str | None = None
    needs: str | None = None
    """The capability a call needs beyond the namespace's presence, if any."""


class NamespaceDoc(msgspec.Struct, frozen=True):
    """One Lua global of the stdlib."""

    name: str
    summary: str
    doc: str
    runs: list[str]
    """Kinds of run that get it: ``eval`` (lua_eval) and/or ``job`` (job_execute)."""
    needs: list[str]
    """Capabilities of which any one makes it present (empty: always present)."""
    functions: list[Function]


class Reference:
    """The namespaces of every kind of run, by name, sorted."""

    def __init__(self, namespaces: Mapping[str, NamespaceDoc]) -> None:
        self.namespaces = dict(sorted(namespaces.items()))

    def names(self) -> list[str]:
        """The namespace names, sorted."""
        return list(self.namespaces)

    def get(self, name: str) -> NamespaceDoc | None:
        """One namespace, or None."""
        return self.namespaces.get(name)

    def summary(self) -> list[dict[str, Any]]:
        """Per namespace its name, one-line summary, run kinds and function names."""
        return [
            {"name": ns.name, "summary": ns.summary, "runs": ns.runs, "functions": [f.name for f in ns.functions]}
            for ns in self.namespaces.values()
        ]


def build(settings: Settings, cas: Cas) -> Reference:
    """The reference for a daemon with ``settings`` and ``cas`` (which decide, e.g.,
    which backends the model namespaces route to)."""
    toolbox = _toolbox(settings, cas)
    run = RunContext(run_id="reference", limits=Limits(), cancel=CancelToken(), deadline=math.inf)
    found: dict[str, dict[str, Any]] = {}
    for kind in RUN_KINDS:
        runset = namespaces_for(kind, toolbox, capabilities=None)
        granted = namespaces_for(kind, toolbox, capabilities=list(_FS_GRANTS))
        try:
            namespaces = runset.namespaces + [ns for ns in granted.namespaces if ns.name == "fs"]
            for namespace in namespaces:
                entry = found.get(namespace.name)
                if entry is None:
                    entry = found[namespace.name] = {"namespace": namespace, "runs": [], "functions": {}}
                entry["runs"].append(kind)
                for name, fn in namespace.functions(run).items():
                    entry["functions"].setdefault(name, fn)
        finally:
            runset.close()
            granted.close()
    return Reference({name: _document(name, entry) for name, entry in found.items()})


def _toolbox(settings: Settings, cas: Cas) -> Toolbox:
    # mirrors Worker.__init__: the same classes, so the same function tables
    from luanette.engine.worker import RemoteBackends, RemoteGarden, RemoteMetrics, RemoteSessions
    from luanette.stdlib.garden import GardenNamespace
    from luanette.stdlib.models import model_namespaces

    def nobody() -> None:
        return None

    backends = RemoteBackends(None, dict(settings.backends), nobody)  # type: ignore[arg-type]
    return Toolbox(
        cas=cas,
        temp_root=Path(tempfile.gettempdir()),  # never made: a run makes its directory on first use
        models=model_namespaces(backends, cas, settings.models),  # type: ignore[arg-type]
        garden=GardenNamespace(RemoteGarden(None, settings.garden, nobody)),  # type: ignore[arg-type]
        metrics=RemoteMetrics(lambda message: None),
        fs_roots=settings.fs_roots(),
        sessions=RemoteSessions(None, nobody),  # type: ignore[arg-type]
    )


def _document(name: str, entry: dict[str, Any]) -> NamespaceDoc:
    namespace: Namespace = entry["namespace"]
    doc, summary = _namespace_doc(namespace)
    needs_of = FUNCTION_NEEDS.get(name, {})
    functions = [
        Function(fname, "async" if _is_async(fn) else "sync", _doc_of(fn), needs_of.get(fname, needs_of.get("*")))
        for fname, fn in entry["functions"].items()
        if not fname.startswith("_")  # a prelude's private halves (it removes them before the script)
    ]
    have = {f.name for f in functions}
    lua_half = _prelude_functions(namespace) + (_sandbox_core_functions() if name == "core" else [])
    functions += [Function(fname, "lua") for fname in sorted(set(lua_half)) if fname not in have]
    return NamespaceDoc(
        name=name,
        summary=summary,
        doc=doc,
        runs=entry["runs"],
        needs=list(NAMESPACE_NEEDS.get(name, ())),
        functions=sorted(functions, key=lambda f: f.name),
    )


def _is_async(fn: Callable[..., Any]) -> bool:
    while True:
        if inspect.iscoroutinefunction(fn):
            return True
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            return False
        fn = inner


def _doc_of(fn: Callable[..., Any]) -> str | None:
    doc = inspect.getdoc(fn)
    if not doc or doc == inspect.getdoc(type(fn)):  # a callable object's class doc says nothing of the call
        return None
    return doc


def _documented(namespace: Any) -> Any:
    # a run's garden and on_error wrappers hold the namespace that documents the API
    for _ in range(8):
        inner = getattr(namespace, "_inner", None) or getattr(namespace, "_garden", None)
        if inner is None or not hasattr(inner, "functions"):
            break
        namespace = inner
    return namespace


def _namespace_doc(namespace: Namespace) -> tuple[str, str]:
    """The documentation of a namespace and its one-line summary."""
    # the namespace's module documents its Lua API (the class mostly how it is built)
    namespace = _documented(namespace)
    module = sys.modules.get(type(namespace).__module__) or importlib.import_module(type(namespace).__module__)
    module_doc = inspect.cleandoc(module.__doc__ or "")
    class_doc = inspect.getdoc(type(namespace)) or ""
    doc = module_doc if class_doc in module_doc else f"{module_doc}\n\n{class_doc}".strip()
    name = namespace.name
    # a module that serves several namespaces may speak of another: then the class says it
    for candidate in (module_doc, class_doc):
        first = candidate.split("\n\n", 1)[0].replace("\n", " ").strip()
        if name in first:
            return doc, re.sub(r"^The `\w+` namespace:\s*", "", first)
    return doc, f"the {name} namespace"


def _prelude_functions(namespace: Namespace) -> list[str]:
    prelude = getattr(namespace, "lua_prelude", None)
    if not prelude:
        return []
    text = prelude.decode() if isinstance(prelude, bytes) else str(prelude)
    alias = re.match(r"\s*local\s+(\w+)", text)
    if alias is None:
        return []
    me = re.escape(alias.group(1))
    pattern = re.compile(rf"^\s*(?:function\s+{me}\.(\w+)\s*\(|{me}\.(\w+)\s*=\s*function\b)", re.M)
    return sorted({a or b for a, b in pattern.findall(text)})


def _sandbox_core_functions() -> list[str]:
    # `core` is the sandbox's own table (luanette/engine/sandbox.lua), which the session
    # functions join; its Lua functions are read off the lines that set them
    source = (importlib.resources.files("luanette.engine") / "sandbox.lua").read_text()
    names: set[str] = set()
    for line in source.splitlines():
        if line.startswith("core.") and "=" in line:
            names.update(re.findall(r"core\.(\w+)", line.split("=", 1)[0]))
    return sorted(names)
