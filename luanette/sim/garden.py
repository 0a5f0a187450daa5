"""Chaosgarden simulator: the garden daemon's shell socket over real ZeroMQ, no audio.

Stands in for chaosgarden (DESIGN "Chaosgarden") in tests, examples and the compose file.
Two halves:

* :class:`GardenState` -- a pure, synchronous state machine: transport, regions, the
  latent lifecycle and approvals. ``handle(request) -> reply``, no sockets.
* :class:`GardenSimServer` -- a ROUTER socket (pyzmq asyncio) that decodes shell
  requests, runs them through a :class:`GardenState` and answers.

Plus :func:`send_timeline_event`, the other direction (garden -> Luanette): a
``TimelineEvent`` sent to a Luanette daemon with the HOOT01 client.

Wire
====

A request reaches the ROUTER in one of two shapes, and is answered in the same one:

* **one frame** holding the ``Message`` as compact MsgPack (what upstream's
  ``rmp_serde::to_vec`` writes), optionally preceded by an empty delimiter frame (a
  DEALER may or may not send one; the reply carries back whatever came before the body).
  Named MsgPack and JSON bodies are also accepted and answered in kind;
* a **HOOT01 Request** (:mod:`hooteproto.frames`) whose body is the ``Message`` as JSON
  (content type Json; MsgPack is accepted too), answered with a HOOT01 Reply echoing the
  request id, service and traceparent, body in the request's encoding. A HOOT01
  Heartbeat is answered with a Heartbeat.

The reply is ``ShellReplyMessage.reply(request.header, content)``: a fresh header in the
request's session and ``parent_header`` = the request's header. A body that does not
decode is answered with a ``ShellReply::Error`` when its header can still be read;
otherwise it is logged, counted in :attr:`GardenSimServer.dropped` and dropped. Nothing a
peer sends stops the server.

State machine
=============

Transport: ``stopped`` (initially, at beat 0, 120 BPM), ``playing``, ``paused``.
``Play`` / ``Pause`` / ``Stop`` move between them from any state; ``Stop`` also rewinds
to beat 0 (upstream's ``GardenDaemon::stop``; the daemon's shell handler at the pinned
commit still maps Stop to pause, which we do not copy). The position never advances on
its own -- the simulator has no clock, so tests are deterministic -- it changes only by
``Seek`` and ``Stop``. ``Seek`` needs a finite beat >= 0; ``SetTempo`` a finite BPM > 0.

Regions live in creation order. ``CreateRegion`` needs a finite position >= 0 and a
finite duration >= 0 and answers ``RegionCreated`` with a new UUID. ``DeleteRegion`` and
``MoveRegion`` answer ``Ok``, or ``Error`` for an unknown id. ``GetRegions`` lists all
regions, or those whose *start* lies in ``range`` = [start, end) (upstream's filter).
In a ``RegionSummary``, ``artifact_id`` is the ``PlayContent`` artifact, or a latent
region's resolved artifact once it has one.

A region created with a ``latent`` behavior has a latent status (upstream's
``LatentStatus``)::

    pending --started--> running --progress*--> running --resolved--> resolved
       |                    |                                           |
       +------failed--------+---> failed --started (retry)--> running   +--approve--> approved
                                                                        +--reject---> rejected

* ``UpdateLatentStarted`` from pending, or from failed (a retry), records the job id
  it carries (which may differ from the one the region was created with) and sets the
  progress to 0.
* ``UpdateLatentProgress`` only while running; progress must be within 0..1 (it need
  not grow: a job may re-estimate).
* ``UpdateLatentResolved`` only while running: the progress becomes 1 and the region
  becomes a **pending approval** (``GetPendingApprovals``) carrying artifact id, content
  hash and content type, stamped with the time it resolved.
* ``UpdateLatentFailed`` while pending or running, recording the error.
* ``ApproveLatent`` / ``RejectLatent`` only for a pending approval; both take it out of
  the pending list and record ``decided_by`` (and the reason).

Approval semantics. Upstream (``LatentManager::approve``) keeps the region's behavior
``Latent`` and marks its state ``Approved``, which makes it *playable* with the resolved
content; ``Region::is_latent`` matches on the behavior, so the region still reports
``is_latent: true``, with the resolved ``artifact_id``. The simulator does the same on
the wire, and its inspection view (:meth:`GardenState.region`) shows the effect:
``playable`` becomes true and ``plays`` the resolved content hash -- the hash a
``play_content`` region would carry. A rejected region stays on the timeline, not
playable, with status ``rejected`` and the decision recorded.

Every refused request -- unknown region, latent update on a region that is not latent,
a transition out of order (progress before started, resolving twice, approving what is
not pending, ...), a value out of range -- answers ``ShellReply::Error`` whose text names
the region and the problem, and changes nothing. The simulator is stricter than
upstream here (which answers ``Ok`` to latent updates for unknown regions) on purpose:
a client bug should fail a test.

Requests the simulator does not model -- the audio graph (``AddNode``, ``RemoveNode``,
``Connect``, ``Disconnect``) and participants (``RegisterParticipant``,
``UpdateParticipant``) -- answer ``Error "<type> is not supported by the simulator"``,
as the upstream daemon answers ``Error "Unhandled shell request"`` to what it lacks.
Answering ``Ok`` would let a client believe a node exists that it can never see.

In-process use
==============

::

    server = GardenSimServer()              # bind "tcp://127.0.0.1:0"
    await server.start()
    server.endpoint                         # "tcp://127.0.0.1:40123"
    server.state.regions()                  # [{region_id, position, ..., latent}, ...]
    server.state.pending()                  # [{region_id, artifact_id, content_hash, ...}]
    server.received[-1].metadata            # the ShellRequestMessage as received
    server.latency_ms = 50                  # switches may change while running
    server.hold(); ...; server.release()    # replies kept back, then sent in order
    await server.stop()

:func:`serve_in_thread` does the same from synchronous code (own thread and loop).
:class:`GardenState` holds a lock around every request and every query, so reading
``server.state`` from another thread is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Self

import msgspec
import zmq
import zmq.asyncio

from hooteproto import frames
from hooteproto import garden as g
from hooteproto import types as t
from hooteproto.codec import DecodeError, Encoding, detect
from hooteproto.frames import Command, Hoot01
from luanette.sim.threaded import in_thread

# stdlib logging, not structlog: structlog's default logger prints to stdout, whose
# first line the CLI reserves for "listening <endpoint>".
log = logging.getLogger("luanette.sim.garden")

DEFAULT_BIND = "tcp://127.0.0.1:0"
DEFAULT_TEMPO = 120.0
BIND_RETRY = 1.0
"""Seconds :meth:`GardenSimServer.start` retries an address in use."""
UNSUPPORTED = "is not supported by the simulator"

# Latent statuses, named as upstream's ``LatentStatus`` (snake_case).
PENDING = "pending"
RUNNING = "running"
RESOLVED = "resolved"
APPROVED = "approved"
REJECTED = "rejected"
FAILED = "failed"

# Transport states.
STOPPED = "stopped"
PLAYING = "playing"
PAUSED = "paused"


class Refused(Exception):
    """A request the state machine will not carry out; becomes ``ShellReply::Error``."""


# --- state ---------------------------------------------------------------------------


@dataclass
class _Latent:
    status: str = PENDING
    job_id: str | None = None
    progress: float = 0.0
    artifact_id: str | None = None
    content_hash: str | None = None
    content_type: g.ContentType | None = None
    resolved_at: str | None = None
    error: str | None = None
    decided_by: uuid.UUID | None = None
    reason: str | None = None


@dataclass
class _Region:
    region_id: uuid.UUID
    position: float
    duration: float
    behavior: g.Behavior
    latent: _Latent | None = None

    def artifact_id(self) -> str | None:
        """What ``RegionSummary.artifact_id`` reports (upstream ``get_regions``)."""
        body = self.behavior.value
        if isinstance(body, g.PlayContent):
            return body.artifact_id
        if self.latent is not None:
            return self.latent.artifact_id
        return None

    def plays(self) -> str | None:
        """The content playback would use: a ``play_content`` artifact, or the resolved
        hash of an approved latent region."""
        body = self.behavior.value
        if isinstance(body, g.PlayContent):
            return body.artifact_id
        if self.latent is not None and self.latent.status == APPROVED:
            return self.latent.content_hash
        return None


class GardenState:
    """The simulated garden: transport, regions, latent lifecycle, approvals.

    :meth:`handle` answers one ``ShellRequest`` with one ``ShellReply``; a refused
    request answers ``Error`` and changes nothing. Every request and query runs under one
    lock, so the state may be read from any thread while a server mutates it.
    """

    def __init__(self, *, tempo: float = DEFAULT_TEMPO) -> None:
        if not (math.isfinite(tempo) and tempo > 0):
            raise ValueError(f"tempo must be a finite number of BPM > 0, got {tempo!r}")
        self._lock = threading.RLock()
        self._transport = STOPPED
        self._position = 0.0
        self._tempo = float(tempo)
        self._regions: dict[uuid.UUID, _Region] = {}  # insertion = creation order
        self._pending: dict[uuid.UUID, g.PendingApproval] = {}  # resolution order
        self._history: list[tuple[Any, Any]] = []

    # --- requests --------------------------------------------------------------------

    def handle(self, request: g.ShellRequest) -> g.ShellReply:
        """Apply ``request`` and return the reply. Never raises for a well-typed request:
        anything refused becomes ``ShellReply::Error`` naming the problem."""
        with self._lock:
            handler = _HANDLERS.get(type(request))
            try:
                if handler is None:
                    raise Refused(f"{_tag(request)} {UNSUPPORTED}")
                reply = handler(self, request)
            except Refused as e:
                reply = g.Error(error=str(e))
            self._history.append((request, reply))
            return reply

    def _play(self, _: g.Play) -> g.ShellReply:
        self._transport = PLAYING
        return g.Ok()

    def _pause(self, _: g.Pause) -> g.ShellReply:
        self._transport = PAUSED
        return g.Ok()

    def _stop(self, _: g.Stop) -> g.ShellReply:
        self._transport = STOPPED
        self._position = 0.0
        return g.Ok()

    def _seek(self, req: g.Seek) -> g.ShellReply:
        self._position = _beat(req.beat, "seek position")
        return g.Ok()

    def _set_tempo(self, req: g.SetTempo) -> g.ShellReply:
        if not (math.isfinite(req.bpm) and req.bpm > 0):
            raise Refused(f"tempo must be a finite number of BPM > 0, got {req.bpm!r}")
        self._tempo = float(req.bpm)
        return g.Ok()

    def _get_transport_state(self, _: g.GetTransportState) -> g.ShellReply:
        return g.TransportState(
            playing=self._transport == PLAYING, position=self._position, tempo=self._tempo
        )

    def _create_region(self, req: g.CreateRegion) -> g.ShellReply:
        position = _beat(req.position, "region position")
        duration = _beat(req.duration, "region duration")
        region_id = uuid.uuid4()
        latent = _Latent() if isinstance(req.behavior.value, g.Latent) else None
        self._regions[region_id] = _Region(region_id, position, duration, req.behavior, latent)
        return g.RegionCreated(region_id=region_id)

    def _delete_region(self, req: g.DeleteRegion) -> g.ShellReply:
        self._find(req.region_id)
        del self._regions[req.region_id]
        self._pending.pop(req.region_id, None)
        return g.Ok()

    def _move_region(self, req: g.MoveRegion) -> g.ShellReply:
        region = self._find(req.region_id)
        region.position = _beat(req.new_position, f"new position of region {req.region_id}")
        return g.Ok()

    def _get_regions(self, req: g.GetRegions) -> g.ShellReply:
        regions: Iterable[_Region] = self._regions.values()
        if req.range is not None:
            start, end = req.range
            regions = [r for r in regions if start <= r.position < end]
        return g.Regions(regions=[_summary(r) for r in regions])

    def _get_pending_approvals(self, _: g.GetPendingApprovals) -> g.ShellReply:
        return g.PendingApprovals(approvals=list(self._pending.values()))

    def _latent_started(self, req: g.UpdateLatentStarted) -> g.ShellReply:
        latent = self._transition(req.region_id, "started", (PENDING, FAILED))
        latent.status, latent.job_id, latent.progress, latent.error = RUNNING, req.job_id, 0.0, None
        return g.Ok()

    def _latent_progress(self, req: g.UpdateLatentProgress) -> g.ShellReply:
        latent = self._transition(req.region_id, "progress", (RUNNING,))
        if not 0.0 <= req.progress <= 1.0:  # also refuses NaN
            raise Refused(
                f"progress for region {req.region_id} must be within 0..1, got {req.progress!r}"
            )
        latent.progress = req.progress
        return g.Ok()

    def _latent_resolved(self, req: g.UpdateLatentResolved) -> g.ShellReply:
        latent = self._transition(req.region_id, "resolved", (RUNNING,))
        latent.status, latent.progress = RESOLVED, 1.0
        latent.artifact_id, latent.content_hash = req.artifact_id, req.content_hash
        latent.content_type, latent.resolved_at = req.content_type, g.rfc3339_now()
        self._pending[req.region_id] = g.PendingApproval(
            region_id=req.region_id,
            artifact_id=req.artifact_id,
            content_hash=req.content_hash,
            content_type=req.content_type,
            resolved_at=latent.resolved_at,
        )
        return g.Ok()

    def _latent_failed(self, req: g.UpdateLatentFailed) -> g.ShellReply:
        latent = self._transition(req.region_id, "failed", (PENDING, RUNNING))
        latent.status, latent.error = FAILED, req.error
        return g.Ok()

    def _approve(self, req: g.ApproveLatent) -> g.ShellReply:
        latent = self._transition(req.region_id, "approve", (RESOLVED,))
        latent.status, latent.decided_by = APPROVED, req.decided_by
        del self._pending[req.region_id]
        return g.Ok()

    def _reject(self, req: g.RejectLatent) -> g.ShellReply:
        latent = self._transition(req.region_id, "reject", (RESOLVED,))
        latent.status, latent.decided_by, latent.reason = REJECTED, req.decided_by, req.reason
        del self._pending[req.region_id]
        return g.Ok()

    def _find(self, region_id: uuid.UUID) -> _Region:
        region = self._regions.get(region_id)
        if region is None:
            raise Refused(f"region {region_id} not found")
        return region

    def _transition(self, region_id: uuid.UUID, event: str, allowed: tuple[str, ...]) -> _Latent:
        """The latent state of ``region_id`` if ``event`` may happen to it now; otherwise
        :class:`Refused` naming the region, its status and what ``event`` needs."""
        region = self._find(region_id)
        if region.latent is None:
            raise Refused(
                f"{event} refused: region {region_id} is not latent "
                f"(behavior {region.behavior.kind})"
            )
        status = region.latent.status
        if status not in allowed:
            hint = " (not pending approval)" if RESOLVED in allowed else ""
            raise Refused(
                f"{event} refused: latent region {region_id} is {status}{hint}, "
                f"expected {' or '.join(allowed)}"
            )
        return region.latent

    # --- queries (for tests; each returns a fresh copy) ------------------------------

    def transport(self) -> dict[str, Any]:
        """``{state: "stopped"|"playing"|"paused", playing, position, tempo}``."""
        with self._lock:
            return {
                "state": self._transport,
                "playing": self._transport == PLAYING,
                "position": self._position,
                "tempo": self._tempo,
            }

    def regions(self) -> list[dict[str, Any]]:
        """Every region in creation order, as :meth:`region` describes it."""
        with self._lock:
            return [_describe(r) for r in self._regions.values()]

    def region(self, region_id: uuid.UUID | str) -> dict[str, Any] | None:
        """One region, or ``None``: ``{region_id (str), position, duration, behavior
        (variant name), behavior_body (dict), is_latent, artifact_id, playable, plays,
        latent}``, where ``latent`` is ``None`` or ``{status, job_id, progress,
        artifact_id, content_hash, content_type, resolved_at, error, decided_by,
        reason}``."""
        key = region_id if isinstance(region_id, uuid.UUID) else _parse_uuid(region_id)
        with self._lock:
            region = self._regions.get(key) if key is not None else None
            return None if region is None else _describe(region)

    def pending(self) -> list[dict[str, Any]]:
        """Pending approvals in resolution order: ``{region_id (str), artifact_id,
        content_hash, content_type ("audio"|"midi"|"control"), resolved_at}``."""
        with self._lock:
            return [msgspec.to_builtins(p) for p in self._pending.values()]

    @property
    def history(self) -> list[g.ShellRequest]:
        """Every request handled so far, refused ones included, in order."""
        with self._lock:
            return [request for request, _ in self._history]

    def exchanges(self) -> list[tuple[g.ShellRequest, g.ShellReply]]:
        """Every (request, reply) pair so far, in order."""
        with self._lock:
            return list(self._history)


_HANDLERS: dict[type, Any] = {
    g.Play: GardenState._play,
    g.Pause: GardenState._pause,
    g.Stop: GardenState._stop,
    g.Seek: GardenState._seek,
    g.SetTempo: GardenState._set_tempo,
    g.GetTransportState: GardenState._get_transport_state,
    g.CreateRegion: GardenState._create_region,
    g.DeleteRegion: GardenState._delete_region,
    g.MoveRegion: GardenState._move_region,
    g.GetRegions: GardenState._get_regions,
    g.GetPendingApprovals: GardenState._get_pending_approvals,
    g.UpdateLatentStarted: GardenState._latent_started,
    g.UpdateLatentProgress: GardenState._latent_progress,
    g.UpdateLatentResolved: GardenState._latent_resolved,
    g.UpdateLatentFailed: GardenState._latent_failed,
    g.ApproveLatent: GardenState._approve,
    g.RejectLatent: GardenState._reject,
}


def _tag(request: Any) -> str:
    return str(type(request).__struct_config__.tag)


def _beat(value: float, what: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise Refused(f"{what} must be a finite number of beats >= 0, got {value!r}")
    return float(value)


def _parse_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _summary(region: _Region) -> g.RegionSummary:
    return g.RegionSummary(
        region_id=region.region_id,
        position=region.position,
        duration=region.duration,
        is_latent=region.latent is not None,
        artifact_id=region.artifact_id(),
    )


def _describe(region: _Region) -> dict[str, Any]:
    latent = None
    if region.latent is not None:
        latent = msgspec.to_builtins(dataclasses.asdict(region.latent))
    return {
        "region_id": str(region.region_id),
        "position": region.position,
        "duration": region.duration,
        "behavior": region.behavior.kind,
        "behavior_body": msgspec.to_builtins(region.behavior.value),
        "is_latent": region.latent is not None,
        "artifact_id": region.artifact_id(),
        "playable": region.plays() is not None,
        "plays": region.plays(),
        "latent": latent,
    }


# --- server --------------------------------------------------------------------------


@dataclass
class Received:
    """One decoded request as it came in, with the reply it got (``None`` if the reply
    was dropped on purpose)."""

    message: g.ShellRequestMessage
    wire: str
    """``"frame"`` (one body frame) or ``"hoot01"``."""
    encoding: Encoding
    route: list[bytes]
    """Frames before the body / the HOOT01 frames: identity, plus ``b""`` when the peer
    sent a delimiter."""
    traceparent: str | None = None
    """The HOOT01 traceparent frame (the Message's own ``metadata`` may carry one too)."""
    reply: g.ShellReplyMessage | None = None

    @property
    def delimited(self) -> bool:
        """Whether the peer sent an empty delimiter frame before the message."""
        return len(self.route) > 1 and self.route[-1] == b""


class GardenSimServer:
    """The simulated garden shell socket: a ROUTER bound to ``bind``.

    ``await start()`` binds and sets :attr:`endpoint` (port 0 resolved); ``await
    stop()`` closes. :attr:`state` is the :class:`GardenState`; :attr:`received` lists
    every decoded ``ShellRequestMessage`` in arrival order and :attr:`log` the same with
    wire details (:class:`Received`).

    Switches, changeable while running: ``latency_ms`` delays each reply (the request is
    applied on arrival, so state order is arrival order; the delay never blocks other
    requests); ``drop_every`` = N leaves every Nth request unanswered *and unapplied* (a
    lost message); ``unresponsive`` leaves every request unanswered and unapplied (a hung
    daemon). Dropped requests still appear in :attr:`received`. ``refuse`` maps a request
    tag (``"delete_region"``) to how many more of those are applied before one is
    refused: that one is answered ``Error`` and changes nothing, and the entry is
    removed (a garden that refuses one request of a batch, for testing all-or-nothing
    commits and their undo).

    :meth:`hold` keeps every reply back (requests are still applied on arrival) until
    :meth:`release` sends them, in order: a test can then have a request outstanding for
    as long as it needs, instead of betting on a latency being long enough.
    """

    def __init__(
        self,
        bind: str = DEFAULT_BIND,
        *,
        state: GardenState | None = None,
        latency_ms: float = 0.0,
        drop_every: int = 0,
        unresponsive: bool = False,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.bind = bind
        self.endpoint: str | None = None
        self.state = state if state is not None else GardenState()
        self.latency_ms = latency_ms
        self.drop_every = drop_every
        self.unresponsive = unresponsive
        self.refuse: dict[str, int] = {}
        self.received: list[g.ShellRequestMessage] = []
        self.log: list[Received] = []
        self.requests = 0
        """Decoded requests so far (the count ``drop_every`` uses)."""
        self.dropped = 0
        """Messages dropped because nothing in them could be answered."""
        self.replies = 0
        """Replies sent (Heartbeats included)."""
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._released = asyncio.Event()
        self._released.set()

    def hold(self) -> None:
        """Keep replies back until :meth:`release` (Heartbeats are still answered).
        Call from the server's event loop."""
        self._released.clear()

    def release(self) -> None:
        """Send the replies :meth:`hold` kept back, in order, and stop holding."""
        self._released.set()

    @property
    def holding(self) -> bool:
        return not self._released.is_set()

    async def start(self) -> Self:
        """Bind the ROUTER and start answering. Raises ``zmq.ZMQError`` if the address
        cannot be bound.

        An address in use is retried for up to ``BIND_RETRY`` seconds: libzmq releases a
        closed socket's port in its I/O thread, a moment *after* ``close``, and tests
        restart a garden on the endpoint of the one they just stopped (to exercise
        client reconnects)."""
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Report a peer that went away instead of silently dropping its reply.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if "[" in self.bind:
            # Only for an IPv6 address: with IPV6 on, libzmq reports an IPv4 bind as
            # tcp://[::ffff:127.0.0.1]:P, which IPv4-only clients cannot connect to.
            sock.setsockopt(zmq.IPV6, 1)
        deadline = asyncio.get_running_loop().time() + BIND_RETRY
        while True:
            try:
                sock.bind(self.bind)
                break
            except zmq.ZMQError as e:
                if e.errno == zmq.EADDRINUSE and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
                    continue
                sock.close(0)
                raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._reader = asyncio.create_task(self._receive_loop(), name=f"garden-sim {self.endpoint}")
        return self

    async def stop(self) -> None:
        """Stop answering and close the socket (pending delayed replies are dropped)."""
        tasks = [*self._tasks, *([self._reader] if self._reader is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._reader = None
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- receiving -------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            raw = await self._socket.recv_multipart()
            try:
                self._on_message(raw)
            except Exception:  # a simulator bug must not stop the server either
                log.exception("garden sim: internal error on a message")
                self.dropped += 1

    def _on_message(self, raw: list[bytes]) -> None:
        route, message = frames.split_route(raw)
        if message and message[0] == frames.PROTOCOL:
            self._on_hoot01(route, message)
        elif len(message) == 1 and route:
            self._on_frame(route, message[0])
        else:
            self._drop("no message frames", route)

    def _on_frame(self, route: list[bytes], body: bytes) -> None:
        try:
            encoding = detect(body)
        except DecodeError as e:
            self._drop(str(e), route)
            return
        try:
            message = g.shell_request_codec.decode(body, encoding)
        except DecodeError as e:
            self._undecodable(route, body, encoding, e, wire="frame")
            return
        self._accept(Received(message, "frame", encoding, route))

    def _on_hoot01(self, route: list[bytes], message: list[bytes]) -> None:
        try:
            hoot = frames.parse(message)
        except DecodeError as e:
            self._drop(f"bad HOOT01 framing: {e}", route)
            return
        if hoot.command is Command.HEARTBEAT:
            self._spawn(self._send(route + _heartbeat_reply(hoot).to_frames(), 0.0, held=False))
            return
        if hoot.command is not Command.REQUEST:
            self._drop(f"HOOT01 {hoot.command.name.title()} is not a request", route)
            return
        try:
            encoding = hoot.body_encoding()
        except DecodeError as e:
            self._drop(str(e), route)
            return
        try:
            decoded = g.shell_request_codec.decode(hoot.body, encoding)
        except DecodeError as e:
            self._undecodable(route, hoot.body, encoding, e, wire="hoot01", hoot=hoot)
            return
        self._accept(Received(decoded, "hoot01", encoding, route, hoot.traceparent), hoot)

    def _accept(self, rec: Received, hoot: Hoot01 | None = None) -> None:
        self.received.append(rec.message)
        self.log.append(rec)
        self.requests += 1
        if self.unresponsive or (self.drop_every and self.requests % self.drop_every == 0):
            log.debug("garden sim: leaving %s unanswered", rec.message.header.msg_id)
            return
        tag = _tag(rec.message.content)
        if tag in self.refuse and self.refuse[tag] <= 0:
            del self.refuse[tag]
            content: g.ShellReply = g.Error(error=f"{tag} refused by the simulator's fault switch")
        else:
            if tag in self.refuse:
                self.refuse[tag] -= 1
            content = self.state.handle(rec.message.content)
        rec.reply = g.ShellReplyMessage.reply(rec.message.header, content)
        self._reply(rec.route, rec.reply, rec.encoding, hoot)

    def _undecodable(
        self,
        route: list[bytes],
        body: bytes,
        encoding: Encoding,
        error: DecodeError,
        *,
        wire: str,
        hoot: Hoot01 | None = None,
    ) -> None:
        header = recover_header(body, encoding)
        if header is None:
            self._drop(f"undecodable {wire} body without a readable header: {error}", route)
            return
        log.info("garden sim: cannot decode request %s: %s", header.msg_id, error)
        reply = g.ShellReplyMessage.reply(
            header, g.Error(error=f"cannot decode shell request: {error}")
        )
        self._reply(route, reply, encoding, hoot)

    def _drop(self, reason: str, route: list[bytes]) -> None:
        self.dropped += 1
        log.warning("garden sim: dropped a message from %s: %s",
                    route[0].hex() if route else "?", reason)

    # --- replying --------------------------------------------------------------------

    def _reply(
        self,
        route: list[bytes],
        reply: g.ShellReplyMessage,
        encoding: Encoding,
        hoot: Hoot01 | None,
    ) -> None:
        body = g.shell_reply_codec.encode(reply, encoding)
        if hoot is None:
            out = [*route, body]
        else:
            out = route + Hoot01(
                command=Command.REPLY,
                content_type=frames.content_type_for(encoding),
                request_id=hoot.request_id,
                service=hoot.service,
                traceparent=hoot.traceparent,
                body=body,
            ).to_frames()
        self._spawn(self._send(out, self.latency_ms / 1000.0))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, out: list[bytes], delay: float, *, held: bool = True) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if held:
            await self._released.wait()
        if self._socket is None:
            return
        try:
            await self._socket.send_multipart(out)
            self.replies += 1
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer went away meanwhile
            log.warning("garden sim: reply to %s not sent: %s", out[0].hex(), e)


def _heartbeat_reply(hoot: Hoot01) -> Hoot01:
    """The Heartbeat answering Heartbeat ``hoot`` (same request id and service)."""
    return Hoot01(
        command=Command.HEARTBEAT,
        content_type=frames.ContentType.EMPTY,
        request_id=hoot.request_id,
        service=hoot.service,
    )


def recover_header(body: bytes, encoding: Encoding) -> g.MessageHeader | None:
    """The header of a shell message that failed to decode as a whole, if its header
    alone is readable (so the error reply can name the request). Never raises."""
    try:
        raw = (msgspec.json if encoding is Encoding.JSON else msgspec.msgpack).decode(body)
        if isinstance(raw, list) and raw:  # compact: header is the first element
            raw_header = raw[0]
        elif isinstance(raw, dict):
            raw_header = raw.get("header")
        else:
            return None
        if isinstance(raw_header, dict):
            names = ("msg_id", "session", "msg_type", "version", "timestamp")
            raw_header = [raw_header.get(n) for n in names]
        if not isinstance(raw_header, list) or len(raw_header) != 5:
            return None
        msg_id, session, msg_type, version, timestamp = raw_header
        if not all(isinstance(s, str) for s in (msg_type, version, timestamp)):
            return None
        return g.MessageHeader(_to_uuid(msg_id), _to_uuid(session), msg_type, version, timestamp)
    except Exception:  # noqa: BLE001 (best effort by contract: any failure means no header)
        return None


def _to_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, bytes):
        return uuid.UUID(bytes=value)
    return uuid.UUID(value)


@contextlib.contextmanager
def serve_in_thread(bind: str = DEFAULT_BIND, **switches: Any) -> Iterator[GardenSimServer]:
    """Run a :class:`GardenSimServer` in a daemon thread with its own event loop for the
    ``with`` body and yield it (already bound: ``.endpoint`` is set).

    ``switches`` are the server's keyword arguments (``state``, ``latency_ms``,
    ``drop_every``, ``unresponsive``). ``server.state`` may be read from the calling
    thread (it locks); assigning switches is safe too (plain attributes read per
    request).
    """
    server = GardenSimServer(bind, **switches)
    with in_thread(server, "luanette-sim-garden") as running:
        yield running


# --- garden -> Luanette --------------------------------------------------------------


async def send_timeline_event(
    endpoint: str,
    event_type: t.TimelineEventType | str,
    position_beats: float,
    tempo: float,
    metadata: Any = None,
    *,
    timeout: float = 5.0,
    traceparent: str | None = None,
    encoding: Encoding = Encoding.COMPACT,
    curve: Any = None,
) -> t.Payload:
    """Send a ``TimelineEvent`` to the Luanette daemon at ``endpoint``, as chaosgarden
    does when playback reaches a marker, and return the reply payload (``Success`` or
    ``Error``).

    ``event_type`` is a :class:`~hooteproto.types.TimelineEventType` or its wire name
    (``"generate_transition"``, ...); ``ValueError`` for an unknown name. ``metadata``
    is any JSON value (``None`` sends ``{}``, what trigger rules expect to look into). Raises
    :class:`~hooteproto.client.RequestTimeout` when no reply comes within ``timeout``
    seconds. ``curve``: the client's :class:`~hooteproto.client.CurveKeys` for a daemon
    that requires CURVE.
    """
    from hooteproto.client import Client  # lazy: the server side needs none

    event = t.TimelineEvent(
        event_type=t.TimelineEventType(event_type),
        position_beats=float(position_beats),
        tempo=float(tempo),
        metadata={} if metadata is None else metadata,
    )
    async with Client(endpoint, encoding=encoding, service="luanette", curve=curve) as client:
        return await client.request(event, timeout=timeout, traceparent=traceparent)
