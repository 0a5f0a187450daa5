"""luanette.store: job records, results and the script index in a real SQLite file.

Every test uses a real database under tmp_path; the crash test SIGKILLs a real writer
process.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from hooteproto.types import JobInfo, JobStatus, JobStoreStats
from luanette.store import (
    DB_FILENAME,
    LUA_TAG,
    SCHEMA_VERSION,
    ScriptRecord,
    Store,
    UnknownJob,
    migrate,
    parse_status,
)
from tests.strategies import json_values

H1 = "0123456789abcdef0123456789abcdef"
H2 = "fedcba9876543210fedcba9876543210"
H3 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

# a value that exercises every JSON shape the store must keep apart
RICH = {
    "int": 1,
    "float_that_looks_int": 1.0,
    "big": 2**53 + 1,
    "u64_max": 2**64 - 1,
    "neg": -(2**63),
    "pi": 3.141592653589793,
    "bool": True,
    "null": None,
    "unicode": "héllo ✓ 音楽 🎵 \u0000 nul",
    "empty_list": [],
    "empty_obj": {},
    "nested": {"a": [1, [2, {"b": None, "c": [{}]}]], "ключ": {"deep": [[[]]]}},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    """The store on SQLite, and on a fresh PostgreSQL database (skipped where no
    PostgreSQL is installed: see tests/postgres.py)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    with Store.open(tmp_path / "state", url=url) as s:
        yield s


def new_job(store: Store, job_id: str, at: float = 100.0, **kw: Any) -> JobInfo:
    return store.create_job(job_id, kw.get("script", H1), kw.get("params", {}), kw.get("tags"), at)


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to the file, to look at it without the Store."""
    return sqlite3.connect(path)


def assert_same_json(a: Any, b: Any) -> None:
    """Equal, and with the same JSON types at every level (1 != 1.0, [] != {})."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_json(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_json(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------ opening the file


def test_open_creates_state_dir_and_file_in_wal_mode(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b"
    with Store.open(state) as s:
        assert s.path == state / DB_FILENAME
        assert (state / DB_FILENAME).is_file()
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        conn = s._db()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8


def test_closed_store_refuses_calls_and_close_is_idempotent(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.get("x")


# ------------------------------------------------------------------ job lifecycle


def test_create_mark_finish_get_round_trip(store: Store) -> None:
    created = store.create_job("j1", H1, RICH, ["batch", "night"], 1000.9)
    assert created == JobInfo(job_id="j1", status=JobStatus.PENDING, source=H1, created_at=1000)

    assert store.mark_running("j1", 1001.5) is True
    running = store.get("j1")
    assert running.status is JobStatus.RUNNING and running.started_at == 1001
    assert running.completed_at is None and running.result is None

    assert store.finish("j1", JobStatus.COMPLETE, result=RICH, at=1002.999) is True
    info = store.get("j1")
    assert info.status is JobStatus.COMPLETE
    assert (info.created_at, info.started_at, info.completed_at) == (1000, 1001, 1002)
    assert all(type(t) is int for t in (info.created_at, info.started_at, info.completed_at))
    assert info.source == H1 and info.error is None
    assert_same_json(info.result, RICH)

    record = store.get_record("j1")
    assert_same_json(record.params, RICH)
    assert record.tags == ["batch", "night"]
    assert (record.created_at, record.started_at, record.completed_at) == (1000.9, 1001.5, 1002.999)


def test_job_info_encodes_on_the_wire(store: Store) -> None:
    new_job(store, "w")
    store.finish("w", "complete", result={"hash": H2}, at=101)
    wire = msgspec.json.decode(msgspec.json.encode(store.get("w")))
    assert wire["status"] == "complete" and wire["source"] == H1 and wire["result"] == {"hash": H2}
    assert wire["completed_at"] == 101


_ids = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_any_json_value_round_trips_as_params_and_result(store: Store, value: Any) -> None:
    job_id = f"h{next(_ids)}"
    store.create_job(job_id, H1, value, None, 1)
    store.finish(job_id, "complete", result=value, at=2)
    record = store.get_record(job_id)
    assert_same_json(record.params, value)
    assert_same_json(record.result, value)


def test_null_result_and_failed_error_dict(store: Store) -> None:
    new_job(store, "nil")
    assert store.finish("nil", "complete", result=None, at=101)
    assert store.get("nil").result is None and store.get("nil").status is JobStatus.COMPLETE

    new_job(store, "bad")
    err = {"kind": "lua_runtime", "message": "boom", "line": 3, "stack": [{"line": 3, "function": "main"}], "hints": []}
    assert store.finish("bad", "failed", error=err, at=101)
    info = store.get("bad")
    assert info.status is JobStatus.FAILED and info.result is None
    assert_same_json(info.error, err)


def test_error_struct_is_stored_as_its_dict(store: Store) -> None:
    class Detail(msgspec.Struct):
        kind: str
        message: str
        line: int | None = None

    new_job(store, "s")
    store.finish("s", "failed", error=Detail("timeout", "too slow", 7), at=101)
    assert store.get("s").error == {"kind": "timeout", "message": "too slow", "line": 7}


def test_finish_after_cancel_is_refused(store: Store) -> None:
    new_job(store, "c")
    store.mark_running("c", 101)
    assert store.finish("c", "cancelled", error={"kind": "cancelled", "message": "by client"}, at=102)
    # the task that was still running completes later: it must not relabel the job
    assert store.finish("c", "complete", result={"late": True}, at=105) is False
    assert store.finish("c", "failed", error={"kind": "lua_runtime", "message": "x"}, at=106) is False
    info = store.get("c")
    assert info.status is JobStatus.CANCELLED and info.result is None
    assert info.error == {"kind": "cancelled", "message": "by client"} and info.completed_at == 102


def test_complete_job_is_never_overwritten(store: Store) -> None:
    new_job(store, "d")
    assert store.finish("d", "complete", result=1, at=101)
    assert store.finish("d", "cancelled", at=102) is False
    assert store.finish("d", "complete", result=2, at=103) is False
    info = store.get("d")
    assert (info.status, info.result, info.completed_at) == (JobStatus.COMPLETE, 1, 101)


def test_cancel_of_pending_job_and_mark_running_afterwards(store: Store) -> None:
    new_job(store, "p")
    assert store.finish("p", "cancelled", at=101)
    # the worker picks it up late: it must learn not to run it
    assert store.mark_running("p", 102) is False
    info = store.get("p")
    assert info.status is JobStatus.CANCELLED and info.started_at is None and info.error is None
    new_job(store, "r")
    assert store.mark_running("r", 101) is True
    assert store.mark_running("r", 102) is False
    assert store.get("r").started_at == 101


def test_unknown_job_ids(store: Store) -> None:
    assert store.get("nope") is None and store.get_record("nope") is None
    with pytest.raises(UnknownJob, match="nope"):
        store.finish("nope", "cancelled", at=1)
    with pytest.raises(UnknownJob):
        store.mark_running("nope", 1)
    assert store.stats().total == 0


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_value_error_and_writes_nothing(store: Store) -> None:
    bad_creates = [
        dict(job_id="", script_hash=H1, params={}, tags=None, created_at=1),
        dict(job_id="a", script_hash="not-a-hash", params={}, tags=None, created_at=1),
        dict(job_id="a", script_hash=H1.upper(), params={}, tags=None, created_at=1),
        dict(job_id="a", script_hash=H1, params={"x": object()}, tags=None, created_at=1),
        dict(job_id="a", script_hash=H1, params={(1, 2): 3}, tags=None, created_at=1),
        dict(job_id="a", script_hash=H1, params={}, tags=["ok", ""], created_at=1),
        dict(job_id="a", script_hash=H1, params={}, tags="single", created_at=1),
        dict(job_id="a", script_hash=H1, params={}, tags=None, created_at=-1),
        dict(job_id="a", script_hash=H1, params={}, tags=None, created_at=float("nan")),
        dict(job_id="a", script_hash=H1, params={}, tags=None, created_at=True),
    ]
    for kwargs in bad_creates:
        with pytest.raises(ValueError):
            store.create_job(**kwargs)
    assert store.stats().total == 0 and store.get("a") is None

    new_job(store, "j")
    store.mark_running("j", 101)
    bad_finishes = [
        dict(status="done", at=102),
        dict(status="running", at=102),
        dict(status=JobStatus.PENDING, at=102),
        dict(status="failed", at=102),  # no error
        dict(status="failed", error="just a string", at=102),
        dict(status="failed", error={"kind": "x"}, at=102),  # no message
        dict(status="failed", error={"kind": 1, "message": "m"}, at=102),
        dict(status="complete", result=1, error={"kind": "x", "message": "y"}, at=102),
        dict(status="cancelled", result=1, at=102),
        dict(status="complete", result={"x": object()}, at=102),
        dict(status="complete", result=1, at=float("inf")),
    ]
    for kwargs in bad_finishes:
        with pytest.raises(ValueError):
            store.finish("j", **kwargs)
    record = store.get_record("j")
    assert record.status is JobStatus.RUNNING and record.result is None and record.error is None

    with pytest.raises(ValueError, match="unknown job status 'done'.*pending"):
        store.list(status="done")
    with pytest.raises(ValueError):
        store.list(limit=-1)


def test_duplicate_job_id_is_refused_and_keeps_the_first(store: Store) -> None:
    store.create_job("dup", H1, {"first": 1}, None, 1)
    with pytest.raises(ValueError, match="already exists"):
        store.create_job("dup", H2, {"second": 2}, None, 2)
    record = store.get_record("dup")
    assert record.script_hash == H1 and record.params == {"first": 1}


def test_parse_status() -> None:
    assert parse_status("cancelled") is JobStatus.CANCELLED
    assert parse_status(JobStatus.RUNNING) is JobStatus.RUNNING
    with pytest.raises(ValueError, match="expected one of: pending, running, complete, failed, cancelled"):
        parse_status("Complete")


# ------------------------------------------------------------------ restart


def test_restart_keeps_finished_jobs_and_results(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s.create_job("done", H1, {"n": 1}, ["t"], 10)
        s.mark_running("done", 11)
        s.finish("done", "complete", result=RICH, at=12)
        s.create_job("err", H1, None, None, 20)
        s.finish("err", "failed", error={"kind": "lua_syntax", "message": "bad", "line": 1}, at=21)
        s.index_script(ScriptRecord(hash=H1, name="kept", tags=["a"], created_at=5))
    with Store.open(tmp_path) as s:
        info = s.get("done")
        assert info.status is JobStatus.COMPLETE and (info.started_at, info.completed_at) == (11, 12)
        assert_same_json(info.result, RICH)
        assert s.get("err").error == {"kind": "lua_syntax", "message": "bad", "line": 1}
        assert s.get_script(H1).name == "kept"
        assert s.recover_interrupted(30) == []
        assert s.stats() == JobStoreStats(total=2, completed=1, failed=1)


def test_recover_interrupted(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s.create_job("pend", H1, {}, None, 1)
        s.create_job("run", H1, {}, None, 2)
        s.mark_running("run", 3)
        s.create_job("ok", H1, {}, None, 4)
        s.finish("ok", "complete", result="fine", at=5)
        s.create_job("gone", H1, {}, None, 6)
        s.finish("gone", "cancelled", at=7)
    # the process "died" with pend and run still active; the next one starts up
    with Store.open(tmp_path) as s:
        assert s.recover_interrupted(50.7) == ["pend", "run"]
        run = s.get("run")
        assert run.status is JobStatus.FAILED and run.completed_at == 50 and run.started_at == 3
        assert run.error == {"kind": "interrupted", "message": "the daemon stopped while this job was running"}
        assert s.get("pend").error["message"] == "the daemon stopped while this job was pending"
        assert s.get("ok").status is JobStatus.COMPLETE and s.get("ok").result == "fine"
        assert s.get("gone").status is JobStatus.CANCELLED
        assert s.recover_interrupted(60) == []
        # an interrupted job is final like any other
        assert s.finish("run", "complete", result=1, at=61) is False


# ------------------------------------------------------------------ listing, stats


def test_list_newest_first_and_by_status(store: Store) -> None:
    for i in range(6):
        store.create_job(f"j{i}", H1, {}, None, 100 + i)
    store.create_job("same-time", H1, {}, None, 105)  # tie with j5: later insert first
    store.mark_running("j1", 200)
    store.finish("j2", "complete", result=None, at=200)
    store.finish("j4", "complete", result=None, at=200)
    store.finish("j3", "failed", error={"kind": "k", "message": "m"}, at=200)

    assert [j.job_id for j in store.list()] == ["same-time", "j5", "j4", "j3", "j2", "j1", "j0"]
    assert [j.job_id for j in store.list(limit=2)] == ["same-time", "j5"]
    assert store.list(limit=0) == []
    assert [j.job_id for j in store.list(JobStatus.COMPLETE)] == ["j4", "j2"]
    assert [j.job_id for j in store.list("pending")] == ["same-time", "j5", "j0"]
    assert [j.job_id for j in store.list("running")] == ["j1"]
    assert [j.job_id for j in store.list("failed")] == ["j3"]
    assert store.list("cancelled") == []
    assert all(isinstance(j, JobInfo) for j in store.list())


def test_stats_counts(store: Store) -> None:
    assert store.stats() == JobStoreStats()
    for i in range(10):
        new_job(store, f"s{i}")
    for i in range(2, 10):
        store.mark_running(f"s{i}", 101)
    for i in range(4, 7):
        store.finish(f"s{i}", "complete", result=i, at=102)
    store.finish("s7", "failed", error={"kind": "k", "message": "m"}, at=102)
    store.finish("s8", "cancelled", at=102)
    store.finish("s0", "cancelled", at=102)
    assert store.stats() == JobStoreStats(total=10, pending=1, running=3, completed=3, failed=1, cancelled=2)


# ------------------------------------------------------------------ prune


def finished(store: Store, job_id: str, completed_at: float) -> None:
    store.create_job(job_id, H1, {}, None, completed_at - 1)
    store.finish(job_id, "complete", result=job_id, at=completed_at)


def test_prune_by_age_never_touches_active_jobs(store: Store) -> None:
    finished(store, "old1", 100)
    finished(store, "old2", 150)
    finished(store, "edge", 200)  # exactly max_age old: kept
    finished(store, "new", 900)
    store.create_job("ancient-pending", H1, {}, None, 1)
    store.create_job("ancient-running", H1, {}, None, 2)
    store.mark_running("ancient-running", 3)

    assert store.prune(max_age_s=800, max_count=None, now=1000) == 2
    left = {j.job_id for j in store.list()}
    assert left == {"edge", "new", "ancient-pending", "ancient-running"}
    assert store.prune(max_age_s=800, max_count=None, now=1000) == 0


def test_prune_by_count_keeps_newest_finished(store: Store) -> None:
    for i in range(10):
        finished(store, f"f{i}", 100 + i)
    store.create_job("pend", H1, {}, None, 50)
    store.create_job("run", H1, {}, None, 51)
    store.mark_running("run", 52)

    assert store.prune(max_age_s=None, max_count=3, now=1000) == 7
    assert {j.job_id for j in store.list()} == {"f7", "f8", "f9", "pend", "run"}
    assert store.prune(max_age_s=None, max_count=0, now=1000) == 3
    assert {j.job_id for j in store.list()} == {"pend", "run"}
    assert store.stats() == JobStoreStats(total=2, pending=1, running=1)


def test_prune_age_then_count(store: Store) -> None:
    for i in range(10):
        finished(store, f"f{i}", 100 * (i + 1))  # completed at 100..1000
    # age removes f0..f4 (completed before 600), count then keeps 2 of f5..f9
    assert store.prune(max_age_s=400, max_count=2, now=1000) == 8
    assert {j.job_id for j in store.list()} == {"f8", "f9"}
    assert store.prune(max_age_s=None, max_count=None, now=1000) == 0
    with pytest.raises(ValueError):
        store.prune(max_age_s=-1, max_count=None, now=1000)
    with pytest.raises(ValueError):
        store.prune(max_age_s=None, max_count=1.5, now=1000)
    assert store.stats().total == 2


# ------------------------------------------------------------------ script index


def test_index_script_adds_lua_tag_and_round_trips(store: Store) -> None:
    schema = {"bars": {"type": "number", "required": True, "default": 8}, "mode": {"type": "string"}}
    stored = store.index_script(
        ScriptRecord(hash=H1, name="Drone", description="A long dark drone", tags=["mood:dark"],
                     creator="claude", params_schema=schema, created_at=10)
    )
    assert stored.tags == ["mood:dark", LUA_TAG]
    got = store.get_script(H1)
    assert got == stored
    assert_same_json(got.params_schema, schema)
    assert store.get_script(H2) is None


def test_index_script_upsert_merges_tags_and_keeps_first_creator(store: Store) -> None:
    store.index_script(ScriptRecord(hash=H1, tags=["a", "b"], creator="alice", created_at=10))
    merged = store.index_script(
        ScriptRecord(hash=H1, name="Named later", tags=["b", "c", LUA_TAG], creator="bob",
                     params_schema={"x": {}}, created_at=20)
    )
    assert merged.tags == ["a", "b", LUA_TAG, "c"]
    assert merged.creator == "alice" and merged.created_at == 10
    assert merged.name == "Named later" and merged.params_schema == {"x": {}}
    # a later store without describe() output keeps what is known
    again = store.index_script(ScriptRecord(hash=H1, tags=[], created_at=30))
    assert again == merged == store.get_script(H1)
    assert len(store.search()) == 1


def test_index_script_first_creator_may_come_later(store: Store) -> None:
    store.index_script(ScriptRecord(hash=H1, created_at=1))
    assert store.index_script(ScriptRecord(hash=H1, creator="carol", created_at=2)).creator == "carol"
    assert store.index_script(ScriptRecord(hash=H1, creator="dave", created_at=3)).creator == "carol"


def test_index_script_rejects_bad_records(store: Store) -> None:
    bad = [
        ScriptRecord(hash="xyz", created_at=1),
        ScriptRecord(hash=H1.upper(), created_at=1),
        ScriptRecord(hash=H1, tags=[""], created_at=1),
        ScriptRecord(hash=H1, tags=[1], created_at=1),  # type: ignore[list-item]
        ScriptRecord(hash=H1, created_at=-5),
        ScriptRecord(hash=H1, created_at=float("inf")),
        ScriptRecord(hash=H1, params_schema={"f": object()}, created_at=1),
        ScriptRecord(hash=H1, name=3, created_at=1),  # type: ignore[arg-type]
    ]
    for record in bad:
        with pytest.raises(ValueError):
            store.index_script(record)
    with pytest.raises(ValueError, match="ScriptRecord"):
        store.index_script({"hash": H1, "created_at": 1})  # type: ignore[arg-type]
    assert store.search() == []


@pytest.fixture
def indexed(store: Store) -> Store:
    store.index_script(ScriptRecord(hash=H1, name="Dark ambient drone", description="Slow evolving pads",
                                    tags=["mood:dark", "genre:ambient"], creator="alice", created_at=1))
    store.index_script(ScriptRecord(hash=H2, name="Bright arpeggio", description="A dark-edged but bright pluck",
                                    tags=["mood:bright"], creator="bob", created_at=2))
    store.index_script(ScriptRecord(hash=H3, name="Drum loop", description=None,
                                    tags=["genre:techno", "Drums"], creator="alice", created_at=3))
    return store


def hashes(scripts: list[ScriptRecord]) -> list[str]:
    return [s.hash for s in scripts]


def test_search_without_filters_is_newest_first(indexed: Store) -> None:
    assert hashes(indexed.search()) == [H3, H2, H1]
    assert hashes(indexed.search(limit=1)) == [H3]
    assert hashes(indexed.search(vibe="  ...  ")) == [H3, H2, H1]


def test_search_by_tag_is_exact(indexed: Store) -> None:
    assert hashes(indexed.search(tag=LUA_TAG)) == [H3, H2, H1]
    assert hashes(indexed.search(tag="mood:dark")) == [H1]
    assert indexed.search(tag="dark") == []
    assert indexed.search(tag="lua") == []
    assert indexed.search(tag="drums") == []  # tags are case-sensitive
    assert hashes(indexed.search(tag="Drums")) == [H3]


def test_search_by_creator(indexed: Store) -> None:
    assert hashes(indexed.search(creator="alice")) == [H3, H1]
    assert indexed.search(creator="Alice") == []
    assert hashes(indexed.search(creator="alice", tag="genre:techno")) == [H3]
    assert indexed.search(creator="bob", tag="genre:techno") == []


def test_search_by_vibe_ranks_by_matched_words(indexed: Store) -> None:
    # "dark" matches H1 (name, tag) and H2 ("dark-edged"); "ambient" and "pads" only H1
    assert hashes(indexed.search(vibe="DARK ambient pads")) == [H1, H2]
    # H2 matches "bright" and "dark": two words beat one
    assert hashes(indexed.search(vibe="bright dark")) == [H2, H1]
    # equal score: newest first
    assert hashes(indexed.search(vibe="dark")) == [H2, H1]
    assert hashes(indexed.search(vibe="drums")) == [H3]  # tag words, case-insensitive
    assert hashes(indexed.search(vibe="techno")) == [H3]
    assert indexed.search(vibe="jazz") == []
    assert indexed.search(vibe="dar") == []  # words, not substrings
    assert hashes(indexed.search(vibe="dark", creator="alice")) == [H1]
    assert hashes(indexed.search(vibe="dark", tag="mood:bright")) == [H2]
    assert hashes(indexed.search(vibe="bright dark", limit=1)) == [H2]


def test_search_unicode_vibe(store: Store) -> None:
    store.index_script(ScriptRecord(hash=H1, name="Ünïcode Tänze", tags=["音楽"], created_at=1))
    assert hashes(store.search(vibe="tänze")) == [H1]
    assert hashes(store.search(vibe="音楽")) == [H1]
    assert hashes(store.search(tag="音楽")) == [H1]


# ------------------------------------------------------------------ concurrency


def test_concurrent_writers_from_threads(store: Store) -> None:
    threads_n, jobs_n = 8, 40
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n + 1)

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(jobs_n):
                job_id = f"t{t}-{i}"
                store.create_job(job_id, H1, {"t": t, "i": i}, [f"thread{t}"], 1000 + i)
                assert store.mark_running(job_id, 1001 + i)
                assert store.finish(job_id, "complete", result={"t": t, "i": i, "sq": i * i}, at=1002 + i)
                if i % 10 == 0:
                    store.index_script(ScriptRecord(hash=H1, tags=[f"thread{t}"], created_at=t))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(100):
                stats = store.stats()
                assert stats.total == stats.pending + stats.running + stats.completed
                store.list(limit=20)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    workers.append(threading.Thread(target=reader))
    for w in workers[:-1]:
        w.start()
    workers[-1].start()
    for w in workers:
        w.join(60)
    assert errors == []
    assert store.stats() == JobStoreStats(total=threads_n * jobs_n, completed=threads_n * jobs_n)
    for t in range(threads_n):
        for i in range(jobs_n):
            assert store.get(f"t{t}-{i}").result == {"t": t, "i": i, "sq": i * i}
    assert set(store.get_script(H1).tags) == {f"thread{t}" for t in range(threads_n)} | {LUA_TAG}


def test_racing_cancel_and_complete_exactly_one_wins(store: Store) -> None:
    for n in range(60):
        job_id = f"race{n}"
        new_job(store, job_id)
        store.mark_running(job_id, 101)
        barrier = threading.Barrier(2)
        outcome: dict[str, bool] = {}

        def cancel() -> None:
            barrier.wait()
            outcome["cancel"] = store.finish(job_id, "cancelled", at=102)

        def complete() -> None:
            barrier.wait()
            outcome["complete"] = store.finish(job_id, "complete", result="done", at=103)

        pair = [threading.Thread(target=cancel), threading.Thread(target=complete)]
        for t in pair:
            t.start()
        for t in pair:
            t.join(10)
        assert sorted(outcome.values()) == [False, True]
        winner = "cancel" if outcome["cancel"] else "complete"
        info = store.get(job_id)
        assert info.status is (JobStatus.CANCELLED if winner == "cancel" else JobStatus.COMPLETE)
        assert info.result == (None if winner == "cancel" else "done")


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    with Store.open(tmp_path) as a, Store.open(tmp_path) as b:
        a.create_job("x", H1, {}, None, 1)
        assert b.finish("x", "cancelled", at=2) is True
        assert a.finish("x", "complete", result=1, at=3) is False
        assert a.get("x").status is JobStatus.CANCELLED


# ------------------------------------------------------------------ crash safety

WRITER = r"""
import sys, threading
from luanette.store import Store, ScriptRecord

state_dir, first = sys.argv[1], int(sys.argv[2])
store = Store.open(state_dir)
lock = threading.Lock()
counter = [first]

def next_index():
    with lock:
        counter[0] += 1
        return counter[0] - 1

def work():
    while True:
        i = next_index()
        job_id = f"job-{i:07d}"
        store.create_job(job_id, "0123456789abcdef0123456789abcdef",
                         {"i": i, "pad": "p" * 3000}, ["crash"], float(i))
        store.mark_running(job_id, i + 0.25)
        store.finish(job_id, "complete", at=i + 0.5,
                     result={"i": i, "text": "é✓" * 2000, "nested": {"r": list(range(40))}})
        if i % 7 == 0:
            store.index_script(ScriptRecord(hash=f"{i % 16:x}" * 32, tags=[f"t{i}"], created_at=i))
        with lock:
            print(i, flush=True)

for _ in range(3):
    threading.Thread(target=work, daemon=True).start()
threading.Event().wait()
"""


def expected_result(i: int) -> dict:
    return {"i": i, "text": "é✓" * 2000, "nested": {"r": list(range(40))}}


def check_consistent(state_dir: Path, acknowledged: set[int]) -> int:
    """The file as a SIGKILLed writer left it: intact, and every row whole."""
    conn = raw(state_dir / DB_FILENAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    with Store.open(state_dir) as s:
        rows = {}
        for job_id in [j.job_id for j in s.list(limit=10**9)]:
            rows[int(job_id.removeprefix("job-"))] = s.get_record(job_id)
        # a job the writer saw committed is there, complete, with its whole result
        assert acknowledged <= set(rows)
        for i, record in rows.items():
            assert record.params == {"i": i, "pad": "p" * 3000}
            assert record.tags == ["crash"] and record.created_at == float(i)
            if record.status is JobStatus.COMPLETE:
                assert record.result == expected_result(i)
                assert (record.started_at, record.completed_at) == (i + 0.25, i + 0.5)
            elif record.status is JobStatus.RUNNING:
                assert record.started_at == i + 0.25 and record.result is None
            elif record.status is JobStatus.PENDING:
                assert record.started_at is None and record.result is None
            else:  # recovered after an earlier round's kill
                assert record.status is JobStatus.FAILED and record.error["kind"] == "interrupted"
        for script in s.search(limit=100):
            assert LUA_TAG in script.tags and script.tags[0].startswith("t")
        active = [f"job-{i:07d}" for i, r in sorted(rows.items()) if r.status in (JobStatus.PENDING, JobStatus.RUNNING)]
        assert s.recover_interrupted(10**7) == active
        assert s.stats().pending == s.stats().running == 0
        return max(rows, default=-1)


def test_database_survives_sigkill_mid_write(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random(1234)
    first = 0
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(state_dir), str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        acknowledged: set[int] = set()
        target = rng.randint(50, 250)
        try:
            while len(acknowledged) < target:
                line = proc.stdout.readline()
                assert line, f"writer exited early: {proc.stderr.read()}"
                acknowledged.add(int(line))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        last = check_consistent(state_dir, acknowledged)
        assert last >= max(acknowledged)
        first = last + 1


# ------------------------------------------------------------------ migrations


def test_opening_twice_keeps_data_and_schema(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s.create_job("keep", H1, [1, 2], None, 1)
    with Store.open(tmp_path) as s:
        assert s.get_record("keep").params == [1, 2]
    with Store.open(tmp_path) as s:
        conn = s._db()
        # running the migrations again is a no-op, not a "table already exists" error
        assert migrate(conn) == SCHEMA_VERSION
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        assert {"jobs", "scripts", "jobs_status", "jobs_completed"} <= tables
        assert s.stats().total == 1


# Frozen copy of the version-1 schema as first released. Do not update it when the
# schema changes: it checks that a database written by that release still opens.
V1_SQL = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY NOT NULL, script_hash TEXT NOT NULL, params TEXT NOT NULL,
    tags TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'complete', 'failed', 'cancelled')),
    result TEXT, error TEXT, created_at REAL NOT NULL, started_at REAL, completed_at REAL,
    CHECK ((status IN ('pending', 'running')) = (completed_at IS NULL))
);
CREATE INDEX jobs_status ON jobs (status, created_at);
CREATE INDEX jobs_completed ON jobs (completed_at);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE TABLE scripts (
    hash TEXT PRIMARY KEY NOT NULL, name TEXT, description TEXT, tags TEXT NOT NULL,
    creator TEXT, params_schema TEXT, created_at REAL NOT NULL
);
CREATE INDEX scripts_creator ON scripts (creator);
INSERT INTO jobs VALUES ('old-done', '0123456789abcdef0123456789abcdef', '{"a":1}', '["x"]',
    'complete', '{"n":1.0,"l":[]}', NULL, 10.5, 11.0, 12.9);
INSERT INTO jobs VALUES ('old-running', '0123456789abcdef0123456789abcdef', 'null', '[]',
    'running', NULL, NULL, 20.0, 21.0, NULL);
INSERT INTO scripts VALUES ('0123456789abcdef0123456789abcdef', 'Old', 'from v1', '["type:lua","old"]',
    'eve', '{"p":{"type":"number"}}', 1.0);
PRAGMA user_version = 1;
"""


def test_opens_a_version_1_database(tmp_path: Path) -> None:
    conn = raw(tmp_path / DB_FILENAME)
    conn.executescript(V1_SQL)
    conn.close()
    with Store.open(tmp_path) as s:
        info = s.get("old-done")
        assert (info.status, info.created_at, info.completed_at) == (JobStatus.COMPLETE, 10, 12)
        assert_same_json(info.result, {"n": 1.0, "l": []})
        assert s.recover_interrupted(30) == ["old-running"]
        assert hashes(s.search(vibe="old", creator="eve")) == [H1]
        assert s.get_script(H1).params_schema == {"p": {"type": "number"}}
        assert s.get_script(H1).capabilities is None  # v2 added the column: nothing declared
        assert s.get_script(H1).emits is None  # v3 added the column: nothing declared
        s.create_job("new", H1, {}, None, 40)
        assert s.stats() == JobStoreStats(total=3, pending=1, completed=1, failed=1)


def test_refuses_a_newer_schema_and_leaves_it_alone(tmp_path: Path) -> None:
    conn = raw(tmp_path / DB_FILENAME)
    conn.execute("CREATE TABLE future (x)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        Store.open(tmp_path)
    conn = raw(tmp_path / DB_FILENAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["future"]
    conn.close()


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    # a version-0 file that already has a conflicting "jobs" table: step 1 fails midway
    conn = raw(tmp_path / DB_FILENAME)
    conn.execute("CREATE TABLE scripts (other)")
    conn.commit()
    conn.close()
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        Store.open(tmp_path)
    conn = raw(tmp_path / DB_FILENAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    # the jobs table created before the failing statement was rolled back with it
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["scripts"]
    conn.close()


def test_a_version_2_database_gains_emits(tmp_path: Path) -> None:
    conn = raw(tmp_path / DB_FILENAME)
    conn.executescript(V1_SQL)
    conn.execute("ALTER TABLE scripts ADD COLUMN capabilities TEXT")
    conn.execute("UPDATE scripts SET capabilities = '[\"lua\"]'")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Store.open(tmp_path) as s:
        old = s.get_script(H1)
        assert old.capabilities == ["lua"] and old.emits is None
        stored = s.index_script(ScriptRecord(hash=H1, created_at=5.0, emits=["cue_point"]))
        assert stored.emits == ["cue_point"] and stored.capabilities is None
        assert s.get_script(H1).emits == ["cue_point"] and s.get_script(H1).name == "Old"
