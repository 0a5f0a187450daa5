"""The daemon's client of chaosgarden's shell socket (DESIGN "Chaosgarden").

One :class:`GardenClient` per daemon holds one asyncio pyzmq DEALER connected to the
garden's shell ROUTER.  :meth:`GardenClient.request` sends one ``ShellRequest`` as a
single frame -- a ``ShellRequestMessage`` in compact MsgPack, as upstream's
``rmp_serde::to_vec`` writes it, with ``metadata["traceparent"]`` when there is one --
and returns the garden's ``ShellReply``.  Many requests share the socket: one reader
task hands each reply to the request whose ``msg_id`` its ``parent_header`` names; a
reply nobody waits for any more (its request timed out or was cancelled) is dropped
and counted in :attr:`GardenStats.late_replies`, never given to another request.

Robustness, and why:

- ``IMMEDIATE=1``: the socket queues messages only on a completed connection.  Without
  it a request to a garden that is down sits in the DEALER's queue and is delivered when
  the garden comes back -- a "play" replayed minutes later, after its script gave up.
  With it a send finds no pipe, so the client waits at most ``connect_timeout_s`` for
  a connection and then fails with :class:`GardenUnavailable`, well before the reply
  timeout.
- ``LINGER=0``: closing the socket discards whatever it still holds, for the same
  reason.
- A request that gets no reply within its timeout *retires* the socket: the next
  request opens a fresh one (and so a fresh connection to a restarted garden), while
  the retired socket stays open only until the requests already waiting on it finish,
  so one slow request never fails its neighbours.  The retired socket's replies can
  only reach its own requests (and ``msg_id`` matching makes even that exact).

Errors are :class:`GardenUnavailable` (no endpoint configured, nothing connected, no
reply in time, client closed) and :class:`GardenError` (the garden answered
``ShellReply::Error``).  Everything here runs on the event loop thread; the client may
be used from any number of tasks on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any, Final, Self

import msgspec
import structlog
import zmq
import zmq.asyncio

from hooteproto.codec import DecodeError, Encoding
from hooteproto.depth import peek
from hooteproto.garden import (
    Error,
    ShellReply,
    ShellReplyMessage,
    ShellRequest,
    ShellRequestMessage,
    shell_reply_codec,
    shell_request_codec,
)
from hooteproto.types import tag_of
from luanette.settings import GardenSettings
from luanette.telemetry import SpanKind, Telemetry, traceparent_of

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "GardenClient",
    "GardenError",
    "GardenSettings",
    "GardenStats",
    "GardenUnavailable",
]

_log = structlog.get_logger("luanette.garden")

# How long a request waits for a connection before calling the garden unreachable.  ZMQ
# retries a refused TCP connect every 100 ms (RECONNECT_IVL), so a garden that just
# (re)started is connected well within this; one that is down fails this fast.
DEFAULT_CONNECT_TIMEOUT_S: Final = 0.5
# Sends that would block (no connected pipe, or a full one) wait on POLLOUT in steps of
# at most this, so a connection made meanwhile is noticed even if an edge is missed.
_POLL_STEP_S: Final = 0.1


class GardenUnavailable(Exception):
    """The garden cannot answer: none configured, nothing connected, no reply in time,
    or the client is closed.  ``str(error)`` says which."""


class GardenError(Exception):
    """The garden answered ``ShellReply::Error``; ``str(error)`` is the garden's text and
    ``traceback`` its traceback, if it sent one."""

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


class GardenStats(msgspec.Struct):
    """Counters of one client (read by telemetry and tests)."""

    requests: int = 0  # requests attempted
    replies: int = 0  # replies handed to their request (Error replies included)
    errors: int = 0  # of those, ShellReply::Error
    unavailable: int = 0  # requests failed with GardenUnavailable
    timeouts: int = 0  # of those, no reply within the timeout
    late_replies: int = 0  # replies for a request that no longer waits (or never did)
    bad_replies: int = 0  # frames that are not a ShellReplyMessage with a parent header
    sockets: int = 0  # sockets opened (the first, plus one per retirement)
    in_flight: int = 0  # requests waiting now


class _Connection:
    """One DEALER socket, its reader task and the requests waiting on it."""

    def __init__(self, socket: zmq.asyncio.Socket) -> None:
        self.socket = socket
        self.waiting: dict[uuid.UUID, asyncio.Future[ShellReplyMessage]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.retired = False
        self.closed = False

    def close(self, reason: str | None = None) -> None:
        """Stop reading, close the socket (discarding anything queued) and fail whoever
        still waits with ``reason``."""
        if self.closed:
            return
        self.closed = True
        if self.reader is not None:
            self.reader.cancel()
        self.socket.close(linger=0)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(GardenUnavailable(reason or "the connection was closed"))
        self.waiting.clear()


class GardenClient:
    """Async client of chaosgarden's shell socket.

    ``settings.endpoint`` None means no garden is configured: every request raises
    :class:`GardenUnavailable` (the daemon still starts).  ``settings.timeout_s`` bounds a
    request unless :meth:`request` is given a shorter or longer ``timeout``.  The socket
    is opened on first use, so the client may be built before the event loop runs.
    ``telemetry`` adds a ``luanette.garden.call`` span per request, whose traceparent the
    request carries unless it is given one.  Close with :meth:`aclose` (or ``async
    with``).
    """

    def __init__(
        self,
        settings: GardenSettings | None = None,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        context: zmq.asyncio.Context | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {connect_timeout_s!r}")
        self.settings = settings if settings is not None else GardenSettings()
        self.connect_timeout_s = connect_timeout_s
        self.stats = GardenStats()
        # One session per client, as a Jupyter-style peer keeps one per connection.
        self.session = uuid.uuid4()
        self._context = context
        self._telemetry = telemetry
        self._current: _Connection | None = None
        self._connections: set[_Connection] = set()  # current and retired, until closed
        self._closed = False

    @property
    def endpoint(self) -> str | None:
        """The garden's shell endpoint, or None when none is configured."""
        return self.settings.endpoint

    @property
    def configured(self) -> bool:
        """Whether a garden endpoint is configured."""
        return self.settings.endpoint is not None

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called."""
        return self._closed

    # ------------------------------------------------------------------- requests

    async def request(
        self,
        content: ShellRequest,
        *,
        traceparent: str | None = None,
        timeout: float | None = None,
    ) -> ShellReply:
        """Send ``content`` to the garden and return its reply content.

        ``timeout`` (seconds, default ``settings.timeout_s``) covers the whole exchange,
        the wait for a connection included.  Raises :class:`GardenUnavailable` when no
        garden is configured, none is connected within ``connect_timeout_s``, or no reply
        comes in time; :class:`GardenError` when the garden answers ``Error``.  Cancelling
        the caller abandons the request (a reply that comes later is dropped).
        """
        self.stats.requests += 1
        endpoint = self.settings.endpoint
        try:
            if endpoint is None:
                raise GardenUnavailable("no garden configured (set endpoint in the [garden] section of the config)")
            if self._closed:
                raise GardenUnavailable("the garden client is closed (the daemon is shutting down)")
            limit = self.settings.timeout_s if timeout is None else timeout
            if not limit > 0:
                raise GardenUnavailable("no time left for a garden request")
            with self._span(content, endpoint) as span:
                if traceparent is None and span is not None:
                    traceparent = traceparent_of(span)
                reply = await self._exchange(content, traceparent, limit, endpoint)
                if isinstance(reply, Error):
                    self.stats.errors += 1
                    raise GardenError(reply.error, reply.traceback)
                return reply
        except GardenUnavailable:
            self.stats.unavailable += 1
            raise

    async def _exchange(
        self, content: ShellRequest, traceparent: str | None, limit: float, endpoint: str
    ) -> ShellReply:
        """One request/reply on the current connection, within ``limit`` seconds."""
        deadline = time.monotonic() + limit
        message = ShellRequestMessage.new(content, session=self.session)
        if traceparent:
            message.metadata["traceparent"] = traceparent
        frame = shell_request_codec.encode(message, Encoding.COMPACT)
        conn = self._connection()
        future: asyncio.Future[ShellReplyMessage] = asyncio.get_running_loop().create_future()
        msg_id = message.header.msg_id
        conn.waiting[msg_id] = future
        self.stats.in_flight += 1
        try:
            await self._send(conn, frame, deadline, endpoint)
            try:
                reply = await asyncio.wait_for(future, max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                self.stats.timeouts += 1
                # A garden that did not answer in time may be hung or restarted:
                # the next request gets a fresh socket and connection.
                self._retire(conn)
                raise GardenUnavailable(f"no reply from {endpoint} within {limit:.3g} s") from None
        finally:
            self.stats.in_flight -= 1
            conn.waiting.pop(msg_id, None)
            if not future.done():
                future.cancel()  # a reply arriving now counts as late
            elif not future.cancelled():
                future.exception()  # set by close() while we were still sending: seen
            if conn.retired and not conn.waiting:
                self._discard(conn)
        self.stats.replies += 1
        return reply.content

    async def _send(self, conn: _Connection, frame: bytes, deadline: float, endpoint: str) -> None:
        """Send ``frame`` without ever queueing it for later: with IMMEDIATE a send that
        would block means no connected garden, which gets ``connect_timeout_s`` (within
        the request's deadline) to appear."""
        wait = max(min(self.connect_timeout_s, deadline - time.monotonic()), 0.0)
        give_up = time.monotonic() + wait
        while True:
            if conn.closed:
                raise GardenUnavailable(f"the connection to {endpoint} was closed")
            try:
                await conn.socket.send(frame, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:  # e.g. the context is being terminated
                raise GardenUnavailable(f"cannot send to {endpoint}: {exc}") from None
            left = give_up - time.monotonic()
            if left <= 0:
                raise GardenUnavailable(
                    f"cannot reach {endpoint}: not connected within {wait:.3g} s (is chaosgarden running?)"
                )
            try:
                # pyzmq's _future.pyi leaves out poll's flags argument, which the code takes
                await conn.socket.poll(int(min(left, _POLL_STEP_S) * 1000) + 1, zmq.POLLOUT)  # type: ignore[call-arg]
            except zmq.ZMQError:  # closed meanwhile: reported at the top of the loop
                pass
            except asyncio.CancelledError:
                # Closing a pyzmq socket cancels the futures waiting on it; that is not
                # a cancellation of this task, unless one is pending as well.
                task = asyncio.current_task()
                if not conn.closed or (task is not None and task.cancelling()):
                    raise

    # ---------------------------------------------------------------- connections

    def _connection(self) -> _Connection:
        conn = self._current
        if conn is None or conn.closed:
            context = self._context or zmq.asyncio.Context.instance()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # see the module docstring
            sock.setsockopt(zmq.LINGER, 0)
            assert self.settings.endpoint is not None
            try:
                sock.connect(self.settings.endpoint)
            except zmq.ZMQError as exc:  # a malformed endpoint, an unknown transport
                sock.close(linger=0)
                raise GardenUnavailable(f"cannot connect to {self.settings.endpoint}: {exc}") from None
            conn = _Connection(sock)
            conn.reader = asyncio.get_running_loop().create_task(
                self._read(conn), name=f"luanette-garden-reader {self.settings.endpoint}"
            )
            self._current = conn
            self._connections.add(conn)
            self.stats.sockets += 1
        return conn

    def _retire(self, conn: _Connection) -> None:
        """No new requests on ``conn``; it closes once its last waiting request ends."""
        conn.retired = True
        if self._current is conn:
            self._current = None
            _log.info("garden.reconnect", endpoint=self.settings.endpoint, reason="a request timed out")

    def _discard(self, conn: _Connection, reason: str | None = None) -> None:
        conn.close(reason)
        self._connections.discard(conn)

    async def _read(self, conn: _Connection) -> None:
        """Hand each reply on ``conn`` to the request it answers."""
        while True:
            try:
                frames = await conn.socket.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:  # the socket was closed under us
                return
            # One body frame; a peer that echoes a delimiter puts empty frames first.
            body = frames[-1]
            try:
                reply = shell_reply_codec.decode(body)
            except DecodeError as exc:
                self.stats.bad_replies += 1
                _log.warning("garden.bad_reply", endpoint=self.settings.endpoint, error=str(exc))
                # A reply we cannot read (a newer garden's variant, say) still fails its
                # request at once, if its parent header is readable, instead of leaving
                # it to time out as if the garden had said nothing.
                msg_id = _parent_msg_id(body)
                future = conn.waiting.get(msg_id) if msg_id is not None else None
                if future is not None and not future.done():
                    future.set_exception(GardenError(f"unreadable reply from the garden: {exc}"))
                continue
            if reply.parent_header is None:
                self.stats.bad_replies += 1
                _log.warning("garden.bad_reply", endpoint=self.settings.endpoint, error="no parent_header")
                continue
            future = conn.waiting.get(reply.parent_header.msg_id)
            if future is None or future.done():
                self.stats.late_replies += 1
                continue
            future.set_result(reply)

    # ------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close every socket; requests still waiting fail with :class:`GardenUnavailable`
        and later ones too.  Idempotent."""
        self._closed = True
        self._current = None
        readers = [c.reader for c in self._connections if c.reader is not None]
        for conn in list(self._connections):
            self._discard(conn, "the garden client was closed")
        for reader in readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------- tracing

    @contextlib.contextmanager
    def _span(self, content: ShellRequest, endpoint: str) -> Iterator[Any]:
        if self._telemetry is None:
            yield None
            return
        with self._telemetry.span(
            "luanette.garden.call",
            kind=SpanKind.CLIENT,
            attributes={"garden.request": tag_of(type(content)), "server.address": endpoint},
        ) as span:
            yield span


def _parent_msg_id(body: bytes) -> uuid.UUID | None:
    """The ``parent_header.msg_id`` of a reply that does not decode as a whole, if that
    much of it is readable (compact: element 1 of the array; named or JSON: the
    ``parent_header`` key).  Only that id is decoded, so a reply broken or nested too
    deep elsewhere still names its request.  Never raises."""
    json = body[:1] in b"{ \t\r\n"
    for path in ((1, 0), (1, "msg_id"), ("parent_header", "msg_id"), ("parent_header", 0)):
        try:
            msg_id = peek(body, path, json=json)
            return uuid.UUID(bytes=msg_id) if isinstance(msg_id, bytes) else uuid.UUID(msg_id)
        except Exception:  # noqa: BLE001 (best effort by contract)
            continue
    return None
