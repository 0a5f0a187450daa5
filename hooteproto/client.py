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
import zmq
import zmq.asyncio

from hooteproto import frames
from hooteproto.codec import DecodeError, Encoding, payload_codec
from hooteproto.frames import Command, ContentType, Hoot01
from hooteproto.types import Payload


class RequestTimeout(TimeoutError):
    """No reply arrived in time."""


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Hoot01 | None = None


class Client:
    """Async HOOT01 client over a DEALER socket. Use as ``async with Client(ep) as c``.

    ``encoding`` picks the body encoding of requests (replies may come in any).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        encoding: Encoding = Encoding.COMPACT,
        service: str = "luanette",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.encoding = encoding
        self.service = service
        self.late_replies = 0
        self.bad_replies = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._pending: dict[uuid.UUID, _Slot] = {}
        # A plain task rather than a task group: a client may be opened in one task and
        # closed in another (e.g. a pytest fixture), which a cancel scope forbids.
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Client:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
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
        self._socket.close(linger=0)

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
            await self._socket.send_multipart(message.to_frames())
            with anyio.fail_after(math.inf if timeout is None else timeout):
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
        return payload_codec.decode(reply.body, reply.body_encoding())

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
