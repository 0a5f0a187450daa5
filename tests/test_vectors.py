"""The golden vectors made by Rust serde/rmp-serde decode and re-encode byte for byte."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest

from hooteproto import frames
from hooteproto.codec import (
    Encoding,
    broadcast_codec,
    envelope_codec,
    payload_codec,
    ready_codec,
)
from hooteproto.types import LUANETTE_REQUESTS, Envelope, Payload, tag_of, variants

VECTORS = Path(__file__).parent / "protocol-vectors"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "protocol-vectors"


def _load(subdir: str) -> list[tuple[str, dict]]:
    return [(p.stem, json.loads(p.read_text())) for p in sorted((VECTORS / subdir).glob("*.json"))]


PAYLOADS = _load("payload")
BROADCASTS = _load("broadcast")
HOOT01 = _load("hoot01")

ENCODINGS = [
    ("msgpack_compact_hex", Encoding.COMPACT),
    ("msgpack_named_hex", Encoding.NAMED),
]


def test_vendored_vectors_match_shared():
    """tests/protocol-vectors is a copy of shared/; catch drift when shared/ is present."""
    if not SHARED.is_dir():
        pytest.skip("shared/protocol-vectors is not beside this checkout")
    cmp = filecmp.dircmp(SHARED, VECTORS)

    def diffs(c: filecmp.dircmp) -> list[str]:
        out = c.left_only + c.right_only + c.diff_files
        for sub in c.subdirs.values():
            out += diffs(sub)
        return out

    assert diffs(cmp) == []


def test_every_payload_variant_has_a_vector():
    # Luanette's own requests (sessions) are not seed 001's and have no Rust vectors
    tags = {tag_of(cls) for cls in variants(Payload) if cls not in LUANETTE_REQUESTS}
    assert len(tags) == 37
    assert tags == {d["variant"] for _, d in PAYLOADS}


@pytest.mark.parametrize("name,vector", PAYLOADS, ids=[n for n, _ in PAYLOADS])
@pytest.mark.parametrize("key,encoding", ENCODINGS, ids=["compact", "named"])
def test_payload_msgpack_round_trip(name, vector, key, encoding):
    raw = bytes.fromhex(vector[key])
    envelope = envelope_codec.decode(raw)
    assert isinstance(envelope, Envelope)
    assert envelope_codec.encode(envelope, encoding) == raw

    bare = bytes.fromhex(vector["payload_only"][key])
    payload = payload_codec.decode(bare)
    assert tag_of(type(payload)) == vector["variant"]
    assert payload_codec.encode(payload, encoding) == bare
    assert payload == envelope.payload


@pytest.mark.parametrize("name,vector", PAYLOADS, ids=[n for n, _ in PAYLOADS])
def test_payload_json_round_trip(name, vector):
    text = vector["json_text"].encode()
    envelope = envelope_codec.decode(text, Encoding.JSON)
    assert envelope_codec.encode(envelope, Encoding.JSON) == text
    # The decoded value matches the documented JSON (key order aside).
    assert json.loads(envelope_codec.encode(envelope, Encoding.JSON)) == vector["json"]
    # All three encodings decode to the same value.
    for key, _ in ENCODINGS:
        assert envelope_codec.decode(bytes.fromhex(vector[key])) == envelope


@pytest.mark.parametrize("name,vector", BROADCASTS, ids=[n for n, _ in BROADCASTS])
def test_broadcast_round_trip(name, vector):
    for key, encoding in ENCODINGS:
        raw = bytes.fromhex(vector[key])
        assert broadcast_codec.encode(broadcast_codec.decode(raw), encoding) == raw
    text = vector["json_text"].encode()
    message = broadcast_codec.decode(text)
    assert broadcast_codec.encode(message, Encoding.JSON) == text
    assert text.startswith(b'{"type":')


@pytest.mark.parametrize("name,vector", HOOT01, ids=[n for n, _ in HOOT01])
def test_hoot01_frames_round_trip(name, vector):
    raw_frames = [bytes.fromhex(h) for h in vector["frames_hex"]]
    route, message = frames.split_route(raw_frames)
    assert len(route) == (1 if name == "router_view_request" else 0)
    parsed = frames.parse(message)
    assert parsed.to_frames() == message
    if "command_u16" in vector:
        assert parsed.command == vector["command_u16"]
        assert parsed.content_type == vector["content_type_u16"]
        assert str(parsed.request_id) == vector["request_id"]
        assert parsed.traceparent == vector["traceparent"]
    if vector["body_decoded"] is None:
        assert parsed.body == b""
        return
    if name == "ready":
        ready = ready_codec.decode(parsed.body)
        assert ready.tools == vector["body_decoded"]["tools"]
        assert ready_codec.encode(ready, Encoding.COMPACT) == parsed.body
        return
    encoding = parsed.body_encoding()
    payload = payload_codec.decode(parsed.body, encoding)
    assert payload_codec.encode(payload, encoding) == parsed.body
    assert json.loads(payload_codec.encode(payload, Encoding.JSON)) == vector["body_decoded"]
