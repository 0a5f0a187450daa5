"""luanette.garden.GardenClient against the real garden simulator over real ZMQ sockets."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest
import zmq
import zmq.asyncio

from hooteproto import garden as g
from hooteproto.codec import Encoding
from luanette.garden import GardenClient, GardenError, GardenSettings, GardenUnavailable
from luanette.sim.garden import GardenSimServer
from luanette.telemetry import Telemetry, span_ids
from tests.conftest import free_port
from tests.waiting import TIMED, until

pytestmark = pytest.mark.timeout(90)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def latent(job: str) -> g.Behavior:
    return g.Behavior.of(g.Latent(job_id=job))


async def test_request_is_one_compact_frame_and_the_reply_comes_back(garden, gclient):
    state = await gclient.request(g.GetTransportState())
    assert state == g.TransportState(playing=False, position=0.0, tempo=120.0)
    created = await gclient.request(g.CreateRegion(position=4.0, duration=2.0, behavior=latent("job_1")))
    assert isinstance(created, g.RegionCreated)
    assert garden.state.region(created.region_id)["position"] == 4.0
    # what upstream's rmp_serde::to_vec writes: one frame, compact MsgPack, no delimiter
    assert [(r.wire, r.encoding, r.delimited) for r in garden.log] == [("frame", Encoding.COMPACT, False)] * 2
    first, second = garden.received
    assert first.header.msg_type == "shell_request" and first.header.version == "0.1.0"
    assert first.header.session == second.header.session == gclient.session
    assert first.header.msg_id != second.header.msg_id
    assert first.metadata == {}  # no traceparent given, no telemetry


async def test_traceparent_travels_in_metadata(garden, gclient):
    await gclient.request(g.Play(), traceparent=TRACEPARENT)
    assert garden.received[-1].metadata == {"traceparent": TRACEPARENT}


async def test_with_telemetry_each_call_is_a_child_span_whose_traceparent_is_sent(garden):
    telemetry = Telemetry()
    settings = GardenSettings(endpoint=garden.endpoint)
    async with GardenClient(settings, telemetry=telemetry) as client:
        with telemetry.span("parent") as parent:
            await client.request(g.Play())
        sent = garden.received[-1].metadata["traceparent"]
        _, trace_id, span_id, _ = sent.split("-")
        assert trace_id == span_ids(parent)["trace_id"] and span_id != span_ids(parent)["span_id"]
        # an explicit traceparent wins over the span's
        await client.request(g.Play(), traceparent=TRACEPARENT)
        assert garden.received[-1].metadata["traceparent"] == TRACEPARENT


async def test_garden_error_reply_raises_garden_error_with_its_text(gclient):
    missing = uuid.uuid4()
    with pytest.raises(GardenError, match=f"region {missing} not found"):
        await gclient.request(g.DeleteRegion(region_id=missing))
    assert gclient.stats.errors == 1 and gclient.stats.replies == 1


async def test_no_endpoint_configured_is_unavailable_at_once():
    async with GardenClient(GardenSettings()) as client:
        assert not client.configured
        with pytest.raises(GardenUnavailable, match="no garden configured"):
            await client.request(g.Play())


@TIMED
async def test_nothing_listening_fails_fast_and_the_request_is_never_replayed(timed):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with GardenClient(GardenSettings(endpoint=endpoint, timeout_s=60.0), connect_timeout_s=0.3) as client:
        started = time.monotonic()
        # "cannot reach": the connect wait ended it, not the reply timeout ("no reply")
        with pytest.raises(GardenUnavailable, match=f"cannot reach {endpoint}"):
            await client.request(g.Play())
        if timed:
            assert time.monotonic() - started < 1.0
        # The garden comes up: the failed "play" must not arrive late (IMMEDIATE=1).
        async with GardenSimServer(endpoint) as garden:
            assert isinstance(await client.request(g.GetTransportState()), g.TransportState)
            await asyncio.sleep(0.1)  # time for a replay to show up (none may)
            assert [type(m.content) for m in garden.received] == [g.GetTransportState]
            assert garden.state.transport()["playing"] is False


@TIMED
async def test_no_reply_in_time_is_unavailable_and_the_next_request_gets_a_fresh_socket(garden, timed):
    async with GardenClient(GardenSettings(endpoint=garden.endpoint, timeout_s=0.3)) as client:
        await client.request(g.Play())
        garden.unresponsive = True
        started = time.monotonic()
        with pytest.raises(GardenUnavailable, match=rf"no reply from {garden.endpoint} within 0\.3 s"):
            await client.request(g.Stop())
        assert time.monotonic() - started > 0.25
        if timed:
            assert time.monotonic() - started < 1.0
        assert client.stats.timeouts == 1 and client.stats.sockets == 1
        garden.unresponsive = False
        assert isinstance(await client.request(g.GetTransportState()), g.TransportState)
        assert client.stats.sockets == 2  # the timed-out socket was replaced


async def test_simulator_restarted_on_the_same_port_is_reached_again(garden, gclient):
    await gclient.request(g.SetTempo(bpm=90.0))
    endpoint = garden.endpoint
    await garden.stop()
    with pytest.raises(GardenUnavailable):
        await gclient.request(g.Play())
    async with GardenSimServer(endpoint) as again:
        state = await gclient.request(g.GetTransportState())
        assert state.tempo == 120.0  # a fresh garden
        assert [type(m.content) for m in again.received] == [g.GetTransportState]


async def test_a_late_reply_never_answers_another_request(garden):
    async with GardenClient(GardenSettings(endpoint=garden.endpoint, timeout_s=60.0)) as client:
        await client.request(g.GetTransportState())  # connected: a send now goes out at once
        garden.hold()
        # The create gives up first; its reply then arrives while the status request
        # still waits on the same socket, and must not be taken for the status.
        create = asyncio.create_task(
            client.request(g.CreateRegion(position=0.0, duration=1.0, behavior=latent("j")), timeout=1.0)
        )
        await asyncio.sleep(0)  # the create's first step sends it
        status = asyncio.create_task(client.request(g.GetTransportState()))
        await until(lambda: len(garden.received) == 3, "both requests reaching the garden")
        assert [type(m.content) for m in garden.received[1:]] == [g.CreateRegion, g.GetTransportState]
        with pytest.raises(GardenUnavailable, match="no reply"):
            await create  # its reply is held back: it can only time out
        garden.release()
        assert isinstance(await status, g.TransportState)
        assert client.stats.late_replies == 1
        # the retired socket closed once its last request finished
        assert client.stats.sockets == 1 and not client._connections


async def test_a_cancelled_request_keeps_the_socket_and_its_reply_is_dropped(garden, gclient):
    garden.hold()
    task = asyncio.create_task(gclient.request(g.Play()))
    await until(lambda: len(garden.received) == 1, "the request reaching the garden")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    garden.release()
    await until(lambda: gclient.stats.late_replies == 1, "the late reply")
    assert isinstance(await gclient.request(g.GetTransportState()), g.TransportState)
    assert gclient.stats.sockets == 1 and gclient.stats.in_flight == 0


async def test_fifty_concurrent_requests_each_get_their_own_reply(garden, gclient):
    garden.latency_ms = 20

    async def create(i: int) -> tuple[int, uuid.UUID]:
        reply = await gclient.request(g.CreateRegion(position=float(i), duration=1.0, behavior=latent(f"job_{i}")))
        return i, reply.region_id

    async def status() -> g.ShellReply:
        return await gclient.request(g.GetTransportState())

    results = await asyncio.gather(*[create(i) for i in range(50)], *[status() for _ in range(10)])
    created, states = results[:50], results[50:]
    for i, region_id in created:
        region = garden.state.region(region_id)
        assert region["position"] == float(i) and region["behavior_body"] == {"job_id": f"job_{i}"}
    assert len({rid for _, rid in created}) == 50
    assert all(isinstance(s, g.TransportState) for s in states)
    assert gclient.stats.sockets == 1 and gclient.stats.late_replies == 0


async def test_a_lost_message_fails_only_its_own_request(garden):
    garden.drop_every = 3  # the 3rd request is never answered
    async with GardenClient(GardenSettings(endpoint=garden.endpoint, timeout_s=1.0)) as client:
        outcomes = await asyncio.gather(*[client.request(g.Play()) for _ in range(5)], return_exceptions=True)
    assert sum(isinstance(o, GardenUnavailable) for o in outcomes) == 1
    assert sum(isinstance(o, g.Ok) for o in outcomes) == 4


async def test_aclose_fails_waiting_and_later_requests(garden):
    client = GardenClient(GardenSettings(endpoint=garden.endpoint))
    await client.request(g.Play())
    garden.unresponsive = True
    waiting = asyncio.create_task(client.request(g.Stop()))
    await until(lambda: len(garden.received) == 2, "the request reaching the garden")
    await client.aclose()
    with pytest.raises(GardenUnavailable, match="closed"):
        await waiting
    with pytest.raises(GardenUnavailable, match="closed"):
        await client.request(g.Play())
    await client.aclose()  # idempotent


@TIMED
async def test_unreadable_replies_are_counted_and_never_mistaken_for_answers(timed):
    # A raw peer (not a garden): it answers the first request with garbage and then the
    # real reply, and the second with a reply of a variant this protocol does not know.
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def answer() -> None:
        identity, body = await router.recv_multipart()
        request = g.shell_request_codec.decode(body)
        await router.send_multipart([identity, b"\x93garbage"])
        reply = g.ShellReplyMessage.reply(request.header, g.Ok())
        await router.send_multipart([identity, g.shell_reply_codec.encode(reply, Encoding.COMPACT)])
        identity, body = await router.recv_multipart()
        request = g.shell_request_codec.decode(body)
        reply = g.ShellReplyMessage.reply(request.header, g.Ok())
        raw = msgspec.msgpack.decode(g.shell_reply_codec.encode(reply, Encoding.COMPACT))
        raw[-1] = ["tempo_map", [1, 2, 3]]  # a newer garden's reply
        await router.send_multipart([identity, msgspec.msgpack.encode(raw)])

    try:
        async with GardenClient(GardenSettings(endpoint=f"tcp://127.0.0.1:{port}", timeout_s=5.0)) as client:
            peer = asyncio.create_task(answer())
            assert isinstance(await client.request(g.Play()), g.Ok)
            started = time.monotonic()
            # a GardenError at all: failed on the reply, not GardenUnavailable at the timeout
            with pytest.raises(GardenError, match="unreadable reply from the garden"):
                await client.request(g.GetTransportState())
            if timed:
                assert time.monotonic() - started < 1.0
            await peer
            assert client.stats.bad_replies == 2 and client.stats.late_replies == 0
    finally:
        router.close(0)


async def test_requests_made_while_the_garden_starts_go_through_once_it_is_up():
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    async def start_later() -> GardenSimServer:
        await until(lambda: client.stats.in_flight == 50, "all 50 requests waiting for the garden")
        return await GardenSimServer(endpoint).start()

    async with GardenClient(GardenSettings(endpoint=endpoint, timeout_s=60.0), connect_timeout_s=30.0) as client:
        starting = asyncio.create_task(start_later())
        replies = await asyncio.gather(*[client.request(g.GetTransportState()) for _ in range(50)])
        garden = await starting
        try:
            assert all(isinstance(r, g.TransportState) for r in replies)
            assert len(garden.received) == 50
        finally:
            await garden.stop()
