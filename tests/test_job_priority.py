"""Job priorities and the queue's signals through a real daemon: job_execute's
``priority`` (Luanette's extension), the order the queue serves, ``lua://jobs/stats``
and the ``luanette.jobs.*`` gauges."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
import zmq
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import Encoding, decode_broadcast
from luanette.telemetry import Telemetry, observe_queue
from tests.test_jobs import SPIN, run, store, subscribed, until_running, wait_done
from tests.waiting import until

pytestmark = pytest.mark.timeout(90)

LOWS = 40


async def execute(c: Client, script_hash: str, params: Any = None, priority: Any = None) -> t.Payload:
    request = t.JobExecute(script_hash=script_hash, params=params)
    if priority is not None:
        request.priority = priority
    return await c.request(request)


async def job(c: Client, script_hash: str, params: Any = None, priority: Any = None) -> str:
    reply = await execute(c, script_hash, params, priority)
    assert isinstance(reply, t.Success), reply
    return reply.result["job_id"]


async def job_stats(c: Client) -> dict[str, Any]:
    reply = await c.request(t.ReadResource(uri="lua://jobs/stats"))
    assert isinstance(reply, t.Success), reply
    (content,) = reply.result["contents"]
    return json.loads(content["text"])


@pytest.mark.parametrize("encoding", [Encoding.COMPACT, Encoding.NAMED, Encoding.JSON])
async def test_a_high_priority_job_overtakes_a_flood_of_low_ones(make_server, zctx, encoding):
    running = await make_server(max_jobs=1, job_queue=LOWS + 10, script_timeout=30.0)
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"job_state_changed"')
    sub.connect(running.server.publisher.endpoint)
    async with Client(running.endpoint, encoding=encoding) as c:
        await subscribed(sub, c)
        spin, quick = await store(c, SPIN), await store(c, "return params.n")
        blocker = (await run(c, spin))["job_id"]
        await until_running(c, blocker)  # the one job slot is busy
        lows = [await job(c, quick, {"n": i}, priority=-5) for i in range(LOWS)]
        normal = await job(c, quick, {"n": -1})  # no priority: normal, 0
        high = await job(c, quick, {"n": 99}, priority=5)

        stats = await job_stats(c)
        assert stats["queue_depth"] == LOWS + 2 and stats["pending"] == LOWS + 2 and stats["running"] == 1
        assert stats["by_priority"] == {"5": 1, "0": 1, "-5": LOWS}
        assert isinstance(stats["oldest_pending_s"], float) and stats["oldest_pending_s"] >= 0

        await c.request(t.JobCancel(job_id=blocker))  # the slot is free: the queue is served
        everything = [blocker, *lows, normal, high]
        done = await c.request(t.JobPoll(job_ids=everything, timeout_ms=30000, mode=t.PollMode.ALL), timeout=45)
        assert isinstance(done, t.Success) and not done.result["timed_out"], done

        started: list[str] = []  # the order the jobs went running, from the broadcasts
        while len(started) < len(everything):
            message = decode_broadcast(await asyncio.wait_for(sub.recv(), 30))
            if isinstance(message, t.JobStateChanged) and message.state == "running":
                started.append(message.job_id)
        assert started == [blocker, high, normal, *lows]  # higher first, FIFO within one
        assert (await wait_done(c, high))["result"] == 99
        after = await job_stats(c)
        assert after["queue_depth"] == 0 and after["oldest_pending_s"] is None and after["by_priority"] == {}
    sub.close(0)


@pytest.mark.parametrize("priority", [11, -11, 1000])
async def test_a_priority_out_of_range_is_refused_naming_the_field(client, priority):
    quick = await store(client, "return 1")
    reply = await execute(client, quick, None, priority)
    assert isinstance(reply, t.Error) and reply.code == "invalid_params", reply
    assert "priority" in reply.message
    assert reply.details == {"field": "priority", "value": priority, "min": -10, "max": 10}
    assert (await client.request(t.JobList(status=None))).result == []  # nothing was queued


async def test_a_priority_that_is_not_an_integer_is_refused(server):
    async with Client(server.endpoint, encoding=Encoding.JSON) as c:
        quick = await store(c, "return 1")
        reply = await execute(c, quick, None, "high")  # (sent as JSON: the decoder names the path)
        # refused by the decoder, as any field of the wrong type is, with where it is
        assert isinstance(reply, t.Error) and reply.code == "bad_request", reply
        assert reply.details["path"] == "$.priority"
        assert (await c.request(t.JobList(status=None))).result == []


async def test_the_bounds_and_null_priority_are_accepted(client):
    quick = await store(client, "return params.n")
    for p in (-10, 10, 0):
        assert (await wait_done(client, await job(client, quick, {"n": p}, priority=p)))["result"] == p
    request = t.JobExecute(script_hash=quick, params={"n": 1}, priority=None)  # null: normal
    reply = await client.request(request)
    assert isinstance(reply, t.Success), reply


async def test_a_cancelled_queued_job_frees_its_place_at_once(make_server):
    running = await make_server(max_jobs=1, job_queue=1)
    async with Client(running.endpoint) as c:
        spin, quick = await store(c, SPIN), await store(c, "return 'ran'")
        blocker = (await run(c, spin))["job_id"]
        await until_running(c, blocker)
        queued = await job(c, quick, priority=3)
        refused = await execute(c, quick)
        assert isinstance(refused, t.Error) and refused.code == "busy"
        cancelled = await c.request(t.JobCancel(job_id=queued))
        assert cancelled.result["status"] == "cancelled"  # finished at once
        assert (await job_stats(c))["queue_depth"] == 0
        second = await job(c, quick)  # its place is free again
        await c.request(t.JobCancel(job_id=blocker))
        assert (await wait_done(c, second))["result"] == "ran"
        assert (await wait_done(c, queued))["status"] == "cancelled"


async def test_shutdown_cancels_queued_jobs(make_server):
    running = await make_server(max_jobs=1, job_queue=10, drain_timeout=0.5)
    async with Client(running.endpoint) as c:
        spin, quick = await store(c, SPIN), await store(c, "return 1")
        blocker = (await run(c, spin))["job_id"]
        await until_running(c, blocker)
        queued = [await job(c, quick, priority=p) for p in (1, -1)]
    jobs = running.server.jobs
    assert jobs.queue_stats()["queue_depth"] == 2
    jobs.cancel_all("the daemon is shutting down")
    assert jobs.queue_stats() == {"queue_depth": 0, "oldest_pending_s": None, "by_priority": {}, "waiting_for_worker": 0}
    for job_id in queued:
        assert jobs.status(job_id).status is t.JobStatus.CANCELLED
    await until(lambda: not jobs.is_live(blocker), "the running job cancelled")


# --- the gauges ------------------------------------------------------------------------


def queue_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """name -> [(attributes, value)] of the luanette.jobs.* gauges one collection reads."""
    points: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.startswith("luanette.jobs."):
                    points[metric.name] = [(dict(p.attributes or {}), p.value) for p in metric.data.data_points]
    return points


def test_queue_gauges_read_the_queue_at_each_collection():
    reader = InMemoryMetricReader()
    stats: dict[str, Any] = {"queue_depth": 3, "oldest_pending_s": 2.5, "by_priority": {"5": 1, "0": 2}}
    observe_queue(Telemetry(metric_reader=reader), lambda: stats)
    points = queue_points(reader)
    assert points["luanette.jobs.queue_depth"] == [({}, 3)]
    assert sorted(points["luanette.jobs.queue_depth_by_priority"], key=str) == sorted(
        [({"priority": "5"}, 1), ({"priority": "0"}, 2)], key=str
    )
    assert points["luanette.jobs.oldest_pending_age"] == [({}, 2.5)]
    stats.update(queue_depth=0, oldest_pending_s=None, by_priority={})
    points = queue_points(reader)
    assert points["luanette.jobs.queue_depth"] == [({}, 0)]
    assert not points.get("luanette.jobs.queue_depth_by_priority")
    assert points["luanette.jobs.oldest_pending_age"] == [({}, 0.0)]  # none waits


def test_a_queue_that_cannot_be_read_reports_nothing():
    reader = InMemoryMetricReader()

    def broken() -> dict[str, Any]:
        raise RuntimeError("gone")

    observe_queue(Telemetry(metric_reader=reader), broken)
    assert all(not found for found in queue_points(reader).values())  # the collection does not fail


async def test_a_daemons_queue_gauges_count_its_queued_jobs(make_server):
    reader = InMemoryMetricReader()
    running = await make_server(telemetry=Telemetry(metric_reader=reader), max_jobs=1, job_queue=10)
    async with Client(running.endpoint) as c:
        assert queue_points(reader)["luanette.jobs.queue_depth"] == [({}, 0)]
        spin, quick = await store(c, SPIN), await store(c, "return 1")
        blocker = (await run(c, spin))["job_id"]
        await until_running(c, blocker)
        queued = [await job(c, quick, priority=2), await job(c, quick)]
        points = queue_points(reader)
        assert points["luanette.jobs.queue_depth"] == [({}, 2)]
        assert sorted(points["luanette.jobs.queue_depth_by_priority"], key=str) == sorted(
            [({"priority": "2"}, 1), ({"priority": "0"}, 1)], key=str
        )
        ((_, age),) = points["luanette.jobs.oldest_pending_age"]
        assert age >= 0.0
        await c.request(t.JobCancel(job_id=blocker))
        for job_id in queued:
            await wait_done(c, job_id)
        assert queue_points(reader)["luanette.jobs.queue_depth"] == [({}, 0)]


# --- where jobs are started: the CLI, MCP, the tool list ----------------------------------------


def test_the_cli_run_sends_a_priority_only_when_given():
    from luanette.cli.client import build_parser, build_request

    parser = build_parser()
    urgent = build_request(parser.parse_args(["run", "ab" * 16, "--priority", "7"]))
    assert isinstance(urgent, t.JobExecute) and urgent.priority == 7
    plain = build_request(parser.parse_args(["run", "ab" * 16]))
    assert isinstance(plain, t.JobExecute) and plain.priority is msgspec.UNSET


def test_the_mcp_job_execute_tool_takes_a_priority():
    from luanette.mcpserver import build_request, local_tools, mcp_tool

    request = build_request("job_execute", {"script_hash": "ab" * 16, "params": {}, "priority": -3})
    assert isinstance(request, t.JobExecute) and request.priority == -3
    assert build_request("job_execute", {"script_hash": "ab" * 16, "params": {}}).priority is msgspec.UNSET
    (tool,) = [mcp_tool(info) for info in local_tools() if info.name == "job_execute"]
    described = tool.input_schema["properties"]["priority"]["description"]
    assert "-10 to 10" in described and "never interrupted" in described
    assert "priority" not in tool.input_schema.get("required", [])
