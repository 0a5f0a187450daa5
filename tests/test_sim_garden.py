"""The chaosgarden simulator (``luanette-sim garden``): the state machine on its own,
then the ROUTER over real ZeroMQ on loopback, every message encoded with the hooteproto
codecs -- one compact MsgPack frame (with and without a delimiter) and HOOT01 + JSON."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Self

import msgspec
import pytest
import zmq
import zmq.asyncio

from hooteproto import frames
from hooteproto import garden as g
from hooteproto import types as t
from hooteproto.client import RequestTimeout
from hooteproto.codec import Encoding, payload_codec
from hooteproto.frames import Command, ContentType, Hoot01
from luanette.sim.cli import main as sim_main
from luanette.sim.garden import (
    GardenSimServer,
    GardenState,
    send_timeline_event,
    serve_in_thread,
)
from tests.waiting import TIMED, until

SESSION = uuid.uuid4()
AGENT = uuid.uuid4()
RECV_TIMEOUT = 30.0  # a hang guard for replies that must come


# -- helpers --------------------------------------------------------------------------


def latent(job: str = "job_1") -> g.Behavior:
    return g.Behavior.of(g.Latent(job))


def play(artifact: str = "artifact_1") -> g.Behavior:
    return g.Behavior.of(g.PlayContent(artifact))


def resolved(region_id: uuid.UUID, content_hash: str = "hash_1") -> g.UpdateLatentResolved:
    return g.UpdateLatentResolved(region_id, "artifact_gen", content_hash, g.ContentType.AUDIO)


def create(state: GardenState, behavior: g.Behavior, position: float = 0.0,
           duration: float = 4.0) -> uuid.UUID:
    reply = state.handle(g.CreateRegion(position, duration, behavior))
    assert isinstance(reply, g.RegionCreated), reply
    return reply.region_id


def ok(state: GardenState, request: g.ShellRequest) -> None:
    reply = state.handle(request)
    assert reply == g.Ok(), reply


def snapshot(state: GardenState) -> tuple:
    return state.transport(), state.regions(), state.pending()


def latent_at(state: GardenState, status: str) -> uuid.UUID:
    """A latent region driven to ``status`` by valid requests."""
    rid = create(state, latent())
    steps: dict[str, list[g.ShellRequest]] = {
        "pending": [],
        "running": [g.UpdateLatentStarted(rid, "job_1")],
        "failed": [g.UpdateLatentStarted(rid, "job_1"), g.UpdateLatentFailed(rid, "oom")],
        "resolved": [g.UpdateLatentStarted(rid, "job_1"), resolved(rid)],
        "approved": [g.UpdateLatentStarted(rid, "job_1"), resolved(rid),
                     g.ApproveLatent(rid, AGENT)],
        "rejected": [g.UpdateLatentStarted(rid, "job_1"), resolved(rid),
                     g.RejectLatent(rid, AGENT, "off key")],
    }
    for request in steps[status]:
        ok(state, request)
    assert state.region(rid)["latent"]["status"] == status
    return rid


def message(content: g.ShellRequest, **metadata: Any) -> g.ShellRequestMessage:
    m = g.ShellRequestMessage.new(content, session=SESSION)
    m.metadata.update(metadata)
    return m


class Peer:
    """A DEALER talking to the simulator the way each kind of client does."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(0)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> list[bytes]:
        return await asyncio.wait_for(self.sock.recv_multipart(), timeout)

    async def nothing_within(self, seconds: float) -> bool:
        try:
            await self.recv(seconds)
        except TimeoutError:
            return True
        return False

    async def frame(self, m: g.ShellRequestMessage, *, delimiter: bool = False,
                    encoding: Encoding = Encoding.COMPACT) -> g.ShellReplyMessage:
        """Send one body frame (as rmp_serde writes it), optionally after b""."""
        body = g.shell_request_codec.encode(m, encoding)
        await self.sock.send_multipart([b"", body] if delimiter else [body])
        reply = await self.recv()
        assert reply[:-1] == ([b""] if delimiter else []), "reply shape differs from request"
        return g.shell_reply_codec.decode(reply[-1], encoding)

    async def hoot(self, m: g.ShellRequestMessage, *, traceparent: str | None = None,
                   encoding: Encoding = Encoding.JSON) -> tuple[Hoot01, g.ShellReplyMessage]:
        """Send a HOOT01 Request carrying the Message; return the Reply and its body."""
        request = Hoot01(
            command=Command.REQUEST, content_type=frames.content_type_for(encoding),
            request_id=uuid.uuid4(), service="chaosgarden", traceparent=traceparent,
            body=g.shell_request_codec.encode(m, encoding),
        )
        await self.sock.send_multipart(request.to_frames())
        reply = frames.parse(await self.recv())
        assert reply.command is Command.REPLY
        assert reply.request_id == request.request_id
        assert reply.content_type is frames.content_type_for(encoding)
        assert reply.traceparent == traceparent
        return reply, g.shell_reply_codec.decode(reply.body, encoding)


@pytest.fixture
async def server() -> AsyncIterator[GardenSimServer]:
    sim = GardenSimServer()
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def peer(server: GardenSimServer) -> AsyncIterator[Peer]:
    p = Peer(server.endpoint)
    try:
        yield p
    finally:
        p.close()


# -- state machine: transport ---------------------------------------------------------


def test_transport_starts_stopped_at_zero_120_bpm():
    state = GardenState()
    assert state.transport() == {"state": "stopped", "playing": False, "position": 0.0,
                                 "tempo": 120.0}
    assert state.handle(g.GetTransportState()) == g.TransportState(False, 0.0, 120.0)


def test_play_pause_seek_stop_set_tempo():
    state = GardenState()
    ok(state, g.Seek(16.0))
    ok(state, g.Play())
    assert state.transport()["state"] == "playing"
    assert state.handle(g.GetTransportState()) == g.TransportState(True, 16.0, 120.0)
    ok(state, g.Pause())
    assert state.transport() == {"state": "paused", "playing": False, "position": 16.0,
                                 "tempo": 120.0}
    ok(state, g.SetTempo(96.5))
    assert state.handle(g.GetTransportState()) == g.TransportState(False, 16.0, 96.5)
    ok(state, g.Stop())  # rewinds, keeps the tempo
    assert state.transport() == {"state": "stopped", "playing": False, "position": 0.0,
                                 "tempo": 96.5}


# -- state machine: regions -----------------------------------------------------------


def test_create_region_returns_a_new_uuid_and_records_behavior():
    state = GardenState()
    a = create(state, play("artifact_a"), 0.0, 8.0)
    b = create(state, latent("job_b"), 8.0, 4.0)
    assert a != b
    assert [r["region_id"] for r in state.regions()] == [str(a), str(b)]
    ra = state.region(a)
    assert ra["behavior"] == "play_content" and ra["behavior_body"] == {"artifact_id": "artifact_a"}
    assert ra["is_latent"] is False and ra["latent"] is None
    assert ra["playable"] is True and ra["plays"] == "artifact_a"
    rb = state.region(str(b))  # by string too
    assert rb["behavior_body"] == {"job_id": "job_b"} and rb["is_latent"] is True
    assert rb["latent"]["status"] == "pending" and rb["playable"] is False
    assert state.region(uuid.uuid4()) is None and state.region("not-a-uuid") is None


def test_move_and_delete_region():
    state = GardenState()
    a = create(state, play())
    b = create(state, play("other"))
    ok(state, g.MoveRegion(a, 32.0))
    assert state.region(a)["position"] == 32.0
    ok(state, g.DeleteRegion(a))
    assert state.region(a) is None
    assert [r["region_id"] for r in state.regions()] == [str(b)]


def test_get_regions_all_and_by_range_start_inclusive_end_exclusive():
    state = GardenState()
    ids = [create(state, play(f"a{i}"), position=p) for i, p in enumerate((0.0, 4.0, 8.0))]
    everything = state.handle(g.GetRegions())
    assert isinstance(everything, g.Regions)
    assert [r.region_id for r in everything.regions] == ids
    assert everything.regions[1] == g.RegionSummary(ids[1], 4.0, 4.0, False, "a1")
    window = state.handle(g.GetRegions(range=(4.0, 8.0)))
    assert [r.region_id for r in window.regions] == [ids[1]]
    assert state.handle(g.GetRegions(range=(100.0, 200.0))) == g.Regions(regions=[])


# -- state machine: latent lifecycle and approvals ------------------------------------


def test_latent_lifecycle_to_approval():
    state = GardenState()
    rid = create(state, latent("job_7"), 16.0, 8.0)
    ok(state, g.UpdateLatentStarted(rid, "job_7b"))
    view = state.region(rid)["latent"]
    assert view["status"] == "running" and view["job_id"] == "job_7b"
    ok(state, g.UpdateLatentProgress(rid, 0.5))
    ok(state, g.UpdateLatentProgress(rid, 0.25))  # need not grow
    assert state.region(rid)["latent"]["progress"] == 0.25
    assert state.pending() == []

    ok(state, g.UpdateLatentResolved(rid, "artifact_gen", "hash_gen", g.ContentType.MIDI))
    view = state.region(rid)
    assert view["latent"]["status"] == "resolved" and view["latent"]["progress"] == 1.0
    assert view["playable"] is False  # not before approval
    [pending] = state.pending()
    assert pending["region_id"] == str(rid)
    assert (pending["artifact_id"], pending["content_hash"], pending["content_type"]) == (
        "artifact_gen", "hash_gen", "midi")
    reply = state.handle(g.GetPendingApprovals())
    assert isinstance(reply, g.PendingApprovals)
    assert reply.approvals[0].region_id == rid
    assert reply.approvals[0].content_hash == "hash_gen"
    assert reply.approvals[0].resolved_at.endswith("Z")

    ok(state, g.ApproveLatent(rid, AGENT))
    assert state.pending() == []
    assert state.handle(g.GetPendingApprovals()) == g.PendingApprovals(approvals=[])
    view = state.region(rid)
    assert view["latent"]["status"] == "approved"
    assert view["latent"]["decided_by"] == str(AGENT)
    assert view["playable"] is True and view["plays"] == "hash_gen"
    # as upstream: still a latent region on the wire, reporting its resolved artifact
    [summary] = state.handle(g.GetRegions()).regions
    assert summary == g.RegionSummary(rid, 16.0, 8.0, True, "artifact_gen")


def test_reject_keeps_the_region_recorded_as_rejected():
    state = GardenState()
    rid = latent_at(state, "resolved")
    ok(state, g.RejectLatent(rid, AGENT, "off key"))
    assert state.pending() == []
    view = state.region(rid)
    assert view["latent"]["status"] == "rejected"
    assert view["latent"]["reason"] == "off key"
    assert view["latent"]["decided_by"] == str(AGENT)
    assert view["playable"] is False and view["plays"] is None


def test_failed_latent_records_error_and_may_be_retried():
    state = GardenState()
    rid = latent_at(state, "failed")
    assert state.region(rid)["latent"]["error"] == "oom"
    ok(state, g.UpdateLatentStarted(rid, "job_retry"))
    view = state.region(rid)["latent"]
    assert (view["status"], view["job_id"], view["error"]) == ("running", "job_retry", None)
    # a job may also fail before it ever started
    other = create(state, latent())
    ok(state, g.UpdateLatentFailed(other, "submission refused"))
    assert state.region(other)["latent"]["status"] == "failed"


def test_deleting_a_pending_region_removes_its_approval():
    state = GardenState()
    rid = latent_at(state, "resolved")
    assert len(state.pending()) == 1
    ok(state, g.DeleteRegion(rid))
    assert state.pending() == []
    assert state.handle(g.ApproveLatent(rid, AGENT)) == g.Error(f"region {rid} not found")


def test_history_records_every_request_refused_ones_too():
    state = GardenState()
    state.handle(g.Play())
    state.handle(g.SetTempo(-1.0))
    assert state.history == [g.Play(), g.SetTempo(-1.0)]
    assert [type(reply) for _, reply in state.exchanges()] == [g.Ok, g.Error]


# -- state machine: refusals change nothing -------------------------------------------

NOWHERE = uuid.UUID(int=7)

# (name, setup status of a latent region or None, request built from its id, words the
# error must contain)
REFUSALS: list[tuple[str, str | None, Callable[[uuid.UUID], Any], tuple[str, ...]]] = [
    ("progress before started", "pending", lambda r: g.UpdateLatentProgress(r, 0.5),
     ("progress", "pending", "running")),
    ("resolve before started", "pending", resolved, ("resolved", "pending")),
    ("resolve twice", "resolved", resolved, ("resolved refused", "is resolved")),
    ("resolve after approval", "approved", resolved, ("resolved", "approved")),
    ("start twice", "running", lambda r: g.UpdateLatentStarted(r, "j"), ("started", "running")),
    ("start after resolve", "resolved", lambda r: g.UpdateLatentStarted(r, "j"), ("started",)),
    ("progress after failure", "failed", lambda r: g.UpdateLatentProgress(r, 0.1),
     ("progress", "failed")),
    ("fail after resolve", "resolved", lambda r: g.UpdateLatentFailed(r, "x"),
     ("failed refused", "resolved")),
    ("approve while running", "running", lambda r: g.ApproveLatent(r, AGENT),
     ("approve", "running", "not pending approval")),
    ("approve while pending", "pending", lambda r: g.ApproveLatent(r, AGENT),
     ("approve", "not pending approval")),
    ("approve twice", "approved", lambda r: g.ApproveLatent(r, AGENT), ("approve", "approved")),
    ("approve after reject", "rejected", lambda r: g.ApproveLatent(r, AGENT),
     ("approve", "rejected")),
    ("reject after approve", "approved", lambda r: g.RejectLatent(r, AGENT, None),
     ("reject", "approved")),
    ("reject a failed job", "failed", lambda r: g.RejectLatent(r, AGENT, "no"), ("reject",)),
    ("progress above 1", "running", lambda r: g.UpdateLatentProgress(r, 1.5), ("0..1",)),
    ("progress below 0", "running", lambda r: g.UpdateLatentProgress(r, -0.1), ("0..1",)),
    ("progress NaN", "running", lambda r: g.UpdateLatentProgress(r, math.nan), ("0..1",)),
    ("tempo zero", None, lambda _: g.SetTempo(0.0), ("tempo",)),
    ("tempo negative", None, lambda _: g.SetTempo(-120.0), ("tempo",)),
    ("tempo infinite", None, lambda _: g.SetTempo(math.inf), ("tempo",)),
    ("tempo NaN", None, lambda _: g.SetTempo(math.nan), ("tempo",)),
    ("seek negative", None, lambda _: g.Seek(-1.0), ("seek position",)),
    ("seek NaN", None, lambda _: g.Seek(math.nan), ("seek position",)),
    ("region at negative beat", None, lambda _: g.CreateRegion(-4.0, 4.0, play()),
     ("region position",)),
    ("region of infinite length", None, lambda _: g.CreateRegion(0.0, math.inf, play()),
     ("region duration",)),
    ("move to negative beat", "pending", lambda r: g.MoveRegion(r, -2.0), ("new position",)),
]
REFUSALS += [
    (f"{name} of an unknown region", None, lambda _, build=build: build(NOWHERE),
     (str(NOWHERE), "not found"))
    for name, build in [
        ("delete", g.DeleteRegion),
        ("move", lambda r: g.MoveRegion(r, 1.0)),
        ("started", lambda r: g.UpdateLatentStarted(r, "j")),
        ("progress", lambda r: g.UpdateLatentProgress(r, 0.5)),
        ("resolved", resolved),
        ("failed", lambda r: g.UpdateLatentFailed(r, "x")),
        ("approve", lambda r: g.ApproveLatent(r, AGENT)),
        ("reject", lambda r: g.RejectLatent(r, AGENT, None)),
    ]
]


@pytest.mark.parametrize(("setup", "build", "words"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refused_request_answers_error_and_changes_nothing(setup, build, words):
    state = GardenState()
    create(state, play(), 64.0)  # a bystander region
    ok(state, g.Seek(8.0))
    rid = latent_at(state, setup) if setup is not None else NOWHERE
    before = snapshot(state)
    reply = state.handle(build(rid))
    assert isinstance(reply, g.Error), reply
    for word in words:
        assert word in reply.error, (word, reply.error)
    if setup is not None:
        assert str(rid) in reply.error
    assert snapshot(state) == before


@pytest.mark.parametrize("build", [
    lambda r: g.UpdateLatentStarted(r, "j"),
    lambda r: g.UpdateLatentProgress(r, 0.5),
    resolved,
    lambda r: g.UpdateLatentFailed(r, "x"),
    lambda r: g.ApproveLatent(r, AGENT),
    lambda r: g.RejectLatent(r, AGENT, None),
], ids=["started", "progress", "resolved", "failed", "approve", "reject"])
def test_latent_update_on_a_non_latent_region_is_refused(build):
    state = GardenState()
    rid = create(state, play())
    before = snapshot(state)
    reply = state.handle(build(rid))
    assert isinstance(reply, g.Error)
    assert f"region {rid} is not latent (behavior play_content)" in reply.error
    assert snapshot(state) == before


UNSUPPORTED = [
    g.AddNode(g.NodeDescriptor("osc", "sine", {"freq": 440})),
    g.RemoveNode(uuid.uuid4()),
    g.Connect(g.PortRef(uuid.uuid4(), "out"), g.PortRef(uuid.uuid4(), "in")),
    g.Disconnect(g.PortRef(uuid.uuid4(), "out"), g.PortRef(uuid.uuid4(), "in")),
    g.RegisterParticipant(g.Participant(uuid.uuid4(), "claude", ["approve"])),
    g.UpdateParticipant(uuid.uuid4(), g.ParticipantUpdate(name="c")),
]


@pytest.mark.parametrize("request_", UNSUPPORTED, ids=lambda r: type(r).__name__)
def test_unmodelled_requests_answer_not_supported(request_):
    state = GardenState()
    before = snapshot(state)
    reply = state.handle(request_)
    tag = type(request_).__struct_config__.tag
    assert reply == g.Error(f"{tag} is not supported by the simulator")
    assert snapshot(state) == before


def test_requests_and_queries_hold_the_state_lock():
    """The contract that makes reading ``server.state`` from a test thread safe: while
    the lock is held elsewhere, neither a request nor a query gets in."""
    state = GardenState()
    done: list[str] = []
    workers = [
        threading.Thread(target=lambda: done.append(type(state.handle(g.Play())).__name__)),
        threading.Thread(target=lambda: done.append(f"regions={len(state.regions())}")),
    ]
    with state._lock:
        for w in workers:
            w.start()
        time.sleep(0.05)  # time for either to get in, if the lock let it
        assert done == []  # both are waiting for the lock
        assert state.transport()["playing"] is False  # re-entrant for the holder
    for w in workers:
        w.join(30)
    assert sorted(done) == ["Ok", "regions=0"]
    assert state.transport()["playing"] is True


# -- server: wire shapes --------------------------------------------------------------


async def test_endpoint_is_resolved_from_port_zero(server):
    assert server.endpoint.startswith("tcp://127.0.0.1:")
    assert int(server.endpoint.rsplit(":", 1)[1]) > 0


def lifecycle() -> Iterator[tuple[Callable[[dict], g.ShellRequest], type]]:
    """Every modelled request, in an order that succeeds; ``ids`` carries the region id
    of the CreateRegion replies."""
    yield lambda ids: g.SetTempo(132.0), g.Ok
    yield lambda ids: g.Seek(4.0), g.Ok
    yield lambda ids: g.Play(), g.Ok
    yield lambda ids: g.Pause(), g.Ok
    yield lambda ids: g.GetTransportState(), g.TransportState
    yield lambda ids: g.Stop(), g.Ok
    yield lambda ids: g.CreateRegion(0.0, 4.0, play("artifact_a")), g.RegionCreated
    yield lambda ids: g.CreateRegion(8.0, 8.0, latent("job_l")), g.RegionCreated
    yield lambda ids: g.CreateRegion(16.0, 8.0, latent("job_r")), g.RegionCreated
    yield lambda ids: g.MoveRegion(ids[0], 2.0), g.Ok
    yield lambda ids: g.GetRegions(range=(0.0, 10.0)), g.Regions
    yield lambda ids: g.UpdateLatentStarted(ids[1], "job_l"), g.Ok
    yield lambda ids: g.UpdateLatentProgress(ids[1], 0.75), g.Ok
    yield lambda ids: resolved(ids[1], "hash_l"), g.Ok
    yield lambda ids: g.UpdateLatentStarted(ids[2], "job_r"), g.Ok
    yield lambda ids: resolved(ids[2], "hash_r"), g.Ok
    yield lambda ids: g.GetPendingApprovals(), g.PendingApprovals
    yield lambda ids: g.ApproveLatent(ids[1], AGENT), g.Ok
    yield lambda ids: g.RejectLatent(ids[2], AGENT, "too loud"), g.Ok
    yield lambda ids: g.CreateRegion(32.0, 4.0, latent("job_f")), g.RegionCreated
    yield lambda ids: g.UpdateLatentFailed(ids[3], "gpu on fire"), g.Ok
    yield lambda ids: g.DeleteRegion(ids[0]), g.Ok
    yield lambda ids: g.GetRegions(), g.Regions


SHAPES = ["compact", "compact+delimiter", "named", "json-frame", "hoot01+json",
          "hoot01+msgpack"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_every_modelled_request_over_the_wire(server, peer, shape):
    ids: list[uuid.UUID] = []
    for build, expected in lifecycle():
        m = message(build(ids))
        if shape.startswith("hoot01"):
            enc = Encoding.JSON if shape == "hoot01+json" else Encoding.COMPACT
            _, reply = await peer.hoot(m, encoding=enc, traceparent=f"00-{'a' * 32}-{'b' * 16}-01")
        else:
            enc = {"named": Encoding.NAMED, "json-frame": Encoding.JSON}.get(shape, Encoding.COMPACT)
            reply = await peer.frame(m, delimiter=shape == "compact+delimiter", encoding=enc)
        assert isinstance(reply.content, expected), (m.content, reply.content)
        assert reply.parent_header == m.header
        assert reply.header.session == SESSION and reply.header.msg_type == "shell_reply"
        assert reply.header.msg_id != m.header.msg_id
        if isinstance(reply.content, g.RegionCreated):
            ids.append(reply.content.region_id)
        if isinstance(reply.content, g.TransportState):
            assert reply.content == g.TransportState(False, 4.0, 132.0)
    # the state the wire built, seen from the test
    assert server.state.transport() == {"state": "stopped", "playing": False,
                                        "position": 0.0, "tempo": 132.0}
    regions = {r["region_id"]: r for r in server.state.regions()}
    assert list(regions) == [str(i) for i in ids[1:]]
    assert regions[str(ids[1])]["latent"]["status"] == "approved"
    assert regions[str(ids[1])]["plays"] == "hash_l"
    assert regions[str(ids[2])]["latent"]["status"] == "rejected"
    assert regions[str(ids[3])]["latent"]["error"] == "gpu on fire"
    assert server.state.pending() == []
    assert len(server.received) == len(list(lifecycle()))
    assert not any(isinstance(r, g.Error) for _, r in server.state.exchanges())


async def test_reply_echoes_shape_and_the_log_records_it(server, peer):
    traceparent = f"00-{'1' * 32}-{'2' * 16}-01"
    await peer.frame(message(g.Play(), traceparent=traceparent))
    await peer.frame(message(g.Pause()), delimiter=True)
    hoot, reply = await peer.hoot(message(g.Stop()), traceparent=traceparent)
    assert hoot.service == "chaosgarden" and hoot.body.startswith(b"{")
    assert json.loads(hoot.body)["content"] == {"type": "ok", "result": None}
    assert server.received[0].metadata["traceparent"] == traceparent
    assert [(r.wire, r.encoding, r.delimited) for r in server.log] == [
        ("frame", Encoding.COMPACT, False),
        ("frame", Encoding.COMPACT, True),
        ("hoot01", Encoding.JSON, False),
    ]
    assert server.log[2].traceparent == traceparent
    assert server.log[2].reply == reply


async def test_refused_request_over_the_wire_is_an_error_reply(server, peer):
    reply = await peer.frame(message(g.ApproveLatent(NOWHERE, AGENT)))
    assert reply.content == g.Error(f"region {NOWHERE} not found")
    _, reply = await peer.hoot(message(g.AddNode(g.NodeDescriptor("n", "t", None))))
    assert reply.content == g.Error("add_node is not supported by the simulator")


async def test_heartbeat_is_answered(server, peer):
    beat = Hoot01(command=Command.HEARTBEAT, request_id=uuid.uuid4(), service="x")
    await peer.sock.send_multipart(beat.to_frames())
    back = frames.parse(await peer.recv())
    assert back.command is Command.HEARTBEAT and back.request_id == beat.request_id
    assert server.received == []


# -- server: bad input ----------------------------------------------------------------


def corrupt_content(body: bytes, encoding: Encoding) -> bytes:
    """The same message with a content tag no ShellRequest has (header intact)."""
    if encoding is Encoding.JSON:
        raw = json.loads(body)
        raw["content"] = {"type": "warp_drive"}
        return json.dumps(raw).encode()
    raw = msgspec.msgpack.decode(body)
    if isinstance(raw, list):
        raw[-1] = ["warp_drive"]
    else:
        raw["content"] = {"type": "warp_drive"}
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize("encoding", [Encoding.COMPACT, Encoding.NAMED, Encoding.JSON])
async def test_undecodable_body_with_a_readable_header_gets_an_error_reply(server, peer,
                                                                          encoding):
    m = message(g.Play())
    bad = corrupt_content(g.shell_request_codec.encode(m, encoding), encoding)
    await peer.sock.send_multipart([bad])
    reply = g.shell_reply_codec.decode((await peer.recv())[-1], encoding)
    assert isinstance(reply.content, g.Error)
    assert "cannot decode shell request" in reply.content.error
    assert reply.parent_header == m.header
    assert server.state.history == [] and server.received == []


async def test_undecodable_hoot01_json_body_gets_an_error_reply(server, peer):
    m = message(g.Play())
    request = Hoot01(command=Command.REQUEST, content_type=ContentType.JSON,
                     request_id=uuid.uuid4(),
                     body=corrupt_content(g.shell_request_codec.encode(m, Encoding.JSON),
                                          Encoding.JSON))
    await peer.sock.send_multipart(request.to_frames())
    reply = frames.parse(await peer.recv())
    assert reply.request_id == request.request_id
    decoded = g.shell_reply_codec.decode(reply.body, Encoding.JSON)
    assert decoded.parent_header == m.header and isinstance(decoded.content, g.Error)
    assert server.state.transport()["state"] == "stopped"


GARBAGE = {
    "random bytes": [b"\xc1\xff\x00garbage"],
    "empty frame": [b""],
    "msgpack int": [msgspec.msgpack.encode(42)],
    "truncated compact": [g.shell_request_codec.encode(message(g.Play()), Encoding.COMPACT)[:9]],
    "json without header": [b'{"content": {"type": "play"}}'],
    "two body frames": [b"a", b"b", b"c"],
    "hoot01 short": [frames.PROTOCOL, b"\x00\x02"],
    "hoot01 bad command": [frames.PROTOCOL, b"\x00\x63", b"\x00\x03", uuid.uuid4().bytes,
                           b"", b"", b"{}"],
    "hoot01 empty content": Hoot01(command=Command.REQUEST, request_id=uuid.uuid4(),
                                   body=b"{}").to_frames(),
    "hoot01 json garbage": Hoot01(command=Command.REQUEST, content_type=ContentType.JSON,
                                  request_id=uuid.uuid4(), body=b"{nope").to_frames(),
    "hoot01 reply": Hoot01(command=Command.REPLY, content_type=ContentType.JSON,
                           request_id=uuid.uuid4(), body=b"{}").to_frames(),
}


async def test_garbage_is_dropped_and_the_server_keeps_answering(server, peer):
    for name, garbage in GARBAGE.items():
        dropped = server.dropped
        await peer.sock.send_multipart(garbage)
        reply = await peer.frame(message(g.GetTransportState()))  # still alive
        assert isinstance(reply.content, g.TransportState), name
        assert server.dropped == dropped + 1, name
    assert server.state.history == [g.GetTransportState()] * len(GARBAGE)


# -- server: switches -----------------------------------------------------------------


@TIMED
async def test_latency_delays_replies_without_serialising_them(server, peer, timed):
    server.latency_ms = 150
    t0 = time.monotonic()
    await peer.frame(message(g.Play()))
    assert time.monotonic() - t0 >= 0.14
    assert server.state.transport()["playing"] is True  # applied on arrival
    t0 = time.monotonic()
    for _ in range(5):
        await peer.sock.send_multipart([g.shell_request_codec.encode(message(g.Play()),
                                                                     Encoding.COMPACT)])
    for _ in range(5):
        await peer.recv()
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.14
    if timed:
        assert elapsed < 0.6, elapsed  # 5 x 150 ms in parallel, not 750 ms


async def test_hold_keeps_replies_back_until_release_then_sends_them_in_order(server, peer):
    server.hold()
    assert server.holding
    for bpm in (90.0, 100.0):
        await peer.sock.send_multipart([g.shell_request_codec.encode(message(g.SetTempo(bpm=bpm)),
                                                                     Encoding.COMPACT)])
    await until(lambda: len(server.received) == 2, "both requests arriving")
    assert server.state.transport()["tempo"] == 100.0  # applied on arrival
    beat = Hoot01(command=Command.HEARTBEAT, request_id=uuid.uuid4(), service="chaosgarden")
    await peer.sock.send_multipart(beat.to_frames())
    assert frames.parse(await peer.recv()).command is Command.HEARTBEAT  # not held
    assert server.replies == 1
    server.release()
    assert not server.holding
    replies = [g.shell_reply_codec.decode((await peer.recv())[-1]) for _ in range(2)]
    assert [r.parent_header for r in replies] == [m.header for m in server.received]
    assert await peer.frame(message(g.Play())) is not None  # released for good


async def test_drop_every_leaves_every_nth_request_unanswered_and_unapplied(server, peer):
    server.drop_every = 2
    first = await peer.frame(message(g.Seek(1.0)))
    assert first.content == g.Ok()
    await peer.sock.send_multipart([g.shell_request_codec.encode(message(g.Seek(2.0)),
                                                                 Encoding.COMPACT)])
    assert await peer.nothing_within(0.3)
    assert server.state.transport()["position"] == 1.0
    third = await peer.frame(message(g.Seek(3.0)))
    assert third.parent_header == server.received[2].header
    assert len(server.received) == 3 and server.state.transport()["position"] == 3.0


async def test_unresponsive_answers_nothing(server, peer):
    server.unresponsive = True
    await peer.sock.send_multipart([g.shell_request_codec.encode(message(g.Play()),
                                                                 Encoding.COMPACT)])
    assert await peer.nothing_within(0.3)
    assert len(server.received) == 1 and server.state.history == []
    server.unresponsive = False
    reply = await peer.frame(message(g.GetTransportState()))
    assert reply.content == g.TransportState(False, 0.0, 120.0)


async def test_stop_then_the_port_is_free_again(server):
    endpoint = server.endpoint
    await server.stop()
    again = GardenSimServer(endpoint)
    await again.start()
    try:
        assert again.endpoint == endpoint
    finally:
        await again.stop()


def test_serve_in_thread_answers_a_blocking_client_and_exposes_state():
    with serve_in_thread(latency_ms=0) as sim:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        sock.connect(sim.endpoint)
        try:
            m = message(g.CreateRegion(4.0, 4.0, latent()))
            sock.send(g.shell_request_codec.encode(m, Encoding.COMPACT))
            reply = g.shell_reply_codec.decode(sock.recv())
        finally:
            sock.close(0)
        assert isinstance(reply.content, g.RegionCreated)
        assert sim.state.region(reply.content.region_id)["position"] == 4.0
        assert sim.received[0].header == m.header
        endpoint = sim.endpoint
    # the thread stopped and released the port
    with serve_in_thread(endpoint) as again:
        assert again.endpoint == endpoint


def test_serve_in_thread_reports_a_bind_failure():
    with pytest.raises(zmq.ZMQError), serve_in_thread("tcp://256.0.0.1:1"):
        pass


# -- garden -> Luanette ---------------------------------------------------------------


class TinyLuanette:
    """A ROUTER answering every HOOT01 Request with ``answer(payload)``, in a thread."""

    def __init__(self, answer: Callable[[t.Payload], t.Payload] | None) -> None:
        self.answer = answer
        self.seen: list[tuple[Hoot01, t.Payload]] = []
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            route, msg = frames.split_route(self.sock.recv_multipart())
            request = frames.parse(msg)
            payload = payload_codec.decode(request.body, request.body_encoding())
            self.seen.append((request, payload))
            if self.answer is None:
                continue
            reply = Hoot01(command=Command.REPLY, content_type=ContentType.JSON,
                           request_id=request.request_id,
                           body=payload_codec.encode(self.answer(payload), Encoding.JSON))
            self.sock.send_multipart(route + reply.to_frames())


def echo_success(p: t.Payload) -> t.Payload:
    return t.Success(result={"job_id": "job_42", "echo": msgspec.to_builtins(p)})


async def test_send_timeline_event_sends_a_timeline_event_and_returns_the_reply():
    with TinyLuanette(echo_success) as lua:
        reply = await send_timeline_event(
            lua.endpoint, "generate_transition", 32.0, 120.0, {"from": "a", "to": "b"},
            traceparent=f"00-{'c' * 32}-{'d' * 16}-01",
        )
    assert isinstance(reply, t.Success) and reply.result["job_id"] == "job_42"
    [(hoot, payload)] = lua.seen
    assert payload == t.TimelineEvent(t.TimelineEventType.GENERATE_TRANSITION, 32.0, 120.0,
                                      {"from": "a", "to": "b"})
    assert hoot.traceparent == f"00-{'c' * 32}-{'d' * 16}-01"


async def test_send_timeline_event_times_out_and_rejects_unknown_types():
    with TinyLuanette(None) as lua:
        with pytest.raises(RequestTimeout):
            await send_timeline_event(lua.endpoint, t.TimelineEventType.CUE_POINT, 1.0, 90.0,
                                      {}, timeout=0.2)
        with pytest.raises(ValueError):
            await send_timeline_event(lua.endpoint, "explode", 1.0, 90.0, {})


async def test_send_timeline_event_to_a_real_luanette_daemon(server_daemon):
    reply = await send_timeline_event(server_daemon.endpoint, "cue_point", 8.0, 100.0,
                                      {"name": "verse"})
    assert isinstance(reply, t.Success)
    assert reply.result["matched"] is False  # no trigger rules configured


@pytest.fixture
async def server_daemon(make_server):
    return await make_server()


# -- CLI ------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luanette.sim.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_garden_prints_listening_serves_and_exits_0_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "luanette.sim.cli", "garden",
                             "--port", "0", "--tempo", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening tcp://127.0.0.1:"), line
        endpoint = line.split(" ", 1)[1]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        sock.connect(endpoint)
        try:
            sock.send_multipart([b"", g.shell_request_codec.encode(
                message(g.GetTransportState()), Encoding.COMPACT)])
            delimiter, body = sock.recv_multipart()
        finally:
            sock.close(0)
        assert delimiter == b""
        assert g.shell_reply_codec.decode(body).content == g.TransportState(False, 0.0, 90.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_garden_refuses_bind_with_host_port(capsys):
    assert sim_main(["garden", "--bind", "tcp://127.0.0.1:0", "--port", "5"]) == 2
    assert "either --bind or --host/--port" in capsys.readouterr().err


def test_cli_garden_refuses_a_bad_tempo(capsys):
    assert sim_main(["garden", "--tempo", "0"]) == 2
    assert "tempo must be a finite number of BPM > 0" in capsys.readouterr().err


def test_cli_garden_reports_an_unbindable_endpoint(capsys):
    assert sim_main(["garden", "--bind", "tcp://256.0.0.1:1"]) == 1
    assert "cannot bind tcp://256.0.0.1:1" in capsys.readouterr().err


def test_cli_timeline_event_prints_the_success_reply_and_exits_0():
    with TinyLuanette(echo_success) as lua:
        done = run_cli("timeline-event", "--luanette", lua.endpoint,
                       "--type", "generate_transition", "--position", "32",
                       "--tempo", "120", "--metadata", '{"from": "cas:a", "to": "cas:b"}')
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["type"] == "success" and reply["result"]["job_id"] == "job_42"
    assert reply["result"]["echo"] == {"type": "timeline_event",
                                       "event_type": "generate_transition",
                                       "position_beats": 32.0, "tempo": 120.0,
                                       "metadata": {"from": "cas:a", "to": "cas:b"}}


def test_cli_timeline_event_exits_1_on_error_and_on_timeout(capsys):
    def refuse(_: t.Payload) -> t.Payload:
        return t.Error(code="no_rule", message="no trigger rule matches")

    with TinyLuanette(refuse) as lua:
        code = sim_main(["timeline-event", "--luanette", lua.endpoint, "--type", "cue_point",
                         "--position", "4", "--encoding", "json"])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert out == {"type": "error", "code": "no_rule", "message": "no trigger rule matches",
                   "details": None}
    assert lua.seen[0][1].event_type is t.TimelineEventType.CUE_POINT
    assert lua.seen[0][0].content_type is ContentType.JSON

    with TinyLuanette(None) as silent:
        code = sim_main(["timeline-event", "--luanette", silent.endpoint, "--type", "cue_point",
                         "--position", "4", "--timeout", "0.2"])
    assert code == 1
    assert "no reply" in capsys.readouterr().err


def test_cli_timeline_event_rejects_bad_metadata_json(capsys):
    with pytest.raises(SystemExit) as exit_:
        sim_main(["timeline-event", "--luanette", "tcp://127.0.0.1:1", "--type", "cue_point",
                  "--position", "4", "--metadata", "{nope"])
    assert exit_.value.code == 2
    assert "not JSON" in capsys.readouterr().err
