"""An async DEALER client that speaks HOOT01 and matches replies to requests by id.

One socket carries many requests at once. Each reply is delivered to the request whose
id it echoes; a reply that arrives after its request gave up (timed out or was
cancelled) is counted in :attr:`Client.late_replies` and dropped, never handed to a
later request. (The Rust client read "the next reply" and so answered the wrong caller.)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from types import TracebackType

import anyio
import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from hooteproto import frames
from hooteproto.codec import DecodeError, Encoding, payload_codec
from hooteproto.depth import CARRIER_DEPTH, MAX_DEPTH
from hooteproto.frames import Command, ContentType, Hoot01
from hooteproto.types import Payload


class RequestTimeout(TimeoutError):
    """No reply arrived in time."""


class ConnectionFailed(ConnectionError):
    """The connection to the daemon cannot work: nothing listens there, or the CURVE
    handshake failed (the message says why)."""


_WATCHED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_CONNECT_RETRIED
)


class CurveKeys(msgspec.Struct, frozen=True):
    """A CURVE client's keys (z85 bytes): the daemon's public key and the client's own
    pair.  ``luanette.auth.load_client`` reads them from a key directory."""

    server: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of that daemon."""
        sock.curve_serverkey = self.server
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Hoot01 | None = None


class Client:
    """Async HOOT01 client over a DEALER socket. Use as ``async with Client(ep) as c``.

    ``encoding`` picks the body encoding of requests (replies may come in any);
    ``curve`` connects with CURVE keys (a daemon started with ``--curve``).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        encoding: Encoding = Encoding.COMPACT,
        service: str = "luanette",
        context: zmq.asyncio.Context | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.encoding = encoding
        self.service = service
        self.late_replies = 0
        self.bad_replies = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._pending: dict[uuid.UUID, _Slot] = {}
        # A plain task rather than a task group: a client may be opened in one task and
        # closed in another (e.g. a pytest fixture), which a cancel scope forbids.
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Client:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        # watched from before the connect, so no event of it is missed
        self._monitor = sock.get_monitor_socket(_WATCHED)
        sock.connect(self.endpoint)
        self._socket = sock
        self._reader = asyncio.create_task(self._read_loop(), name=f"hooteproto-reader {self.endpoint}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reader is not None and self._socket is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)

    async def connected(self, within: float = 2.0) -> None:
        """Wait until the daemon has completed the handshake (CURVE or not).

        Raises :class:`ConnectionFailed` at once when the handshake fails (a refused or
        unknown key, a daemon that requires CURVE or does not speak it), and after
        ``within`` seconds when nothing has answered, saying whether the connection
        was refused (nothing listening) or just got no answer."""
        assert self._monitor is not None, "use the client inside 'async with'"
        refused = False
        try:
            with anyio.fail_after(within):
                while True:
                    event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        return
                    if event == zmq.EVENT_CONNECT_RETRIED:
                        refused = True
                    elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        raise ConnectionFailed(
                            f"{self.endpoint} refused this client's key (it is not among the daemon's "
                            "allowed keys, or was revoked)"
                        )
                    else:
                        hint = (
                            "does the daemon use CURVE? (its key may not match server.key)"
                            if self.curve is not None
                            else "the daemon may require CURVE keys (--curve DIR, or $LUANETTE_CURVE)"
                        )
                        raise ConnectionFailed(f"the handshake with {self.endpoint} failed: {hint}")
        except TimeoutError:
            if refused:
                raise ConnectionFailed(f"nothing is listening at {self.endpoint} (connection refused)") from None
            raise ConnectionFailed(f"no answer from {self.endpoint} within {within:g} s") from None

    async def _read_loop(self) -> None:
        assert self._socket is not None
        while True:
            raw = await self._socket.recv_multipart()
            _, message = frames.split_route(raw)
            try:
                reply = frames.parse(message)
            except DecodeError:
                self.bad_replies += 1
                continue
            slot = self._pending.pop(reply.request_id, None)
            if slot is None:
                self.late_replies += 1
                continue
            slot.reply = reply
            slot.event.set()

    async def _exchange(self, message: Hoot01, timeout: float | None) -> Hoot01:
        assert self._socket is not None, "use the client inside 'async with'"
        if self._reader is not None and self._reader.done():
            self._reader.result()  # surface why the reader stopped
        slot = _Slot()
        self._pending[message.request_id] = slot
        try:
            # the send too: with no peer to take it (a failed CURVE handshake drops the
            # connection's pipe) a DEALER's send waits
            with anyio.fail_after(math.inf if timeout is None else timeout):
                await self._socket.send_multipart(message.to_frames())
                await slot.event.wait()
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {self.endpoint} within {timeout:g} s"
            ) from None
        finally:
            self._pending.pop(message.request_id, None)
        assert slot.reply is not None
        return slot.reply

    async def request(
        self,
        payload: Payload,
        *,
        timeout: float | None = 30.0,
        traceparent: str | None = None,
    ) -> Payload:
        """Send ``payload`` and return the reply payload.

        Raises :class:`RequestTimeout` when no reply comes within ``timeout`` seconds and
        :class:`~hooteproto.DecodeError` when the reply cannot be decoded.
        """
        message = Hoot01(
            command=Command.REQUEST,
            content_type=frames.content_type_for(self.encoding),
            request_id=uuid.uuid4(),
            service=self.service,
            traceparent=traceparent,
            body=payload_codec.encode(payload, self.encoding),
        )
        reply = await self._exchange(message, timeout)
        if reply.command is not Command.REPLY:
            raise DecodeError(f"expected a Reply, got {reply.command.name.title()}")
        # a reply carries a result (up to MAX_DEPTH levels) a few levels down
        return payload_codec.decode(reply.body, reply.body_encoding(), max_depth=MAX_DEPTH + CARRIER_DEPTH)

    async def heartbeat(self, *, timeout: float | None = 5.0) -> None:
        """Send a Heartbeat and wait for the daemon's Heartbeat back."""
        message = Hoot01(
            command=Command.HEARTBEAT,
            content_type=ContentType.EMPTY,
            request_id=uuid.uuid4(),
            service=self.service,
        )
        reply = await self._exchange(message, timeout)
        if reply.command is not Command.HEARTBEAT:
            raise DecodeError(f"expected a Heartbeat, got {reply.command.name.title()}")
