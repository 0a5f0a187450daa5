"""luanette.stdlib.cas: the `cas` namespace over a real store, through the real runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from luanette.cas import Cas, hash_bytes
from luanette.runtime import ScriptError, run_script
from luanette.stdlib.cas import CasNamespace
from luanette.stdlib.temp import TempNamespace

CAP = 1000


@pytest.fixture
def cas(tmp_path: Path) -> Cas:
    return Cas(tmp_path / "cas")


@pytest.fixture
def temp(tmp_path: Path):
    temp = TempNamespace(tmp_path / "temp")
    try:
        yield temp
    finally:
        temp.close()


async def run(cas: Cas, code: str, params: Any = None, *, temp: TempNamespace | None = None, cap: int = CAP) -> Any:
    namespaces: list[Any] = [CasNamespace(cas, cap, temp=temp)]
    if temp is not None:
        namespaces.append(temp)
    return (await run_script(code, params, namespaces=namespaces)).result


async def failure(cas: Cas, code: str, params: Any = None, **kwargs: Any) -> str:
    with pytest.raises(ScriptError) as info:
        await run(cas, code, params, **kwargs)
    message = info.value.detail.message
    assert "internal error" not in message
    return message


async def test_store_get_round_trip_text_and_binary(cas: Cas) -> None:
    result = await run(
        cas,
        """
        local text = cas.store("hello, world", "text/plain; charset=utf-8")
        local bin = string.char(0, 255, 1, 128, 10)
        local h = cas.store(bin)
        return {text = text, bin = h, same_text = cas.get(text) == "hello, world",
                same_bin = cas.get(h) == bin, len = #cas.get(h), again = cas.store(bin)}
        """,
    )
    assert result["text"] == hash_bytes(b"hello, world")
    assert result["bin"] == result["again"] == hash_bytes(bytes([0, 255, 1, 128, 10]))
    assert result["same_text"] and result["same_bin"] and result["len"] == 5
    assert cas.retrieve(result["bin"]) == bytes([0, 255, 1, 128, 10])
    assert cas.inspect(result["text"]).mime_type == "text/plain; charset=utf-8"
    assert cas.inspect(result["bin"]).mime_type == "application/octet-stream"


async def test_inspect_exists_path(cas: Cas) -> None:
    h = cas.store(b"abc", "audio/midi")
    result = await run(
        cas,
        "local h = params.h return {cas.inspect(h), cas.inspect('cas:' .. h), cas.exists(h), "
        "cas.exists(string.rep('0', 32)), cas.path(h)}",
        {"h": h},
    )
    info, prefixed, present, absent, path = result
    assert info == prefixed == {"hash": h, "mime_type": "audio/midi", "size_bytes": 3}
    assert "local_path" not in info
    assert (present, absent) == (True, False)
    # relative to the CAS root (a script never sees a host path), as a tool sharing the
    # CAS joins it to its own root
    assert path == f"objects/{h[:2]}/{h[2:]}" and not Path(path).is_absolute()
    assert (cas.root / path).read_bytes() == b"abc"


async def test_get_over_the_cap_names_the_cap(cas: Cas) -> None:
    h = cas.store(b"x" * (CAP + 1))
    message = await failure(cas, "return cas.get(params.h)", {"h": h})
    assert message == f"cas.get: hash: object {h} is {CAP + 1} bytes, over the read limit of {CAP} bytes"
    assert await run(cas, "return #cas.get(params.h)", {"h": cas.store(b"y" * CAP)}) == CAP


async def test_missing_objects(cas: Cas) -> None:
    missing = "0" * 32
    for function in ("get", "inspect", "path"):
        message = await failure(cas, f"return cas.{function}(params.h)", {"h": missing})
        assert message == f"cas.{function}: hash: no object {missing} in the CAS"
        assert str(cas.root) not in message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("nothex", "32 hex characters"),
        ("A" * 32, "lowercase"),
        ("../../../../etc/passwd", "32 hex characters"),
        ("0123456789abcdef0123456789abcde/", "non-hex character"),
        ("cas:" + "g" * 32, "non-hex character"),
        (42, "must be a string, got number"),
        ({"a": 1}, "must be a string, got table"),
    ],
)
@pytest.mark.parametrize("function", ["get", "inspect", "exists", "path"])
async def test_invalid_hashes_are_lua_errors(cas: Cas, function: str, value: Any, fragment: str) -> None:
    code = f"local ok, err = pcall(cas.{function}, params.v) return {{ok, err}}"
    ok, message = await run(cas, code, {"v": value})
    assert ok is False
    assert message.startswith(f"cas.{function}: ") and fragment in message
    assert "internal error" not in message


async def test_binary_hash_argument(cas: Cas) -> None:
    message = await failure(cas, "return cas.get('\\xff' .. string.rep('0', 31))")
    assert "binary string" in message


@pytest.mark.parametrize("mime", ["", "audio", "audio/", "a/b c", "x/y\n", "a" * 300 + "/b", "/midi"])
async def test_bad_mime_types(cas: Cas, mime: str) -> None:
    message = await failure(cas, "return cas.store('x', params.m)", {"m": mime})
    assert message.startswith("cas.store: mime_type must be a MIME type")


async def test_store_needs_a_string(cas: Cas) -> None:
    assert "data must be a string, got table" in await failure(cas, "return cas.store({1, 2})")
    assert "data must be a string, got number" in await failure(cas, "return cas.store(12)")


async def test_read_only_store(tmp_path: Path, cas: Cas) -> None:
    h = cas.store(b"kept")
    read_only = Cas(tmp_path / "cas", read_only=True)
    assert await failure(read_only, "return cas.store('x')") == (
        "cas.store: cas_read_only: the CAS is read-only (it was opened read-only): "
        "objects can be read but not stored"
    )
    assert await run(read_only, "return cas.get(params.h)", {"h": h}) == "kept"


async def test_store_file_from_the_temp_directory(cas: Cas, temp: TempNamespace) -> None:
    (temp.directory / "render.wav").write_bytes(b"RIFF....WAVE")
    result = await run(
        cas, "return cas.inspect(cas.store_file(temp.path('render.wav'), 'audio/wav'))", temp=temp
    )
    assert result == {"hash": hash_bytes(b"RIFF....WAVE"), "mime_type": "audio/wav", "size_bytes": 12}


async def test_store_file_is_capped_and_confined(cas: Cas, temp: TempNamespace, tmp_path: Path) -> None:
    (temp.directory / "big").write_bytes(b"x" * (CAP + 1))
    assert "over the read limit of 1000 bytes" in await failure(cas, "cas.store_file('big')", temp=temp)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    message = await failure(cas, "cas.store_file(params.p)", {"p": str(secret)}, temp=temp)
    assert "outside the job's temp directory" in message
    assert not cas.exists(hash_bytes(b"s"))


async def test_store_file_without_a_temp_directory(cas: Cas) -> None:
    assert await failure(cas, "cas.store_file('x')") == "cas.store_file: this job has no temp directory"


async def test_errors_can_be_caught(cas: Cas) -> None:
    assert await run(cas, "local ok = pcall(cas.get, 'zz') return ok") is False
