"""A run's session: its garden edits held in an overlay, and ``on_error = "skip"``.

In ``execution_mode = "session"`` (the default) ``garden.create_region``,
``delete_region`` and ``move_region`` do not reach the garden: they go to the run's
:class:`Overlay`, which ``garden.get_regions`` applies to what the garden holds, so the
script sees its own edits.  Lua API (on ``core``, always present)::

    core.commit()              -> {operations = n, created = {[provisional] = real, ...}}
    core.discard()             -> n (operations dropped)
    core.overlay.operations()  -> {{op = "create"|"delete"|"move", region_id, ...}, ...}

A region created in the overlay has a provisional id (a UUID); after a commit the run
maps it to the id the garden gave (later calls with the provisional id use the real
one).  Transport, queries and the latent lifecycle are never buffered; a latent call on
a region that exists only in the overlay fails with ``not_committed``.  At the end of
``main`` the worker calls :meth:`RunSession.finish`: the overlay is committed (or kept
for review with ``review = true``) on success, and dropped on error or cancel.

The commit itself happens in the front (``luanette.sessions``), through a service call.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from luanette.engine.api import ErrorDetail, LuaCallError, Namespace, RunContext, ScriptError
from luanette.sessions import MAX_OPERATIONS, SessionError

__all__ = ["ALWAYS_RAISE", "CoreSession", "Overlay", "RunSession", "SessionGarden", "Skipping"]

# Namespaces on_error = "skip" leaves alone: the always-present ones, whose failures
# are the script's own mistakes or the run's limits rather than a failing operation.
NOT_SKIPPED: Final = frozenset({"core", "json", "log", "context", "clock", "otel", "progress", "job"})
# Failures that are never skipped: limits and refusals the run must not step over.
ALWAYS_RAISE: Final = ("permission_denied", "cas_quota_exceeded", "log_quota_exceeded", "cancelled")
MAX_SKIPPED: Final = 1000  # entries recorded; later skips are counted only

_NOT_COMMITTED = (
    "not_committed: region {rid} exists only in this run's overlay (session mode); call core.commit() "
    'first, or declare execution_mode = "autoCommit" in describe()'
)


class SessionService(Protocol):
    """The front's session service (``luanette.sessions.Sessions``), or a proxy of it."""

    async def commit(self, ops: list[dict[str, Any]]) -> dict[str, str]: ...

    async def keep(self, ops: list[dict[str, Any]], job_id: str | None, user: str | None,
                   script_hash: str | None) -> str: ...  # fmt: skip


def _lua_error(exc: SessionError) -> LuaCallError:
    return LuaCallError(f"{exc.code}: {exc.message}")


class Overlay:
    """The garden edits of one run that have not reached the garden."""

    def __init__(self, service: SessionService | None) -> None:
        self._service = service
        self.ops: list[dict[str, Any]] = []
        self.real: dict[str, str] = {}  # provisional id -> the garden's, after a commit

    def resolve(self, rid: str) -> str:
        """The id to use for ``rid`` now (a committed provisional id becomes real)."""
        return self.real.get(rid, rid)

    def _created(self, rid: str) -> dict[str, Any] | None:
        for op in self.ops:
            if op["op"] == "create" and op["region_id"] == rid:
                return op
        return None

    def for_garden(self, rid: str) -> str:
        """``rid`` for a request that is never buffered; ``not_committed`` if it exists
        only in the overlay."""
        rid = self.resolve(rid)
        if self._created(rid) is not None:
            raise LuaCallError(_NOT_COMMITTED.format(rid=rid))
        return rid

    def _room(self) -> None:
        if len(self.ops) >= MAX_OPERATIONS:
            raise LuaCallError(
                f"too_many_operations: an overlay holds at most {MAX_OPERATIONS} operations; "
                "call core.commit() to apply them, or core.discard()"
            )

    def create(self, position: float, duration: float, behavior: str, content_id: str) -> str:
        """Buffer a new region; its provisional id."""
        self._room()
        rid = str(uuid.uuid4())
        self.ops.append({"op": "create", "region_id": rid, "position": position, "duration": duration,
                         "behavior": behavior, "content_id": content_id})  # fmt: skip
        return rid

    def _check_exists(self, rid: str, garden_ids: list[str]) -> None:
        deleted = {op["region_id"] for op in self.ops if op["op"] == "delete"}
        if rid not in garden_ids or rid in deleted:
            raise LuaCallError(f"garden_error: region {rid} not found")

    def delete(self, rid: str, garden_ids: list[str]) -> None:
        """Buffer a delete (a region the overlay created is simply forgotten)."""
        created = self._created(rid)
        if created is not None:
            self.ops.remove(created)
            return
        self._check_exists(rid, garden_ids)
        self._room()
        self.ops = [op for op in self.ops if not (op["op"] == "move" and op["region_id"] == rid)]
        self.ops.append({"op": "delete", "region_id": rid})

    def move(self, rid: str, position: float, garden_ids: list[str]) -> None:
        """Buffer a move (one per region: the last position wins)."""
        created = self._created(rid)
        if created is not None:
            created["position"] = position
            return
        self._check_exists(rid, garden_ids)
        for op in self.ops:
            if op["op"] == "move" and op["region_id"] == rid:
                op["position"] = position
                return
        self._room()
        self.ops.append({"op": "move", "region_id": rid, "position": position})

    def view(self, regions: list[dict[str, Any]], span: tuple[float, float] | None) -> list[dict[str, Any]]:
        """``regions`` (the garden's, all of them) with the overlay applied, then the
        ones starting in ``span`` (as the garden filters)."""
        deleted = {op["region_id"] for op in self.ops if op["op"] == "delete"}
        moved = {op["region_id"]: op["position"] for op in self.ops if op["op"] == "move"}
        out = []
        for region in regions:
            if region["region_id"] in deleted:
                continue
            if region["region_id"] in moved:
                region = {**region, "position": moved[region["region_id"]]}
            out.append(region)
        for op in self.ops:
            if op["op"] == "create":
                region = {"region_id": op["region_id"], "position": op["position"], "duration": op["duration"],
                          "is_latent": op["behavior"] == "latent"}  # fmt: skip
                if op["behavior"] == "play_content":
                    region["artifact_id"] = op["content_id"]
                out.append(region)
        if span is not None:
            out = [r for r in out if span[0] <= r["position"] < span[1]]
        return out

    def operations(self) -> list[dict[str, Any]]:
        """Copies of the buffered operations, in order."""
        return [dict(op) for op in self.ops]

    def discard(self) -> int:
        """Drop every buffered operation; how many there were."""
        count, self.ops = len(self.ops), []
        return count

    async def commit(self) -> dict[str, Any]:
        """Apply the overlay through the front, all-or-nothing.  On failure the
        overlay is kept (the script may fix it, retry or discard)."""
        ops = self.operations()
        if not ops:
            return {"operations": 0, "created": {}}
        if self._service is None:
            raise LuaCallError("garden_unavailable: no session service in this process")
        try:
            created = await self._service.commit(ops)
        except SessionError as exc:
            raise _lua_error(exc) from None
        self.real.update(created)
        del self.ops[: len(ops)]
        return {"operations": len(ops), "created": created}


class SessionGarden:
    """``garden`` for one run in session mode: region edits go to the run's overlay."""

    name = "garden"

    def __init__(self, garden: Any, overlay: Overlay) -> None:
        self._garden = garden
        self.overlay = overlay

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        """The ``garden.*`` functions, over the overlay."""
        return self._garden.run_functions(run, self.overlay)


class CoreSession:
    """``core.commit``, ``core.discard`` and ``core.overlay.operations`` of one run
    (joined to the sandbox's own ``core``).  Without an overlay (autoCommit) there is
    never anything to commit or discard."""

    name = "core"
    # the engine merges it into the sandbox's `core`, and overlay_operations becomes
    # core.overlay.operations (luanette/engine/sandbox.lua)
    core_extension = True

    def __init__(self, overlay: Overlay | None) -> None:
        self.overlay = overlay

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        """The session functions of ``core``."""
        overlay = self.overlay

        async def commit() -> dict[str, Any]:
            if overlay is None:
                return {"operations": 0, "created": {}}
            return await overlay.commit()

        def discard() -> int:
            return 0 if overlay is None else overlay.discard()

        def overlay_operations() -> list[dict[str, Any]]:
            return [] if overlay is None else overlay.operations()

        return {"commit": commit, "discard": discard, "overlay_operations": overlay_operations}


class Skipping:
    """A namespace under ``on_error = "skip"``: a call that fails with a LuaCallError
    returns nil instead, and the failure is logged and recorded.  Limits, refusals and
    cancels (:data:`ALWAYS_RAISE`) still raise; a kill never reaches Python."""

    def __init__(self, inner: Namespace, skipped: list[dict[str, str]], counter: list[int]) -> None:
        self._inner = inner
        self._skipped = skipped
        self._counter = counter  # [skips not recorded past MAX_SKIPPED]
        self.name = inner.name
        prelude = getattr(inner, "lua_prelude", None)
        if prelude is not None:
            self.lua_prelude = prelude
            self.lua_prelude_lazy = getattr(inner, "lua_prelude_lazy", False)

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        """The inner namespace's functions, skipping their failures."""
        return {name: self._wrap(run, f"{self.name}.{name}", call) for name, call in self._inner.functions(run).items()}

    def _skip(self, run: RunContext, qualname: str, exc: LuaCallError) -> None:
        if exc.message.startswith(ALWAYS_RAISE):
            raise exc
        error = f"{qualname}: {exc.message}"
        if len(self._skipped) < MAX_SKIPPED:
            self._skipped.append({"call": qualname, "error": error})
        else:
            self._counter[0] += 1
        with contextlib.suppress(LuaCallError):  # past the log quota the record is enough
            run.script_log("warn", f"skipped (on_error = skip): {error}", {"call": qualname})

    def _wrap(self, run: RunContext, qualname: str, call: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(call):

            async def skipping_async(*args: Any) -> Any:
                try:
                    return await call(*args)
                except LuaCallError as exc:
                    self._skip(run, qualname, exc)
                    return None

            return skipping_async

        def skipping(*args: Any) -> Any:
            try:
                return call(*args)
            except LuaCallError as exc:
                self._skip(run, qualname, exc)
                return None

        return skipping


class RunSession:
    """The session state of one run: its overlay (session mode), what ``on_error =
    "skip"`` skipped, and what happens when ``main`` ends."""

    def __init__(self, info: Any, service: SessionService | None) -> None:
        self.info = info
        self.overlay = Overlay(service) if getattr(info, "execution_mode", "session") != "autoCommit" else None
        self._service = service
        self.skip = getattr(info, "on_error", "abort") == "skip"
        self.skipped: list[dict[str, str]] = []
        self._unrecorded = [0]

    def base(self, namespaces: list[Namespace]) -> list[Namespace]:
        """The run's namespaces (before capabilities gate them) with the garden over the
        overlay and ``core``'s session functions added."""
        out: list[Namespace] = []
        for namespace in namespaces:
            if self.overlay is not None and namespace.name == "garden" and hasattr(namespace, "run_functions"):
                namespace = SessionGarden(namespace, self.overlay)
            out.append(namespace)
        out.append(CoreSession(self.overlay))
        return out

    def wrap(self, namespaces: list[Namespace]) -> list[Namespace]:
        """The run's final namespaces: under on_error = "skip", every one but
        :data:`NOT_SKIPPED` skips its failures."""
        if not self.skip:
            return namespaces
        return [n if n.name in NOT_SKIPPED else Skipping(n, self.skipped, self._unrecorded) for n in namespaces]

    def pending_operations(self) -> int:
        """Operations the overlay holds now."""
        return 0 if self.overlay is None else len(self.overlay.ops)

    def discard(self) -> None:
        """The run failed or was cancelled: its overlay goes."""
        if self.overlay is not None:
            self.overlay.discard()

    async def finish(self, result: Any) -> tuple[Any, str | None]:
        """``main`` succeeded: commit the overlay (or keep it for review), and add what
        was skipped to the result.  Returns the result and the id of a kept session.
        Raises ScriptError ``commit_failed`` (or the session error's code) when the
        final commit or keep fails: the run fails, and nothing of the overlay stays."""
        kept: str | None = None
        overlay = self.overlay
        if overlay is not None and overlay.ops:
            info = self.info
            try:
                if getattr(info, "review", False):
                    if self._service is None:
                        raise SessionError("garden_unavailable", "no session service in this process")
                    about = (getattr(info, k, None) for k in ("job_id", "user", "script_hash"))
                    kept = await self._service.keep(overlay.operations(), *about)
                    overlay.discard()
                else:
                    await overlay.commit()
            except (SessionError, LuaCallError) as exc:
                overlay.discard()
                code, message = (exc.code, exc.message) if isinstance(exc, SessionError) else _split(exc.message)
                raise ScriptError(
                    ErrorDetail(
                        code,
                        f"the session could not be {'kept' if getattr(info, 'review', False) else 'committed'} "
                        f"at the end of main: {message}",
                        hints=["nothing of the overlay reached the garden; see core.commit() in docs/lua-api.md"],
                    )
                ) from None
        return self.with_skipped(result), kept

    def with_skipped(self, result: Any) -> Any:
        """``result`` carrying what on_error = "skip" skipped (unchanged if nothing was)."""
        if not self.skipped:
            return result
        skipped: Any = list(self.skipped)
        if self._unrecorded[0]:
            skipped.append({"call": "...", "error": f"{self._unrecorded[0]} more skipped calls were not recorded"})
        if isinstance(result, dict):
            return {**result, "skipped": skipped}
        return {"value": result, "skipped": skipped}

    def commit_budget_s(self, timeout_s: float) -> float:
        """Seconds the final commit may take: validation, every operation and its undo."""
        return timeout_s * (2 + 2 * self.pending_operations())


def _split(message: str) -> tuple[str, str]:
    code, _, rest = message.partition(": ")
    return (code, rest) if rest and code.isidentifier() else ("commit_failed", message)
