"""Storage faults have names (issue 10, item 5), over real sockets.

A read-only CAS answers ``cas_read_only``, a full disk ``storage_full``, a job database
that cannot be used ``unavailable``, params Lua cannot hold ``invalid_params`` naming the
place; inside scripts the same faults are Lua errors whose message starts with the code;
the daemon keeps answering meanwhile.

Which faults are real and which simulated (the test names say so too):

- real: ``HOOTENANNY_CAS_READONLY=1``; a read-only filesystem (a read-only bind mount,
  or as a non-root user a directory of mode 0555); a full disk (a 1 MiB tmpfs filled
  up) under the CAS and under the state database; a database locked by another
  connection past the busy timeout (shortened for the test); a closed database.
- simulated: a full state database by ``PRAGMA max_page_count``, and a full CAS by a
  file-size limit (``RLIMIT_FSIZE``, which gives ``EFBIG``) on a daemon process.  These
  run everywhere; the tmpfs tests skip only where mounting is impossible, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette import faults
from luanette import store as store_mod
from luanette.cas import Cas
from luanette.jobs import REWRITE_FIRST_S
from luanette.scripts import MIME
from tests.conftest import DaemonProcess
from tests.waiting import until

pytestmark = pytest.mark.timeout(120)

STORES = """
function main(p)
  p = p or {}
  local out = {}
  out.store = {pcall(cas.store, p.size and string.rep("y", p.size) or "some bytes")}
  out.midi = {pcall(midi.write, {tracks = {{events = {{type = "note_on", note = 60}}}}})}
  out.read = cas.exists(p.known or string.rep("0", 32))
  return out
end
"""


# --------------------------------------------------------------------- helpers


async def ok(c: Client, payload: t.Payload, timeout: float = 30) -> object:
    reply = await c.request(payload, timeout=timeout)
    assert isinstance(reply, t.Success), reply
    return reply.result


async def refused(c: Client, payload: t.Payload, code: str) -> t.Error:
    reply = await c.request(payload, timeout=30)
    assert isinstance(reply, t.Error) and reply.code == code, reply
    return reply


async def finished(c: Client, job_id: str) -> dict:
    reply = await c.request(t.JobPoll(job_ids=[job_id], timeout_ms=30000, mode=t.PollMode.ALL), timeout=45)
    assert isinstance(reply, t.Success) and not reply.result["timed_out"], reply
    return reply.result["completed"][0]


async def job(c: Client, script_hash: str, params=None) -> dict:
    started = await ok(c, t.JobExecute(script_hash=script_hash, params=params))
    return await finished(c, started["job_id"])


async def still_answering(c: Client) -> None:
    """The daemon answers other requests while a store is failing."""
    assert isinstance(await c.request(t.Ping(), timeout=10), t.Pong)
    assert (await ok(c, t.LuaEval(code="return 6 * 7")))["result"] == 42


def preload(root: Path, script: str) -> str:
    """Store ``script`` in the CAS at ``root`` with a writable store (as another
    hootenanny process would have), before the daemon opens it read-only."""
    return Cas(root).store(script.encode(), MIME)


def no_host_path(value: object, *paths: Path) -> None:
    text = msgspec.json.encode(value).decode()
    for path in paths:
        for form in {str(path), os.path.realpath(path)}:
            assert form not in text, f"{form} shown to a script: {text}"


def _mount(*args: str) -> str | None:
    """Run mount; None when it worked, else why not."""
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs at ``path``; skips the test (with the reason) where mounting is
    impossible."""
    path.mkdir(parents=True, exist_ok=True)
    why = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs for a real full disk: {why}")
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[str]:
    """Make the existing tree at ``path`` unwritable for the daemon; yields the reason
    the daemon will give.  As root (whom chmod does not stop) a read-only bind mount;
    otherwise mode 0555 on every directory."""
    if os.geteuid() != 0:
        dirs = [path, *(p for p in path.rglob("*") if p.is_dir())]
        for d in dirs:
            d.chmod(0o555)
        try:
            yield "the daemon has no permission to write there"
        finally:
            for d in dirs:
                d.chmod(0o755)
        return
    why = _mount("--bind", str(path), str(path))
    if why is not None:
        pytest.skip(f"running as root, so chmod cannot make a directory read-only, and bind-mounting failed: {why}")
    try:
        why = _mount("-o", "remount,bind,ro", str(path))
        if why is not None:
            pytest.skip(f"running as root, and remounting read-only failed: {why}")
        yield "its filesystem is mounted read-only"
    finally:
        _umount(path)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last block; the filler's path."""
    filler = directory / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


# ------------------------------------------------------------------ read-only CAS


async def test_read_only_cas_by_env_is_cas_read_only_for_clients_and_scripts(make_server, tmp_path, monkeypatch):
    root = tmp_path / "cas"
    script = preload(root, STORES)
    known = Cas(root).store(b"already there")
    monkeypatch.setenv("HOOTENANNY_CAS_READONLY", "1")
    running = await make_server(workers=1)
    async with Client(running.endpoint) as c:
        reply = await refused(c, t.ScriptStore(content="return 1"), "cas_read_only")
        assert reply.message.startswith(f"the CAS at {root} is read-only (HOOTENANNY_CAS_READONLY=1): ")
        assert "unset HOOTENANNY_CAS_READONLY" in reply.message
        await still_answering(c)
        done = await job(c, script, {"known": known})
        assert done["status"] == "complete", done["error"]
        out = done["result"]
        expected = "the CAS is read-only (HOOTENANNY_CAS_READONLY=1): objects can be read but not stored"
        assert out["store"] == [False, f"cas.store: cas_read_only: {expected}"]
        assert out["midi"] == [False, f"midi.write: cas_read_only: {expected}"]
        assert out["read"] is True  # reads go on
        no_host_path(out, tmp_path)


async def test_read_only_filesystem_under_the_cas_is_cas_read_only(make_server, tmp_path):
    root = tmp_path / "cas"
    script = preload(root, STORES)
    with read_only_directory(root) as reason:
        running = await make_server(workers=1)
        async with Client(running.endpoint) as c:
            reply = await refused(c, t.ScriptStore(content="return 'new'"), "cas_read_only")
            assert reply.message.startswith(f"the CAS at {root} is read-only ({reason}); nothing was stored")
            await still_answering(c)
            done = await job(c, script)
            assert done["status"] == "complete", done["error"]
            expected = f"the CAS is read-only ({reason}); objects can be read but not stored"
            assert done["result"]["store"] == [False, f"cas.store: cas_read_only: {expected}"]
            assert done["result"]["midi"] == [False, f"midi.write: cas_read_only: {expected}"]
            no_host_path(done["result"], tmp_path)
            await running.stop()


# ------------------------------------------------------------------ a full CAS


async def test_full_disk_under_the_cas_real_tmpfs_is_storage_full(make_server, tmp_path):
    with tmpfs(tmp_path / "cas") as root:
        running = await make_server(workers=1)
        async with Client(running.endpoint) as c:
            script = (await ok(c, t.ScriptStore(content=STORES)))["hash"]
            filler = fill(root)
            big = "-- " + "x" * 200_000 + "\nreturn 1"
            reply = await refused(c, t.ScriptStore(content=big), "storage_full")
            assert reply.message.startswith(f"the CAS at {root} is full (no space left on its disk); nothing was")
            await still_answering(c)
            done = await job(c, script, {"size": 200_000})
            assert done["status"] == "complete", done["error"]
            assert done["result"]["store"] == [
                False, "cas.store: storage_full: the CAS is full (no space left on its disk); nothing was stored"
            ]
            no_host_path(done["result"], tmp_path)
            assert list((root / "tmp").iterdir()) == []  # no half-written temp file left
            filler.unlink()
            assert (await ok(c, t.ScriptStore(content=big)))["hash"]  # room again: it works
            await running.stop()


def test_cas_file_size_limit_simulated_efbig_is_storage_full(tmp_path):
    """Simulated: the daemon runs under RLIMIT_FSIZE, so a CAS write past it fails with
    EFBIG (Python ignores SIGXFSZ), as a full disk would with ENOSPC."""
    limit = 512 * 1024

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    class Limited(DaemonProcess):
        """``luanette serve`` as DaemonProcess starts it, under the file-size limit."""

        def _spawn(self, argv: list[str]) -> subprocess.Popen:
            return subprocess.Popen(argv + ["--workers", "1"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, preexec_fn=limited)

    daemon = Limited(tmp_path)
    try:
        async def check() -> None:
            async with Client(daemon.endpoint) as c:
                big = "-- " + "x" * (limit + 1000) + "\nreturn 1"
                reply = await refused(c, t.ScriptStore(content=big), "storage_full")
                assert "is full (a file reached the size limit of the daemon's process)" in reply.message
                script = (await ok(c, t.ScriptStore(content=STORES)))["hash"]  # small ones still fit
                done = await job(c, script, {"size": limit + 1000})
                assert done["result"]["store"] == [False, (
                    "cas.store: storage_full: the CAS is full (a file reached the size limit of the "
                    "daemon's process); nothing was stored"
                )]
                await still_answering(c)

        asyncio.run(check())
    finally:
        daemon.stop()


# ------------------------------------------------------------ the job database

SLOW_BIG = """
function main(p)
  p = p or {}
  clock.sleep(p.ms or 500)
  return string.rep("r", p.size or 10)
end
"""


async def _final_state_waits_for_room(running, c: Client, make_room, fill_up, big: int) -> None:
    """A job whose end cannot be written stays running (the workers go on), then reads
    failed with kind storage_full once there is room."""
    script = (await ok(c, t.ScriptStore(content=SLOW_BIG)))["hash"]
    stuck = (await ok(c, t.JobExecute(script_hash=script, params={"ms": 800, "size": big})))["job_id"]

    async def running_now() -> bool:
        return (await ok(c, t.JobStatusRequest(job_id=stuck)))["status"] == "running"

    await until(running_now, "the job running")  # (its start is written before the disk fills)
    fill_up()
    reply = await refused(c, t.JobExecute(script_hash=script, params={"pad": "p" * big}), "storage_full")
    assert reply.message.startswith(f"the job database at {running.server.store.path} is full (the disk holding it")
    jobs = running.server.jobs
    await until(lambda: jobs.finals_deferred >= 1, "the job's end deferred")
    await still_answering(c)
    # running until its end is written (a small write may fit in the WAL's slack at once)
    assert (await ok(c, t.JobStatusRequest(job_id=stuck)))["status"] in ("running", "failed")
    make_room()
    done = await finished(c, stuck)
    assert done["status"] == "failed" and done["error"]["kind"] == "storage_full", done
    assert "could not be recorded" in done["error"]["message"]
    # the job workers are alive: the next job runs to the end
    after = await job(c, script, {"ms": 1, "size": 3})
    assert after["status"] == "complete" and after["result"] == "rrr", after


async def test_full_disk_under_the_state_database_real_tmpfs(make_server, tmp_path):
    with tmpfs(tmp_path / "state") as state:
        running = await make_server(workers=1, state_dir=str(state))
        async with Client(running.endpoint) as c:
            filler: list[Path] = []
            await _final_state_waits_for_room(
                running, c, lambda: filler.pop().unlink(), lambda: filler.append(fill(state)), big=1_500_000
            )
            await running.stop()


async def test_state_database_full_simulated_with_max_page_count(make_server):
    """Simulated: SQLite's max_page_count stops the file from growing, which SQLite
    reports as SQLITE_FULL, exactly as for a full disk."""
    running = await make_server(workers=1)
    db = running.server.store._db()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    async with Client(running.endpoint) as c:
        await _final_state_waits_for_room(
            running,
            c,
            lambda: db.execute("PRAGMA max_page_count = 1000000"),
            lambda: db.execute(f"PRAGMA max_page_count = {pages + 2}"),
            big=400_000,
        )


async def test_a_locked_job_database_is_unavailable_and_a_job_end_waits_for_it(make_server, monkeypatch):
    """Real: another connection holds the write lock past the (shortened) busy timeout.
    Requests that write answer ``unavailable``; reads go on (WAL); a job that ends
    meanwhile stays running and is written as it ended once the lock is gone."""
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.2)
    running = await make_server(workers=1)
    path = running.server.store.path
    async with Client(running.endpoint) as c:
        script = (await ok(c, t.ScriptStore(content=SLOW_BIG)))["hash"]
        ending = (await ok(c, t.JobExecute(script_hash=script, params={"ms": 300, "size": 2})))["job_id"]
        await until(lambda: running.server.store.get(ending).status.value == "running", "the job running")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            reply = await refused(c, t.JobExecute(script_hash=script, params=None), "unavailable")
            assert reply.message == (
                f"the job database at {path} is unavailable (another process holds its lock past the busy "
                "timeout); try again shortly, and see the daemon log if it lasts"
            )
            await refused(c, t.ScriptStore(content="return 'indexed'"), "unavailable")
            await still_answering(c)
            jobs = running.server.jobs
            await until(lambda: jobs.finals_deferred >= 1, "the job's end deferred")
            await asyncio.sleep(REWRITE_FIRST_S * 3)  # retries meet the lock too
            assert (await ok(c, t.JobStatusRequest(job_id=ending)))["status"] == "running"
        finally:
            other.execute("ROLLBACK")
            other.close()
        done = await finished(c, ending)
        assert done["status"] == "complete" and done["result"] == "rr", done  # kept, not lost
        assert (await job(c, script, {"ms": 1, "size": 1}))["status"] == "complete"


async def test_a_closed_job_database_is_unavailable(make_server):
    running = await make_server(workers=1)
    async with Client(running.endpoint) as c:
        running.server.store.close()
        reply = await refused(c, t.JobStatusRequest(job_id="job_1"), "unavailable")
        assert "is closed" in reply.message
        await refused(c, t.JobList(), "unavailable")
        assert isinstance(await c.request(t.Ping(), timeout=10), t.Pong)


# ------------------------------------------------------------- params Lua cannot hold

BAD_PARAMS = [
    ({None: 1}, "params: a map key is nil"),
    ({"a": {"b": {None: 2}}}, "params.a.b: a map key is nil"),
    ({"a": [1, msgspec.msgpack.Ext(5, b"x")]}, "params.a[2]: a MessagePack extension (type 5)"),
    ({"when": [msgspec.msgpack.Ext(-1, b"\x00\x00\x00\x00")]}, "params.when[1]: a MessagePack timestamp"),
    ([{"odd key": msgspec.msgpack.Ext(42, b"")}], 'params[1]["odd key"]: a MessagePack extension (type 42)'),
]


@pytest.mark.parametrize(("params", "message"), BAD_PARAMS)
async def test_params_lua_cannot_hold_are_invalid_params_naming_the_place(server, client, params, message):
    reply = await refused(client, t.LuaEval(code="return 1", params=params), "invalid_params")
    assert reply.message.startswith(message), reply.message
    script = (await ok(client, t.ScriptStore(content="return params")))["hash"]
    reply = await refused(client, t.JobExecute(script_hash=script, params=params), "invalid_params")
    assert reply.message.startswith(message), reply.message
    assert (await ok(client, t.LuaEval(code="return params.x", params={"x": 5})))["result"] == 5


# ------------------------------------------------------------------ the table itself


@pytest.mark.parametrize(
    ("number", "code"),
    [
        (errno.ENOSPC, "storage_full"),
        (errno.EDQUOT, "storage_full"),
        (errno.EFBIG, "storage_full"),
        (errno.EROFS, "cas_read_only"),
        (errno.EACCES, "cas_read_only"),
        (errno.EPERM, "cas_read_only"),
        (errno.EIO, None),
        (errno.ENOENT, None),
    ],
)
def test_the_table_names_os_errors_of_a_cas_write(number, code, tmp_path):
    fault = faults.cas_fault(OSError(number, os.strerror(number), str(tmp_path / "x")), tmp_path)
    assert (fault.code if fault else None) == code
    if fault is not None:
        assert str(tmp_path) in str(fault)  # the operator is told where
        assert str(tmp_path) not in fault.script_message and fault.lua_message().startswith(f"{code}: ")


def test_the_table_names_sqlite_errors(tmp_path):
    path = tmp_path / "luanette.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.Error) as full:
        conn.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    fault = faults.database_fault(full.value, path)
    assert fault is not None and fault.code == "storage_full" and str(path) in str(fault)
    conn.close()
    with pytest.raises(sqlite3.Error) as closed:
        conn.execute("SELECT 1")
    assert faults.database_fault(closed.value, path).code == "unavailable"
    assert faults.database_fault(sqlite3.IntegrityError("UNIQUE constraint failed"), path) is None
    assert faults.database_fault(ValueError("not a database error"), path) is None
