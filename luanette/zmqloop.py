"""A ZeroMQ socket served from the asyncio loop in batches, without a future per call.

pyzmq's asyncio sockets make a future for every send and receive and, after each send,
read the socket's events again (ZeroMQ's file descriptor only signals a change of
state): under load that bookkeeping cost the front more than handling the request.
Here the loop watches the descriptor, a receive drains what is queued without waiting,
and what is sent during one turn of the loop goes out together at its end.

The rule that keeps this correct: any operation on the socket may consume the
descriptor's signal, so the receiver never waits before it has found the queue empty
*after* its last operation, and a flush that may have consumed a signal raises the
readable flag itself when messages are waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import zmq

# Plain ints: pyzmq's flag enums made every frame of send_multipart and recv_multipart
# pay for enum arithmetic (13.7 -> 2.9 us to send a 7-frame HOOT01 message).
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.DONTWAIT) | int(zmq.SNDMORE)
_SEND_LAST = int(zmq.DONTWAIT)


class LoopSocket:
    """One socket's traffic on the running loop: :meth:`receive` batches, and
    :meth:`send_soon` with a flush at the end of the loop's turn.  ``sock`` may shadow
    the handle of a ``zmq.asyncio`` socket, which must then not be used itself."""

    def __init__(self, sock: zmq.Socket[Any], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._readable = asyncio.Event()
        self._loop.add_reader(self._fd, self._readable.set)
        self._outbox: list[list[Any]] = []
        self.on_failed: Any = None  # called with (frames, error) for a send that failed; None: dropped
        self.closed = False

    async def receive(self, limit: int, *, copy: bool = True) -> list[list[Any]]:
        """The messages queued now, at least one (waiting for it), at most ``limit``."""
        while True:
            batch = self.receive_now(limit, copy=copy)
            if batch:
                return batch
            self._readable.clear()
            # (the check reads the socket's state: a signal that came meanwhile is seen)
            if cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN:
                continue
            await self._readable.wait()

    def receive_now(self, limit: int, *, copy: bool = True) -> list[list[Any]]:
        """Up to ``limit`` messages queued now, without waiting (maybe none)."""
        batch: list[list[Any]] = []
        recv = self.sock.recv
        # Frames, whose ``more`` is read without getsockopt: pyzmq's getsockopt makes an
        # enum of the option on every call (~30% of receiving an 8-frame message).
        try:
            for _ in range(limit):
                frame = recv(_NOBLOCK, False)
                parts = [frame.bytes if copy else frame]
                while frame.more:  # (the rest of a message is there once its first part is)
                    frame = recv(_NOBLOCK, False)
                    parts.append(frame.bytes if copy else frame)
                batch.append(parts)
        except zmq.Again:
            pass
        return batch

    def send_soon(self, frames: list[Any]) -> None:
        """Send ``frames`` at the end of this turn of the loop (never blocks)."""
        if not self._outbox:
            self._loop.call_soon(self.flush)
        self._outbox.append(frames)

    def flush(self) -> None:
        """Send what is queued now; a send the socket refuses (full, or no such peer)
        goes to :attr:`on_failed`."""
        if not self._outbox or self.closed:
            return
        messages, self._outbox = self._outbox, []
        try:
            for frames in messages:
                try:
                    self._send(frames)
                except zmq.ZMQError as e:
                    if self.on_failed is not None:
                        self.on_failed(frames, e)
        finally:
            self._recheck()

    def send_now(self, frames: list[Any]) -> None:
        """Send ``frames`` at once, without waiting: raises ``zmq.Again`` when the
        socket cannot take them now, another ``zmq.ZMQError`` when it refuses them."""
        try:
            self._send(frames)
        finally:
            self._recheck()

    def _send(self, frames: list[Any]) -> None:
        # A refusal (zmq.Again, EHOSTUNREACH) comes at the first frame, before any is sent.
        send = self.sock.send
        for frame in frames[:-1]:
            send(frame, _SEND_MORE)
        send(frames[-1], _SEND_LAST)

    def _recheck(self) -> None:
        # Sending may have taken the signal of a message that arrived meanwhile.
        if cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN:
            self._readable.set()

    def close(self) -> None:
        """Stop watching the socket (the caller closes it)."""
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)
            self._readable.set()


class Outbox:
    """Messages for one peer, coalesced: the frames queued during one turn of the loop
    go to ``send`` as one list (one multipart message) at the end of the turn, or as soon
    as ``flush_at`` are queued.  A send that finds the peer's pipe empty wakes libzmq's
    I/O thread, which on a small machine costs more than the rest of handing over a
    message; holding a whole turn back, though, left the peer idle while this side
    finished it (the front's pool and a worker each keep one per peer)."""

    __slots__ = ("_frames", "_send", "flush_at")

    def __init__(self, send: Callable[[list[bytes]], object], flush_at: int) -> None:
        self._send = send
        self._frames: list[bytes] = []
        self.flush_at = flush_at

    def put(self, frame: bytes) -> None:
        """Queue ``frame``; on the loop's thread only."""
        if not self._frames:
            asyncio.get_running_loop().call_soon(self.flush)
        self._frames.append(frame)
        if len(self._frames) >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        """Send what is queued now (nothing when it went already)."""
        if self._frames:
            frames, self._frames = self._frames, []
            self._send(frames)

    def __len__(self) -> int:
        return len(self._frames)
