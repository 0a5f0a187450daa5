"""The PUB socket: one JSON frame per Broadcast, ``"type"`` first (what the gateway's
subscriber reads).

PUB never blocks: a subscriber that cannot keep up loses messages at its high-water
mark, which is the contract of a broadcast (state is always queryable with JobStatus);
what was sent and dropped is counted.
"""

from __future__ import annotations

import msgspec
import structlog
import zmq
import zmq.asyncio

from hooteproto.codec import encode_broadcast
from hooteproto.types import Broadcast
from luanette.auth import ServerKeys, secure_server_socket

log = structlog.get_logger("luanette.broadcast")

DEFAULT_PUB = "tcp://127.0.0.1:5572"


class PublisherStats(msgspec.Struct):
    published: int = 0
    dropped: int = 0


class Publisher:
    """Publishes Broadcast messages; until :meth:`bind` it publishes nowhere."""

    def __init__(self, *, context: zmq.asyncio.Context | None = None) -> None:
        self.stats = PublisherStats()
        self.endpoint: str | None = None
        self._context = context
        self._socket: zmq.Socket | None = None

    def bind(self, endpoint: str, keys: ServerKeys | None = None) -> str:
        """Bind the PUB socket (a CURVE server with ``keys``: only allowed keys may
        subscribe); returns the bound endpoint. Raises ``zmq.ZMQError``."""
        # A plain (sync) socket in the daemon's context: PUB sends never wait, so there
        # is nothing to await.
        ctx: zmq.Context = zmq.Context.shadow((self._context or zmq.asyncio.Context.instance()).underlying)
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 500)
        if keys is not None:
            secure_server_socket(sock, keys)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    @property
    def bound(self) -> bool:
        """Whether anything is published (``--pub none``: nothing)."""
        return self._socket is not None

    def publish(self, message: Broadcast) -> None:
        """Send one broadcast now; never blocks, never raises for a slow subscriber."""
        if self._socket is None:
            return
        try:
            self._socket.send(encode_broadcast(message), zmq.DONTWAIT)
            self.stats.published += 1
        except zmq.Again:
            self.stats.dropped += 1

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
