"""hooteproto: the wire protocol of the hootenanny stack (types, codecs, HOOT01 frames,
and an async DEALER client). Imports nothing from ``luanette``."""

from hooteproto.codec import (
    Codec,
    DecodeError,
    Encoding,
    decode_broadcast,
    decode_envelope,
    decode_payload,
    encode_broadcast,
    encode_envelope,
    encode_payload,
)
from hooteproto.depth import MAX_DEPTH, TooDeepError
from hooteproto.types import *  # noqa: F403
from hooteproto.types import Broadcast, Envelope, Payload

__all__ = [
    "Broadcast",
    "Codec",
    "DecodeError",
    "Encoding",
    "Envelope",
    "MAX_DEPTH",
    "Payload",
    "TooDeepError",
    "decode_broadcast",
    "decode_envelope",
    "decode_payload",
    "encode_broadcast",
    "encode_envelope",
    "encode_payload",
]
