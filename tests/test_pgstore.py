"""The PostgreSQL job store (``--state postgresql://...``) and the lease between fronts.

Everything runs against a real PostgreSQL server that the tests start in a temp
directory (tests/postgres.py; skipped, saying so, where no PostgreSQL is installed), and
real ``luanette serve`` processes: a standby waits while the active front serves, and
takes over within seconds when the front is killed with SIGKILL mid-job.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette import postgres
from luanette.store import DatabaseUnavailable, ScriptRecord, Store
from tests import test_flows
from tests.conftest import BIN, DaemonProcess, free_port
from tests.postgres import SKIP_REASON, PostgresServer, find_bin_dir
from tests.waiting import until, until_sync

pytestmark = pytest.mark.timeout(180)

H1 = "0123456789abcdef0123456789abcdef"
H2 = "fedcba9876543210fedcba9876543210"


# --- the dialect (no server needed) --------------------------------------------------


def test_translate_speaks_postgresql() -> None:
    tr = postgres.translate
    assert tr("SELECT a FROM t WHERE b = ? AND c LIKE 'x%'") == "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%'"
    assert tr("BEGIN IMMEDIATE") == "BEGIN"
    upsert = tr("INSERT OR REPLACE INTO script_describes (hash, described, created_at) VALUES (?, ?, ?)")
    assert upsert == (
        "INSERT INTO script_describes (hash, described, created_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (hash) DO UPDATE SET described = EXCLUDED.described, created_at = EXCLUDED.created_at"
    )
    assert tr("INSERT OR IGNORE INTO t (a) VALUES (?)") == "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"
    assert tr("SELECT user, user_version, s.user FROM x") == 'SELECT "user", user_version, s.user FROM x'
    assert "LIMIT ALL OFFSET %s" in tr("SELECT 1 LIMIT -1 OFFSET ?")
    assert tr("EXISTS (SELECT 1 FROM json_each(scripts.tags) WHERE value = ?)") == (
        "EXISTS (SELECT 1 FROM json_array_elements_text(scripts.tags::json) AS json_each(value) WHERE value = %s)"
    )
    ddl = tr("CREATE TABLE x (\n a REAL NOT NULL, n INTEGER, user TEXT)")
    assert ddl == 'CREATE TABLE x (rowid BIGSERIAL, \n a DOUBLE PRECISION NOT NULL, n BIGINT, "user" TEXT)'


def test_check_url_and_redact() -> None:
    assert postgres.check_url("postgresql://me@db:5432/jobs") == "postgresql://me@db:5432/jobs"
    with pytest.raises(postgres.BadUrl, match="must be a postgresql:// URL"):
        postgres.check_url("mysql://me@db/jobs")
    with pytest.raises(postgres.BadUrl, match="not a valid PostgreSQL URL"):
        postgres.check_url("postgresql://me@db/jobs?nonsense=1")
    assert postgres.redact("postgresql://me:secret@db:5432/jobs") == "postgresql://me:***@db:5432/jobs"


# --- the store on PostgreSQL ---------------------------------------------------------


def test_jobs_scripts_and_sessions_round_trip_and_survive_a_reopen(pg_url: str, tmp_path: Path) -> None:
    with Store.open(tmp_path, url=pg_url) as s:
        assert s.is_postgres and s.path is None and s.location == pg_url
        s.create_job("j1", H1, {"n": 1.0, "deep": [{"x": None}]}, ["a"], 100.5)
        assert s.mark_running("j1", 101)
        assert s.finish("j1", "complete", at=102.25, result={"out": [1, 2.5, "✓"]}, progress={"step": 3})
        s.create_job("j2", H1, {}, None, 103)
        s.create_job("j3", H2, {}, None, 104)
        assert s.mark_running("j3", 105)
        # a batch: the duplicate id fails alone, the other writes commit (a savepoint each)
        results = s.write_batch([s.create_job_op("j4", H1, {}, None, 106), s.create_job_op("j1", H1, {}, None, 106),
                                 s.finish_op("j2", "cancelled", at=107)])  # fmt: skip
        assert isinstance(results[1], ValueError) and "already exists" in str(results[1])
        assert results[2] is True
        first = ScriptRecord(hash=H1, name="drums", description="dark beat", tags=["mood:dark"], creator="alice",
                             created_at=50, capabilities=["garden.read"], review=True)  # fmt: skip
        assert s.index_script(first).review is True
        s.index_script(ScriptRecord(hash=H1, tags=["genre:dnb"], creator="bob", created_at=60))  # upsert
        s.add_session("sess", job_id="j1", user="alice", script_hash=H1, operations=[{"op": 1}], created_at=5)
        for n in range(4):
            s.put_described(H2, {"n": n}, at=200 + n, keep=2)
    with Store.open(tmp_path, url=pg_url) as s:  # a second open: migrated already, data kept
        j1 = s.get_record("j1")
        assert j1 is not None and j1.status == t.JobStatus.COMPLETE
        assert j1.params == {"n": 1.0, "deep": [{"x": None}]} and isinstance(j1.params["n"], float)
        assert j1.result == {"out": [1, 2.5, "✓"]} and j1.progress == {"step": 3} and j1.completed_at == 102.25
        assert [j.job_id for j in s.list()] == ["j4", "j3", "j2", "j1"]
        assert s.stats().cancelled == 1 and s.stats().running == 1
        script = s.get_script(H1)
        assert script is not None and script.tags == ["mood:dark", "type:lua", "genre:dnb"]
        assert script.creator == "alice" and script.name == "drums" and script.capabilities is None
        assert [r.hash for r in s.search(tag="genre:dnb")] == [H1] and s.search(tag="dnb") == []
        assert [r.hash for r in s.search(vibe="DARK drums")] == [H1]
        assert s.list_sessions("j1")[0]["user"] == "alice"
        assert s.get_described(H2) == {"n": 3}
        # a standby taking over: what the lost front left active fails as worker_lost
        assert s.recover_interrupted(300, lost_front="'a' on host (pid 1)") == ["j3", "j4"]
        lost = s.get_record("j3")
        assert lost is not None and lost.error["kind"] == "worker_lost"
        assert lost.error["message"] == "the front 'a' on host (pid 1) was lost while this job was running"
        assert s.prune(None, 1, now=400) == 3


def test_a_store_survives_postgresql_restarting(tmp_path: Path) -> None:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    server = PostgresServer(bin_dir, free_port()).start()  # its own: restarting it cuts every session
    try:
        with Store.open(tmp_path, url=server.url()) as s:
            s.create_job("j1", H1, {}, None, 1)
            server.restart()
            with pytest.raises(DatabaseUnavailable, match="unavailable") as caught:
                s.get_record("j1")
            assert caught.value.code == "unavailable"
            assert s.get_record("j1") is not None  # the next call connects again
    finally:
        server.stop()


async def test_flows_live_in_postgresql(make_server, pg_url: str) -> None:
    first = await make_server(state=pg_url)
    async with Client(first.endpoint) as c:
        await test_flows.test_transition_results_queries_and_errors(c)
        kept = await c.request(t.FlowList(definition="toy"))
    await first.stop()
    second = await make_server(state=pg_url)  # another front (its own state dir) on the same database
    async with Client(second.endpoint) as c:
        again = await c.request(t.FlowList(definition="toy"))
    assert isinstance(kept, t.Success) and isinstance(again, t.Success)
    assert {i["id"] for i in again.result} == {i["id"] for i in kept.result} and len(kept.result) == 2


# --- fronts and the lease ------------------------------------------------------------


class Front(DaemonProcess):
    """``luanette serve --state URL``, its log in a file (a standby may log for a long
    time: a pipe nobody reads would fill up). With ``wait=False`` the start returns at
    once: a standby binds nothing until it takes over."""

    def __init__(self, tmp: Path, url: str, cas: Path, *, wait: bool = True) -> None:
        self.log_path = tmp / "front.log"
        tmp.mkdir(parents=True, exist_ok=True)
        self.waiting = not wait
        super().__init__(tmp, "--state", url, "--cas-root", str(cas), "--script-timeout", "120", "--workers", "1")
        self.waiting = False

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        self.log_file = open(self.log_path, "ab")  # closed in stop()
        return subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})  # fmt: skip

    def _wait_listening(self) -> None:
        if not self.waiting:
            self.wait_listening()

    def wait_listening(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"front exited {self.proc.returncode}: {self.log()}")
            return self.listening()

        until_sync(up, "the front listening", step=0.02)

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        def logged() -> bool:
            assert self.proc.poll() is None, f"front exited {self.proc.returncode}: {self.log()}"
            return text in self.log()

        until_sync(logged, f"{text!r} logged", step=0.05)

    def stop(self) -> None:
        super().stop()
        self.log_file.close()


@pytest.fixture
def fronts(tmp_path: Path):
    """Factory: ``fronts(url, name, wait=True)`` -> Front sharing one CAS; all stopped at the end."""
    made: list[Front] = []

    def make(url: str, name: str, *, wait: bool = True) -> Front:
        front = Front(tmp_path / name, url, tmp_path / "cas", wait=wait)
        made.append(front)
        return front

    yield make
    for front in made:
        front.stop()


async def job_status(endpoint: str, job_id: str) -> dict:
    async with Client(endpoint) as c:
        reply = await c.request(t.JobStatusRequest(job_id=job_id))
    assert isinstance(reply, t.Success), reply
    return reply.result


async def wait_status(endpoint: str, job_id: str, wanted: set[str]) -> dict:
    async def reached() -> bool:
        return (await job_status(endpoint, job_id))["status"] in wanted

    await until(reached, f"job {job_id} reaches {sorted(wanted)}", step=0.05)
    return await job_status(endpoint, job_id)


async def submit(endpoint: str, code: str, params=None) -> str:
    async with Client(endpoint) as c:
        stored = await c.request(t.ScriptStore(content=code))
        assert isinstance(stored, t.Success), stored
        started = await c.request(t.JobExecute(script_hash=stored.result["hash"], params=params))
    assert isinstance(started, t.Success), started
    return started.result["job_id"]


async def test_a_standby_takes_over_from_a_killed_front(fronts, pg_url: str) -> None:
    first = fronts(pg_url, "first")
    second = fronts(pg_url, "second", wait=False)
    second.wait_for_log("lease.waiting")
    assert not second.listening() and second.proc.poll() is None  # it binds nothing while it waits

    done = await submit(first.endpoint, "return params.n * 2", {"n": 21})
    assert (await wait_status(first.endpoint, done, {"complete"}))["result"] == 42
    slow = await submit(first.endpoint, "clock.sleep(100000) return 'never'")
    await wait_status(first.endpoint, slow, {"running"})
    await asyncio.sleep(1.5)  # a standby poll or two: it must still be waiting
    assert not second.listening()

    first.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    second.wait_listening()
    took = time.monotonic() - killed
    print(f"\nfailover: the standby served {took:.2f} s after the active front was killed")
    assert first.proc.wait(10) == -signal.SIGKILL

    lost = await wait_status(second.endpoint, slow, {"failed"})
    assert lost["error"]["kind"] == "worker_lost"
    assert re.fullmatch(rf"the front 'luanette' on .+ \(pid {first.proc.pid}\) was lost while this job was running",
                        lost["error"]["message"]), lost["error"]  # fmt: skip
    kept = await job_status(second.endpoint, done)
    assert kept["status"] == "complete" and kept["result"] == 42
    again = await submit(second.endpoint, "return params.n + 1", {"n": 1})
    assert (await wait_status(second.endpoint, again, {"complete"}))["result"] == 2
    assert "lease.acquired" in second.log() and "took_over_from" in second.log()


async def test_a_clean_stop_hands_over_without_lost_jobs(fronts, pg_url: str) -> None:
    first = fronts(pg_url, "first")
    second = fronts(pg_url, "second", wait=False)
    third = fronts(pg_url, "third", wait=False)
    second.wait_for_log("lease.waiting")
    third.wait_for_log("lease.waiting")
    third.signal(signal.SIGTERM)  # a standby stops at once, and cleanly
    assert third.wait() == 0 and "lease.wait_stopped" in third.log()
    first.stop()
    assert first.proc.returncode == 0 and "lease.released" in first.log()
    second.wait_listening()
    assert "worker_lost" not in second.log()


def test_the_front_stops_when_its_lease_is_lost(tmp_path: Path, fronts) -> None:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    server = PostgresServer(bin_dir, free_port()).start()  # its own: the test restarts it
    try:
        front = fronts(server.url(), "front")
        server.restart()  # ends the lease session: a standby could take the lock now
        assert front.proc.wait(30) == 3
        assert "lease.lost" in front.log() and "stopped serving at once" in front.log()
    finally:
        server.stop()


def test_a_bad_state_url_stops_the_start(tmp_path: Path) -> None:
    serve = [str(BIN / "luanette"), "serve", "--bind", f"tcp://127.0.0.1:{free_port()}", "--pub", "none",
             "--state-dir", str(tmp_path / "state"), "--cas-root", str(tmp_path / "cas")]  # fmt: skip
    bad = subprocess.run([*serve, "--state", "mysql://me@db/jobs"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--state must be a postgresql:// URL" in bad.stderr
    nobody_there = f"postgresql://postgres@127.0.0.1:{free_port()}/jobs"
    down = subprocess.run([*serve, "--state", nobody_there], capture_output=True, text=True, timeout=60)
    assert down.returncode == 2, down
    assert "cannot reach the job store at postgresql://postgres@127.0.0.1" in down.stdout + down.stderr


def test_postgresql_errors_are_named_storage_faults() -> None:
    import psycopg

    from luanette import faults
    from luanette.store import DatabaseFull

    url = "postgresql://me@db/jobs"
    full = faults.database_fault(psycopg.errors.DiskFull("could not extend file"), url, full=DatabaseFull)
    assert isinstance(full, DatabaseFull) and full.code == "storage_full"
    assert "disk of the PostgreSQL server is full" in str(full)
    assert "free space on the disk of the PostgreSQL server" in str(full)
    gone = faults.database_fault(psycopg.errors.AdminShutdown("terminating connection"), url)
    assert gone is not None and gone.code == "unavailable" and "57P01" in str(gone)
    lost = faults.database_fault(psycopg.OperationalError("the connection is lost"), url)
    assert lost is not None and lost.code == "unavailable" and "connection to PostgreSQL failed" in str(lost)
    assert faults.database_fault(psycopg.errors.UniqueViolation("duplicate key"), url) is None  # a bug, not a fault
