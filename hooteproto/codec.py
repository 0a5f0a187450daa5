"""Body codecs: compact MsgPack, named MsgPack and JSON, as Rust serde writes them.

- compact: ``rmp_serde::to_vec`` — structs as arrays in field order, a tagged variant as
  an array whose first element is its tag, UUIDs as 16-byte bin;
- named: ``rmp_serde::to_vec_named`` — structs as maps, UUIDs as 16-byte bin;
- json: ``serde_json`` — structs as objects, UUIDs as strings.

The types in :mod:`hooteproto.types` are written once, for the named forms. For the
compact form every struct class gets a *compact twin*: a subclass with
``array_like=True`` whose struct-typed fields point at twins too. Decoding compact bytes
yields twins, which are instances of the canonical classes, so callers never see the
difference; encoding converts canonical instances to twins first. A struct class that
sets ``__compact_map__ = True`` gets a twin that stays a map (its fields still point at
twins): that is how serde writes an externally tagged enum, ``{"variant": body}``, in
every encoding. A class that names ``__compact_fields__`` gets a twin of just those
fields (a sibling class, not a subclass, which would inherit the rest): extension
fields a positional array cannot add without breaking seed 001 peers; decoding fills
in their defaults. A class that names ``__compact_trailing__`` (its last fields, each
defaulting to ``msgspec.UNSET``) gets a twin that may carry them as optional trailing
array elements: decoding accepts the array with or without them, and encoding writes
them only when set, so a message that leaves them unset is byte-identical to the
seed's form.

Every decoding failure raises :class:`DecodeError` and nothing else.
"""

from __future__ import annotations

import enum
import functools
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from hooteproto.depth import CARRIER_DEPTH, MAX_DEPTH, TooDeepError, check_json, check_msgpack, peek
from hooteproto.types import Broadcast, Envelope, Payload, ReadyPayload

T = TypeVar("T")


class Encoding(enum.Enum):
    """A body encoding. A reply is written in the encoding of its request."""

    COMPACT = "compact"
    NAMED = "named"
    JSON = "json"


class DecodeError(ValueError):
    """Bytes that are not a valid message. The only exception the decoders raise.

    ``path`` names where in the message the problem is (e.g. ``$.payload.type``) when
    known.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


# --- compact twins -------------------------------------------------------------------

_CANONICAL: dict[type, type] = {}  # compact twin -> canonical class


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _is_twin(cls: type[msgspec.Struct]) -> bool:
    """Whether instances of ``cls`` are already in compact form."""
    return cls.__struct_config__.array_like or cls in _CANONICAL


@functools.cache
def compact_twin(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The compact twin of a struct class (cached; a twin is its own twin): ``array_like``,
    or a map for a class with ``__compact_map__ = True``."""
    if _is_twin(cls):
        return cls
    as_map = getattr(cls, "__compact_map__", False)
    only = getattr(cls, "__compact_fields__", None)
    trailing = _trailing(cls)
    fields = [
        _twin_field(f, keep_default=as_map or f.name in trailing)
        for f in msgspec.structs.fields(cls)
        if only is None or f.name in only
    ]
    if only is None:
        twin = msgspec.defstruct(cls.__name__, fields, bases=(cls,), module=cls.__module__, array_like=not as_map)
        _CANONICAL[twin] = cls
        return twin
    return _sibling_twin(cls, fields)


def _sibling_twin(cls: type[msgspec.Struct], fields: list[tuple]) -> type[msgspec.Struct]:
    """A compact twin of ``cls`` with only ``fields``: a sibling class (same bases and
    tag), since a subclass would inherit the fields left out."""
    config = cls.__struct_config__
    twin = msgspec.defstruct(
        cls.__name__, fields, bases=cls.__bases__, module=cls.__module__, array_like=True,
        tag=config.tag, tag_field=config.tag_field,
    )  # fmt: skip
    _CANONICAL[twin] = cls
    return twin


def _trailing(cls: type) -> tuple[str, ...]:
    """A class's ``__compact_trailing__`` fields (none unless it names some)."""
    names: tuple[str, ...] = getattr(cls, "__compact_trailing__", ())
    return names


@functools.cache
def _short_twin(cls: type[msgspec.Struct], n: int) -> type[msgspec.Struct]:
    """The compact twin of ``cls`` without its last ``n`` ``__compact_trailing__``
    fields: what encoding writes when they are unset (decoding never makes one)."""
    return _sibling_twin(cls, [_twin_field(f, keep_default=False) for f in msgspec.structs.fields(cls)[:-n]])


def _twin_field(f: msgspec.structs.FieldInfo, *, keep_default: bool) -> tuple:
    # No defaults in arrays: like serde's derived visit_seq, a compact array must hold
    # every field. A map twin keeps them, so omit_defaults still omits.
    tp = _twin_type(f.type)
    if not keep_default or f.required:
        return (f.name, tp)
    if f.default_factory is not msgspec.NODEFAULT:
        return (f.name, tp, msgspec.field(default_factory=f.default_factory))
    return (f.name, tp, f.default)


def _twin_type(tp: Any) -> Any:
    """Rewrite a field annotation so each struct class in it becomes its twin."""
    if _is_struct(tp):
        return compact_twin(tp)
    origin = typing.get_origin(tp)
    if origin is None:
        return tp
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return typing.Annotated[(_twin_type(args[0]), *tp.__metadata__)]
    new_args = tuple(_twin_type(a) for a in args)
    if new_args == args:
        return tp
    if origin in (typing.Union, types.UnionType):
        return typing.Union[new_args]  # noqa: UP007 (a union built from a tuple at run time)
    return origin[new_args]


def _converter(tp: Any, convert: Callable[[Any], Any]) -> Callable[[Any], Any] | None:
    """A function applying ``convert`` to every struct inside a value of annotation
    ``tp``; ``None`` when ``tp`` holds no struct, so the value passes through untouched
    (JSON-like ``Any`` results are never walked)."""
    if _is_struct(tp):
        return convert
    origin = typing.get_origin(tp)
    if origin is None:
        return None
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _converter(args[0], convert)

    def one(v: Any) -> Any:
        return convert(v) if isinstance(v, msgspec.Struct) else v

    if origin in (typing.Union, types.UnionType):
        return one if any(_converter(a, convert) for a in args) else None
    if origin in (list, tuple, set, frozenset):
        if any(_converter(a, convert) for a in args if a is not Ellipsis):
            return lambda v: [one(x) for x in v]
        return None
    if origin is dict and _converter(args[1], convert):
        return lambda v: {k: one(x) for k, x in v.items()}
    return None


@functools.cache
def _plan(cls: type[msgspec.Struct], target: type[msgspec.Struct]) -> tuple:
    convert = to_canonical if _is_twin(cls) else to_compact
    hints = typing.get_type_hints(target, include_extras=True)
    # (a twin of __compact_fields__ has fewer fields than its class: only shared ones)
    return tuple((name, _converter(hints[name], convert)) for name in cls.__struct_fields__ if name in hints)


def _rebuild(obj: msgspec.Struct, target: type[msgspec.Struct]) -> msgspec.Struct:
    values = {}
    for name, conv in _plan(type(obj), target):
        v = getattr(obj, name)
        values[name] = conv(v) if conv is not None and v is not None else v
    return target(**values)


def to_compact(obj: msgspec.Struct) -> msgspec.Struct:
    """Convert a struct (and the structs inside it) to compact twins for encoding."""
    cls = type(obj)
    canonical = _CANONICAL.get(cls)
    if canonical is not None and _trailing(canonical):
        obj, cls = to_canonical(obj), canonical  # a decoded twin: leave unset trailing fields out
    elif _is_twin(cls):
        return obj
    trailing = _trailing(cls)
    unset = 0  # trailing fields unset at the end: the array leaves them out
    for name in reversed(trailing):
        if getattr(obj, name) is not msgspec.UNSET:
            break
        unset += 1
    return _rebuild(obj, _short_twin(cls, unset) if unset else compact_twin(cls))


def to_canonical(obj: msgspec.Struct) -> msgspec.Struct:
    """Convert a compact twin (and the twins inside it) back to the canonical classes,
    so decoded values compare equal whatever encoding they came in."""
    cls = type(obj)
    canonical = _CANONICAL.get(cls)
    return obj if canonical is None else _rebuild(obj, canonical)


# --- codecs --------------------------------------------------------------------------

_MSGPACK_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
_JSON_ENCODER = msgspec.json.Encoder()


def detect_msgpack(buf: bytes | memoryview) -> Encoding:
    """Tell compact from named MsgPack by the first byte (array vs map)."""
    if not buf:
        raise DecodeError("empty body")
    b = buf[0]
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        return Encoding.COMPACT
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        return Encoding.NAMED
    raise DecodeError(f"body is not a MsgPack array or map (first byte 0x{b:02x})")


def detect(buf: bytes | memoryview) -> Encoding:
    """Guess the encoding of a body that came without a content type."""
    if buf and buf[0] in b"{ \t\r\n":
        return Encoding.JSON
    return detect_msgpack(buf)


class Codec(Generic[T]):
    """Encode and decode one message type (a struct or a tagged union) in all three
    encodings.  Decoding refuses bodies nested deeper than ``max_depth`` levels
    (:data:`hooteproto.depth.MAX_DEPTH` unless told)."""

    def __init__(self, tp: Any, *, max_depth: int = MAX_DEPTH) -> None:
        self.type = tp
        self.max_depth = max_depth
        self._decoders: dict[Encoding, msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]] = {
            Encoding.COMPACT: msgspec.msgpack.Decoder(_twin_type(tp)),
            Encoding.NAMED: msgspec.msgpack.Decoder(tp),
            Encoding.JSON: msgspec.json.Decoder(tp),
        }

    def decode(self, buf: bytes | memoryview, encoding: Encoding | None = None, *, max_depth: int | None = None) -> T:
        """Decode ``buf``; with no ``encoding``, detect it. Raises :class:`DecodeError`,
        also for a body nested deeper than ``max_depth`` (default: the codec's)."""
        if encoding is None:
            encoding = detect(buf)
        limit = self.max_depth if max_depth is None else max_depth
        try:
            if len(buf) > limit:  # (a shorter body cannot nest deeper: a level takes a byte)
                (check_json if encoding is Encoding.JSON else check_msgpack)(buf, limit)
            value: T = self._decoders[encoding].decode(buf)
        except TooDeepError as e:
            raise DecodeError(f"malformed {encoding.value} body: {e}") from None
        except RecursionError:  # deeper than the stack allows, past a malformed part
            raise DecodeError(f"malformed {encoding.value} body: {TooDeepError(limit)}") from None
        except msgspec.ValidationError as e:
            raise DecodeError(str(e), path=_path_of(str(e))) from None
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError) as e:
            raise DecodeError(f"malformed {encoding.value} body: {e}") from None
        if encoding is Encoding.COMPACT:
            # T is a struct type or a union of them, so this is one of T's structs again
            return typing.cast(T, to_canonical(typing.cast(msgspec.Struct, value)))
        return value

    def encode(self, obj: T, encoding: Encoding) -> bytes:
        """Encode ``obj`` (a canonical or compact instance) in ``encoding``."""
        if encoding is Encoding.JSON:
            return _JSON_ENCODER.encode(obj)
        if encoding is Encoding.COMPACT:
            return _MSGPACK_ENCODER.encode(to_compact(typing.cast(msgspec.Struct, obj)))
        return _MSGPACK_ENCODER.encode(obj)


def _path_of(message: str) -> str | None:
    _, sep, rest = message.rpartition(" - at `")
    return rest.rstrip("`") if sep else None


payload_codec: Codec[Payload] = Codec(Payload)
envelope_codec: Codec[Envelope] = Codec(Envelope)
# subscribers read broadcasts, which carry results a few levels down
broadcast_codec: Codec[Broadcast] = Codec(Broadcast, max_depth=MAX_DEPTH + CARRIER_DEPTH)
ready_codec: Codec[ReadyPayload] = Codec(ReadyPayload)


def encode_payload(payload: Payload, encoding: Encoding) -> bytes:
    """Encode a bare Payload (a HOOT01 body)."""
    return payload_codec.encode(payload, encoding)


def decode_payload(buf: bytes | memoryview, encoding: Encoding | None = None) -> Payload:
    """Decode a bare Payload; raises :class:`DecodeError`."""
    return payload_codec.decode(buf, encoding)


def encode_envelope(envelope: Envelope, encoding: Encoding = Encoding.COMPACT) -> bytes:
    """Encode a legacy Envelope."""
    return envelope_codec.encode(envelope, encoding)


def decode_envelope(buf: bytes | memoryview, encoding: Encoding | None = None) -> Envelope:
    """Decode a legacy Envelope; raises :class:`DecodeError`."""
    return envelope_codec.decode(buf, encoding)


def encode_broadcast(message: Broadcast) -> bytes:
    """A PUB frame: JSON with ``"type"`` first, which is what the gateway reads."""
    return broadcast_codec.encode(message, Encoding.JSON)


def decode_broadcast(buf: bytes | memoryview, encoding: Encoding | None = None) -> Broadcast:
    """Decode a broadcast frame; raises :class:`DecodeError`."""
    return broadcast_codec.decode(buf, encoding)


def peek_envelope_id(buf: bytes | memoryview) -> tuple[uuid.UUID | None, Encoding | None]:
    """Best-effort id and encoding of an Envelope that failed to decode, so that the
    error reply can still name the request. Never raises."""
    try:
        encoding = detect(buf)
    except DecodeError:
        return None, None
    # Only the id is decoded: the rest may be broken, or nested too deep to decode.
    json = encoding is Encoding.JSON
    is_array = (bytes(buf).lstrip()[:1] == b"[") if json else encoding is Encoding.COMPACT
    try:
        candidate = peek(buf, (0,) if is_array else ("id",), json=json)
    except Exception:  # noqa: BLE001 (best effort by contract)
        return None, encoding
    try:
        if isinstance(candidate, bytes) and len(candidate) == 16:
            return uuid.UUID(bytes=candidate), encoding
        if isinstance(candidate, str):
            return uuid.UUID(candidate), encoding
    except ValueError:
        pass
    return None, encoding
