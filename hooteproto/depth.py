"""The one nesting limit of every decoder, and how it is checked.

No decoder in hooteproto or the daemon accepts a document nested deeper than
:data:`MAX_DEPTH` (128) levels: the outermost array or map is level 1, a container in
it level 2, and so on; scalars add no level.  That covers wire bodies (HOOT01 bodies and
legacy envelopes, MsgPack and JSON), ``json.decode`` in scripts, values crossing into
and out of Lua, model backend answers and garden replies.  Deeper input is refused with
:class:`TooDeepError` (``nested deeper than 128 levels``); the wire codec turns it into
a :class:`~hooteproto.codec.DecodeError`.

Why a limit of our own: msgspec (like most decoders) recurses once per level and has no
depth option.  It raises ``RecursionError`` when Python's recursion limit runs out, at a
depth that depends on how deep the caller's stack already is (~900 levels), and that
error escapes every ``except msgspec.DecodeError``.  128 is far beyond any real message
and is the depth serde_json refuses at by default, so what our Rust peers can read we
read too.

Cost: the check runs on every request, so it is cheap when it cannot fail.  A document
of ``n`` bytes cannot nest deeper than ``n`` levels, and never deeper than the number
of bytes that could open a container (MsgPack array and map headers, JSON ``[`` and
``{``), counted in one C pass.  Only when that bound is over the limit is the depth
measured exactly: by a plain (untyped) decode, which ``RecursionError`` stops for
documents far too deep, and a walk of the decoded value level by level, without
recursion.

:func:`peek` reads one field near the start of a document without decoding (or
recursing into) the rest, so a message too deep or too broken to decode still yields
its request id for the error reply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec

__all__ = [
    "CARRIER_DEPTH",
    "MAX_DEPTH",
    "TooDeepError",
    "check_json",
    "check_msgpack",
    "check_value",
    "decode_json",
    "decode_msgpack",
    "peek",
]

MAX_DEPTH: Final = 128
"""The deepest nesting any decoder accepts (levels of arrays and maps)."""

CARRIER_DEPTH: Final = 8
"""Levels a message may add around a value it carries.  A reply or broadcast holds a
script's result (itself up to :data:`MAX_DEPTH` deep) a few levels down (``job_poll``:
success → result → completed → job → result), so readers of replies and broadcasts,
and the daemon's front↔worker channel, accept ``MAX_DEPTH + CARRIER_DEPTH``."""


class TooDeepError(ValueError):
    """A document or value nested deeper than the limit.  The message names the limit:
    ``nested deeper than 128 levels``."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        super().__init__(f"nested deeper than {limit} levels")
        self.limit = limit


# --- bounds: one C pass over the bytes ------------------------------------------------

_MSGPACK_OPENERS: Final = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_MSGPACK_OPENERS: Final = bytes(b for b in range(256) if b not in _MSGPACK_OPENERS)
_NOT_JSON_OPENERS: Final = bytes(b for b in range(256) if b not in b"[{")


def _msgpack_bound(buf: bytes) -> int:
    """An upper bound of the nesting of MsgPack ``buf``: its bytes that could open an
    array or a map (fixmap, fixarray, map16/32, array16/32)."""
    return len(buf.translate(None, _NOT_MSGPACK_OPENERS))


def _json_bound(buf: bytes) -> int:
    return len(buf.translate(None, _NOT_JSON_OPENERS))


# --- exact: a walk of a decoded value -------------------------------------------------

_NESTED: Final = frozenset({list, dict, tuple})


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` (lists, tuples, dicts) nests deeper than ``limit``; one level at
    a time, no recursion (a cycle is too deep)."""
    level = [value] if type(value) in _NESTED else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            if type(container) is dict:
                parts: Iterable[Any] = (container.values(), container.keys())  # msgpack keys may be arrays
            else:
                parts = (container,)
            for items in parts:
                # the common case, no container inside, stays in C
                if not _NESTED.isdisjoint(map(type, items)):
                    below.extend([item for item in items if type(item) in _NESTED])
        level = below
    return False


def check_value(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`TooDeepError` if ``value`` (JSON-like: lists, tuples, dicts)
    nests deeper than ``limit`` levels or contains itself."""
    if type(value) in _NESTED and _too_deep(value, limit):
        raise TooDeepError(limit)


def _check_bytes(buf: bytes, limit: int, module: Any, bound: Any) -> None:
    if len(buf) <= limit or bound(buf) <= limit:
        return
    try:
        value = module.decode(buf)
    except RecursionError:
        raise TooDeepError(limit) from None
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError):
        return  # malformed: the real decoder says how
    if _too_deep(value, limit):
        raise TooDeepError(limit)


def check_msgpack(buf: bytes | memoryview, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`TooDeepError` if MsgPack ``buf`` nests deeper than ``limit``.

    Malformed bytes pass unless they are too deep before they go wrong: the decoder that
    runs next reports them."""
    _check_bytes(bytes(buf), limit, msgspec.msgpack, _msgpack_bound)


def check_json(buf: bytes | memoryview | str, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`TooDeepError` if JSON ``buf`` nests deeper than ``limit``; as
    :func:`check_msgpack`."""
    _check_bytes(buf.encode() if isinstance(buf, str) else bytes(buf), limit, msgspec.json, _json_bound)


def _decode(buf: bytes, limit: int, decoder: Any, bound: Any) -> Any:
    try:
        value = decoder.decode(buf)
    except RecursionError:
        raise TooDeepError(limit) from None
    if len(buf) > limit and bound(buf) > limit and _too_deep(value, limit):
        raise TooDeepError(limit)
    return value


_json_decoder: Final = msgspec.json.Decoder()
_msgpack_decoder: Final = msgspec.msgpack.Decoder()


def decode_json(buf: bytes | str, limit: int = MAX_DEPTH) -> Any:
    """Untyped ``msgspec.json.decode`` that refuses nesting deeper than ``limit``.
    Raises ``msgspec.DecodeError`` for malformed text, :class:`TooDeepError`."""
    return _decode(buf.encode() if isinstance(buf, str) else buf, limit, _json_decoder, _json_bound)


def decode_msgpack(buf: bytes, limit: int = MAX_DEPTH) -> Any:
    """Untyped ``msgspec.msgpack.decode`` that refuses nesting deeper than ``limit``.
    Raises ``msgspec.DecodeError`` for malformed bytes, :class:`TooDeepError`."""
    return _decode(buf, limit, _msgpack_decoder, _msgpack_bound)


# --- peek: one leading field, without decoding the rest -------------------------------

# MessagePack: the size of every fixed-size item by its first byte; for str, bin and
# ext (whose length follows the first byte) the size of the length and of the ext type.
_FIXED_SIZE: Final = {
    0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip
_SIZED: Final = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
}  # fmt: skip
_ARRAYS: Final = {0xDC: 2, 0xDD: 4}
_MAPS: Final = {0xDE: 2, 0xDF: 4}


def _mp_head(buf: bytes, pos: int) -> tuple[int, int, str]:
    """The item at ``pos``: where its contents start (or it ends, for a scalar), how many
    items it holds (a map's keys and values both count) and ``array``, ``map`` or
    ``scalar``."""
    b = buf[pos]
    if b < 0x80 or b >= 0xE0:
        return pos + 1, 0, "scalar"
    if b < 0x90:
        return pos + 1, 2 * (b & 0x0F), "map"
    if b < 0xA0:
        return pos + 1, b & 0x0F, "array"
    if b < 0xC0:
        return pos + 1 + (b & 0x1F), 0, "scalar"
    if b in _FIXED_SIZE:
        return pos + _FIXED_SIZE[b], 0, "scalar"
    if b in _SIZED:
        width, extra = _SIZED[b]
        return pos + 1 + width + extra + int.from_bytes(buf[pos + 1 : pos + 1 + width], "big"), 0, "scalar"
    if b not in _ARRAYS and b not in _MAPS:
        raise ValueError(f"not MessagePack: byte 0x{b:02x} at {pos}")
    width = _ARRAYS.get(b) or _MAPS[b]
    count = int.from_bytes(buf[pos + 1 : pos + 1 + width], "big")
    return pos + 1 + width, count * (2 if b in _MAPS else 1), "array" if b in _ARRAYS else "map"


def _mp_skip(buf: bytes, pos: int) -> int:
    """The end of the item at ``pos`` (iterative: any depth)."""
    pending = 1
    while pending:
        pos, inner, _ = _mp_head(buf, pos)
        pending += inner - 1
    if pos > len(buf):
        raise ValueError("truncated MessagePack")
    return pos


def _mp_step(buf: bytes, pos: int, step: int | str) -> int:
    start, inner, kind = _mp_head(buf, pos)
    if kind == "array" and isinstance(step, int) and 0 <= step < inner:
        for _ in range(step):
            start = _mp_skip(buf, start)
        return start
    if kind == "map" and isinstance(step, str):
        for _ in range(inner // 2):
            end = _mp_skip(buf, start)
            if 0xA0 <= buf[start] < 0xC0 or 0xD9 <= buf[start] <= 0xDB:  # a str key
                if msgspec.msgpack.decode(buf[start:end]) == step:
                    return end
            start = _mp_skip(buf, end)
    raise LookupError(step)


_JSON_TOKEN: Final = re.compile(
    rb'[ \t\r\n]*(?:(?P<string>"[^"\\]*(?:\\.[^"\\]*)*")|(?P<open>[\[{])|(?P<close>[\]}])|(?P<punct>[,:])'
    rb'|(?P<scalar>[^ \t\r\n\[\]{},:"]+))',
    re.DOTALL,
)


def _js_token(buf: bytes, pos: int) -> tuple[str, int, int]:
    """The kind, start and end of the JSON token at ``pos`` (after white space)."""
    match = _JSON_TOKEN.match(buf, pos)
    if match is None or match.lastgroup is None:
        raise ValueError(f"not JSON at {pos}")
    return match.lastgroup, match.start(match.lastgroup), match.end()


def _js_skip(buf: bytes, pos: int) -> int:
    kind, _, end = _js_token(buf, pos)
    depth = 1 if kind == "open" else 0
    while depth:
        kind, _, end = _js_token(buf, end)
        depth += 1 if kind == "open" else -1 if kind == "close" else 0
    return end


def _js_expect(buf: bytes, pos: int, text: bytes) -> int:
    _, start, end = _js_token(buf, pos)
    if buf[start:end] != text:
        raise ValueError(f"expected {text.decode()} at {start}")
    return end


def _js_step(buf: bytes, pos: int, step: int | str) -> int:
    kind, start, end = _js_token(buf, pos)
    if kind != "open":
        raise LookupError(step)
    closer = b"]" if buf[start] == ord("[") else b"}"
    is_array = closer == b"]"
    if is_array != isinstance(step, int):
        raise LookupError(step)
    index = 0
    while True:
        kind, start, after = _js_token(buf, end)
        if kind == "close":
            raise LookupError(step)
        if is_array:
            if index == step:
                return end
        else:
            if kind != "string":
                raise ValueError(f"expected a key at {start}")
            end = _js_expect(buf, after, b":")
            if msgspec.json.decode(buf[start:after]) == step:
                return end
        end = _js_skip(buf, end)
        index += 1
        kind, start, end = _js_token(buf, end)
        if kind == "close" or buf[start:end] != b",":
            raise LookupError(step)


def peek(buf: bytes | memoryview, path: Sequence[int | str], *, json: bool) -> Any:
    """The value at ``path`` (array indexes and map keys) in MsgPack or JSON ``buf``,
    decoded on its own: the rest of the document is only skipped (iteratively, so any
    depth), and may be malformed after it.  For a leading field of a message, e.g. the
    ``id`` of an envelope that failed to decode.

    Raises LookupError when the path is not there, ValueError (``msgspec.DecodeError``,
    :class:`TooDeepError`) when the bytes on the way are not a document."""
    buf = bytes(buf)
    step_in, skip = (_js_step, _js_skip) if json else (_mp_step, _mp_skip)
    try:
        pos = 0
        for step in path:
            pos = step_in(buf, pos, step)
        end = skip(buf, pos)
    except IndexError:
        raise ValueError("truncated document") from None
    return decode_json(buf[pos:end]) if json else decode_msgpack(buf[pos:end])
