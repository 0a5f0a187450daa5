"""HOOT01 multipart framing and the ROUTER envelope around it.

A HOOT01 message is seven frames: ``b"HOOT01"``, command (u16 BE), content type
(u16 BE), request id (16 raw bytes), service (UTF-8), traceparent (UTF-8, empty for
none), body. A ROUTER sees routing identity frames before them; a legacy peer sends one
frame holding a MsgPack ``Envelope`` instead.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence

import msgspec

from hooteproto.codec import DecodeError, Encoding, detect_msgpack

PROTOCOL = b"HOOT01"
FRAME_COUNT = 7


class Command(enum.IntEnum):
    READY = 1
    REQUEST = 2
    REPLY = 3
    HEARTBEAT = 4
    DISCONNECT = 5


class ContentType(enum.IntEnum):
    EMPTY = 0
    MSGPACK = 1
    RAW_BINARY = 2
    JSON = 3


class FrameError(DecodeError):
    """A multipart message that is not valid HOOT01 framing."""


class Hoot01(msgspec.Struct, kw_only=True):
    """One HOOT01 message (without routing identities)."""

    command: Command
    content_type: ContentType = ContentType.EMPTY
    request_id: uuid.UUID
    service: str = ""
    traceparent: str | None = None
    body: bytes = b""

    def to_frames(self) -> list[bytes]:
        """The seven frames, ready for ``send_multipart`` after any identities."""
        return [
            PROTOCOL,
            self.command.to_bytes(2, "big"),
            self.content_type.to_bytes(2, "big"),
            self.request_id.bytes,
            self.service.encode(),
            (self.traceparent or "").encode(),
            self.body,
        ]

    def body_encoding(self) -> Encoding:
        """The encoding of a MsgPack or JSON body; :class:`FrameError` otherwise."""
        if self.content_type is ContentType.JSON:
            return Encoding.JSON
        if self.content_type is ContentType.MSGPACK:
            return detect_msgpack(self.body)
        raise FrameError(f"content type {self.content_type.name.lower()} carries no payload")


def content_type_for(encoding: Encoding) -> ContentType:
    """The HOOT01 content type that announces a body in ``encoding``."""
    return ContentType.JSON if encoding is Encoding.JSON else ContentType.MSGPACK


def split_route(frames: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split a ROUTER message into (routing frames, message frames).

    The message starts at the first ``HOOT01`` frame; without one it is a legacy
    single-frame message and every frame before the last is routing (including the
    empty delimiter a REQ peer adds, which its reply must carry back).
    """
    for i, frame in enumerate(frames):
        if frame == PROTOCOL:
            return list(frames[:i]), list(frames[i:])
    return list(frames[:-1]), list(frames[-1:])


def _u16(frame: bytes, name: str) -> int:
    if len(frame) != 2:
        raise FrameError(f"{name} frame must be 2 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def _text(frame: bytes, name: str) -> str:
    try:
        return bytes(frame).decode()
    except UnicodeDecodeError:
        raise FrameError(f"{name} frame is not UTF-8") from None


def parse(frames: Sequence[bytes]) -> Hoot01:
    """Parse the frames of one HOOT01 message (starting at ``b"HOOT01"``).

    Raises :class:`FrameError` naming the offending frame.
    """
    if len(frames) != FRAME_COUNT:
        raise FrameError(f"HOOT01 message must have {FRAME_COUNT} frames, got {len(frames)}")
    if frames[0] != PROTOCOL:
        raise FrameError("first frame is not HOOT01")
    raw_command = _u16(frames[1], "command")
    raw_content = _u16(frames[2], "content type")
    try:
        command = Command(raw_command)
    except ValueError:
        raise FrameError(f"unknown command {raw_command}") from None
    try:
        content_type = ContentType(raw_content)
    except ValueError:
        raise FrameError(f"unknown content type {raw_content}") from None
    if len(frames[3]) != 16:
        raise FrameError(f"request id frame must be 16 bytes, got {len(frames[3])}")
    traceparent = _text(frames[5], "traceparent")
    return Hoot01(
        command=command,
        content_type=content_type,
        request_id=uuid.UUID(bytes=bytes(frames[3])),
        service=_text(frames[4], "service"),
        traceparent=traceparent or None,
        body=bytes(frames[6]),
    )


def request_id_of(frames: Sequence[bytes]) -> uuid.UUID | None:
    """The request id of a possibly malformed HOOT01 message, if one can be read."""
    if len(frames) > 3 and len(frames[3]) == 16:
        return uuid.UUID(bytes=bytes(frames[3]))
    return None
