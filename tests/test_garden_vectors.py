"""The chaosgarden shell messages: the golden vectors made by Rust serde/rmp-serde decode
in all three encodings and re-encode byte for byte -- except where Rust wrote a float32,
which Python writes as a float64 of the same value -- plus decode errors and random
round trips."""

from __future__ import annotations

import json
import math
import re
import struct
import types
import typing
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hooteproto import DecodeError
from hooteproto.codec import Codec, Encoding
from hooteproto.garden import (
    FLOAT32_FIELDS,
    Behavior,
    CreateRegion,
    Latent,
    MessageHeader,
    Ok,
    Play,
    PlayContent,
    ShellReply,
    ShellReplyMessage,
    ShellRequest,
    ShellRequestMessage,
    UpdateLatentProgress,
    shell_reply_codec,
    shell_reply_content_codec,
    shell_request_codec,
    shell_request_content_codec,
)
from hooteproto.types import tag_of, variants
from tests.strategies import strategy_for

VECTORS = Path(__file__).parent / "protocol-vectors" / "garden"

CODECS: dict[str, tuple[Codec, Codec]] = {  # kind -> (message codec, content codec)
    "shell_request": (shell_request_codec, shell_request_content_codec),
    "shell_reply": (shell_reply_codec, shell_reply_content_codec),
}
ALL_CODECS = [codec for pair in CODECS.values() for codec in pair]
MSGPACK = [("msgpack_compact_hex", Encoding.COMPACT), ("msgpack_named_hex", Encoding.NAMED)]


class Case(NamedTuple):
    kind: str  # "shell_request" or "shell_reply"
    name: str
    vector: dict

    @property
    def codec(self) -> Codec:
        return CODECS[self.kind][0]

    @property
    def content_codec(self) -> Codec:
        return CODECS[self.kind][1]


CASES = [
    Case(kind, p.stem, json.loads(p.read_text()))
    for kind in CODECS
    for p in sorted((VECTORS / kind).glob("*.json"))
]
IDS = [f"{c.kind}/{c.name}" for c in CASES]


# --- MsgPack tokens ------------------------------------------------------------------
# msgspec.msgpack.decode turns float32 and float64 alike into a Python float, so the
# test reads MsgPack itself to find where Rust wrote a float32 (marker 0xca).


class Token(NamedTuple):
    """A scalar in a MsgPack buffer: where it is in the tree and in the bytes."""

    path: tuple
    start: int
    end: int
    marker: int
    value: Any


_SCALARS = {0xC0: None, 0xC2: False, 0xC3: True}
_NUMBERS = {
    0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
    0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
}  # fmt: skip
_SIZED = {  # marker -> (length format, kind)
    0xC4: (">B", "bin"), 0xC5: (">H", "bin"), 0xC6: (">I", "bin"),
    0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"),
    0xDC: (">H", "array"), 0xDD: (">I", "array"), 0xDE: (">H", "map"), 0xDF: (">I", "map"),
}  # fmt: skip


def msgpack_tokens(buf: bytes) -> list[Token]:
    """Every scalar value in ``buf`` (map keys aside), in order. A path element is a map
    key or an array index."""
    out: list[Token] = []

    def read(i: int, path: tuple, emit: bool = True) -> tuple[Any, int]:
        start, b = i, buf[i]
        i += 1
        if b <= 0x7F or b >= 0xE0:
            value = b if b <= 0x7F else b - 0x100
        elif b in _SCALARS:
            value = _SCALARS[b]
        elif b in _NUMBERS:
            fmt = _NUMBERS[b]
            (value,) = struct.unpack_from(fmt, buf, i)
            i += struct.calcsize(fmt)
        else:
            if 0x80 <= b <= 0x8F:
                n, kind = b & 0x0F, "map"
            elif 0x90 <= b <= 0x9F:
                n, kind = b & 0x0F, "array"
            elif 0xA0 <= b <= 0xBF:
                n, kind = b & 0x1F, "str"
            else:
                fmt, kind = _SIZED[b]
                (n,) = struct.unpack_from(fmt, buf, i)
                i += struct.calcsize(fmt)
            if kind == "array":
                for k in range(n):
                    _, i = read(i, path + (k,))
                return None, i
            if kind == "map":
                for _ in range(n):
                    key, i = read(i, path, emit=False)
                    _, i = read(i, path + (key,))
                return None, i
            value = bytes(buf[i : i + n])
            i += n
            if kind == "str":
                value = value.decode()
        if emit:
            out.append(Token(path, start, i, b, value))
        return value, i

    _, end = read(0, ())
    assert end == len(buf), "trailing bytes"
    return out


def float32_paths(value: Any, compact: bool, path: tuple = ()) -> list[tuple]:
    """Where the fields in FLOAT32_FIELDS sit in the MsgPack tree of ``value``: by index
    in a compact array (after the tag, if any), by name in a map."""
    if isinstance(value, msgspec.Struct):
        cls = type(value)
        as_array = compact and not getattr(cls, "__compact_map__", False)
        first = 1 if cls.__struct_config__.tag is not None else 0
        out = []
        for i, name in enumerate(cls.__struct_fields__):
            at = path + ((first + i) if as_array else name,)
            if (cls, name) in FLOAT32_FIELDS:
                out.append(at)
            else:
                out += float32_paths(getattr(value, name), compact, at)
        return out
    if isinstance(value, (list, tuple)):
        items: Any = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    else:
        return []
    return [p for k, v in items for p in float32_paths(v, compact, path + (k,))]


def as_float32(x: float) -> float:
    return struct.unpack(">f", struct.pack(">f", x))[0]


def assert_same_msgpack(ours: bytes, theirs: bytes, value: Any, encoding: Encoding) -> None:
    """``ours`` is ``theirs`` byte for byte, except that each float32 Rust wrote is a
    float64 of the same value in ours -- and float32s sit exactly at FLOAT32_FIELDS."""
    theirs_f32 = [t for t in msgpack_tokens(theirs) if t.marker == 0xCA]
    compact = encoding is Encoding.COMPACT
    assert [t.path for t in theirs_f32] == float32_paths(value, compact)
    if not theirs_f32:
        assert ours == theirs
        return
    ours_by_path = {t.path: t for t in msgpack_tokens(ours)}
    expected, at = bytearray(), 0
    for t in theirs_f32:
        mine = ours_by_path[t.path]
        assert mine.marker == 0xCB  # Python writes float64
        assert as_float32(mine.value) == t.value  # the same float32 ...
        assert math.isclose(mine.value, t.value, rel_tol=0, abs_tol=1e-6)  # ... near enough
        expected += theirs[at : t.start] + ours[mine.start : mine.end]
        at = t.end
    expected += theirs[at:]
    assert ours == bytes(expected)  # and everything else is identical


def content_json_text(message_text: str) -> str:
    """The ``content`` member of a message as serde_json wrote it (the last member)."""
    key = '"content":'
    start = message_text.rfind(key)
    while start != -1:
        try:
            _, end = json.JSONDecoder().raw_decode(message_text, start + len(key))
        except ValueError:
            end = -1
        if end == len(message_text) - 1:
            return message_text[start + len(key) : end]
        start = message_text.rfind(key, 0, start)
    raise AssertionError("no top-level content in message text")


# --- vector coverage -----------------------------------------------------------------


@pytest.mark.parametrize("kind,union,count", [
    ("shell_request", ShellRequest, 23), ("shell_reply", ShellReply, 7),
])  # fmt: skip
def test_every_variant_has_a_vector(kind, union, count):
    tags = {tag_of(cls) for cls in variants(union)}
    assert len(tags) == count
    assert tags == {c.vector["variant"] for c in CASES if c.kind == kind}


def test_rust_decodes_every_vector_back():
    """The round trips below assume exact ones on the Rust side too."""
    for c in CASES:
        checks = c.vector["rust_decodes_back"]
        assert all(v is True for part in checks.values() for v in part.values()), c.name


def _raw(case: Case) -> bytes:
    return bytes.fromhex(case.vector["msgpack_compact_hex"])


def test_float32_appears_exactly_in_vectors_with_float32_fields():
    with_f32 = {
        c.name for c in CASES if any(t.marker == 0xCA for t in msgpack_tokens(_raw(c)))
    }
    with_fields = {
        c.name for c in CASES if float32_paths(c.codec.decode(_raw(c)), compact=True)
    }
    assert with_f32 == with_fields
    assert with_f32 == {"update_latent_progress", "update_latent_progress__exact"}


# --- golden vectors ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("part", ["message", "content_only"])
@pytest.mark.parametrize("key,encoding", MSGPACK, ids=["compact", "named"])
def test_msgpack_round_trip(case, part, key, encoding):
    if part == "message":
        codec, raw = case.codec, bytes.fromhex(case.vector[key])
    else:
        codec, raw = case.content_codec, bytes.fromhex(case.vector["content_only"][key])
    value = codec.decode(raw)  # detected
    assert codec.decode(raw, encoding) == value
    assert_same_msgpack(codec.encode(value, encoding), raw, value, encoding)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_json_round_trip(case):
    text = case.vector["json_text"].encode()
    message = case.codec.decode(text, Encoding.JSON)
    assert case.codec.encode(message, Encoding.JSON) == text  # float32s too: "0.1" stays

    content_text = content_json_text(case.vector["json_text"]).encode()
    content = case.content_codec.decode(content_text)
    assert case.content_codec.encode(content, Encoding.JSON) == content_text
    assert content == message.content
    # content_only.json has its keys sorted, so "type" is not first: still fine.
    sorted_text = msgspec.json.encode(case.vector["content_only"]["json"])
    assert case.content_codec.decode(sorted_text, Encoding.JSON) == content


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_encoding_decodes_to_the_documented_value(case):
    v = case.vector
    messages = [case.codec.decode(bytes.fromhex(v[k])) for k, _ in MSGPACK]
    messages.append(case.codec.decode(v["json_text"].encode()))
    contents = [
        case.content_codec.decode(bytes.fromhex(v["content_only"][k])) for k, _ in MSGPACK
    ]
    assert all(m == messages[0] for m in messages)
    assert all(c == messages[0].content for c in contents)
    assert tag_of(type(contents[0])) == v["variant"]
    # Exact equality with the JSON values, float32 fields included (0.1, not 0.10000000149).
    assert json.loads(msgspec.json.encode(messages[0])) == v["json"]
    assert json.loads(msgspec.json.encode(contents[0])) == v["content_only"]["json"]


# --- decode errors -------------------------------------------------------------------

GARBAGE = [
    b"", b"\xc1", b"\x91", b"\x94\xc0", b"\xff" * 8, b"\x81\xa4type", b"{", b"[]", b"{}",
    b"null", b"\x90", b"\x80", b"\xe9",
]  # fmt: skip


@pytest.mark.parametrize("raw", GARBAGE)
@pytest.mark.parametrize("codec", ALL_CODECS)
@pytest.mark.parametrize("encoding", [None, *Encoding])
def test_garbage_raises_decode_error(raw, codec, encoding):
    with pytest.raises(DecodeError):
        codec.decode(raw, encoding)


def _by_name(kind: str, name: str) -> dict:
    return next(c.vector for c in CASES if (c.kind, c.name) == (kind, name))


_REQUEST = _by_name("shell_request", "create_region")
_REPLY = _by_name("shell_reply", "ok")
_DELETE = _by_name("shell_request", "delete_region")["content_only"]["msgpack_compact_hex"]


def _create_region(behavior: Any) -> bytes:
    body = {"type": "create_region", "position": 0.0, "duration": 1.0, "behavior": behavior}
    return msgspec.json.encode(body)


WRONG = [
    # a reply is not a request, nor the other way round
    (shell_request_codec, bytes.fromhex(_REPLY["msgpack_compact_hex"]), "'ok'"),
    (shell_request_codec, _REPLY["json_text"].encode(), "'ok'"),
    (shell_reply_codec, bytes.fromhex(_REQUEST["msgpack_named_hex"]), "'create_region'"),
    (shell_request_content_codec, b'{"type":"ok","result":1}', "'ok'"),
    (shell_request_content_codec, b'{"type":"bogus"}', "'bogus'"),
    (shell_request_content_codec, b'{"job_id":"j"}', "type"),
    # a Behavior is exactly one known variant
    (shell_request_content_codec, _create_region({}), "exactly one"),
    (shell_request_content_codec,
     _create_region({"latent": {"job_id": "j"}, "play_content": {"artifact_id": "a"}}),
     "exactly one"),
    (shell_request_content_codec, _create_region({"nope": {}}), "nope"),
    (shell_request_content_codec, _create_region("latent"), "behavior"),
    (shell_request_content_codec,
     msgspec.msgpack.encode(["create_region", 0.0, 1.0, ["job_1"]]), "$[3]"),
    # wrong field types
    (shell_request_content_codec,
     bytes.fromhex(_DELETE.replace("c410", "c40f")[:-2]), "uuid"),  # 15-byte UUID
    (shell_request_content_codec,
     b'{"type":"update_latent_resolved","region_id":"4e610000-0000-4000-8000-0000000000aa",'
     b'"artifact_id":"a","content_hash":"h","content_type":"video"}', "'video'"),
    (shell_request_content_codec, b'{"type":"seek","beat":"32"}', "beat"),
    (shell_request_codec, b'{"header":{},"content":{"type":"play"}}', "header"),
]  # fmt: skip


@pytest.mark.parametrize("codec,raw,fragment", WRONG)
def test_wrong_messages_raise_decode_error(codec, raw, fragment):
    with pytest.raises(DecodeError) as info:
        codec.decode(raw)
    assert fragment.lower() in str(info.value).lower()


def _decodes_or_raises_decode_error(codec: Codec, raw: bytes, encoding: Encoding | None):
    try:
        codec.decode(raw, encoding)
    except DecodeError:
        pass  # anything else propagates and fails the test


@given(raw=st.binary(max_size=64), codec=st.sampled_from(ALL_CODECS),
       encoding=st.sampled_from([None, *Encoding]))  # fmt: skip
def test_random_bytes_raise_decode_error_only(raw, codec, encoding):
    _decodes_or_raises_decode_error(codec, raw, encoding)


VECTOR_KEYS = ["msgpack_compact_hex", "msgpack_named_hex", "json_text"]


@given(data=st.data(), case=st.sampled_from(CASES), key=st.sampled_from(VECTOR_KEYS))
def test_corrupted_vectors_raise_decode_error_only(data, case, key):
    raw = bytearray(
        case.vector[key].encode() if key == "json_text" else bytes.fromhex(case.vector[key])
    )
    at = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw[at] = data.draw(st.integers(0, 255))
    else:
        del raw[at:]
    _decodes_or_raises_decode_error(case.codec, bytes(raw), None)


# --- random round trips --------------------------------------------------------------

FLOAT32 = st.floats(min_value=-3.4028234663852886e38, max_value=3.4028234663852886e38)


def garden_strategy(tp: Any) -> st.SearchStrategy:
    """Like tests.strategies.strategy_for, plus what garden types need: a Behavior with
    exactly one variant, tuples, and float32-range values for FLOAT32_FIELDS."""
    if tp is Behavior:
        hints = typing.get_type_hints(Behavior)
        bodies = {n: next(a for a in typing.get_args(hints[n]) if a is not type(None))
                  for n in Behavior.__struct_fields__}  # fmt: skip
        return st.one_of(
            [st.builds(Behavior, **{n: garden_strategy(b)}) for n, b in bodies.items()]
        )
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = {
            n: FLOAT32 if (tp, n) in FLOAT32_FIELDS else garden_strategy(hints[n])
            for n in tp.__struct_fields__
        }
        return st.builds(tp, **fields)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([garden_strategy(a) for a in args])
    if origin is tuple:
        return st.tuples(*map(garden_strategy, args))
    if origin is list:
        return st.lists(garden_strategy(args[0]), max_size=4)
    return strategy_for(tp)


ROUND_TRIPS = [
    (shell_request_content_codec, ShellRequest),
    (shell_reply_content_codec, ShellReply),
    (shell_request_codec, ShellRequestMessage),
    (shell_reply_codec, ShellReplyMessage),
]
ROUND_TRIP_IDS = ["request", "reply", "request_message", "reply_message"]


@pytest.mark.parametrize("codec,tp", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
@pytest.mark.parametrize("encoding", list(Encoding), ids=lambda e: e.value)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_values_round_trip(codec, tp, encoding, data):
    value = data.draw(garden_strategy(tp))
    raw = codec.encode(value, encoding)
    back = codec.decode(raw, encoding)
    assert back == value
    assert codec.decode(raw) == value  # the encoding is detected too
    assert codec.encode(back, encoding) == raw


# --- helpers -------------------------------------------------------------------------


def test_float32_fields_hold_what_rust_holds():
    assert UpdateLatentProgress(uuid.uuid4(), as_float32(0.1)).progress == 0.1
    assert UpdateLatentProgress(uuid.uuid4(), 0.123456789).progress == 0.12345679
    assert UpdateLatentProgress(uuid.uuid4(), 1e39).progress == math.inf  # `as f32`
    assert UpdateLatentProgress(uuid.uuid4(), 0.75).progress == 0.75


def test_behavior_helpers():
    b = Behavior.of(Latent("job_1"))
    assert b == Behavior(latent=Latent("job_1"))
    assert (b.kind, b.value) == ("latent", Latent("job_1"))
    with pytest.raises(ValueError, match="exactly one"):
        Behavior(latent=Latent("j"), play_content=PlayContent("a"))
    with pytest.raises(TypeError):
        Behavior.of("latent")  # type: ignore[arg-type]
    region = CreateRegion(0.0, 4.0, b)
    assert shell_request_content_codec.encode(region, Encoding.JSON) == (
        b'{"type":"create_region","position":0.0,"duration":4.0,'
        b'"behavior":{"latent":{"job_id":"job_1"}}}'
    )
    compact = msgspec.msgpack.encode(["create_region", 0.0, 4.0, {"latent": ["job_1"]}])
    assert shell_request_content_codec.encode(region, Encoding.COMPACT) == compact


def test_request_and_reply_messages():
    session = uuid.uuid4()
    request = ShellRequestMessage.new(Play(), session=session)
    assert (request.header.session, request.header.msg_type) == (session, "shell_request")
    assert request.header.version == "0.1.0"
    rfc3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?Z"
    assert re.fullmatch(rfc3339, request.header.timestamp)
    reply = ShellReplyMessage.reply(request.header, Ok(None))
    assert reply.parent_header == request.header
    assert (reply.header.session, reply.header.msg_type) == (session, "shell_reply")
    assert reply.header.msg_id != request.header.msg_id
    for encoding in Encoding:
        raw = shell_reply_codec.encode(reply, encoding)
        assert shell_reply_codec.decode(raw) == reply
    assert isinstance(request.header, MessageHeader)
