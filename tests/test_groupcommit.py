"""Group commit: many job-state writes, one transaction; each writer its own result.

Real SQLite files under tmp_path; the daemon test reads the committed file through a
second connection, as a crash-restarted daemon would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.types import JobStatus
from luanette.groupcommit import GroupCommit
from luanette.store import Store, UnknownJob

H1 = "0123456789abcdef0123456789abcdef"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "state") as s:
        yield s


def committed(store: Store, job_id: str) -> str | None:
    """The job's status as another connection sees it: only what has been committed."""
    with sqlite3.connect(store.path) as conn:
        row = conn.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else row[0]


def test_a_batch_commits_once_and_a_failing_write_changes_only_itself(store):
    store.create_job("old", H1, {}, None, 1.0)
    results = store.write_batch(
        [
            store.create_job_op("a", H1, {"n": 1}, None, 2.0),
            store.create_job_op("old", H1, {}, None, 3.0),  # duplicate id
            store.finish_op("ghost", JobStatus.COMPLETE, at=4.0, result=1),  # unknown job
            store.mark_running_op("a", 5.0),  # sees the create before it in the batch
            store.finish_op("a", JobStatus.COMPLETE, at=6.0, result={"ok": True}),
            store.finish_op("a", JobStatus.FAILED, at=7.0, error={"kind": "late", "message": "x"}),
        ]
    )
    assert results[0].job_id == "a"
    assert isinstance(results[1], ValueError) and "already exists" in str(results[1])
    assert isinstance(results[2], UnknownJob)
    assert results[3:] == [True, True, False]  # the first finish wins, inside a batch too
    assert committed(store, "a") == "complete" and store.get("a").result == {"ok": True}
    assert committed(store, "old") == "pending"
    assert store.get("old").created_at == 1  # the duplicate did not overwrite it


def test_a_batch_that_cannot_commit_writes_nothing(store):
    store.create_job("seed", H1, {}, None, 1.0)
    with sqlite3.connect(store.path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    # a full disk, as SQLite sees one: the file may not grow past its current pages
    store._db().execute(f"PRAGMA max_page_count = {pages}")
    big = "x" * 200_000
    ops = [store.create_job_op(f"j{i}", H1, {"pad": big if i == 3 else i}, None, 2.0) for i in range(6)]
    try:
        results = store.write_batch(ops)
    except sqlite3.Error as e:
        assert "full" in str(e)
        assert [committed(store, f"j{i}") for i in range(6)] == [None] * 6  # all or nothing
    else:  # SQLite undid only the statement: the others committed, the big one did not
        assert isinstance(results[3], sqlite3.Error) and "full" in str(results[3])
        assert [committed(store, f"j{i}") is not None for i in range(6)] == [True, True, True, False, True, True]
    assert committed(store, "seed") == "pending"  # what was there before is intact


async def test_writes_of_one_loop_turn_share_one_commit(store):
    commits = GroupCommit(store)
    infos = await asyncio.gather(*(commits.write(store.create_job_op(f"j{i}", H1, i, None, 1.0)) for i in range(50)))
    assert [i.job_id for i in infos] == [f"j{i}" for i in range(50)]
    assert (commits.batches, commits.writes) == (1, 50)
    outcomes = await asyncio.gather(
        commits.write(store.finish_op("j0", JobStatus.COMPLETE, at=2.0, result=0)),
        commits.write(store.finish_op("nope", JobStatus.COMPLETE, at=2.0, result=0)),
        return_exceptions=True,
    )
    assert outcomes[0] is True and isinstance(outcomes[1], UnknownJob)
    assert commits.batches == 2 and committed(store, "j0") == "complete"


async def test_a_writer_cancelled_while_waiting_still_has_its_write_committed(store):
    commits = GroupCommit(store)
    waiting = asyncio.ensure_future(commits.write(store.create_job_op("kept", H1, None, None, 1.0)))
    await asyncio.sleep(0)  # queued; its group has not run yet
    waiting.cancel()
    other = await commits.write(store.create_job_op("other", H1, None, None, 1.0))
    assert other.job_id == "other"
    assert committed(store, "kept") == "pending"


async def test_a_failed_commit_reaches_every_writer_of_its_group(store):
    commits = GroupCommit(store)
    writes = [commits.write(store.create_job_op(f"j{i}", H1, None, None, 1.0)) for i in range(3)]
    store.close()  # the next group cannot run at all
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "closed" in str(o) for o in outcomes)


async def test_a_job_execute_reply_comes_after_its_row_is_committed(server, client):
    digest = (await client.request(t.ScriptStore(content="return 7", tags=None, creator=None))).result["hash"]
    replies = await asyncio.gather(*(client.request(t.JobExecute(script_hash=digest, params=None)) for _ in range(40)))
    store = server.server.store
    for reply in replies:
        assert committed(store, reply.result["job_id"]) is not None
    ids = [r.result["job_id"] for r in replies]
    polled = (await client.request(t.JobPoll(job_ids=ids, timeout_ms=20000, mode=t.PollMode.ALL))).result
    # a poll reports a job finished only once that state is on disk
    assert {committed(store, j["job_id"]) for j in polled["completed"]} == {"complete"}
    assert {j["result"] for j in polled["completed"]} == {7}


async def test_many_jobs_then_restart_keep_every_result(make_server, tmp_path):
    running = await make_server()
    async with Client(running.endpoint) as c:
        digest = (await c.request(t.ScriptStore(content="return params.n", tags=None, creator=None))).result["hash"]
        execute = [t.JobExecute(script_hash=digest, params={"n": i}) for i in range(100)]
        replies = await asyncio.gather(*(c.request(e) for e in execute))
        ids = [r.result["job_id"] for r in replies]
        await c.request(t.JobPoll(job_ids=ids, timeout_ms=20000, mode=t.PollMode.ALL))
    path = running.server.store.path
    await running.stop()
    with Store(path) as reopened:
        assert [reopened.get(i).result for i in ids] == list(range(100))
