"""Property tests for the codecs, and garbage that must fail cleanly."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hooteproto import frames
from hooteproto.codec import (
    DecodeError,
    Encoding,
    broadcast_codec,
    detect,
    envelope_codec,
    payload_codec,
    peek_envelope_id,
)
from hooteproto.types import (
    Broadcast,
    Envelope,
    LuaEval,
    Payload,
    Ping,
    ToolInfo,
    ToolList,
)
from tests.strategies import strategy_for

ALL = list(Encoding)


@settings(max_examples=300, deadline=None)
@given(strategy_for(Payload), st.sampled_from(ALL))
def test_payload_round_trips(payload, encoding):
    raw = payload_codec.encode(payload, encoding)
    back = payload_codec.decode(raw, encoding)
    assert back == payload
    assert type(back) is type(payload)
    # Detection finds the same encoding without being told.
    assert payload_codec.decode(raw) == payload


@settings(max_examples=200, deadline=None)
@given(strategy_for(Envelope), st.sampled_from(ALL))
def test_envelope_round_trips(envelope, encoding):
    assert envelope_codec.decode(envelope_codec.encode(envelope, encoding)) == envelope


@settings(max_examples=100, deadline=None)
@given(strategy_for(Broadcast), st.sampled_from(ALL))
def test_broadcast_round_trips(message, encoding):
    expected = message
    only = getattr(type(message), "__compact_fields__", None)
    if encoding is Encoding.COMPACT and only is not None:
        # the positional form carries only the seed's fields; extensions come back unset
        expected = type(message)(**{f: getattr(message, f) for f in only})
    assert broadcast_codec.decode(broadcast_codec.encode(message, encoding)) == expected


def test_shutdown_extensions_are_absent_unless_set():
    from hooteproto.types import ShutdownNotice

    plain = ShutdownNotice(reason="bye")
    assert broadcast_codec.encode(plain, Encoding.JSON) == b'{"type":"shutdown","reason":"bye"}'
    draining = ShutdownNotice(reason="bye", phase="draining", deadline=1700000000.5)
    text = broadcast_codec.encode(draining, Encoding.JSON)
    assert text == b'{"type":"shutdown","reason":"bye","phase":"draining","deadline":1700000000.5}'
    assert broadcast_codec.decode(text) == draining
    assert broadcast_codec.decode(broadcast_codec.encode(draining, Encoding.NAMED)) == draining
    compact = broadcast_codec.encode(draining, Encoding.COMPACT)
    assert msgspec.msgpack.decode(compact) == ["shutdown", "bye"]


def test_job_execute_priority_is_an_optional_trailing_element():
    from hooteproto.types import JobExecute

    plain = JobExecute(script_hash="ab", params=None)
    # unset, every encoding is the seed's
    assert msgspec.msgpack.decode(payload_codec.encode(plain, Encoding.COMPACT)) == ["job_execute", "ab", None, None]
    seed_json = b'{"type":"job_execute","script_hash":"ab","params":null,"tags":null}'
    assert payload_codec.encode(plain, Encoding.JSON) == seed_json
    urgent = JobExecute(script_hash="ab", params={}, tags=["t"], priority=7)
    compact = payload_codec.encode(urgent, Encoding.COMPACT)
    assert msgspec.msgpack.decode(compact) == ["job_execute", "ab", {}, ["t"], 7]
    for encoding in ALL:
        raw = payload_codec.encode(urgent, encoding)
        back = payload_codec.decode(raw, encoding)
        assert back == urgent
        assert payload_codec.encode(back, encoding) == raw
    # a decoded seed-form request re-encodes byte for byte (also from its compact twin)
    seed = msgspec.msgpack.encode(["job_execute", "ab", None, None])
    assert payload_codec.encode(payload_codec.decode(seed), Encoding.COMPACT) == seed
    assert payload_codec.decode(seed).priority is msgspec.UNSET


def test_compact_nested_structs_are_arrays():
    tl = ToolList(tools=[ToolInfo(name="a", description="d", input_schema={"type": "object"})])
    raw = payload_codec.encode(tl, Encoding.COMPACT)
    assert msgspec.msgpack.decode(raw) == ["tool_list", [["a", "d", {"type": "object"}]]]
    named = msgspec.msgpack.decode(payload_codec.encode(tl, Encoding.NAMED))
    assert named["tools"][0] == {"name": "a", "description": "d", "input_schema": {"type": "object"}}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([None, *ALL]))
def test_garbage_raises_decode_error_only(raw, encoding):
    for codec in (payload_codec, envelope_codec, broadcast_codec):
        try:
            codec.decode(raw, encoding)
        except DecodeError:
            pass


@settings(max_examples=300, deadline=None)
@given(strategy_for(Payload), st.integers(min_value=0, max_value=200), st.integers(0, 255))
def test_corrupted_messages_raise_decode_error_only(payload, at, byte):
    raw = bytearray(payload_codec.encode(payload, Encoding.COMPACT))
    raw[at % len(raw)] = byte
    try:
        payload_codec.decode(bytes(raw))
    except DecodeError:
        pass


@pytest.mark.parametrize(
    "raw,encoding,fragment",
    [
        (b"", None, "empty body"),
        (b"\xc1", None, "not a MsgPack array or map"),
        (msgspec.msgpack.encode(["no_such_variant"]), None, "no_such_variant"),
        (msgspec.msgpack.encode({"type": "lua_eval"}), None, "code"),
        (msgspec.msgpack.encode(["lua_eval", 5, None]), None, "Expected `str`"),
        (b'{"type": "ping"', Encoding.JSON, "malformed json"),
        (msgspec.msgpack.encode(["job_poll", [], -1, "any"]), None, ">= 0"),
    ],
)
def test_decode_errors_say_what_is_wrong(raw, encoding, fragment):
    with pytest.raises(DecodeError) as info:
        payload_codec.decode(raw, encoding)
    assert fragment in str(info.value)


def test_validation_error_names_the_path():
    with pytest.raises(DecodeError) as info:
        envelope_codec.decode(msgspec.json.encode({"id": str(uuid.uuid4()), "payload": {"type": "nope"}}))
    assert info.value.path == "$.payload.type"


def test_detect():
    assert detect(b'{"type":"ping"}') is Encoding.JSON
    assert detect(payload_codec.encode(Ping(), Encoding.COMPACT)) is Encoding.COMPACT
    assert detect(payload_codec.encode(Ping(), Encoding.NAMED)) is Encoding.NAMED


def test_peek_envelope_id_recovers_id_from_a_bad_envelope():
    rid = uuid.uuid4()
    bad_compact = msgspec.msgpack.encode([rid.bytes, None, ["bogus"]])
    assert peek_envelope_id(bad_compact) == (rid, Encoding.COMPACT)
    bad_json = msgspec.json.encode({"id": str(rid), "payload": 3})
    assert peek_envelope_id(bad_json) == (rid, Encoding.JSON)
    assert peek_envelope_id(b"\xc1\xc1") == (None, None)


def test_lua_eval_params_object_keeps_key_order_and_types():
    p = LuaEval(code="return 1", params={"b": 1, "a": [1.0, None, "x"], "c": {}})
    for enc in ALL:
        back = payload_codec.decode(payload_codec.encode(p, enc), enc)
        assert list(back.params) == ["b", "a", "c"]
        assert back.params["a"][0] == 1.0 and isinstance(back.params["a"][0], float)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=20), max_size=9))
def test_garbage_frames_raise_frame_error_only(parts):
    try:
        frames.parse([frames.PROTOCOL, *parts])
    except frames.FrameError:
        pass
    assert issubclass(frames.FrameError, DecodeError)


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda f: f[:6], "7 frames"),
        (lambda f: [f[0], b"\x00\x09", *f[2:]], "unknown command 9"),
        (lambda f: [f[0], f[1], b"\x00\x07", *f[3:]], "unknown content type 7"),
        (lambda f: [*f[:3], b"short", *f[4:]], "16 bytes"),
        (lambda f: [f[0], b"\x02", *f[2:]], "2 bytes"),
        (lambda f: [*f[:4], b"\xff\xfe", *f[5:]], "service frame is not UTF-8"),
    ],
)
def test_bad_frames_are_named(mutate, fragment):
    good = frames.Hoot01(
        command=frames.Command.REQUEST,
        content_type=frames.ContentType.MSGPACK,
        request_id=uuid.uuid4(),
        service="luanette",
        body=payload_codec.encode(Ping(), Encoding.COMPACT),
    ).to_frames()
    assert frames.parse(good).service == "luanette"
    with pytest.raises(frames.FrameError) as info:
        frames.parse(mutate(good))
    assert fragment in str(info.value)
