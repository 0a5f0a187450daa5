"""The `audio` namespace: WAV files and sample buffers, as the Rust luanette defined them.

Upstream compatibility (issue 12): names, arguments and return shapes follow upstream's
``audio.*`` (crates/luanette/src/stdlib/audio.rs); docs/lua-api.md says where they differ.

A sample buffer is a plain Lua table, interleaved floats in -1..1::

    { data = {0.0, 0.1, -0.2, ...}, channels = 2, sample_rate = 44100 }

``channels`` defaults to 1 and ``sample_rate`` to 44100 when missing, as upstream.

Lua API (``src`` is a CAS hash, ``cas:`` and a hash, a CAS object path as ``cas.path``
gives it, or a file of the job's temp directory)::

    audio.read_wav(src)                 -> samples, info
    audio.info(src)                     -> {sample_rate, channels, bits, duration, samples,
                                            frames, format = "wav"}
    audio.duration(src)                 -> seconds
    audio.write_wav(samples [, path [, opts]]) -> where, {hash|path, mime_type, size_bytes}
        with a temp ``path``: writes there and ``where`` is the path (upstream);
        without: stores in the CAS and ``where`` is the hash.  opts.bits: 8, 16
        (default), 24 (integer PCM) or 32 (float).
    audio.resample(samples, from_rate, to_rate [, quality]) -> samples
        (soxr; quality "quick", "medium" or "high", the default; a nil from_rate is the
        buffer's own rate)
    audio.to_mono(samples), audio.to_stereo(samples) -> samples
    audio.trim(samples, start_sec [, end_sec]) -> samples
    audio.pad(samples, before_sec, after_sec) -> samples
    audio.fade(samples, in_sec, out_sec [, "linear"|"log"|"quarter"]) -> samples
    audio.gain(samples, db), audio.normalize(samples [, target_db = 0]) -> samples
    audio.peak(samples), audio.rms(samples) -> dB (-math.huge for silence)
    audio.silence(duration_sec, sample_rate [, channels]) -> samples
    audio.mix({a, b, ...} [, {gain_a, ...}]) -> samples (default gains 1/n)
    audio.concat({a, b, ...}), audio.reverse(samples) -> samples

Every buffer, read or made, holds at most ``max_samples`` values (all channels counted;
``audio_too_large``), at most ``MAX_CHANNELS`` channels and a rate in 1..``MAX_RATE``
(``invalid_samples``); a WAV file is at most ``max_read_bytes`` and must be PCM or float
(``invalid_wav``).  Writes to the CAS count against the run's CAS write quota.  Errors
start with their code, after the ``audio.<function>: `` prefix.

numpy and soxr are imported on first use, in the worker process: a daemon front or a
run that never touches ``audio`` does not load them.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from luanette.cas import Cas
from luanette.engine.api import LuaCallError, RunContext, charge_cas_write
from luanette.stdlib.cas import cas_failure, check_hash
from luanette.stdlib.paths import as_text, lua_type, relative

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from luanette.stdlib.temp import TempNamespace

    Floats = npt.NDArray[np.float64]

MIME: Final = "audio/wav"
DEFAULT_MAX_SAMPLES: Final = 2**22  # ~47 s of 44.1 kHz stereo: a Lua float costs 16 bytes
DEFAULT_MAX_READ_BYTES: Final = 64 * 2**20
MAX_CHANNELS: Final = 32
MAX_RATE: Final = 768_000
DEFAULT_RATE: Final = 44_100
MAX_DB: Final = 120.0
_QUALITY: Final = {"quick": "QQ", "medium": "MQ", "high": "HQ"}
_FADES: Final = ("linear", "log", "quarter")
_HASHLIKE: Final = re.compile(r"cas:.*|[0-9a-fA-F]{32}", re.DOTALL)
# cas.path's form, objects/<2>/<30> (a host path ending so names the same object)
_OBJECT_PATH: Final = re.compile(r"(?:.*/)?objects/([0-9a-f]{2})/([0-9a-f]{30})")
_PCM: Final = 1
_FLOAT: Final = 3
_EXTENSIBLE: Final = 0xFFFE


def _np() -> Any:
    import numpy

    return numpy


def _fail(code: str, message: str) -> LuaCallError:
    return LuaCallError(f"{code}: {message}")


# --- WAV ------------------------------------------------------------------------------
# A RIFF reader of its own: Python's wave module reads integer PCM only, and upstream
# writes 32-bit float WAVs; the format is a header and one data chunk.


class WavHeader:
    """What a WAV file's fmt chunk says, and where its samples are."""

    __slots__ = ("bits", "channels", "data_offset", "data_size", "float", "sample_rate")

    def __init__(self, *, channels: int, sample_rate: int, bits: int, float: bool, offset: int, size: int) -> None:
        self.channels = channels
        self.sample_rate = sample_rate
        self.bits = bits
        self.float = float
        self.data_offset = offset
        self.data_size = size

    @property
    def samples(self) -> int:
        """Sample values in the data chunk, all channels counted."""
        return self.data_size // (self.bits // 8)

    def info(self) -> dict[str, Any]:
        """The ``audio.info`` table."""
        samples = self.samples - self.samples % self.channels
        frames = samples // self.channels
        return {
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "bits": self.bits,
            "duration": frames / self.sample_rate,
            "samples": samples,
            "frames": frames,
            "format": "wav",
            "sample_format": "float" if self.float else "int",
        }


def parse_header(data: bytes, what: str) -> WavHeader:
    """The header of the WAV file ``data``; LuaCallError ``invalid_wav`` when it is not one
    this namespace reads (PCM 8/16/24/32 bit, float 32/64 bit, up to MAX_CHANNELS)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise _fail("invalid_wav", f"{what} is not a WAV file (no RIFF/WAVE header)")
    pos, fmt, found = 12, None, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt ":
            fmt = data[body : body + size]
        elif chunk == b"data":
            # a streamed WAV may claim more than it holds (or 0xFFFFFFFF): take what is there
            found = (body, min(size, len(data) - body))
            break
        pos = body + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise _fail("invalid_wav", f"{what} has no fmt chunk before its data")
    if found is None:
        raise _fail("invalid_wav", f"{what} has no data chunk")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the subformat GUID starts with the tag
    if tag not in (_PCM, _FLOAT):
        raise _fail("invalid_wav", f"{what} is WAV format {tag:#x}; only PCM (1) and float (3) are read")
    if (tag == _PCM and bits not in (8, 16, 24, 32)) or (tag == _FLOAT and bits not in (32, 64)):
        raise _fail(
            "invalid_wav", f"{what} has {bits}-bit {'float' if tag == _FLOAT else 'PCM'} samples, not supported"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise _fail("invalid_wav", f"{what} has {channels} channels; 1 to {MAX_CHANNELS} are read")
    if not 1 <= rate <= MAX_RATE:
        raise _fail("invalid_wav", f"{what} has sample rate {rate}; 1 to {MAX_RATE} Hz are read")
    return WavHeader(
        channels=channels, sample_rate=rate, bits=bits, float=tag == _FLOAT, offset=found[0], size=found[1]
    )


def decode(data: bytes, header: WavHeader) -> Floats:
    """The samples of a WAV file as float64 in -1..1, interleaved."""
    np = _np()
    width = header.bits // 8
    count = header.samples - header.samples % header.channels
    raw = data[header.data_offset : header.data_offset + count * width]
    if header.float:
        values = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float64)
        return np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0)
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        return ints.astype(np.float64) / float(1 << 23)
    dtype = "<i2" if width == 2 else "<i4"
    return np.frombuffer(raw, dtype=dtype).astype(np.float64) / float(1 << (header.bits - 1))


def encode(values: Floats, channels: int, rate: int, bits: int) -> bytes:
    """A WAV file of ``values`` (interleaved, clipped to -1..1 for integer PCM)."""
    np = _np()
    if bits == 32:
        payload = values.astype("<f4").tobytes()
        fmt = struct.pack("<HHIIHHH", _FLOAT, channels, rate, rate * channels * 4, channels * 4, 32, 0)
        frames = len(values) // channels
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, frames)
    else:
        width = bits // 8
        scale = float((1 << (bits - 1)) - 1)
        ints = np.rint(np.clip(values, -1.0, 1.0) * scale).astype(np.int32)
        if bits == 8:
            payload = (ints + 128).astype(np.uint8).tobytes()
        elif bits == 16:
            payload = ints.astype("<i2").tobytes()
        else:
            payload = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        fmt = struct.pack("<HHIIHH", _PCM, channels, rate, rate * channels * width, channels * width, bits)
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    pad = b"\x00" if len(payload) & 1 else b""
    body = b"WAVE" + chunks + b"data" + struct.pack("<I", len(payload)) + payload + pad
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- buffers --------------------------------------------------------------------------


class Buffer:
    """A sample buffer: interleaved float64 values, channels, sample rate."""

    __slots__ = ("channels", "rate", "values")

    def __init__(self, values: Floats, channels: int, rate: int) -> None:
        self.values = values
        self.channels = channels
        self.rate = rate

    @property
    def frames(self) -> int:
        return len(self.values) // self.channels

    def frame_view(self) -> Floats:
        """The values as a (frames, channels) array (a view)."""
        return self.values.reshape(-1, self.channels)

    def table(self) -> dict[str, Any]:
        """The Lua table of this buffer."""
        return {"data": self.values.tolist(), "channels": self.channels, "sample_rate": self.rate}


def _int(value: Any, what: str, low: int, high: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("invalid_samples", f"{what} must be an integer, got {lua_type(value)}")
    if isinstance(value, float) and not value.is_integer():
        raise _fail("invalid_samples", f"{what} must be an integer, got {value}")
    number = int(value)
    if not low <= number <= high:
        raise _fail("invalid_samples", f"{what} must be in {low}..{high}, got {number}")
    return number


def _seconds(value: Any, what: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LuaCallError(f"{what} must be a number of seconds, got {lua_type(value)}")
    if value < 0:
        raise LuaCallError(f"{what} must not be negative, got {value}")
    return float(value)


def _db(value: Any, what: str, default: float | None = None) -> float:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LuaCallError(f"{what} must be a number of decibels, got {lua_type(value)}")
    if abs(value) > MAX_DB:
        raise LuaCallError(f"{what} must be within -{MAX_DB:g}..{MAX_DB:g} dB, got {value}")
    return float(value)


def _db_of(level: float) -> float:
    return 20.0 * math.log10(level) if level > 0 else -math.inf


class AudioNamespace:
    """Lua global `audio`.  ``cas`` backs hashes and ``write_wav`` without a path;
    ``temp`` (the job's TempNamespace) backs temp paths; either may be None."""

    name = "audio"
    lua_prelude_lazy: Final = True  # (only fills its own table: runs on first use)
    lua_prelude: Final = b"""
local audio = ...
local type, error, pcall = type, error, pcall
local function rethrow(err)
  if err == "not enough memory" or type(err) ~= "string" then error(err, 0) end
  error(err, 3)  -- at the script's call
end
-- upstream returns two values from these; a Python call returns one table
for _, name in ipairs({"read_wav", "write_wav"}) do
  local raw = audio[name]
  audio[name] = function(...)
    local ok, both = pcall(raw, ...)
    if not ok then rethrow(both) end
    return both[1], both[2]
  end
end
"""

    def __init__(
        self,
        cas: Cas | None,
        temp: TempNamespace | None = None,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
    ) -> None:
        self.cas = cas
        self.temp = temp
        self.max_samples = max_samples
        self.max_read_bytes = max_read_bytes

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        # a run with a small memory limit could not hold the largest buffer anyway
        bound = _Bound(self, min(self.max_samples, max(1, run.limits.memory_bytes // 32)))
        return {
            name: getattr(bound, name)
            for name in (
                "read_wav", "write_wav", "info", "duration", "resample", "to_mono", "to_stereo", "trim", "pad",
                "fade", "gain", "normalize", "peak", "rms", "silence", "mix", "concat", "reverse",
            )
        }  # fmt: skip


class _Bound:
    """The functions of one run (its sample bound)."""

    def __init__(self, ns: AudioNamespace, max_samples: int) -> None:
        self.ns = ns
        self.max_samples = max_samples

    # --- helpers ---

    def _check_size(self, count: float, what: str) -> None:
        if count > self.max_samples:
            shown = f"{int(count)}" if count < 1e15 else f"{count:.3g}"
            raise _fail(
                "audio_too_large",
                f"{what} would hold {shown} samples; a buffer holds at most {self.max_samples} "
                "(all channels counted): work on shorter pieces",
            )

    def _load(self, src: Any, what: str) -> bytes:
        text = as_text(src, what)
        match = _OBJECT_PATH.fullmatch(text)
        if match is not None or _HASHLIKE.fullmatch(text):
            h = check_hash("".join(match.groups()) if match else text, what)
            if self.ns.cas is None:
                raise LuaCallError(f"{what}: this job has no CAS")
            try:
                return self.ns.cas.retrieve(h, max_bytes=self.ns.max_read_bytes)
            except Exception as exc:
                raise cas_failure(exc, what, h) from None
        if self.ns.temp is None:
            raise LuaCallError(f"{what} is not a CAS hash, and this job has no temp directory")
        return self.ns.temp.read_bytes(text, self.ns.max_read_bytes, what)

    def _buffer(self, value: Any, what: str = "samples") -> Buffer:
        if not isinstance(value, dict):
            raise _fail(
                "invalid_samples",
                f"{what} must be a sample table {{data, channels, sample_rate}}, got {lua_type(value)}",
            )
        channels = _int(value.get("channels"), f"{what}.channels", 1, MAX_CHANNELS, 1)
        rate = _int(value.get("sample_rate"), f"{what}.sample_rate", 1, MAX_RATE, DEFAULT_RATE)
        data = value.get("data")
        if data == {}:  # an empty Lua table
            data = []
        if not isinstance(data, list):
            raise _fail("invalid_samples", f"{what}.data must be an array of numbers, got {lua_type(data)}")
        self._check_size(len(data), what)
        if len(data) % channels:
            raise _fail(
                "invalid_samples",
                f"{what}.data has {len(data)} values, not a whole number of {channels}-channel frames",
            )
        np = _np()
        try:
            values = np.array(data, dtype=np.float64)
        except (TypeError, ValueError):
            bad = next(i for i, v in enumerate(data, 1) if isinstance(v, bool) or not isinstance(v, (int, float)))
            raise _fail(
                "invalid_samples", f"{what}.data[{bad}] must be a number, got {lua_type(data[bad - 1])}"
            ) from None
        if values.ndim != 1:
            raise _fail("invalid_samples", f"{what}.data must be a flat array of numbers")
        return Buffer(values, channels, rate)

    def _buffers(self, value: Any, what: str) -> list[Buffer]:
        if value == {}:
            value = []
        if not isinstance(value, list) or not value:
            raise LuaCallError(f"{what} must be a non-empty array of sample tables, got {lua_type(value)}")
        buffers = [self._buffer(v, f"{what}[{i}]") for i, v in enumerate(value, 1)]
        first = buffers[0]
        for i, b in enumerate(buffers[1:], 2):
            if (b.channels, b.rate) != (first.channels, first.rate):
                raise _fail(
                    "invalid_samples",
                    f"{what}[{i}] is {b.channels} ch at {b.rate} Hz but {what}[1] is {first.channels} ch at "
                    f"{first.rate} Hz: audio.resample / to_mono / to_stereo first",
                )
        return buffers

    def _frames(self, seconds: float, rate: int) -> int:
        return int(round(seconds * rate))

    def _wav(self, src: Any) -> tuple[bytes, WavHeader]:
        data = self._load(src, "src")
        return data, parse_header(data, "src")

    # --- I/O ---

    def read_wav(self, src: Any) -> list[Any]:
        data, header = self._wav(src)
        self._check_size(header.samples, "src")
        buffer = Buffer(decode(data, header), header.channels, header.sample_rate)
        return [buffer.table(), header.info()]

    def info(self, src: Any) -> dict[str, Any]:
        return self._wav(src)[1].info()

    def duration(self, src: Any) -> float:
        return float(self._wav(src)[1].info()["duration"])

    def write_wav(self, samples: Any, path: Any = None, opts: Any = None) -> list[Any]:
        buffer = self._buffer(samples)
        if opts is not None and not isinstance(opts, dict):
            raise LuaCallError(f"opts must be a table, got {lua_type(opts)}")
        bits = (opts or {}).get("bits", 16)
        if bits not in (8, 16, 24, 32) or isinstance(bits, bool):
            raise LuaCallError(f"opts.bits must be 8, 16, 24 (integer PCM) or 32 (float), got {bits!r}")
        data = encode(buffer.values, buffer.channels, buffer.rate, int(bits))
        if path is not None:
            temp = self.ns.temp
            if temp is None:
                raise LuaCallError("path: this job has no temp directory")
            written = relative(temp.directory, temp.write_bytes(path, data, "path"))
            return [written, {"path": written, "mime_type": MIME, "size_bytes": len(data)}]
        if self.ns.cas is None:
            raise LuaCallError("this job has no CAS: give a temp path")
        charge_cas_write(len(data))
        try:
            h = self.ns.cas.store(data, MIME)
        except Exception as exc:
            raise cas_failure(exc, "samples") from None
        return [h, {"hash": h, "mime_type": MIME, "size_bytes": len(data)}]

    # --- format ---

    def resample(self, samples: Any, from_rate: Any, to_rate: Any, quality: Any = None) -> dict[str, Any]:
        buffer = self._buffer(samples)
        source = _int(from_rate, "from_rate", 1, MAX_RATE, buffer.rate)
        target = _int(to_rate, "to_rate", 1, MAX_RATE)
        recipe = _QUALITY.get(as_text(quality, "quality") if quality is not None else "high")
        if recipe is None:
            raise LuaCallError(f"quality must be one of {', '.join(_QUALITY)}, got {quality!r}")
        if source == target:
            return Buffer(buffer.values, buffer.channels, target).table()
        out_frames = math.ceil(buffer.frames * target / source)
        self._check_size(out_frames * buffer.channels, "the resampled buffer")
        if buffer.frames == 0:
            return Buffer(buffer.values, buffer.channels, target).table()
        import soxr

        out = soxr.resample(buffer.frame_view(), source, target, quality=recipe)
        return Buffer(_np().ascontiguousarray(out).reshape(-1), buffer.channels, target).table()

    def to_mono(self, samples: Any) -> dict[str, Any]:
        buffer = self._buffer(samples)
        if buffer.channels == 1:
            return buffer.table()
        return Buffer(buffer.frame_view().mean(axis=1), 1, buffer.rate).table()

    def to_stereo(self, samples: Any) -> dict[str, Any]:
        buffer = self._buffer(samples)
        if buffer.channels >= 2:
            return buffer.table()
        self._check_size(len(buffer.values) * 2, "the stereo buffer")
        return Buffer(_np().repeat(buffer.values, 2), 2, buffer.rate).table()

    # --- time ---

    def trim(self, samples: Any, start_sec: Any, end_sec: Any = None) -> dict[str, Any]:
        buffer = self._buffer(samples)
        start = _seconds(start_sec, "start_sec")
        end = _seconds(end_sec, "end_sec", optional=True)
        assert start is not None
        first = min(self._frames(start, buffer.rate), buffer.frames)
        last = buffer.frames if end is None else min(self._frames(end, buffer.rate), buffer.frames)
        if first >= last:
            raise LuaCallError(
                f"invalid trim range: {start:g} s to {'the end' if end is None else f'{end:g} s'} of a "
                f"{buffer.frames / buffer.rate:g} s buffer is empty"
            )
        return Buffer(buffer.frame_view()[first:last].reshape(-1), buffer.channels, buffer.rate).table()

    def pad(self, samples: Any, before_sec: Any, after_sec: Any = None) -> dict[str, Any]:
        buffer = self._buffer(samples)
        before = self._frames(_seconds(before_sec, "before_sec") or 0.0, buffer.rate)
        after = self._frames(_seconds(after_sec, "after_sec", optional=True) or 0.0, buffer.rate)
        self._check_size((before + buffer.frames + after) * buffer.channels, "the padded buffer")
        np = _np()
        padded = np.pad(buffer.frame_view(), ((before, after), (0, 0)))
        return Buffer(padded.reshape(-1), buffer.channels, buffer.rate).table()

    def fade(self, samples: Any, in_sec: Any, out_sec: Any, kind: Any = None) -> dict[str, Any]:
        buffer = self._buffer(samples)
        shape = "linear" if kind is None else as_text(kind, "type")
        if shape not in _FADES:
            raise LuaCallError(f"type must be one of {', '.join(_FADES)}, got {shape!r}")
        np = _np()
        frames = buffer.frame_view().copy()
        total = len(frames)

        def curve(t: Floats) -> Floats:
            if shape == "log":
                return np.log(t * 10.0 + 1.0) / math.log(11.0)
            if shape == "quarter":
                return np.sin(t * (math.pi / 2))
            return t

        fade_in = min(self._frames(_seconds(in_sec, "in_sec") or 0.0, buffer.rate), total)
        fade_out = min(self._frames(_seconds(out_sec, "out_sec") or 0.0, buffer.rate), total)
        if fade_in:
            frames[:fade_in] *= curve(np.arange(fade_in) / fade_in)[:, None]
        if fade_out:
            frames[total - fade_out :] *= curve(np.arange(fade_out, 0, -1) / fade_out)[:, None]
        return Buffer(frames.reshape(-1), buffer.channels, buffer.rate).table()

    def reverse(self, samples: Any) -> dict[str, Any]:
        buffer = self._buffer(samples)
        return Buffer(buffer.frame_view()[::-1].reshape(-1), buffer.channels, buffer.rate).table()

    def silence(self, duration_sec: Any, sample_rate: Any = None, channels: Any = None) -> dict[str, Any]:
        duration = _seconds(duration_sec, "duration_sec")
        assert duration is not None
        rate = _int(sample_rate, "sample_rate", 1, MAX_RATE, DEFAULT_RATE)
        count = _int(channels, "channels", 1, MAX_CHANNELS, 1)
        # checked in floats first: a duration of 1e300 s must not become a huge int
        self._check_size(duration * rate * count, f"{duration:g} s of silence")
        frames = self._frames(duration, rate)
        self._check_size(frames * count, f"{duration:g} s of silence")
        return Buffer(_np().zeros(frames * count), count, rate).table()

    def mix(self, samples_list: Any, gains: Any = None) -> dict[str, Any]:
        buffers = self._buffers(samples_list, "samples_list")
        if gains == {}:
            gains = []
        if gains is not None and not isinstance(gains, list):
            raise LuaCallError(f"gains must be an array of numbers, got {lua_type(gains)}")
        levels: list[float] = []
        for i in range(len(buffers)):
            g = gains[i] if gains is not None and i < len(gains) else None
            if g is None:
                levels.append(1.0 / len(buffers))
            elif isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
                raise LuaCallError(f"gains[{i + 1}] must be a number, got {lua_type(g)}")
            else:
                levels.append(float(g))
        np = _np()
        longest = max(len(b.values) for b in buffers)
        mixed = np.zeros(longest)
        for buffer, level in zip(buffers, levels, strict=True):
            mixed[: len(buffer.values)] += buffer.values * level
        return Buffer(mixed, buffers[0].channels, buffers[0].rate).table()

    def concat(self, samples_list: Any) -> dict[str, Any]:
        buffers = self._buffers(samples_list, "samples_list")
        self._check_size(sum(len(b.values) for b in buffers), "the joined buffer")
        np = _np()
        return Buffer(np.concatenate([b.values for b in buffers]), buffers[0].channels, buffers[0].rate).table()

    # --- level ---

    def gain(self, samples: Any, db: Any) -> dict[str, Any]:
        buffer = self._buffer(samples)
        factor = 10.0 ** (_db(db, "db") / 20.0)
        return Buffer(buffer.values * factor, buffer.channels, buffer.rate).table()

    def normalize(self, samples: Any, target_db: Any = None) -> dict[str, Any]:
        buffer = self._buffer(samples)
        target = _db(target_db, "target_db", 0.0)
        peak = float(_np().max(_np().abs(buffer.values))) if len(buffer.values) else 0.0
        if peak == 0.0:
            return buffer.table()
        factor = 10.0 ** (target / 20.0) / peak
        return Buffer(buffer.values * factor, buffer.channels, buffer.rate).table()

    def peak(self, samples: Any) -> float:
        buffer = self._buffer(samples)
        np = _np()
        return _db_of(float(np.max(np.abs(buffer.values)))) if len(buffer.values) else -math.inf

    def rms(self, samples: Any) -> float:
        buffer = self._buffer(samples)
        np = _np()
        return _db_of(float(np.sqrt(np.mean(buffer.values**2)))) if len(buffer.values) else -math.inf
