"""The `garden` namespace: drive the chaosgarden timeline from Lua (seed 002).

Every function sends one shell request through the daemon's
:class:`~luanette.garden.GardenClient` (the script waits without holding a thread) and
returns when the garden has answered.  Lua API::

    garden.status()                          -> {playing, position, tempo}
    garden.play() / pause() / stop()         -> true
    garden.seek(beat)                        -> true
    garden.set_tempo(bpm)                    -> true
    garden.create_region{position, duration, behavior = "play_content"|"latent", content_id}
                                             -> region_id (a UUID string)
    garden.delete_region(region_id)          -> true
    garden.move_region(region_id, position)  -> true
    garden.get_regions([start_beat [, end_beat]])
        -> {{region_id, position, duration, is_latent [, artifact_id]}, ...}
    garden.latent_started(region_id, job_id) -> true
    garden.latent_progress(region_id, progress)   (0 <= progress <= 1) -> true
    garden.latent_resolved(region_id, {artifact_id, content_hash,
                                       content_type = "audio"|"midi"|"control"}) -> true
    garden.latent_failed(region_id, error)   -> true
    garden.get_pending()
        -> {{region_id, artifact_id, content_hash, content_type, resolved_at}, ...}
    garden.approve(region_id, decided_by)    -> true
    garden.reject(region_id, decided_by [, reason]) -> true
    garden.query(...)                        -> always an error: not_supported

In a run's session mode (the default for daemon runs; luanette.stdlib.session) the
region edits go to the run's overlay instead, ``get_regions`` sees it, and ids the
overlay made are mapped to the garden's once committed (:meth:`GardenNamespace.run_functions`).

Positions and durations are in beats.  A ``region_id`` argument is a UUID string, or any
table with a ``region_id`` field (an entry of ``get_regions`` or ``get_pending``);
``decided_by`` is the UUID of the agent or person deciding.  ``get_regions`` with only a
start lists regions starting at or after it; with both, those starting in
[start, end).  UUIDs come back as strings.

Errors are Lua errors (catch them with pcall) whose message, after the runtime's
``"garden.<function>: "`` prefix, starts with a stable code:

- ``invalid_params``: a bad argument; the message names it;
- ``garden_unavailable``: no garden configured, none reachable, or no reply within the
  garden timeout (``[garden] timeout_s``) -- a call never outlives the job's deadline;
- ``garden_error``: the garden refused the request (its text follows), or answered
  something the protocol does not allow for it;
- ``not_supported``: ``garden.query`` -- seed 002's Trustfall queries have no shell
  request; use ``get_regions``, ``get_pending`` and ``status``.
"""

from __future__ import annotations

import difflib
import math
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from hooteproto import garden as g
from hooteproto.types import tag_of
from luanette.engine.api import LuaCallError, RunContext
from luanette.garden import GardenClient, GardenError, GardenUnavailable
from luanette.stdlib.paths import lua_type, shown

if TYPE_CHECKING:
    from luanette.stdlib.session import Overlay

__all__ = ["BEHAVIORS", "CONTENT_TYPES", "GardenNamespace", "garden_namespace"]

BEHAVIORS: Final = ("play_content", "latent")
"""``behavior`` values of ``create_region`` (seed 002): what ``content_id`` names."""
CONTENT_TYPES: Final = tuple(t.value for t in g.ContentType)
MAX_ID_CHARS: Final = 1024  # ids and hashes: generous, but no megabyte "job id"
MAX_TEXT_CHARS: Final = 65536  # error texts and reasons
# How long past the job's deadline a call's own timeout fires: the runtime cancels the
# wait at the deadline itself (the job ends as a timeout naming the call), and the
# slack makes sure that cancel wins (the same rule as luanette.backends).
_DEADLINE_SLACK_S: Final = 0.25
# The open end of a one-sided get_regions range: finite, so every encoding carries it.
_END_OF_TIME: Final = sys.float_info.max
_CREATE_FIELDS: Final = ("position", "duration", "behavior", "content_id")
_RESOLVED_FIELDS: Final = ("artifact_id", "content_hash", "content_type")
_EXAMPLE_UUID: Final = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


# --------------------------------------------------------------------- argument checks


def _invalid(message: str) -> LuaCallError:
    return LuaCallError(f"invalid_params: {message}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{what} must be a number, got {lua_type(value)}")
    if not math.isfinite(value):
        raise _invalid(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _beat(value: Any, what: str) -> float:
    beat = _number(value, what)
    if beat < 0:
        raise _invalid(f"{what} must be a number of beats >= 0, got {beat:g}")
    return beat


def _text(value: Any, what: str, *, limit: int, empty: bool = False) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"{what} must be UTF-8 text") from None
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, got {lua_type(value)}")
    if not value and not empty:
        raise _invalid(f"{what} must not be empty")
    if len(value) > limit:
        raise _invalid(f"{what} is too long ({len(value)} characters, at most {limit})")
    return value


def _id(value: Any, what: str) -> str:
    return _text(value, what, limit=MAX_ID_CHARS)


def _uuid(value: Any, what: str) -> uuid.UUID:
    """A UUID argument; for ``region_id`` also a table with a ``region_id`` field."""
    if what == "region_id" and isinstance(value, dict) and "region_id" in value:
        value = value["region_id"]
    if not isinstance(value, (str, bytes)):
        raise _invalid(f"{what} must be a UUID string, got {lua_type(value)}")
    text = _text(value, what, limit=64)
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _invalid(f"{what} must be a UUID like '{_EXAMPLE_UUID}', got {shown(text)}") from None


def _fields(value: Any, what: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The fields of an options table; every one of ``allowed`` is required and no other
    may appear (a typo must not silently become a missing field)."""
    if not isinstance(value, dict):
        if isinstance(value, list) and not value:
            value = {}
        else:
            raise _invalid(f"{what} must be a table of named fields ({', '.join(allowed)}), got {lua_type(value)}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _invalid(f"{what}: unknown field '{key}'{hint}; fields: {', '.join(allowed)}")
    for key in allowed:
        if value.get(key) is None:
            raise _invalid(f"{what}.{key} is required")
    return value


def _choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    text = _text(value, what, limit=64)
    if text not in choices:
        raise _invalid(f"{what} must be one of {', '.join(repr(c) for c in choices)}, got {shown(text)}")
    return text


# ------------------------------------------------------------------------- conversion


def _region(summary: g.RegionSummary) -> dict[str, Any]:
    region: dict[str, Any] = {
        "region_id": str(summary.region_id),
        "position": summary.position,
        "duration": summary.duration,
        "is_latent": summary.is_latent,
    }
    if summary.artifact_id is not None:
        region["artifact_id"] = summary.artifact_id
    return region


def _approval(pending: g.PendingApproval) -> dict[str, Any]:
    return {
        "region_id": str(pending.region_id),
        "artifact_id": pending.artifact_id,
        "content_hash": pending.content_hash,
        "content_type": pending.content_type.value,
        "resolved_at": pending.resolved_at,
    }


# -------------------------------------------------------------------------- namespace


class GardenNamespace:
    """Lua global ``garden``: chaosgarden transport, regions, latent lifecycle, approvals.

    ``client`` None (or a client without an endpoint) keeps every function present but
    failing with ``garden_unavailable``, so a script's ``pcall`` behaves the same with
    and without a garden.  ``traceparent``, when given, is called per request and its
    value travels in the request's ``metadata``; otherwise the client's own
    ``luanette.garden.call`` span (if it has telemetry) supplies one.  The namespace
    holds no per-run state: one instance may serve every job.
    """

    name = "garden"

    def __init__(
        self,
        client: GardenClient | None,
        traceparent: Callable[[], str | None] | None = None,
    ) -> None:
        self.client = client
        self._traceparent = traceparent

    async def _call(self, run: RunContext, content: g.ShellRequest, expect: type) -> Any:
        """One request within the run's deadline; the reply if it is an ``expect``."""
        client = self.client
        if client is None or not client.configured:
            raise LuaCallError("garden_unavailable: no garden configured (set [garden] endpoint in the config)")
        left = run.remaining_s()
        if left <= 0:
            raise LuaCallError("garden_unavailable: the job deadline passed before the request")
        timeout = min(client.settings.timeout_s, left + _DEADLINE_SLACK_S)
        traceparent = self._traceparent() if self._traceparent is not None else None
        try:
            reply = await client.request(content, traceparent=traceparent, timeout=timeout)
        except GardenUnavailable as exc:
            run.logger.info("garden.unavailable", request=tag_of(type(content)), reason=str(exc))
            raise LuaCallError(f"garden_unavailable: {exc}") from None
        except GardenError as exc:
            raise LuaCallError(f"garden_error: {exc}") from None
        if not isinstance(reply, expect):
            raise LuaCallError(
                f"garden_error: the garden answered '{tag_of(type(reply))}' to '{tag_of(type(content))}'"
            )
        return reply

    async def _ok(self, run: RunContext, content: g.ShellRequest) -> bool:
        await self._call(run, content, g.Ok)
        return True

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        """The ``garden.*`` functions for one run (always the same names and kinds),
        writing through to the garden (``execution_mode = "autoCommit"``)."""
        return self.run_functions(run, None)

    def run_functions(self, run: RunContext, overlay: Overlay | None) -> Mapping[str, Callable[..., Any]]:
        """The ``garden.*`` functions for one run; with ``overlay`` (session mode) region
        edits go to it and ``get_regions`` sees it (see luanette.stdlib.session)."""

        def region(value: Any) -> uuid.UUID:
            """A region id for a request that is never buffered (a committed provisional
            id is mapped to the garden's)."""
            rid = _uuid(value, "region_id")
            return rid if overlay is None else uuid.UUID(overlay.for_garden(str(rid)))

        async def garden_ids() -> list[str]:
            reply = await self._call(run, g.GetRegions(range=None), g.Regions)
            return [str(r.region_id) for r in reply.regions]

        # -- transport ------------------------------------------------------------

        async def status() -> dict[str, Any]:
            state = await self._call(run, g.GetTransportState(), g.TransportState)
            return {"playing": state.playing, "position": state.position, "tempo": state.tempo}

        async def play() -> bool:
            return await self._ok(run, g.Play())

        async def pause() -> bool:
            return await self._ok(run, g.Pause())

        async def stop() -> bool:
            return await self._ok(run, g.Stop())

        async def seek(beat: Any = None) -> bool:
            return await self._ok(run, g.Seek(beat=_beat(beat, "beat")))

        async def set_tempo(bpm: Any = None) -> bool:
            tempo = _number(bpm, "bpm")
            if tempo <= 0:
                raise _invalid(f"bpm must be greater than 0, got {tempo:g}")
            return await self._ok(run, g.SetTempo(bpm=tempo))

        # -- regions --------------------------------------------------------------

        async def create_region(opts: Any = None) -> str:
            o = _fields(opts, "opts", _CREATE_FIELDS)
            position = _beat(o["position"], "opts.position")
            duration = _beat(o["duration"], "opts.duration")
            behavior = _choice(o["behavior"], "opts.behavior", BEHAVIORS)
            content_id = _id(o["content_id"], "opts.content_id")
            if overlay is not None:
                return overlay.create(position, duration, behavior, content_id)
            body = g.PlayContent(artifact_id=content_id) if behavior == "play_content" else g.Latent(job_id=content_id)
            request = g.CreateRegion(position=position, duration=duration, behavior=g.Behavior.of(body))
            created = await self._call(run, request, g.RegionCreated)
            return str(created.region_id)

        async def delete_region(region_id: Any = None) -> bool:
            rid = _uuid(region_id, "region_id")
            if overlay is not None:
                overlay.delete(overlay.resolve(str(rid)), await garden_ids())
                return True
            return await self._ok(run, g.DeleteRegion(region_id=rid))

        async def move_region(region_id: Any = None, position: Any = None) -> bool:
            rid, beat = _uuid(region_id, "region_id"), _beat(position, "position")
            if overlay is not None:
                overlay.move(overlay.resolve(str(rid)), beat, await garden_ids())
                return True
            return await self._ok(run, g.MoveRegion(region_id=rid, new_position=beat))

        async def get_regions(start_beat: Any = None, end_beat: Any = None) -> list[dict[str, Any]]:
            span: tuple[float, float] | None = None
            if start_beat is not None or end_beat is not None:
                start = 0.0 if start_beat is None else _beat(start_beat, "start_beat")
                end = _END_OF_TIME if end_beat is None else _beat(end_beat, "end_beat")
                if end < start:
                    raise _invalid(f"end_beat ({end:g}) must not be before start_beat ({start:g})")
                span = (start, end)
            if overlay is not None and overlay.ops:
                # the whole timeline: a region the overlay moved may come into the range
                whole = await self._call(run, g.GetRegions(range=None), g.Regions)
                return overlay.view([_region(r) for r in whole.regions], span)
            reply = await self._call(run, g.GetRegions(range=span), g.Regions)
            return [_region(r) for r in reply.regions]

        # -- latent lifecycle -----------------------------------------------------

        async def latent_started(region_id: Any = None, job_id: Any = None) -> bool:
            request = g.UpdateLatentStarted(region_id=region(region_id), job_id=_id(job_id, "job_id"))
            return await self._ok(run, request)

        async def latent_progress(region_id: Any = None, progress: Any = None) -> bool:
            rid = region(region_id)
            value = _number(progress, "progress")
            if not 0.0 <= value <= 1.0:
                raise _invalid(f"progress must be within 0..1, got {value:g}")
            return await self._ok(run, g.UpdateLatentProgress(region_id=rid, progress=value))

        async def latent_resolved(region_id: Any = None, opts: Any = None) -> bool:
            rid = region(region_id)
            o = _fields(opts, "opts", _RESOLVED_FIELDS)
            request = g.UpdateLatentResolved(
                region_id=rid,
                artifact_id=_id(o["artifact_id"], "opts.artifact_id"),
                content_hash=_id(o["content_hash"], "opts.content_hash"),
                content_type=g.ContentType(_choice(o["content_type"], "opts.content_type", CONTENT_TYPES)),
            )
            return await self._ok(run, request)

        async def latent_failed(region_id: Any = None, error: Any = None) -> bool:
            rid = region(region_id)
            text = _text(error, "error", limit=MAX_TEXT_CHARS)
            return await self._ok(run, g.UpdateLatentFailed(region_id=rid, error=text))

        # -- approvals ------------------------------------------------------------

        async def get_pending() -> list[dict[str, Any]]:
            reply = await self._call(run, g.GetPendingApprovals(), g.PendingApprovals)
            return [_approval(a) for a in reply.approvals]

        async def approve(region_id: Any = None, decided_by: Any = None) -> bool:
            request = g.ApproveLatent(
                region_id=region(region_id), decided_by=_uuid(decided_by, "decided_by")
            )
            return await self._ok(run, request)

        async def reject(region_id: Any = None, decided_by: Any = None, reason: Any = None) -> bool:
            request = g.RejectLatent(
                region_id=region(region_id),
                decided_by=_uuid(decided_by, "decided_by"),
                reason=None if reason is None else _text(reason, "reason", limit=MAX_TEXT_CHARS, empty=True),
            )
            return await self._ok(run, request)

        # -- not in the shell protocol --------------------------------------------

        def query(*_: Any) -> None:
            # Seed 002 lists garden.query(graphql, variables) (Trustfall over the
            # garden's query socket); no shell request carries it.  Present so a script
            # written from the seed gets this message rather than "attempt to call a nil
            # value".
            raise LuaCallError(
                "not_supported: Trustfall queries are not available to Luanette scripts; "
                "use garden.get_regions, garden.get_pending or garden.status"
            )

        return {
            "status": status,
            "play": play,
            "pause": pause,
            "stop": stop,
            "seek": seek,
            "set_tempo": set_tempo,
            "create_region": create_region,
            "delete_region": delete_region,
            "move_region": move_region,
            "get_regions": get_regions,
            "latent_started": latent_started,
            "latent_progress": latent_progress,
            "latent_resolved": latent_resolved,
            "latent_failed": latent_failed,
            "get_pending": get_pending,
            "approve": approve,
            "reject": reject,
            "query": query,
        }


def garden_namespace(
    client: GardenClient | None,
    traceparent: Callable[[], str | None] | None = None,
) -> GardenNamespace:
    """The ``garden`` namespace over the daemon's one :class:`GardenClient` (None: no
    garden configured).  Stateless per run, so one instance may serve every job."""
    return GardenNamespace(client, traceparent)
