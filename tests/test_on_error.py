"""describe().on_error (issue 11 item 8): "skip" turns a failing namespace call into nil,
logged and recorded in the job's result under ``skipped``; "abort" (the default) raises."""

from __future__ import annotations

import pytest

from hooteproto import types as t
from tests.test_jobs import until_running, wait_done
from tests.test_sessions import job, seed, settings_for, store
from tests.waiting import until

pytestmark = pytest.mark.timeout(90)

MISSING = "00000000-0000-0000-0000-0000000000ff"


@pytest.fixture
async def stack(make_server, garden):
    from hooteproto.client import Client

    running = await make_server(settings=settings_for(garden))
    async with Client(running.endpoint) as c:
        yield running, c, garden


def script(on_error: str | None, body: str, mode: str = "session") -> str:
    fields = f'execution_mode = "{mode}"' + (f', on_error = "{on_error}"' if on_error else "")
    return f"function describe() return {{name = 'e', {fields}}} end\nfunction main(p)\n{body}\nend"


async def test_skip_returns_nil_and_records_the_failure_in_a_map_result(stack):
    _, c, garden = stack
    done = await job(
        c,
        script(
            "skip",
            """
        local gone = garden.delete_region(p.missing)            -- checked against the garden at once
        local id = garden.create_region{position = 0, duration = 4, behavior = "play_content", content_id = "a"}
        return {gone = gone == nil, id = id}
    """,
        ),
        {"missing": MISSING},
    )
    assert done["status"] == "complete", done
    result = done["result"]
    assert result["gone"] is True
    assert result["skipped"] == [
        {"call": "garden.delete_region", "error": f"garden.delete_region: garden_error: region {MISSING} not found"}
    ]
    assert len(garden.state.regions()) == 1  # the rest of the session was committed


async def test_skip_wraps_a_result_that_is_not_a_map(stack):
    _, c, _ = stack
    done = await job(
        c,
        script(
            "skip",
            """
        garden.latent_progress(p.missing, 0.5)
        return 42
    """,
            mode="autoCommit",
        ),
        {"missing": MISSING},
    )
    assert done["status"] == "complete"
    (entry,) = done["result"]["skipped"]
    assert done["result"]["value"] == 42 and entry["call"] == "garden.latent_progress"
    assert "garden_error" in entry["error"]


async def test_nothing_skipped_leaves_the_result_alone(stack):
    _, c, _ = stack
    done = await job(c, script("skip", "return {n = 1}"))
    assert done["result"] == {"n": 1}


async def test_abort_is_the_default_and_raises(stack):
    _, c, garden = stack
    for on_error in (None, "abort"):
        done = await job(
            c,
            script(
                on_error,
                """
            garden.create_region{position = 0, duration = 4, behavior = "play_content", content_id = "a"}
            garden.delete_region(p.missing)
            return 1
        """,
            ),
            {"missing": MISSING},
        )
        assert done["status"] == "failed" and "region" in done["error"]["message"]
    assert garden.state.regions() == []  # the overlay went with the error


async def test_skip_leaves_the_always_present_namespaces_and_argument_errors_alone(stack):
    _, c, _ = stack
    done = await job(
        c,
        script(
            "skip",
            """
        local ok, err = pcall(json.decode, "{")
        local ok2, err2 = pcall(garden.seek, -1)    -- garden, skipped too: it is an invalid_params
        return {json_raised = not ok, seek = ok2, seek_value = err2 == nil}
    """,
        ),
    )
    result = done["result"]
    assert result["json_raised"] is True and result["seek"] is True and result["seek_value"] is True
    assert [s["call"] for s in result["skipped"]] == ["garden.seek"]


async def test_skip_never_swallows_a_cancel(stack):
    _, c, garden = stack
    existing = seed(garden, 0)
    garden.hold()  # the garden's reply never comes while held: the job waits in garden.status
    try:
        digest = await store(c, script("skip", "garden.status() return 'finished'"))
        job_id = (await c.request(t.JobExecute(script_hash=digest, params=None))).result["job_id"]
        await until_running(c, job_id)
        await until(lambda: garden.received, "the job waiting on the garden")
        await c.request(t.JobCancel(job_id=job_id))
        done = await wait_done(c, job_id)
    finally:
        garden.release()
    assert done["status"] == "cancelled" and done["result"] is None
    assert [r["region_id"] for r in garden.state.regions()] == [existing]


async def test_lua_eval_aborts(stack):
    _, c, _ = stack
    reply = await c.request(t.LuaEval(code=f"return garden.delete_region('{MISSING}')"))
    assert isinstance(reply, t.Error) and "not found" in reply.message
