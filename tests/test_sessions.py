"""Sessions (issue 11 item 7): a run's garden edits go to an overlay, committed
all-or-nothing, over the real socket against the garden simulator."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import pytest

from hooteproto import garden as g
from hooteproto import types as t
from hooteproto.client import Client
from luanette import auth
from luanette.settings import parse_settings
from luanette.stdlib.session import Overlay
from tests.conftest import cli
from tests.test_auth import Keys, as_
from tests.test_jobs import wait_done
from tests.waiting import until

pytestmark = pytest.mark.timeout(90)


def settings_for(garden: Any) -> Any:
    return parse_settings({"garden": {"endpoint": garden.endpoint, "timeout_s": 5.0}})


@pytest.fixture
async def stack(make_server, garden):
    running = await make_server(settings=settings_for(garden))
    async with Client(running.endpoint) as c:
        yield running, c, garden


def seed(garden: Any, position: float, content: str = "art", latent: bool = False) -> str:
    """A region put in the garden directly (as if someone else had made it)."""
    body = g.Latent(job_id=content) if latent else g.PlayContent(artifact_id=content)
    reply = garden.state.handle(g.CreateRegion(position=position, duration=4, behavior=g.Behavior.of(body)))
    return str(reply.region_id)


def layout(garden: Any) -> list[tuple[float, str | None]]:
    return sorted((r["position"], r["behavior_body"].get("artifact_id")) for r in garden.state.regions())


async def evaluate(c: Client, code: str, params: Any = None) -> Any:
    reply = await c.request(t.LuaEval(code=code, params=params))
    assert isinstance(reply, t.Success), reply
    return reply.result["result"]


async def store(c: Client, code: str) -> str:
    reply = await c.request(t.ScriptStore(content=code))
    assert isinstance(reply, t.Success), reply
    return reply.result["hash"]


async def job(c: Client, code: str, params: Any = None) -> dict[str, Any]:
    digest = await store(c, code)
    reply = await c.request(t.JobExecute(script_hash=digest, params=params))
    assert isinstance(reply, t.Success), reply
    return await wait_done(c, reply.result["job_id"])


def kinds(garden: Any) -> list[str]:
    return [type(m.content).__name__ for m in garden.received]


REVIEWED = """
function describe() return {name = "reviewed", review = true} end
function main(p)
  garden.create_region{position = p.at, duration = 4, behavior = "play_content", content_id = "new"}
  garden.move_region(p.existing, 40)
  return {ops = #core.overlay.operations()}
end
"""


# ------------------------------------------------------------------ within one run


async def test_the_overlay_is_what_the_script_sees_and_reaches_the_garden_only_at_commit(stack):
    _, c, garden = stack
    existing = seed(garden, 0)
    result = await evaluate(
        c,
        """
        local a = garden.create_region{position = 8, duration = 4, behavior = "play_content", content_id = "a"}
        garden.move_region(params.existing, 32)
        local out = {seen = garden.get_regions(), window = garden.get_regions(30, 40),
                     ops = core.overlay.operations(), a = a}
        out.commit = core.commit()
        out.after = garden.get_regions()
        out.ops_after = #core.overlay.operations()
        return out
    """,
        {"existing": existing},
    )
    a = result["a"]
    assert result["seen"] == [
        {"region_id": existing, "position": 32.0, "duration": 4.0, "is_latent": False, "artifact_id": "art"},
        {"region_id": a, "position": 8.0, "duration": 4.0, "is_latent": False, "artifact_id": "a"},
    ]
    assert [r["region_id"] for r in result["window"]] == [existing]
    assert result["ops"] == [
        {"op": "create", "region_id": a, "position": 8.0, "duration": 4.0, "behavior": "play_content",
         "content_id": "a"},
        {"op": "move", "region_id": existing, "position": 32.0},
    ]  # fmt: skip
    real = result["commit"]["created"][a]
    assert result["commit"]["operations"] == 2 and real != a
    assert {r["region_id"] for r in result["after"]} == {existing, real} and result["ops_after"] == 0
    # nothing but reads reached the garden before the commit (the last read validates it)
    assert kinds(garden) == ["GetRegions"] * 4 + ["CreateRegion", "MoveRegion", "GetRegions"]
    assert layout(garden) == [(8.0, "a"), (32.0, "art")]


async def test_discard_drops_the_overlay_and_an_eval_commits_at_its_end(stack):
    _, c, garden = stack
    result = await evaluate(
        c,
        """
        garden.create_region{position = 0, duration = 4, behavior = "play_content", content_id = "dropped"}
        local dropped = core.discard()
        garden.create_region{position = 4, duration = 4, behavior = "play_content", content_id = "kept"}
        return {dropped = dropped, ops = core.overlay.operations()}
    """,
    )
    assert result["dropped"] == 1 and len(result["ops"]) == 1
    assert layout(garden) == [(4.0, "kept")]  # committed when the eval ended


async def test_a_failed_commit_undoes_what_it_applied_and_keeps_the_overlay(stack):
    _, c, garden = stack
    r1, r2, r3 = seed(garden, 0, "one"), seed(garden, 8, "two"), seed(garden, 16, "three")
    before = layout(garden)
    garden.refuse = {"delete_region": 1}  # the second delete is refused
    result = await evaluate(
        c,
        """
        garden.create_region{position = 24, duration = 4, behavior = "play_content", content_id = "new"}
        garden.move_region(params.r1, 40)
        garden.delete_region(params.r2)
        garden.delete_region(params.r3)
        local ok, err = pcall(core.commit)
        local ops = #core.overlay.operations()
        return {ok = ok, err = err, ops = ops, dropped = core.discard()}
    """,
        {"r1": r1, "r2": r2, "r3": r3},
    )
    assert result["ok"] is False and result["ops"] == 4 and result["dropped"] == 4
    err = result["err"]
    assert err.startswith(f"core.commit: commit_failed: delete of region {r3} failed"), err
    assert "the 3 operation(s) applied before it were undone" in err
    assert f"deleted region {r2} was recreated with a new id" in err
    assert layout(garden) == before
    assert garden.state.region(r1)["position"] == 0.0 and garden.state.region(r2) is None


async def test_end_of_main_commits_on_success_and_discards_on_error(stack):
    _, c, garden = stack
    ok = await job(
        c,
        """
        function main() garden.create_region{position = 0, duration = 4, behavior = "latent", content_id = "j"}
          return "done" end
    """,
    )
    assert ok["status"] == "complete" and ok["result"] == "done"
    failed = await job(
        c,
        """
        function main() garden.create_region{position = 8, duration = 4, behavior = "latent", content_id = "j"}
          error("boom") end
    """,
    )
    assert failed["status"] == "failed"
    assert [r["position"] for r in garden.state.regions()] == [0.0]


async def test_a_cancelled_job_leaves_nothing_in_the_garden(stack):
    _, c, garden = stack
    digest = await store(
        c,
        """
        function main()
          garden.create_region{position = 0, duration = 4, behavior = "play_content", content_id = "x"}
          progress.update(50, "in the overlay")
          clock.sleep(60000)
        end
    """,
    )
    job_id = (await c.request(t.JobExecute(script_hash=digest, params=None))).result["job_id"]

    async def overlaid() -> bool:
        reply = await c.request(t.JobStatusRequest(job_id=job_id))
        return reply.result.get("progress") is not None

    await until(overlaid, "the region in the overlay")
    await c.request(t.JobCancel(job_id=job_id))
    done = await wait_done(c, job_id)
    assert done["status"] == "cancelled"
    assert garden.state.regions() == [] and "CreateRegion" not in kinds(garden)


async def test_a_final_commit_that_fails_fails_the_job(stack):
    _, c, garden = stack
    garden.refuse = {"create_region": 0}
    done = await job(
        c,
        """
        function main() garden.create_region{position = 0, duration = 4, behavior = "latent", content_id = "j"}
          return 1 end
    """,
    )
    assert done["status"] == "failed" and done["error"]["kind"] == "commit_failed"
    assert "at the end of main" in done["error"]["message"] and garden.state.regions() == []


# ------------------------------------------------ what is never buffered, autoCommit


async def test_transport_and_latent_calls_are_not_buffered(stack):
    _, c, garden = stack
    result = await evaluate(
        c,
        """
        garden.play()
        local id = garden.create_region{position = 0, duration = 8, behavior = "latent", content_id = "j"}
        local ok, err = pcall(garden.latent_started, id, "j")
        local created = core.commit().created
        local started = garden.latent_started(id, "j")   -- the provisional id maps to the real one
        garden.latent_progress(id, 0.5)
        return {err = err, ok = ok, started = started, id = id, real = created[id]}
    """,
    )
    assert result["ok"] is False and result["started"] is True
    assert result["err"].startswith(f"garden.latent_started: not_committed: region {result['id']} exists only")
    assert "core.commit()" in result["err"] and 'execution_mode = "autoCommit"' in result["err"]
    assert kinds(garden)[0] == "Play"  # at once, before anything else
    assert garden.state.region(result["real"])["latent"]["status"] == "running"
    assert garden.state.transport()["state"] == "playing"


async def test_auto_commit_writes_through(stack):
    _, c, garden = stack
    done = await job(
        c,
        """
        function describe() return {name = "live", execution_mode = "autoCommit"} end
        function main()
          local id = garden.create_region{position = 0, duration = 8, behavior = "latent", content_id = "j"}
          garden.latent_started(id, "j")
          return {id = id, ops = #core.overlay.operations(), commit = core.commit(), discard = core.discard()}
        end
    """,
    )
    result = done["result"]
    assert done["status"] == "complete" and result["ops"] == 0 and result["discard"] == 0
    assert result["commit"]["operations"] == 0
    assert garden.state.region(result["id"])["latent"]["status"] == "running"


def test_an_overlay_is_bounded():
    overlay = Overlay(None)
    for i in range(1000):
        overlay.create(float(i), 1.0, "latent", "j")
    with pytest.raises(Exception, match="too_many_operations"):
        overlay.create(0.0, 1.0, "latent", "j")


# ------------------------------------------------------------- sessions for review


async def test_a_reviewed_session_is_listed_shown_committed_or_discarded(stack):
    running, c, garden = stack
    existing = seed(garden, 0)
    done = await job(c, REVIEWED, {"at": 8, "existing": existing})
    assert done["status"] == "complete" and done["result"] == {"ops": 2}
    assert layout(garden) == [(0.0, "art")]  # untouched: the session waits for review
    listed = (await c.request(t.SessionList(job_id=done["job_id"]))).result
    (session,) = listed
    assert session["job_id"] == done["job_id"] and session["operation_count"] == 2 and session["user"] == "local"
    shown = (await c.request(t.SessionShow(session_id=session["session_id"]))).result
    assert [op["op"] for op in shown["operations"]] == ["create", "move"]
    committed = await c.request(t.SessionCommit(session_id=session["session_id"]))
    assert isinstance(committed, t.Success) and committed.result["operations"] == 2
    assert layout(garden) == [(8.0, "new"), (40.0, "art")]
    assert (await c.request(t.SessionList())).result == []
    again = await c.request(t.SessionCommit(session_id=session["session_id"]))
    assert isinstance(again, t.Error) and again.code == "not_found"

    second = await job(c, REVIEWED, {"at": 12, "existing": existing})
    (pending,) = (await c.request(t.SessionList(job_id=second["job_id"]))).result
    dropped = await c.request(t.SessionDiscard(session_id=pending["session_id"]))
    assert isinstance(dropped, t.Success) and dropped.result["discarded"] is True
    assert layout(garden) == [(8.0, "new"), (40.0, "art")] and running.server.store.count_sessions() == 0


async def test_a_pending_session_whose_region_went_away_fails_to_commit_and_stays(stack):
    _, c, garden = stack
    existing = seed(garden, 0)
    done = await job(c, REVIEWED, {"at": 8, "existing": existing})
    (session,) = (await c.request(t.SessionList(job_id=done["job_id"]))).result
    garden.state.handle(g.DeleteRegion(region_id=uuid.UUID(existing)))
    failed = await c.request(t.SessionCommit(session_id=session["session_id"]))
    assert isinstance(failed, t.Error) and failed.code == "commit_failed"
    assert "nothing was applied" in failed.message
    assert garden.state.regions() == [] and "CreateRegion" not in kinds(garden)
    assert len((await c.request(t.SessionList())).result) == 1


async def test_sessions_from_the_cli(stack):
    running, c, garden = stack
    existing = seed(garden, 0)
    first = await job(c, REVIEWED, {"at": 8, "existing": existing})
    second = await job(c, REVIEWED, {"at": 12, "existing": existing})

    def run_cli(*args: str) -> Any:
        return anyio.to_thread.run_sync(lambda: cli(running.endpoint, *args))

    listed = await run_cli("--json", "session", "list")
    assert listed.returncode == 0, listed.stderr
    sessions = {s["job_id"]: s["session_id"] for s in json.loads(listed.stdout)["result"]}
    assert set(sessions) == {first["job_id"], second["job_id"]}
    shown = await run_cli("session", "show", sessions[first["job_id"]])
    assert shown.returncode == 0 and '"move"' in shown.stdout
    committed = await run_cli("session", "commit", sessions[first["job_id"]])
    assert committed.returncode == 0 and committed.stdout.startswith("committed ses_"), committed
    discarded = await run_cli("session", "discard", sessions[second["job_id"]])
    assert discarded.returncode == 0 and discarded.stdout.startswith("discarded ses_")
    missing = await run_cli("session", "commit", sessions[second["job_id"]])
    assert missing.returncode == 1 and "not_found" in missing.stderr + missing.stdout
    assert layout(garden) == [(8.0, "new"), (40.0, "art")]


async def test_a_pending_session_survives_a_restart(make_server, garden):
    existing = seed(garden, 0)
    first = await make_server(settings=settings_for(garden))
    async with Client(first.endpoint) as c:
        done = await job(c, REVIEWED, {"at": 8, "existing": existing})
    await first.stop()
    second = await make_server(settings=settings_for(garden))
    async with Client(second.endpoint) as c:
        (session,) = (await c.request(t.SessionList())).result
        assert session["job_id"] == done["job_id"]
        committed = await c.request(t.SessionCommit(session_id=session["session_id"]))
        assert isinstance(committed, t.Success), committed
    assert layout(garden) == [(8.0, "new"), (40.0, "art")]


async def test_only_the_jobs_client_or_an_admin_may_commit_or_discard(make_server, garden, tmp_path):
    keys = Keys(tmp_path / "keys")
    bob = keys._person(tmp_path / "keys", "bob", auth.CLIENTS_DIR)
    running = await make_server(settings=settings_for(garden), curve=str(keys.server))
    existing = seed(garden, 0)
    async with as_(keys.client, running.endpoint) as alice:
        done = await job(alice, REVIEWED, {"at": 8, "existing": existing})
        (session,) = (await alice.request(t.SessionList(job_id=done["job_id"]))).result
    sid = session["session_id"]
    async with as_(bob, running.endpoint) as other:
        for request in (t.SessionCommit(session_id=sid), t.SessionDiscard(session_id=sid)):
            refused = await other.request(request)
            assert isinstance(refused, t.Error) and refused.code == "forbidden", refused
    assert layout(garden) == [(0.0, "art")]
    async with as_(keys.admin, running.endpoint) as admin:
        committed = await admin.request(t.SessionCommit(session_id=sid))
        assert isinstance(committed, t.Success), committed
    assert layout(garden) == [(8.0, "new"), (40.0, "art")]


# ------------------------------------------------------------------ the manifest


@pytest.mark.parametrize(
    ("declared", "named"),
    [
        ('execution_mode = "live"', "execution_mode"),
        ('review = "yes"', "review"),
        ('on_error = "prompt"', "on_error"),
        ('execution_mode = "autoCommit", review = true', "review"),
    ],
)
async def test_bad_session_fields_are_refused_when_the_script_is_stored(stack, declared, named):
    _, c, _ = stack
    reply = await c.request(t.ScriptStore(content=f"function describe() return {{{declared}}} end"))
    assert isinstance(reply, t.Error) and reply.details["kind"] == "invalid_params", reply
    assert f"describe().{named}" in reply.message and reply.details["hints"]


async def test_session_fields_are_kept_in_the_script_index(stack):
    running, c, _ = stack
    digest = await store(c, 'function describe() return {execution_mode = "session", review = true, '
                            'on_error = "skip"} end')  # fmt: skip
    record = running.server.store.get_script(digest)
    assert (record.execution_mode, record.review, record.on_error) == ("session", True, "skip")
