"""audio.* (upstream compatibility, issue 12): WAV files in the CAS and the temp directory
and sample buffers, over the real socket with real worker processes.  WAVs going in are
made with Python's wave module and the ones coming out are read with it, so the
namespace's own RIFF code is checked against another reader."""

from __future__ import annotations

import io
import math
import struct
import wave

import numpy as np
import pytest

from luanette.stdlib.audio import MAX_CHANNELS, encode, parse_header
from tests.test_capabilities import stored
from tests.test_jobs import run, wait_done

pytestmark = pytest.mark.timeout(120)


async def job(c, code: str, params=None) -> dict:
    return await wait_done(c, (await run(c, await stored(c, code), params))["job_id"])


def sine_wav(seconds: float, rate: int, channels: int, freq: float = 440.0, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * freq * t)
    frames = np.repeat(mono[:, None], channels, axis=1)
    if channels > 1:
        frames[:, 1] *= 0.5  # the second channel quieter, so to_mono has something to average
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((frames.reshape(-1) * 32767).round().astype("<i2").tobytes())
    return buffer.getvalue()


def read_wave(data: bytes) -> tuple[int, int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as w:
        raw = w.readframes(w.getnframes())
        return w.getframerate(), w.getnchannels(), np.frombuffer(raw, dtype="<i2") / 32768.0


async def test_wav_round_trip_through_the_buffer_functions(server, client):
    cas = server.server.cas
    source = cas.store(sine_wav(0.5, 8000, 2), "audio/wav")
    done = await job(client, """
        function main(p)
          local s, info = audio.read_wav(p.src)
          local mono = audio.to_mono(s)
          local up = audio.resample(mono, 8000, 16000)
          local loud = audio.normalize(up, -6)
          local out, meta = audio.write_wav(loud)
          local back = audio.info(out)
          return {info = info, first = s.data[1], n = #s.data, mono_n = #mono.data, mono_ch = mono.channels,
                  up_rate = up.sample_rate, up_n = #up.data, peak = audio.peak(loud), out = out, meta = meta,
                  back = back, quiet = audio.peak(audio.gain(loud, -6)), duration = audio.duration(p.src),
                  rms = audio.rms(mono), silent_peak = audio.peak(audio.silence(0.01, 8000)) == -math.huge}
        end
    """, {"src": source})
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    assert r["info"] == {"sample_rate": 8000, "channels": 2, "bits": 16, "duration": 0.5, "samples": 8000,
                         "frames": 4000, "format": "wav", "sample_format": "int"}  # fmt: skip
    assert (r["n"], r["mono_n"], r["mono_ch"], r["first"]) == (8000, 4000, 1, 0.0)
    assert (r["up_rate"], r["up_n"]) == (16000, 8000)
    assert r["peak"] == pytest.approx(-6.0, abs=1e-6)
    assert r["quiet"] == pytest.approx(-12.0, abs=1e-6)
    assert r["duration"] == 0.5
    assert r["rms"] == pytest.approx(20 * math.log10(0.375 / math.sqrt(2)), abs=0.05)
    assert r["silent_peak"] is True  # -math.huge: silence has no level
    assert r["meta"] == {"hash": r["out"], "mime_type": "audio/wav", "size_bytes": 44 + 8000 * 2}
    assert r["back"]["sample_rate"] == 16000 and r["back"]["channels"] == 1
    rate, channels, values = read_wave(cas.retrieve(r["out"]))
    assert (rate, channels, len(values)) == (16000, 1, 8000)
    assert 20 * math.log10(np.max(np.abs(values))) == pytest.approx(-6.0, abs=0.01)
    # the resampled sine is still a 440 Hz sine (mean of the two channels: 0.375)
    spectrum = np.abs(np.fft.rfft(values))
    assert np.argmax(spectrum) * 16000 / len(values) == pytest.approx(440, abs=2)
    assert cas.inspect(r["out"]).mime_type == "audio/wav"


async def test_lengths_after_trim_silence_pad_mix_concat_and_friends(client):
    done = await job(client, """
        function main()
          local tone = {data = {}, channels = 2, sample_rate = 1000}
          for i = 1, 1000 do tone.data[2 * i - 1] = 0.5; tone.data[2 * i] = -0.25 end
          local quiet = audio.silence(0.5, 1000, 2)
          local mixed = audio.mix({tone, quiet})
          local weighted = audio.mix({tone, quiet}, {1.0, 1.0})
          local faded = audio.fade(tone, 0.1, 0.1)
          local rev = audio.reverse({data = {1, 2, 3, 4}, channels = 2, sample_rate = 10})
          local defaults = audio.silence(1)
          return {
            trim = #audio.trim(tone, 0.25, 0.75).data, trim_open = #audio.trim(tone, 0.9).data,
            trim_past = #audio.trim(tone, 0.5, 99).data,
            silence = #quiet.data, silence_ch = quiet.channels, silence_rate = quiet.sample_rate,
            defaults = {#defaults.data, defaults.channels, defaults.sample_rate},
            mixed = #mixed.data, mixed_first = mixed.data[1], mixed_last = mixed.data[#mixed.data],
            weighted_first = weighted.data[1],
            pad = #audio.pad(tone, 0.1, 0.2).data,
            concat = #audio.concat({tone, quiet, tone}).data,
            stereo = {#audio.to_stereo(audio.to_mono(tone)).data, audio.to_mono(tone).data[1]},
            fade = {faded.data[1], faded.data[999]},
            rev = rev.data,
            same = audio.resample(tone, nil, 1000).sample_rate,
            empty = #audio.gain({data = {}, channels = 1, sample_rate = 8000}, 3).data,
          }
        end
    """)
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    assert (r["trim"], r["trim_open"], r["trim_past"]) == (1000, 200, 1000)
    assert (r["silence"], r["silence_ch"], r["silence_rate"]) == (1000, 2, 1000)
    assert r["defaults"] == [44100, 1, 44100]
    assert (r["mixed"], r["mixed_first"], r["mixed_last"]) == (2000, 0.25, -0.125)
    assert r["weighted_first"] == 0.5
    assert r["pad"] == 2000 + 2 * 300
    assert r["concat"] == 2000 * 2 + 1000
    assert r["stereo"] == [2000, 0.125]
    assert r["fade"] == [0.0, 0.5]
    assert r["rev"] == [3, 4, 1, 2]
    assert (r["same"], r["empty"]) == (1000, 0)


async def test_wav_formats_temp_paths_and_cas_object_paths(server, client):
    cas = server.server.cas
    done = await job(client, """
        function main()
          local s = {data = {0.5, -0.5, 0.25, -1.0, 1.0, 0.0}, channels = 2, sample_rate = 22050}
          local out = {}
          for _, bits in ipairs({8, 16, 24, 32}) do
            local path = audio.write_wav(s, "out/" .. bits .. ".wav", {bits = bits})
            local back, info = audio.read_wav(path)
            out[#out + 1] = {path = path, bits = info.bits, data = back.data, format = info.sample_format}
          end
          local h = audio.write_wav(s, nil, {bits = 32})
          local via_path = audio.info(cas.path(h))
          local via_prefix = audio.info("cas:" .. h)
          return {formats = out, hash = h, via_path = via_path.channels, via_prefix = via_prefix.bits}
        end
    """)
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    expected = [0.5, -0.5, 0.25, -1.0, 1.0, 0.0]
    for entry, bits in zip(r["formats"], (8, 16, 24, 32), strict=True):
        assert entry["path"] == f"out/{bits}.wav" and entry["bits"] == bits
        assert entry["format"] == ("float" if bits == 32 else "int")
        assert entry["data"] == pytest.approx(expected, abs=2 / 2 ** (bits - 1))
    assert (r["via_path"], r["via_prefix"]) == (2, 32)
    header = parse_header(cas.retrieve(r["hash"]), "x")
    assert (header.float, header.channels, header.sample_rate, header.samples) == (True, 2, 22050, 6)


def test_the_16_bit_writer_is_what_the_wave_module_reads():
    values = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0])  # 2.0 clips
    rate, channels, read = read_wave(encode(values, 2, 48000, 16))
    assert (rate, channels) == (48000, 2)
    assert read == pytest.approx([0.0, 0.5, -0.5, 1.0, -1.0, 1.0], abs=1e-4)


def bad_wav(channels: int = 2, tag: int = 1, bits: int = 16, rate: int = 8000) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4) + b"\x00" * 4
    return b"RIFF" + struct.pack("<I", len(body)) + body


async def test_hostile_inputs_get_named_errors(server, client):
    cas = server.server.cas
    files = {
        "text": cas.store(b"this is not a wav file", "text/plain"),
        "channels": cas.store(bad_wav(channels=MAX_CHANNELS + 1000), "audio/wav"),
        "mp3ish": cas.store(bad_wav(tag=0x55), "audio/wav"),
        "bits": cas.store(bad_wav(bits=12), "audio/wav"),
        "nodata": cas.store(bad_wav()[:36], "audio/wav"),
        "truncated": cas.store(b"RIFF\x00\x00", "audio/wav"),
    }
    done = await job(client, """
        function main(p)
          local function err(f, ...)
            local ok, e = pcall(f, ...)
            assert(not ok, "expected an error")
            return e
          end
          local tone = {data = {0.1, 0.2}, channels = 1, sample_rate = 8000}
          local out = {}
          for name, h in pairs(p.files) do out[name] = err(audio.read_wav, h) end
          out.huge_silence = err(audio.silence, 1e9, 48000)
          out.inf_silence = err(audio.silence, math.huge, 48000)
          out.negative = err(audio.silence, -1, 48000)
          out.too_many_channels = err(audio.silence, 1, 48000, 1000)
          out.rate = err(audio.silence, 1, 0)
          out.upsample = err(audio.resample, audio.silence(5, 8000, 2), 8000, 768000)
          out.not_table = err(audio.gain, "x", 3)
          out.string_sample = err(audio.gain, {data = {0.1, "loud"}, channels = 1}, 3)
          out.odd = err(audio.to_mono, {data = {0.1, 0.2, 0.3}, channels = 2})
          out.channels_zero = err(audio.to_mono, {data = {0.1}, channels = 0})
          out.db = err(audio.gain, tone, 1e6)
          out.mismatch = err(audio.mix, {tone, {data = {0.1}, channels = 1, sample_rate = 44100}})
          out.empty_mix = err(audio.mix, {})
          out.trim = err(audio.trim, tone, 5)
          out.quality = err(audio.resample, tone, 8000, 16000, "ultra")
          out.write_bits = err(audio.write_wav, tone, nil, {bits = 12})
          out.missing = err(audio.read_wav, string.rep("ab", 16))
          out.escape = err(audio.write_wav, tone, "../x.wav")
          out.host = err(audio.read_wav, "/etc/passwd")
          out.line = err(audio.info, 42)
          return out
        end
    """, {"files": files})
    assert done["status"] == "complete", done.get("error")
    r = done["result"]
    assert "audio.read_wav: invalid_wav: src is not a WAV file" in r["text"]
    assert "invalid_wav: src has 1032 channels" in r["channels"]
    assert "invalid_wav: src is WAV format 0x55" in r["mp3ish"]
    assert "invalid_wav: src has 12-bit PCM samples" in r["bits"]
    assert "invalid_wav: src has no data chunk" in r["nodata"]
    assert "invalid_wav" in r["truncated"]
    assert r["huge_silence"].startswith("audio.silence: audio_too_large: 1e+09 s of silence would hold 48000000000")
    assert "infinite" in r["inf_silence"]
    assert "must not be negative" in r["negative"]
    assert "invalid_samples: channels must be in 1..32" in r["too_many_channels"]
    assert "sample_rate must be in 1..768000" in r["rate"]
    assert "audio.resample: audio_too_large: the resampled buffer" in r["upsample"]
    assert "invalid_samples: samples must be a sample table" in r["not_table"]
    assert "samples.data[2] must be a number, got string" in r["string_sample"]
    assert "not a whole number of 2-channel frames" in r["odd"]
    assert "samples.channels must be in 1..32, got 0" in r["channels_zero"]
    assert "db must be within -120..120 dB" in r["db"]
    assert "samples_list[2] is 1 ch at 44100 Hz" in r["mismatch"]
    assert "non-empty array" in r["empty_mix"]
    assert "invalid trim range" in r["trim"]
    assert "quality must be one of quick, medium, high" in r["quality"]
    assert "opts.bits must be 8, 16, 24" in r["write_bits"]
    assert "no object" in r["missing"]
    assert "must not contain '..'" in r["escape"]
    assert "outside the job's temp directory" in r["host"]
    assert "src must be a string, got number" in r["line"]
    for message in r.values():  # a script error names its line, never a host path
        assert str(server.server.cas.root) not in message


async def test_writes_count_against_the_runs_cas_quota(make_server):
    from hooteproto.client import Client

    running = await make_server(run_cas_bytes=10_000)
    async with Client(running.endpoint) as c:
        done = await job(c, """
            function main()
              local small = audio.write_wav(audio.silence(0.1, 8000))
              local ok, err = pcall(audio.write_wav, audio.silence(1, 8000))
              return {small = small, err = err}
            end
        """)
    assert done["status"] == "complete", done.get("error")
    assert done["result"]["err"].startswith("audio.write_wav: cas_quota_exceeded:")


async def test_a_script_that_declares_capabilities_needs_audio(client):
    done = await job(client, """
        function describe() return {name = "narrow", capabilities = {"cas.read"}} end
        function main() return {audio = type(audio), abc = type(abc)} end
    """)
    assert done["status"] == "complete", done.get("error")
    assert done["result"] == {"audio": "nil", "abc": "nil"}
    done = await job(client, """
        function describe() return {name = "wide", capabilities = {"audio", "abc"}} end
        function main() return {audio = type(audio), abc = type(abc), cas = type(cas)} end
    """)
    assert done["result"] == {"audio": "table", "abc": "table", "cas": "nil"}
