"""Stored scripts: Lua source kept in the CAS as ``text/x-lua``, indexed in the store.

A script is stored once and run by hash. Storing compiles it first (a script that does
not compile is refused with its error) and runs its ``describe()``, if any, in the
sandbox to index its name, description and params.

A script another process wrote into the shared CAS is treated the same way before its
first job (:meth:`Scripts.resolve`): described (the outcome cached by hash in the
store, bounded), checked as ``script_store`` would check it, and indexed with the tag
``source:cas`` once a job of it is accepted.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Any

import anyio
import msgspec
import structlog

from luanette import cas
from luanette import params as params_mod
from luanette.capabilities import GROUP_PATTERN, declared_capabilities
from luanette.cas import Cas, CasError
from luanette.engine.api import MAX_SHUTDOWN_TIMEOUT_S, CancelToken, ErrorDetail, Limits, ScriptError
from luanette.engine.channel import RunInfo
from luanette.engine.errors import syntax_detail
from luanette.engine.pool import Engine, RunHooks
from luanette.errors import RequestError
from luanette.faults import StorageFault
from luanette.store import ScriptRecord, Store
from luanette.triggers import declared_emits

_log = structlog.get_logger("luanette.scripts")

MIME = "text/x-lua"
_DEFINES_DESCRIBE = re.compile(r"\bfunction\s+describe\s*\(|\bdescribe\s*=\s*function\b")
TYPE_TAG = "type:lua"
MAX_SCRIPT_BYTES = 4 * 2**20
SOURCE_CACHE = 64  # sources kept in memory, each at most CACHED_SOURCE_BYTES
CACHED_SOURCE_BYTES = 256 * 2**10
RECORD_CACHE = 1024  # index entries kept in memory (a job reads its script's twice)
DESCRIBE_TIMEOUT_S = 5.0
DESCRIBE_CACHE = 4096
"""describe() outcomes of scripts run by hash without script_store, kept in the store."""
CAS_TAG = "source:cas"
"""Index tag of a script that entered the index by a job, not by script_store."""

# Compiles the chunk (a syntax error is answered as such), runs it, then its describe().
# `main` is cleared so the runtime returns this wrapper's value instead of calling the
# script's main; the script's on_shutdown is never defined, so it does not run here.
_DESCRIBE = """
local chunk, err = load(params.source, "=script", "t")
if not chunk then return {syntax = err} end
setmetatable(_G, {__newindex = function(t, k, v) if k ~= "on_shutdown" then rawset(t, k, v) end end})
chunk()
main = nil
if type(describe) ~= "function" then return {found = false} end
return {found = true, value = describe()}
"""


def declared_shutdown_timeout(described: Any) -> float | None:
    """``describe().shutdown_timeout``: seconds the script's on_shutdown may run (more
    than 0, at most 60); None when it declares none.  ``ValueError`` otherwise."""
    if not isinstance(described, dict) or described.get("shutdown_timeout") is None:
        return None
    value = described["shutdown_timeout"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SHUTDOWN_TIMEOUT_S:
        raise ValueError(
            f"describe().shutdown_timeout must be a number of seconds above 0 and at most "
            f"{MAX_SHUTDOWN_TIMEOUT_S:g}, got {value!r}"
        )
    return float(value)


EXECUTION_MODES = ("session", "autoCommit")
ON_ERROR = ("skip", "abort")


def declared_session(described: Any) -> tuple[str | None, bool | None, str | None]:
    """``describe()``'s ``execution_mode``, ``review`` and ``on_error`` (None where not
    declared); ``ValueError`` naming the field for any other value."""
    if not isinstance(described, dict):
        return None, None, None
    mode, review, on_error = (described.get(k) for k in ("execution_mode", "review", "on_error"))
    if mode is not None and mode not in EXECUTION_MODES:
        raise ValueError(f'describe().execution_mode must be "session" or "autoCommit", got {mode!r}')
    if review is not None and not isinstance(review, bool):
        raise ValueError(f"describe().review must be true or false, got {review!r}")
    if review and mode == "autoCommit":
        raise ValueError('describe().review = true needs execution_mode = "session" (autoCommit keeps no overlay)')
    if on_error is not None and on_error not in ON_ERROR:
        raise ValueError(f'describe().on_error must be "skip" or "abort", got {on_error!r}')
    return mode, review, on_error


RETRY = ("on_worker_loss",)


def declared_placement(described: Any) -> tuple[str | None, str | None]:
    """``describe()``'s ``retry`` and ``group`` (None where not declared);
    ``ValueError`` naming the field for any other value."""
    if not isinstance(described, dict):
        return None, None
    retry, group = described.get("retry"), described.get("group")
    if retry is not None and retry not in RETRY:
        raise ValueError(f'describe().retry must be "on_worker_loss" (or absent: never), got {retry!r}')
    if group is not None and (not isinstance(group, str) or not GROUP_PATTERN.match(group)):
        raise ValueError(
            f"describe().group must name a worker group (letters, digits, '_', '.', '-'; at most 64), got {group!r}"
        )
    return retry, group


class ManifestError(ValueError):
    """``describe()`` declares something malformed (its params table, additional_params,
    tags); ``problems`` lists each as ``{path, expected, got, message}``."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__(f"describe() is malformed: {'; '.join(p['message'] for p in problems[:3])}")
        self.problems = problems

    def details(self) -> dict[str, Any]:
        """``details`` of the ``invalid_params`` reply."""
        return {
            "reason": "describe",
            "problems": self.problems[: params_mod.MAX_PROBLEMS],
            "problem_count": len(self.problems),
        }


class ScriptProblem(Exception):
    """A script could not be stored or described; ``detail`` is the structured error."""

    def __init__(self, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.detail = detail


class Described(msgspec.Struct):
    """What ``describe()`` said, or ``found=False``; ``problem`` when running it failed."""

    found: bool
    value: Any = None
    problem: ErrorDetail | None = None
    syntax: ErrorDetail | None = None  # the script does not compile


def manifest(described: Described, content: str) -> dict[str, Any]:
    """The index fields of a script from its ``describe()``, checked as ``script_store``
    checks them.  Raises :class:`ScriptProblem` (it does not compile, or describe()
    cannot be read or declares a bad session field, emits or shutdown_timeout),
    :class:`~luanette.capabilities.CapabilityError` and :class:`ManifestError`."""
    if described.syntax is not None:
        raise ScriptProblem(described.syntax)
    if described.problem is not None and _DEFINES_DESCRIBE.search(content):
        # Its declarations (capabilities above all) cannot be read: storing it would
        # give it the default grants instead of what it asked for.
        raise ScriptProblem(
            ErrorDetail(
                "describe_failed",
                f"describe() could not be read: the script failed while defining it: {described.problem.message}",
                described.problem.line,
                described.problem.stack,
                ["a script with describe() must do its work in main(), not at its top level"],
            )
        )
    info = described.value if described.found and isinstance(described.value, dict) else {}
    capabilities = declared_capabilities(info)
    try:
        emits = declared_emits(info)
    except ValueError as e:
        raise ScriptProblem(ErrorDetail("invalid_params", str(e), hints=['e.g. emits = {"cue_point"}'])) from None
    try:
        shutdown_timeout = declared_shutdown_timeout(info)
    except ValueError as e:
        raise ScriptProblem(ErrorDetail("invalid_params", str(e), hints=["e.g. shutdown_timeout = 10"])) from None
    try:
        execution_mode, review, on_error = declared_session(info)
    except ValueError as e:
        hint = 'e.g. execution_mode = "autoCommit", review = true, on_error = "skip"'
        raise ScriptProblem(ErrorDetail("invalid_params", str(e), hints=[hint])) from None
    try:
        retry, group = declared_placement(info)
    except ValueError as e:
        hint = 'e.g. retry = "on_worker_loss", group = "gpu-host"'
        raise ScriptProblem(ErrorDetail("invalid_params", str(e), hints=[hint])) from None
    problems = params_mod.check_schema(info.get("params"))
    additional = info.get("additional_params")
    if additional is not None and not isinstance(additional, bool):
        got = params_mod.kind_of(additional)
        message = f"describe().additional_params must be true or false, got {got}"
        problems.append(params_mod.problem("describe().additional_params", "boolean", got, message))
    declared_tags = _declared_tags(info.get("tags"), problems)
    if problems:
        raise ManifestError(problems)
    return {
        "name": _text(info.get("name")),
        "description": _text(info.get("description")),
        "params_schema": info.get("params"),
        "capabilities": capabilities,
        "emits": emits,
        "shutdown_timeout": shutdown_timeout,
        "execution_mode": execution_mode,
        "review": review,
        "on_error": on_error,
        "additional_params": additional,
        "declared_tags": declared_tags,
        "retry": retry,
        "group": group,
    }


def _declared_tags(tags: Any, problems: list[dict[str, str]]) -> list[str] | None:
    """``describe().tags`` (a list of non-empty strings; ``{}`` is an empty Lua table),
    adding to ``problems`` what is wrong with it."""
    if tags is None or tags == {} or tags == []:
        return None
    if not isinstance(tags, list):
        got = params_mod.kind_of(tags)
        message = f'describe().tags must be a list of strings such as {{"melody"}}, got {got}'
        problems.append(params_mod.problem("describe().tags", "a list of strings", got, message))
        return None
    bad = [i for i, tag in enumerate(tags, 1) if not isinstance(tag, str) or not tag]
    for i in bad:
        got = params_mod.kind_of(tags[i - 1])
        message = f"describe().tags[{i}] must be a non-empty string, got {got}"
        problems.append(params_mod.problem(f"describe().tags[{i}]", "a non-empty string", got, message))
    return None if bad else list(dict.fromkeys(tags))


class Scripts:
    """Store, describe, load and search scripts."""

    def __init__(self, cas: Cas, store: Store, limits: Limits, engine: Engine | None = None) -> None:
        self.cas = cas
        self._engine = engine
        self.store = store
        self._sources: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._records: collections.OrderedDict[str, ScriptRecord] = collections.OrderedDict()
        self._loading: dict[str, anyio.Event] = {}
        self._resolving: dict[str, anyio.Event] = {}
        self._file_threads = anyio.CapacityLimiter(4)
        self._limits = msgspec.structs.replace(limits, timeout_s=min(limits.timeout_s, DESCRIBE_TIMEOUT_S))

    async def save(self, content: str, tags: list[str] | None, creator: str | None) -> tuple[ScriptRecord, Described]:
        """Compile, store in the CAS, describe and index ``content``.

        Raises :class:`ScriptProblem` (kind ``lua_syntax``) for code that does not
        compile, :class:`~luanette.capabilities.CapabilityError` for a
        ``describe().capabilities`` that is not a list of capabilities and
        :class:`ManifestError` for a malformed params table, additional_params or tags;
        nothing is stored then.
        """
        described = await self.describe_source(content)
        fields = manifest(described, content)
        digest = await anyio.to_thread.run_sync(self.cas.store, content.encode(), MIME)
        record = ScriptRecord(
            hash=digest,
            tags=[*(tags or []), *(fields["declared_tags"] or []), TYPE_TAG],
            creator=creator,
            created_at=time.time(),
            **fields,
        )
        self._records.pop(digest, None)  # storing again merges tags: re-read it
        return self.store.index_script(record), described

    async def resolve(self, script_hash: str) -> tuple[ScriptRecord, bool]:
        """The index entry of a script to run, and whether it is new: a script in the
        CAS that was never stored through Luanette (another process wrote it) is
        described and checked as :meth:`save` would, its describe() outcome cached by
        hash in the store (so a broken script costs one sandboxed run, also across
        restarts).  A new entry is not indexed yet: :meth:`adopt` it once its job is
        accepted.

        Raises ``cas.NotFound``/``InvalidHash``, ``CasError`` (not a Lua script: not
        UTF-8, or too large), and what :func:`manifest` raises."""
        while True:
            record = self.record(script_hash)
            if record is not None:
                return record, False
            resolving = self._resolving.get(script_hash)
            if resolving is None:
                break
            await resolving.wait()  # a burst of jobs of one new script: one describe()
        self._resolving[script_hash] = done = anyio.Event()
        try:
            content = await self.source(script_hash)
            cached = self.store.get_described(script_hash)
            if cached is not None:
                described = msgspec.convert(cached, Described)
            else:
                described = await self.describe_source(content)
                try:
                    self.store.put_described(script_hash, msgspec.to_builtins(described), time.time(), DESCRIBE_CACHE)
                except StorageFault as fault:  # only a cache: the next job describes it again
                    _log.warning("script.describe_not_cached", hash=script_hash, code=fault.code, error=str(fault))
            fields = manifest(described, content)
        finally:
            del self._resolving[script_hash]
            done.set()
        tags = [*(fields["declared_tags"] or []), TYPE_TAG, CAS_TAG]
        return ScriptRecord(hash=script_hash, tags=tags, created_at=time.time(), **fields), True

    def adopt(self, record: ScriptRecord) -> ScriptRecord:
        """Index a script :meth:`resolve` found in the CAS (a storage fault is raised)."""
        self._records.pop(record.hash, None)
        _log.info("script.indexed_from_cas", hash=record.hash, name=record.name)
        return self.store.index_script(record)

    async def source_of(self, text: str) -> tuple[str, str]:
        """The hash and source of the stored script ``text`` names, or a RequestError a
        reader can answer with (``invalid_params``, ``not_found``, ``too_large``), worded
        without the CAS's paths."""
        try:
            script_hash = cas.parse_hash(text)
            return script_hash, await self.source(script_hash)
        except cas.InvalidHash as e:
            raise RequestError("invalid_params", f"not a script hash: {e}") from None
        except cas.NotFound:
            raise RequestError("not_found", f"no script {text} is stored") from None
        except cas.TooLarge:
            raise RequestError("too_large", f"{text} is larger than a script may be") from None
        except CasError:  # stored, but not text: not a script
            raise RequestError("not_found", f"{text} is stored but is not a Lua script") from None

    async def source(self, script_hash: str) -> str:
        """The Lua source of a stored script. Raises ``cas.NotFound``/``InvalidHash``.

        Content under a hash never changes, so recent sources are kept in memory: a
        script run as a thousand jobs is read from disk once.
        """
        while True:
            cached = self._sources.get(script_hash)
            if cached is not None:
                self._sources.move_to_end(script_hash)
                return cached
            loading = self._loading.get(script_hash)
            if loading is None:
                break
            await loading.wait()  # a burst of jobs of one script: one read serves them all
        self._loading[script_hash] = done = anyio.Event()
        try:
            return await self._read_source(script_hash)
        finally:
            del self._loading[script_hash]
            done.set()

    async def _read_source(self, script_hash: str) -> str:
        data = await anyio.to_thread.run_sync(
            lambda: self.cas.retrieve(script_hash, max_bytes=MAX_SCRIPT_BYTES), limiter=self._file_threads
        )
        try:
            source = data.decode()
        except UnicodeDecodeError:
            raise CasError(f"{script_hash} is not a Lua script (not UTF-8 text)") from None
        if len(data) > CACHED_SOURCE_BYTES:
            return source
        self._sources[script_hash] = source
        if len(self._sources) > SOURCE_CACHE:
            self._sources.popitem(last=False)
        return source

    async def describe_source(self, content: str) -> Described:
        """Run ``describe()`` of ``content`` in the sandbox (best effort: a chunk whose
        top level needs params may fail here, which is reported, not raised)."""
        if self._engine is None:
            raise RuntimeError("describing a script needs the engine")
        try:
            outcome = await self._engine.run(
                _DESCRIBE,
                {"source": content},
                limits=self._limits,
                info=RunInfo("describe"),
                cancel=CancelToken(),
                hooks=RunHooks(lambda: _log),
                chunk_name="describe",
            )
        except ScriptError as e:
            return Described(found=False, problem=e.detail)
        result = outcome.result
        if isinstance(result.get("syntax"), (str, bytes)):
            problem = syntax_detail(result["syntax"], "script")
            return Described(found=False, problem=problem, syntax=problem)
        return Described(found=bool(result.get("found")), value=result.get("value"))

    async def describe(self, script_hash: str) -> Described:
        """``describe()`` of a stored script. Raises ``cas.NotFound``/``InvalidHash``."""
        return await self.describe_source(await self.source(script_hash))

    def record(self, script_hash: str) -> ScriptRecord | None:
        """The index entry of a stored script, if it was stored through Luanette.

        Entries change only when this daemon stores the script again, so recent ones are
        kept in memory (a script not indexed yet is not: it may be stored later)."""
        cached = self._records.get(script_hash)
        if cached is not None:
            self._records.move_to_end(script_hash)
            return cached
        record = self.store.get_script(script_hash)
        if record is not None:
            self._records[script_hash] = record
            if len(self._records) > RECORD_CACHE:
                self._records.popitem(last=False)
        return record


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
