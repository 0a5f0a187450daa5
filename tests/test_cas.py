"""The CAS module against real files: layout, sidecars, atomicity, validation, roots."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luanette.cas import (
    DEFAULT_MIME,
    Cas,
    CasError,
    Inspection,
    InvalidHash,
    NotFound,
    ReadOnly,
    TooLarge,
    UnsafePath,
    hash_bytes,
    parse_hash,
)
from tests.waiting import TIMED

HELLO = b"Hello, World!"
# BLAKE3("Hello, World!") truncated to 16 bytes.  Hard-coded so a change in hashing
# (wrong length, wrong algorithm, upper case) fails even if the test's own blake3 call
# changed the same way.
HELLO_HASH = "288a86a79f20a3d6dccdca7713beaed1"
# Upstream's own vector (tobert/hootenanny crates/cas/src/hash.rs,
# test_matches_hootenanny_output).
UPSTREAM_DATA = b"Concurrent Data"
UPSTREAM_HASH = "5c735d76fe3537a0f35cf4a4eb14a532"
TEMP_NAME = re.compile(r"luanette-[0-9]+-[0-9a-f]{16}\.tmp")


def files_under(path: Path) -> list[Path]:
    """Every non-directory entry below ``path``, sorted."""
    return sorted(p for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    """Name -> (mode, size, mtime_ns) of everything below ``path``, to prove nothing moved."""
    out = {}
    for p in sorted(path.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(path))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture
def cas(tmp_path: Path) -> Cas:
    return Cas(tmp_path / "cas")


# --- layout and format ----------------------------------------------------------------


def test_hello_world_lands_where_its_hash_says(cas: Cas) -> None:
    expected = blake3.blake3(HELLO).digest(length=16).hex()
    assert expected == HELLO_HASH

    h = cas.store(HELLO, "text/plain")

    assert h == HELLO_HASH
    obj = cas.root / "objects" / "28" / "8a86a79f20a3d6dccdca7713beaed1"
    meta = cas.root / "metadata" / "28" / "8a86a79f20a3d6dccdca7713beaed1.json"
    assert obj.read_bytes() == HELLO
    assert meta.read_bytes() == b'{"mime_type":"text/plain","size":13}'
    # Nothing else: no stray temp files, no extra shards.
    assert files_under(cas.root) == sorted([obj, meta])


def test_hash_matches_upstream_vector(cas: Cas) -> None:
    assert hash_bytes(UPSTREAM_DATA) == UPSTREAM_HASH
    assert cas.store(UPSTREAM_DATA, "application/octet-stream") == UPSTREAM_HASH
    assert (cas.root / "objects" / "5c" / "735d76fe3537a0f35cf4a4eb14a532").read_bytes() == UPSTREAM_DATA


def test_sidecar_is_compact_json_in_upstream_key_order(cas: Cas) -> None:
    data = b"\x00" * 48000
    h = cas.store(data, "audio/wav")
    raw = cas.metadata_path(h).read_bytes()
    # serde_json::to_string: no spaces, mime_type before size, no trailing newline.
    assert raw == b'{"mime_type":"audio/wav","size":48000}'
    assert list(json.loads(raw)) == ["mime_type", "size"]


def test_sidecar_escapes_like_serde_json(cas: Cas) -> None:
    h = cas.store(b"odd mime", 'text/x-"quoted"\\é')
    # serde_json escapes quote and backslash, writes non-ASCII as raw UTF-8.
    assert cas.metadata_path(h).read_bytes() == '{"mime_type":"text/x-\\"quoted\\"\\\\é","size":8}'.encode()


def test_missing_mime_defaults_to_octet_stream(cas: Cas) -> None:
    h = cas.store(b"untyped")
    assert cas.metadata_path(h).read_bytes() == b'{"mime_type":"application/octet-stream","size":7}'


def test_empty_content_round_trips(cas: Cas) -> None:
    h = cas.store(b"", "text/plain")
    assert h == "af1349b9f5f9a1a6a0404dea36dcc949"
    assert cas.retrieve(h) == b""
    assert cas.inspect(h).size_bytes == 0


def test_object_permissions_follow_umask_like_upstream(cas: Cas) -> None:
    old = os.umask(0o022)
    try:
        h = cas.store(b"readable by the garden", "text/plain")
    finally:
        os.umask(old)
    assert stat.S_IMODE(cas.object_path(h).stat().st_mode) == 0o644
    assert stat.S_IMODE(cas.metadata_path(h).stat().st_mode) == 0o644


# --- idempotence ----------------------------------------------------------------------


def test_storing_again_leaves_object_and_sidecar_untouched(cas: Cas) -> None:
    h = cas.store(HELLO, "text/plain")
    obj_before = cas.object_path(h).stat()
    meta_before = cas.metadata_path(h).stat()
    time.sleep(0.01)

    assert cas.store(HELLO, "audio/wav") == h

    obj_after = cas.object_path(h).stat()
    meta_after = cas.metadata_path(h).stat()
    assert (obj_after.st_ino, obj_after.st_mtime_ns) == (obj_before.st_ino, obj_before.st_mtime_ns)
    assert (meta_after.st_ino, meta_after.st_mtime_ns) == (meta_before.st_ino, meta_before.st_mtime_ns)
    # The first mime type stays, as upstream never rewrites a sidecar.
    assert cas.inspect(h).mime_type == "text/plain"


def test_store_writes_a_missing_sidecar_without_touching_the_object(cas: Cas) -> None:
    h = cas.store(HELLO, "text/plain")
    cas.metadata_path(h).unlink()
    ino = cas.object_path(h).stat().st_ino

    assert cas.store(HELLO, "text/markdown") == h

    assert cas.object_path(h).stat().st_ino == ino
    assert cas.metadata_path(h).read_bytes() == b'{"mime_type":"text/markdown","size":13}'


# --- reads ----------------------------------------------------------------------------


def test_retrieve_exists_inspect_path(cas: Cas) -> None:
    h = cas.store(b"Inspectable content", "application/json")

    assert cas.exists(h)
    assert cas.exists("cas:" + h)
    assert cas.retrieve(h) == b"Inspectable content"
    assert cas.retrieve("cas:" + h) == b"Inspectable content"
    assert cas.path(h) == cas.root / "objects" / h[:2] / h[2:]
    assert cas.inspect(h) == Inspection(
        hash=h,
        mime_type="application/json",
        size_bytes=19,
        local_path=str(cas.root / "objects" / h[:2] / h[2:]),
    )


def test_missing_objects_raise_not_found(cas: Cas) -> None:
    missing = "0" * 32
    assert not cas.exists(missing)
    for call in (cas.retrieve, cas.inspect, cas.path):
        with pytest.raises(NotFound, match=missing):
            call(missing)


def test_inspect_without_sidecar_uses_file_size_and_octet_stream(cas: Cas) -> None:
    h = cas.store(b"no metadata", "text/plain")
    cas.metadata_path(h).unlink()
    info = cas.inspect(h)
    assert (info.mime_type, info.size_bytes) == (DEFAULT_MIME, 11)


def test_inspect_reads_a_sidecar_written_by_another_process(cas: Cas) -> None:
    # An object as hootenanny would leave it: plain files, compact sidecar.
    data = b"MThd fake midi"
    h = blake3.blake3(data).digest(length=16).hex()
    obj = cas.root / "objects" / h[:2] / h[2:]
    meta = cas.root / "metadata" / h[:2] / f"{h[2:]}.json"
    obj.parent.mkdir(parents=True)
    meta.parent.mkdir(parents=True)
    obj.write_bytes(data)
    meta.write_bytes(b'{"mime_type":"audio/midi","size":14}')

    assert cas.retrieve(h) == data
    assert cas.inspect(h) == Inspection(hash=h, mime_type="audio/midi", size_bytes=14, local_path=str(obj))


def test_inspect_survives_a_torn_sidecar(cas: Cas) -> None:
    h = cas.store(b"torn", "text/plain")
    cas.metadata_path(h).write_bytes(b'{"mime_ty')
    info = cas.inspect(h)
    assert (info.mime_type, info.size_bytes) == (DEFAULT_MIME, 4)


def test_max_bytes_caps_retrieve(cas: Cas) -> None:
    data = bytes(range(256)) * 4
    h = cas.store(data)
    assert cas.retrieve(h, max_bytes=1024) == data
    with pytest.raises(TooLarge) as info:
        cas.retrieve(h, max_bytes=1023)
    assert (info.value.hash, info.value.size, info.value.limit) == (h, 1024, 1023)
    assert "1024 bytes" in str(info.value)


def _bytes_read_by_this_process() -> int | None:
    """``rchar`` of /proc/self/io (bytes this process got from read calls), if there is one."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


@TIMED
def test_max_bytes_refuses_before_reading(cas: Cas, timed: bool) -> None:
    # An 8 GiB sparse object: reading it all would take seconds and gigabytes of memory.
    # That nothing near the cap was read shows the cap is checked before the read.
    h = "ab" + "0" * 30
    obj = cas.object_path(h)
    obj.parent.mkdir(parents=True)
    with open(obj, "wb") as f:
        f.truncate(8 << 30)
    before = _bytes_read_by_this_process()
    start = time.monotonic()
    with pytest.raises(TooLarge) as info:
        cas.retrieve(h, max_bytes=1 << 20)
    elapsed = time.monotonic() - start
    after = _bytes_read_by_this_process()
    assert info.value.size == 8 << 30
    if before is not None and after is not None:
        assert after - before < 64 << 10  # reading up to the cap would be 1 MiB
    if timed:
        assert elapsed < 1.0


# --- store_file -----------------------------------------------------------------------


def test_store_file_streams_to_the_same_object_as_store(cas: Cas, tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * (1 << 20) + 17)  # several copy chunks, odd tail
    src = tmp_path / "take.wav"
    src.write_bytes(data)

    h = cas.store_file(src, "audio/wav")

    assert h == blake3.blake3(data).digest(length=16).hex()
    assert cas.retrieve(h) == data
    assert cas.metadata_path(h).read_bytes() == f'{{"mime_type":"audio/wav","size":{len(data)}}}'.encode()
    ino = cas.object_path(h).stat().st_ino
    assert cas.store(data, "audio/wav") == h
    assert cas.store_file(src, "audio/wav") == h
    assert cas.object_path(h).stat().st_ino == ino
    assert list((cas.root / "tmp").iterdir()) == []


def test_store_file_of_a_missing_source_leaves_no_temp(cas: Cas, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cas.store_file(tmp_path / "nope.wav")
    assert files_under(cas.root) == []


# --- read-only ------------------------------------------------------------------------


def test_read_only_refuses_writes_and_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "absent"
    ro = Cas(root, read_only=True)
    assert not root.exists()
    assert not ro.exists(HELLO_HASH)
    src = tmp_path / "src"
    src.write_bytes(HELLO)
    writes = [lambda: ro.store(HELLO, "text/plain"), lambda: ro.store_file(src), lambda: ro.clean_temp(0)]
    for write in writes:
        with pytest.raises(ReadOnly, match="read-only"):
            write()
    assert not root.exists()


def test_read_only_reads_what_a_writer_stored(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    h = Cas(root).store(b"readable content", "text/plain")
    before = snapshot(root)
    ro = Cas(root, read_only=True)

    assert ro.retrieve(h) == b"readable content"
    assert ro.inspect(h).mime_type == "text/plain"
    # Even content that is already stored is refused: read-only means no writes at all.
    with pytest.raises(ReadOnly):
        ro.store(b"readable content", "text/plain")
    assert snapshot(root) == before


# --- root resolution ------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake HOME and XDG data dir, and no CAS variables from the caller's shell."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HOOTENANNY_CAS_PATH", raising=False)
    monkeypatch.delenv("HOOTENANNY_CAS_READONLY", raising=False)
    return home


def test_flag_beats_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOTENANNY_CAS_PATH", str(tmp_path / "from-env"))
    cas = Cas.from_config(str(tmp_path / "from-flag"))
    assert cas.root == tmp_path / "from-flag"
    assert (tmp_path / "from-flag" / "objects").is_dir()
    assert not (tmp_path / "from-env").exists()


def test_env_beats_default(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOTENANNY_CAS_PATH", str(tmp_path / "from-env"))
    cas = Cas.from_config(None)
    assert cas.root == tmp_path / "from-env"
    assert cas.store(HELLO, "text/plain") == HELLO_HASH
    assert (tmp_path / "from-env" / "objects" / "28").is_dir()
    assert not (clean_env / ".hootenanny").exists()


def test_default_is_upstreams_home_dir_path(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOOTENANNY_CAS_PATH", "")  # empty counts as unset
    cas = Cas.from_config(None)
    assert cas.root == clean_env / ".hootenanny" / "cas"
    assert (clean_env / ".hootenanny" / "cas" / "objects").is_dir()
    assert not (tmp_path / "xdg").exists()


def test_read_only_from_env_like_upstream(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = str(tmp_path / "cas")
    for value, expected in [("true", True), ("TRUE", True), ("1", True), ("yes", False), ("0", False)]:
        monkeypatch.setenv("HOOTENANNY_CAS_READONLY", value)
        assert Cas.from_config(root).read_only is expected, value
    monkeypatch.setenv("HOOTENANNY_CAS_READONLY", "true")
    assert Cas.from_config(root, read_only=False).read_only is False


# --- hash validation ------------------------------------------------------------------

BAD_HASHES = [
    "../../etc/passwd",
    "28/" + "a" * 29,  # 32 chars with a separator
    "../" * 10 + "ab",  # 32 chars of parent references
    "cas:" + "../" * 10 + "ab",
    "28" + "/" * 30,
    HELLO_HASH.upper(),
    HELLO_HASH[:31],
    HELLO_HASH + "0",
    HELLO_HASH[:31] + "\x00",
    "\x00" * 32,
    "٠" * 32,  # ARABIC-INDIC DIGIT ZERO: str.isdigit() is True
    "０" * 32,  # FULLWIDTH DIGIT ZERO
    HELLO_HASH[:31] + "٣",
    HELLO_HASH[:31] + "\n",
    " " + HELLO_HASH[:31],
    "",
    "cas:",
    "CAS:" + HELLO_HASH,
    "cas:cas:" + HELLO_HASH,
    "cas://" + HELLO_HASH,
]


@pytest.mark.parametrize("bad", BAD_HASHES, ids=repr)
def test_bad_hashes_raise_and_touch_nothing(tmp_path: Path, bad: str) -> None:
    cas = Cas(tmp_path / "cas")
    cas.store(HELLO, "text/plain")
    (tmp_path / "victim").write_bytes(b"keep me")
    before = snapshot(tmp_path)

    calls = [parse_hash, cas.exists, cas.retrieve, cas.inspect, cas.path, cas.object_path, cas.metadata_path]
    for call in calls:
        with pytest.raises(InvalidHash):
            call(bad)

    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("bad", [HELLO_HASH.encode(), None, 288, ["28"]], ids=repr)
def test_non_string_hashes_are_invalid(cas: Cas, bad: object) -> None:
    with pytest.raises(InvalidHash, match="must be a string"):
        cas.retrieve(bad)  # type: ignore[arg-type]


def test_invalid_hash_messages_name_the_problem() -> None:
    with pytest.raises(InvalidHash, match="32 hex characters, got 31"):
        parse_hash(HELLO_HASH[:31])
    with pytest.raises(InvalidHash, match="lowercase"):
        parse_hash(HELLO_HASH.upper())
    with pytest.raises(InvalidHash, match=r"non-hex character '\\x00' at 31"):
        parse_hash(HELLO_HASH[:31] + "\x00")
    with pytest.raises(InvalidHash, match="non-hex character '/' at 2"):
        parse_hash("28/" + "a" * 29)
    assert issubclass(InvalidHash, ValueError) and issubclass(InvalidHash, CasError)


def test_cas_prefix_is_accepted() -> None:
    assert parse_hash("cas:" + HELLO_HASH) == HELLO_HASH
    assert parse_hash(HELLO_HASH) == HELLO_HASH


# --- symlinks -------------------------------------------------------------------------


def test_object_symlinked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    cas = Cas(tmp_path / "cas")
    secret = tmp_path / "secret"
    secret.write_bytes(b"top secret")
    h = hash_bytes(b"top secret")
    link = cas.object_path(h)
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)

    for call in (cas.exists, cas.retrieve, cas.inspect, cas.path):
        with pytest.raises(UnsafePath, match="outside the CAS root"):
            call(h)
    with pytest.raises(UnsafePath):
        cas.store(b"top secret", "text/plain")
    assert secret.read_bytes() == b"top secret"
    assert link.is_symlink()


def test_shard_dir_symlinked_out_of_the_root_is_not_written_through(tmp_path: Path) -> None:
    cas = Cas(tmp_path / "cas")
    outside = tmp_path / "outside"
    outside.mkdir()
    (cas.root / "objects" / HELLO_HASH[:2]).symlink_to(outside)

    with pytest.raises(UnsafePath):
        cas.store(HELLO, "text/plain")
    assert list(outside.iterdir()) == []
    assert list((cas.root / "tmp").iterdir()) == []


def test_symlinked_root_works(tmp_path: Path) -> None:
    # Deployments often point ~/.hootenanny/cas at a bigger disk.
    real = tmp_path / "tank"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    cas = Cas(tmp_path / "link")
    h = cas.store(HELLO, "text/plain")
    assert cas.retrieve(h) == HELLO
    assert (real / "objects" / "28" / HELLO_HASH[2:]).read_bytes() == HELLO


def test_fifo_at_an_object_path_does_not_hang(cas: Cas) -> None:
    h = "cd" + "0" * 30
    obj = cas.object_path(h)
    obj.parent.mkdir(parents=True)
    os.mkfifo(obj)
    with pytest.raises(CasError, match="not a regular file"):
        cas.retrieve(h)
    assert not cas.exists(h)


# --- crashes, temp files, concurrency -------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from luanette.cas import Cas
Cas(Path(sys.argv[1])).store_file(sys.argv[2], "audio/wav")
"""


def _open_fifo_writer(fifo: Path, child: subprocess.Popen, deadline: float) -> int:
    """Open the FIFO's write end once the child has opened it for reading."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert child.poll() is None, "child exited before opening the FIFO"
            assert time.monotonic() < deadline, "child never opened the FIFO"
            time.sleep(0.01)
            continue
        os.set_blocking(fd, True)
        return fd


def test_sigkill_mid_copy_leaves_only_a_temp_file(tmp_path: Path) -> None:
    cas = Cas(tmp_path / "cas")
    content = random.Random(7).randbytes(16 << 20)
    sent = 6 << 20
    # A FIFO makes "mid-copy" deterministic: the child has copied what we sent and is
    # blocked waiting for the rest when the SIGKILL lands.
    fifo = tmp_path / "big.wav"
    os.mkfifo(fifo)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cas.root), str(fifo)])
    deadline = time.monotonic() + 60
    fd = -1
    try:
        fd = _open_fifo_writer(fifo, child, deadline)
        view = memoryview(content)[:sent]
        while view:
            view = view[os.write(fd, view) :]
        # Wait until the child has written (nearly) all of it into its temp file.
        while True:
            temps = list((cas.root / "tmp").iterdir())
            if temps and temps[0].stat().st_size >= sent - (1 << 20):
                break
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if fd >= 0:
            os.close(fd)
        if child.poll() is None:
            child.kill()
            child.wait()

    assert child.returncode == -signal.SIGKILL
    temps = list((cas.root / "tmp").iterdir())
    assert len(temps) == 1 and TEMP_NAME.fullmatch(temps[0].name)
    partial = temps[0].read_bytes()
    assert 0 < len(partial) <= sent and content.startswith(partial)
    # No object or sidecar for the whole content, the part sent, or the part copied.
    assert files_under(cas.root / "objects") == []
    assert files_under(cas.root / "metadata") == []
    for data in (content, content[:sent], partial):
        assert not cas.exists(hash_bytes(data))

    assert cas.clean_temp(older_than_s=3600) == 0  # too fresh to be a crash's leftovers
    assert temps[0].exists()
    assert cas.clean_temp(older_than_s=0) == 1
    assert list((cas.root / "tmp").iterdir()) == []


def test_clean_temp_only_removes_old_files_of_its_own(cas: Cas) -> None:
    old = time.time() - 7200
    stale = cas.root / "tmp" / "luanette-123-0123456789abcdef.tmp"
    fresh = cas.root / "tmp" / "luanette-123-fedcba9876543210.tmp"
    foreign = cas.root / "tmp" / "notes.txt"
    # Upstream's staging area holds recordings chaosgarden may still be writing.
    staging = cas.root / "staging" / "ab" / ("c" * 30)
    staging.parent.mkdir(parents=True)
    for p in (stale, fresh, foreign, staging):
        p.write_bytes(b"x")
    for p in (stale, foreign, staging):
        os.utime(p, (old, old))

    assert cas.clean_temp(older_than_s=3600) == 1

    assert not stale.exists()
    assert fresh.exists() and foreign.exists() and staging.exists()
    with pytest.raises(ValueError):
        cas.clean_temp(older_than_s=-1)


def test_concurrent_stores_make_one_intact_object(cas: Cas, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(2 << 20)
    expected = blake3.blake3(data).digest(length=16).hex()
    src = tmp_path / "same.bin"
    src.write_bytes(data)
    workers = 16
    barrier = threading.Barrier(workers)

    def work(i: int) -> str:
        barrier.wait()
        return cas.store(data, "audio/wav") if i % 2 else cas.store_file(src, "audio/wav")

    with ThreadPoolExecutor(workers) as pool:
        hashes = list(pool.map(work, range(workers)))

    assert hashes == [expected] * workers
    obj = cas.object_path(expected)
    assert files_under(cas.root / "objects") == [obj]
    assert obj.read_bytes() == data
    assert cas.metadata_path(expected).read_bytes() == f'{{"mime_type":"audio/wav","size":{2 << 20}}}'.encode()
    assert list((cas.root / "tmp").iterdir()) == []


def test_upstream_concurrent_vector_from_threads(cas: Cas) -> None:
    # upstream store.rs test_concurrent_writes, in Python.
    with ThreadPoolExecutor(10) as pool:
        stores = [pool.submit(cas.store, UPSTREAM_DATA, "application/octet-stream") for _ in range(10)]
        hashes = [f.result() for f in stores]
    assert hashes == [UPSTREAM_HASH] * 10
    assert cas.retrieve(UPSTREAM_HASH) == UPSTREAM_DATA


# --- property ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cas(tmp_path_factory: pytest.TempPathFactory) -> Cas:
    return Cas(tmp_path_factory.mktemp("prop") / "cas")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096), mime=st.none() | st.text(max_size=40))
def test_store_retrieve_round_trip(shared_cas: Cas, data: bytes, mime: str | None) -> None:
    h = shared_cas.store(data, mime)
    assert h == blake3.blake3(data).digest(length=16).hex()
    assert re.fullmatch(r"[0-9a-f]{32}", h)
    assert shared_cas.retrieve(h) == data
    info = shared_cas.inspect(h)
    assert info.size_bytes == len(data)
    assert info.local_path == str(shared_cas.root / "objects" / h[:2] / h[2:])
