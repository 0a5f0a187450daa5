"""Sessions: a run's garden edits held in an overlay, applied all-or-nothing.

The overlay itself lives in the worker, per run (``luanette.stdlib.session``); this
module is the front's half and the one place a commit happens, whether a run asks for
it (``core.commit()``, the end of ``main``) or a client does (``session_commit`` of a
pending session).  A commit:

1. validates: every region an operation names exists (one ``get_regions``), so most
   failures apply nothing;
2. applies in a safe order: creates, then moves, then deletes (a delete is the only
   step whose undo loses something, so it goes last);
3. on a failure undoes what it applied, newest first: created regions are deleted,
   moved ones moved back, deleted ones created again with their old position, duration
   and content (a recreated region has a new id; a latent region's job id is not known
   to Luanette, so one deleted by a failed commit cannot be recreated and the error
   says so) -- then fails with :class:`SessionError` ``commit_failed`` and the reason.

Commits are serialised (one lock): two overlays validated against the same garden
state cannot both apply over each other.  Pending sessions (``review = true``) are kept
in the store and survive restarts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog

from hooteproto import garden as g
from hooteproto import types as t
from luanette.errors import RequestError
from luanette.garden import GardenClient, GardenError, GardenUnavailable

log = structlog.get_logger("luanette.sessions")

MAX_OPERATIONS: Final = 1000
"""Operations one overlay may hold (create, delete, move); past it: ``too_many_operations``."""
MAX_PENDING: Final = 256
"""Pending sessions kept for review; past it keeping one more is ``too_many_sessions``."""
OPS: Final = ("create", "delete", "move")


class SessionError(RequestError):
    """A session request that failed; ``code`` is also the Lua error's prefix."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _uuid(value: Any) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise SessionError("invalid_params", f"not a region id: {value!r}") from None


def check_operations(ops: Any) -> list[dict[str, Any]]:
    """The operations of an overlay, checked (they come from our worker or our store,
    but a pending session is data: it is read back as data)."""
    if not isinstance(ops, list):
        raise SessionError("invalid_params", "operations must be a list")
    if len(ops) > MAX_OPERATIONS:
        raise SessionError("too_many_operations", f"an overlay holds at most {MAX_OPERATIONS} operations")
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in OPS or "region_id" not in op:
            raise SessionError("invalid_params", f"not an overlay operation: {op!r}")
    return ops


class Sessions:
    """Commits overlays to the garden and keeps pending sessions in the store."""

    def __init__(
        self,
        garden: GardenClient | None,
        store: Any,
        publish: Callable[[t.Broadcast], None] | None = None,
        *,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._garden = garden
        self._store = store
        self._publish = publish or (lambda _: None)
        self._lock = asyncio.Lock()
        self._busy: set[str] = set()  # pending sessions being committed or discarded
        self.max_pending = max_pending

    # --- the garden ------------------------------------------------------------------

    async def _ask(self, content: g.ShellRequest, expect: type) -> Any:
        garden = self._garden
        if garden is None or not garden.configured:
            raise SessionError("garden_unavailable", "no garden configured (set [garden] endpoint in the config)")
        try:
            reply = await garden.request(content)
        except GardenUnavailable as exc:
            raise SessionError("garden_unavailable", str(exc)) from None
        except GardenError as exc:
            raise SessionError("garden_error", str(exc)) from None
        if not isinstance(reply, expect):
            raise SessionError("garden_error", f"the garden answered '{t.tag_of(type(reply))}'")
        return reply

    # --- commit ----------------------------------------------------------------------

    async def commit(self, ops: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Apply ``ops`` to the garden all-or-nothing; the ids the garden gave the
        overlay's created regions (provisional -> real).  Raises SessionError:
        ``commit_failed`` (nothing stays applied), ``garden_unavailable`` before anything
        was applied, ``too_many_operations``, ``invalid_params``."""
        ops = check_operations(list(ops))
        if not ops:
            return {}
        async with self._lock:
            return await self._commit(ops)

    async def _commit(self, ops: list[dict[str, Any]]) -> dict[str, str]:
        regions = await self._ask(g.GetRegions(range=None), g.Regions)
        before = {str(r.region_id): r for r in regions.regions}
        present = set(before)
        for op in ops:  # validate against the garden as it is now
            rid = str(op["region_id"])
            if op["op"] == "create":
                present.add(rid)
            elif rid not in present:
                raise SessionError(
                    "commit_failed",
                    f"region {rid} ({op['op']}) is not in the garden any more; nothing was applied",
                )
            elif op["op"] == "delete":
                present.discard(rid)
        order = {"create": 0, "move": 1, "delete": 2}
        created: dict[str, str] = {}
        done: list[tuple[dict[str, Any], str]] = []  # (op, the real id it touched)
        for op in sorted(ops, key=lambda o: order[o["op"]]):  # sorted() is stable
            rid = created.get(str(op["region_id"]), str(op["region_id"]))
            try:
                if op["op"] == "create":
                    real = await self._create(op)
                    created[str(op["region_id"])] = real
                    done.append((op, real))
                elif op["op"] == "move":
                    request = g.MoveRegion(region_id=_uuid(rid), new_position=float(op["position"]))
                    await self._ask(request, g.Ok)
                    done.append((op, rid))
                else:
                    await self._ask(g.DeleteRegion(region_id=_uuid(rid)), g.Ok)
                    done.append((op, rid))
            except SessionError as exc:
                lost = await self._undo(done, before)
                what = f"{op['op']} of region {rid} failed ({exc})"
                undone = "nothing was applied"
                if done:
                    undone = f"the {len(done)} operation(s) applied before it were undone"
                if lost:
                    undone += f"; {'; '.join(lost)}"
                log.warning("session.commit_failed", reason=what, applied=len(done), lost=lost)
                raise SessionError("commit_failed", f"{what}; {undone}") from None
        return created

    async def _create(self, op: dict[str, Any]) -> str:
        if op.get("behavior") == "latent":
            body: Any = g.Latent(job_id=str(op["content_id"]))
        else:
            body = g.PlayContent(artifact_id=str(op["content_id"]))
        request = g.CreateRegion(
            position=float(op["position"]), duration=float(op["duration"]), behavior=g.Behavior.of(body)
        )
        reply = await self._ask(request, g.RegionCreated)
        return str(reply.region_id)

    async def _undo(self, done: list[tuple[dict[str, Any], str]], before: dict[str, g.RegionSummary]) -> list[str]:
        """Undo ``done`` newest first; what could not be restored exactly."""
        lost: list[str] = []
        for op, rid in reversed(done):
            old = before.get(rid)
            try:
                if op["op"] == "create":
                    await self._ask(g.DeleteRegion(region_id=_uuid(rid)), g.Ok)
                elif op["op"] == "move" and old is not None:
                    await self._ask(g.MoveRegion(region_id=_uuid(rid), new_position=old.position), g.Ok)
                elif op["op"] == "delete" and old is not None:
                    if old.is_latent or old.artifact_id is None:
                        lost.append(f"latent region {rid} (its job id is not known)")
                        continue
                    again = {"position": old.position, "duration": old.duration,
                             "behavior": "play_content", "content_id": old.artifact_id}  # fmt: skip
                    real = await self._create(again)
                    lost.append(f"deleted region {rid} was recreated with a new id, {real}")
            except SessionError as exc:
                lost.append(f"{op['op']} of region {rid} ({exc})")
        return lost

    # --- pending sessions ------------------------------------------------------------

    def keep(self, ops: Sequence[dict[str, Any]], *, job_id: str | None, user: str | None,
             script_hash: str | None) -> str:  # fmt: skip
        """Keep an overlay as a pending session for review; its id.  SessionError
        ``too_many_sessions`` when the store holds the most it may."""
        ops = check_operations(list(ops))
        if self._store.count_sessions() >= self.max_pending:
            raise SessionError(
                "too_many_sessions",
                f"{self.max_pending} sessions are pending review; commit or discard some (luanette-cli session list)",
            )
        session_id = f"ses_{uuid.uuid4().hex}"
        self._store.add_session(session_id, job_id=job_id, user=user, script_hash=script_hash, operations=ops,
                                created_at=time.time())  # fmt: skip
        self._announce(session_id, job_id, "pending", len(ops))
        log.info("session.kept", session_id=session_id, job_id=job_id, operations=len(ops))
        return session_id

    def list(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Pending sessions, oldest first, without their operations."""
        return [{k: v for k, v in s.items() if k != "operations"} for s in self._store.list_sessions(job_id)]

    def show(self, session_id: str) -> dict[str, Any]:
        """One pending session with its operations; SessionError ``not_found``."""
        found = self._store.get_session(session_id)
        if found is None:
            raise SessionError("not_found", f"no pending session {session_id!r} (committed, discarded or never kept)")
        return found

    def check_owner(self, session: dict[str, Any], user: str, admin: bool) -> None:
        """SessionError ``forbidden`` unless ``user`` started the session's job or is an admin."""
        if not admin and session.get("user") != user:
            raise SessionError("forbidden", "only the client that started the job, or an admin, may do that")

    async def commit_pending(self, session_id: str, user: str, admin: bool) -> dict[str, Any]:
        """Commit a pending session (then it is gone); on failure it stays pending."""
        session = self._claim(session_id, user, admin)
        try:
            created = await self.commit(session["operations"])
            self._store.remove_session(session_id)
        finally:
            self._busy.discard(session_id)
        self._announce(session_id, session.get("job_id"), "committed", len(session["operations"]))
        return {"session_id": session_id, "committed": True, "operations": len(session["operations"]),
                "created": created}  # fmt: skip

    def discard_pending(self, session_id: str, user: str, admin: bool) -> dict[str, Any]:
        """Drop a pending session; nothing reaches the garden."""
        session = self._claim(session_id, user, admin)
        try:
            self._store.remove_session(session_id)
        finally:
            self._busy.discard(session_id)
        self._announce(session_id, session.get("job_id"), "discarded", len(session["operations"]))
        return {"session_id": session_id, "discarded": True, "operations": len(session["operations"])}

    def _claim(self, session_id: str, user: str, admin: bool) -> dict[str, Any]:
        session = self.show(session_id)
        self.check_owner(session, user, admin)
        if session_id in self._busy:
            raise SessionError("invalid_state", f"session {session_id} is being committed or discarded")
        self._busy.add(session_id)
        return session

    def _announce(self, session_id: str, job_id: str | None, state: str, operations: int) -> None:
        self._publish(t.SessionChanged(session_id=session_id, job_id=job_id, state=state, operations=operations))
