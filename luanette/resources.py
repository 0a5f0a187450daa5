"""Resources: read-only context for AI clients, addressed by ``lua://`` URIs.

Seed 000's resources, served over ZeroMQ by ``list_resources`` and ``read_resource``
(and, through the same calls, by an MCP server):

===============================  ==================  ==========================================
URI                              MIME type           content
===============================  ==================  ==========================================
``lua://namespaces``             application/json    the Lua stdlib: each namespace, its summary
``lua://namespaces/{name}``      application/json    one namespace: docs, functions (sync/async)
``lua://examples``               application/json    the bundled example scripts
``lua://examples/{name}``        text/x-lua          one example's source
``lua://scripts/{hash}``         text/x-lua + JSON   a stored script's source and its describe()
``lua://jobs``                   application/json    recent jobs (JobInfo), newest first
``lua://jobs/{id}``              application/json    one job (JobInfo)
``lua://jobs/stats``             application/json    job counts by state; queue depth, oldest wait; pool
``lua://tools``                  application/json    the requests the daemon serves (list_tools)
``lua://plugins``                application/json    the plugins, loaded or failed with their error
``lua://workers``                application/json    the Lua workers (local and remote) and the pool's counts
===============================  ==================  ==========================================

``luanette://jobs/stats`` is the older name of the job counts; the dispatcher keeps
answering it in its old shape (the bare counts).

Who may read what: a resource shows exactly what the matching request shows the same
caller (``job_status``, ``job_list``, ``lua_describe``, ``list_tools``): every client
that may connect may read jobs and scripts (docs/security.md), so a resource grants
nothing more.  No resource carries a host path: examples are named, not located; CAS
errors are reworded here.
"""

from __future__ import annotations

import builtins
import importlib.resources
import re
from collections.abc import Callable
from importlib.resources.abc import Traversable
from typing import Any, Final

import msgspec

from hooteproto import types as t
from hooteproto.results import ResourceContent, ResourceInfo, ResourceRead
from luanette import poolview
from luanette.apiref import Reference
from luanette.errors import RequestError
from luanette.jobs import JobError, Jobs
from luanette.scripts import Scripts

MAX_RESOURCE_BYTES: Final = 4 * 2**20
"""The largest read: the sum of a reply's texts (UTF-8). Past it, ``too_large``."""
MAX_LISTED_JOBS: Final = 100
"""Jobs in ``lua://jobs`` (the newest)."""
MAX_URI_LENGTH: Final = 2048

JSON: Final = "application/json"
LUA: Final = "text/x-lua"

_EXAMPLE_NAME: Final = re.compile(r"(?:modules/)?[A-Za-z0-9_][A-Za-z0-9_-]*")
_encoder = msgspec.json.Encoder()


class ResourceError(RequestError):
    """A read that cannot be answered."""


def _resource(name: str, description: str, mime_type: str, **where: str) -> ResourceInfo:
    """A resource (``uri=``) or a family of them (``uri_template=``)."""
    return ResourceInfo(name=name, description=description, mime_type=mime_type, **where)


STATIC: Final = (
    _resource("namespaces", "The Lua standard library: every namespace a script can use, with a one-line summary, "
         "which kinds of run get it and its function names.", JSON, uri="lua://namespaces"),
    _resource("examples", "Example Lua scripts bundled with Luanette, with what each shows.", JSON,
         uri="lua://examples"),
    _resource("jobs", f"The {MAX_LISTED_JOBS} most recent jobs, newest first: state, script hash, result or error.",
         JSON, uri="lua://jobs"),
    _resource("job-stats", "How many jobs are in each state (pending, running, completed, failed, cancelled), "
         "and the queue: queue_depth (jobs waiting for a job slot), oldest_pending_s (how long the longest-waiting "
         "one has waited, null when none) and by_priority (waiting jobs by priority).", JSON,
         uri="lua://jobs/stats"),
    _resource("tools", "The requests this daemon serves, with descriptions and JSON Schemas (as list_tools).", JSON,
         uri="lua://tools"),
    _resource("plugins", "The daemon's plugins: loaded ones with their subscriptions, and the ones that failed "
         "to load with their error (as plugin_list).", JSON, uri="lua://plugins"),
    _resource("workers", "The Lua workers serving this front, local and remote: name, group, capabilities, host, "
         "state, runs and capacity, last heartbeat; and the pool's counts by group (busy, idle) with the runs "
         "waiting for an eligible worker.", JSON, uri="lua://workers"),
)  # fmt: skip
"""The resources that always exist."""

TEMPLATES: Final = (
    _resource("script", "A stored script: its Lua source (text/x-lua) and what its describe() returns "
         "(application/json). {hash} is the script's 32-hex hash.", LUA, uri_template="lua://scripts/{hash}"),
    _resource("job", "One job: its state, script hash, params' result or error, times and progress. {id} is a job id.",
         JSON, uri_template="lua://jobs/{id}"),
    _resource("example", "One bundled example script's Lua source. {name} is as lua://examples lists it.", LUA,
         uri_template="lua://examples/{name}"),
    _resource("namespace", "One Lua namespace: its documentation and every function, sync or async, with the "
         "capability a call needs. {name} is as lua://namespaces lists it.", JSON,
         uri_template="lua://namespaces/{name}"),
)  # fmt: skip
"""The parameterised resources."""


def template_uris() -> list[str]:
    """Every URI template (for ``not_found`` replies and completions)."""
    return [spec.uri_template for spec in TEMPLATES if spec.uri_template is not None]


# --- examples --------------------------------------------------------------------------


def examples_root() -> Traversable:
    """The bundled examples: ``luanette/examples`` (a link to the repository's
    ``examples/`` in a checkout, a copy in an installed package)."""
    return importlib.resources.files("luanette") / "examples"


def example_names() -> list[str]:
    """The example names: ``hello`` for ``examples/hello.lua``, ``modules/variations``
    for ``examples/modules/variations.lua``."""
    root = examples_root()
    if not root.is_dir():
        return []
    names = [f.name[:-4] for f in root.iterdir() if f.name.endswith(".lua") and f.is_file()]
    modules = root / "modules"
    if modules.is_dir():
        names += [f"modules/{f.name[:-4]}" for f in modules.iterdir() if f.name.endswith(".lua") and f.is_file()]
    return sorted(names)


def example_source(name: str) -> str | None:
    """One example's source, or None when there is no such example."""
    if not _EXAMPLE_NAME.fullmatch(name) or name not in example_names():
        return None
    return (examples_root().joinpath(*f"{name}.lua".split("/"))).read_text(encoding="utf-8")


def example_summary(source: str) -> str:
    """What an example shows: its leading ``--`` comment, joined into one paragraph."""
    lines = []
    for line in source.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].strip())
    return " ".join(lines)


# --- the service -----------------------------------------------------------------------


class Resources:
    """Lists and reads the ``lua://`` resources."""

    def __init__(
        self,
        *,
        jobs: Jobs,
        scripts: Scripts,
        tools: Callable[[], list[t.ToolInfo]],
        reference: Callable[[], Reference],
    ) -> None:
        self._jobs = jobs
        self._scripts = scripts
        self._tools = tools
        self._reference = reference
        # luanette.plugins.Plugins.list, set by the server (None: no plugins)
        self.plugins: Callable[[], builtins.list[dict[str, Any]]] | None = None
        # luanette.poolview.snapshot of the engine, set by the dispatcher (None: no workers known)
        self.pool: Callable[[], dict[str, Any]] | None = None

    def list(self) -> list[dict[str, Any]]:
        """Every resource: the static ones, each example and namespace, then the
        templates (entries with ``uri_template`` instead of ``uri``)."""
        listed = [*STATIC]
        for name in example_names():
            listed.append(_resource(f"example:{name}", f"Example script {name}.", LUA, uri=f"lua://examples/{name}"))
        for ns in self._reference().namespaces.values():
            listed.append(_resource(f"namespace:{ns.name}", f"Lua namespace {ns.name}: {ns.summary}", JSON,
                               uri=f"lua://namespaces/{ns.name}"))  # fmt: skip
        listed += TEMPLATES
        return [msgspec.to_builtins(spec) for spec in listed]

    async def read(self, uri: str) -> dict[str, Any]:
        """``{contents: [{uri, mime_type, text}]}`` for ``uri``. Raises ResourceError:
        ``not_found`` (with the templates), ``invalid_params``, ``too_large``."""
        if len(uri) > MAX_URI_LENGTH:
            raise ResourceError("invalid_params", f"a resource URI is at most {MAX_URI_LENGTH} characters")
        contents = await self._contents(uri)
        size = sum(len(item.text.encode()) for item in contents)
        if size > MAX_RESOURCE_BYTES:
            raise ResourceError(
                "too_large",
                f"{uri} is {size} bytes, more than the {MAX_RESOURCE_BYTES} a read may return",
                {"limit": MAX_RESOURCE_BYTES, "size": size},
            )
        return msgspec.to_builtins(ResourceRead(contents))

    async def _contents(self, uri: str) -> builtins.list[ResourceContent]:
        if uri == "lua://namespaces":
            return [_json(uri, self._reference().summary())]
        if uri == "lua://examples":
            listing = []
            for name in example_names():
                text = example_source(name) or ""
                listing.append({"name": name, "uri": f"lua://examples/{name}", "summary": example_summary(text)})
            return [_json(uri, listing)]
        if uri == "lua://jobs":
            jobs = self._jobs.list(None)[:MAX_LISTED_JOBS]
            return [_json(uri, msgspec.to_builtins(jobs))]
        if uri == "lua://jobs/stats":
            # the store's counts by state, the queue's signals (Jobs.queue_stats) and the
            # pool's (busy and idle workers per group, runs waiting for one): what an
            # autoscaler reads, in one place
            stats = msgspec.to_builtins(self._jobs.stats()) | self._jobs.queue_stats()
            if self.pool is not None:
                stats["pool"] = self.pool()["pool"]
            return [_json(uri, stats)]
        if uri == "lua://tools":
            return [_json(uri, msgspec.to_builtins(self._tools()))]
        if uri == "lua://plugins":
            return [_json(uri, self.plugins() if self.plugins is not None else [])]
        if uri == "lua://workers":
            pool = self.pool() if self.pool is not None else {"workers": [], "pool": poolview.pool_from_workers([])}
            return [_json(uri, pool)]
        kind, _, rest = uri.removeprefix("lua://").partition("/")
        if uri.startswith("lua://") and rest:
            if kind == "namespaces":
                found = self._reference().get(rest)
                if found is not None:
                    return [_json(uri, msgspec.to_builtins(found))]
            elif kind == "examples":
                source = example_source(rest)
                if source is not None:
                    return [ResourceContent(uri, LUA, source)]
            elif kind == "jobs":
                return [_json(uri, msgspec.to_builtins(self._job(rest)))]
            elif kind == "scripts":
                return await self._script(uri, rest)
        raise ResourceError(
            "not_found",
            f"no resource {uri!r}; the resources are {', '.join(s.uri for s in STATIC if s.uri)} and the "
            f"templates {', '.join(template_uris())} (see list_resources)",
            {"uri": uri, "templates": template_uris()},
        )

    def _job(self, job_id: str) -> t.JobInfo:
        try:
            return self._jobs.status(job_id)
        except JobError as e:
            raise ResourceError(e.code, str(e)) from None

    async def _script(self, uri: str, text: str) -> builtins.list[ResourceContent]:
        script_hash, source = await self._scripts.source_of(text)  # (its errors name no path)
        described = await self._scripts.describe(script_hash)
        about: dict[str, Any] = {"hash": script_hash, "described": described.found}
        if described.found:
            about["describe"] = described.value
        if described.problem is not None:
            about["describe_error"] = msgspec.to_builtins(described.problem)
        record = self._scripts.record(script_hash)
        if record is not None:
            about.update(name=record.name, tags=record.tags, creator=record.creator)
        return [ResourceContent(uri, LUA, source), _json(uri, about)]


def _json(uri: str, value: Any) -> ResourceContent:
    return ResourceContent(uri, JSON, _encoder.encode(value).decode())
