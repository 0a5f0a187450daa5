"""luanette.zmqloop.LoopSocket over real sockets on loopback: batches, the end-of-turn
flush, refused sends, and no message left unseen when sends take the descriptor's
signal."""

from __future__ import annotations

import asyncio
import errno
import select
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq

from luanette.zmqloop import LoopSocket, Outbox



@pytest.fixture
async def pair() -> AsyncIterator[tuple[LoopSocket, zmq.Socket[Any]]]:
    """A ROUTER served by a LoopSocket, and a plain DEALER connected to it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    io = LoopSocket(router)
    try:
        yield io, dealer
    finally:
        io.close()
        router.close(0)
        dealer.close(0)
        ctx.term()


async def test_receive_waits_for_a_message_and_takes_at_most_its_limit(pair: Any) -> None:
    io, dealer = pair
    assert io.receive_now(10) == []
    for n in range(5):
        dealer.send(b"%d" % n)
    got: list[list[bytes]] = []
    while len(got) < 5:
        batch = await asyncio.wait_for(io.receive(3), 30)
        assert 1 <= len(batch) <= 3
        got += batch
    assert got == [[b"peer", b"%d" % n] for n in range(5)]


async def test_what_is_sent_in_one_turn_goes_at_its_end_in_order(pair: Any) -> None:
    io, dealer = pair
    dealer.send(b"hello")
    (route, _), = await asyncio.wait_for(io.receive(1), 30)
    for n in range(3):
        io.send_soon([route, b"%d" % n])
    assert dealer.poll(0) == 0  # nothing yet: the turn has not ended
    await asyncio.sleep(0)
    assert [dealer.recv() for _ in range(3)] == [b"0", b"1", b"2"]


async def test_a_send_the_socket_refuses_goes_to_on_failed(pair: Any) -> None:
    io, _ = pair
    failed: list[tuple[list[bytes], int]] = []
    io.on_failed = lambda frames, error: failed.append((frames, error.errno))
    io.send_soon([b"nobody", b"x"])
    io.flush()
    assert failed == [([b"nobody", b"x"], errno.EHOSTUNREACH)]
    with pytest.raises(zmq.ZMQError):
        io.send_now([b"nobody", b"y"])


async def test_no_message_is_missed_while_sends_take_the_signal(pair: Any) -> None:
    # The peer answers every message it gets with two; the loop sends as it receives.
    # Were a receive to wait on a signal a send had taken, this would hang (the wait_for
    # turns that into a failure instead).
    io, dealer = pair
    dealer.send(b"start")
    (route, _), = await asyncio.wait_for(io.receive(1), 30)
    total = 0
    for round_ in range(200):
        io.send_now([route, b"%d" % round_])
        assert dealer.poll(30_000)
        dealer.recv()
        dealer.send(b"a")
        dealer.send(b"b")
        got = 0
        while got < 2:
            got += len(await asyncio.wait_for(io.receive(64), 30))
        total += got
    assert total == 400


async def test_a_send_that_takes_the_signal_of_a_waiting_message_wakes_the_receiver(pair: Any) -> None:
    # The exact case: a receive waits; a message arrives and signals the descriptor;
    # before the loop looks, a send processes the socket's commands, which clears the
    # signal.  Only the send's own look at the socket's events can wake the receive.
    io, dealer = pair
    dealer.send(b"start")
    (route, _), = await asyncio.wait_for(io.receive(1), 30)
    waiting = asyncio.ensure_future(io.receive(1))
    await asyncio.sleep(0)  # (the receive runs until it waits)
    assert not waiting.done()
    dealer.send(b"x")
    fd = io.sock.getsockopt(zmq.FD)
    assert select.select([fd], [], [], 30)[0]  # signalled, and the loop has not looked
    # libzmq processes commands on a send at most once a millisecond or so: let one pass
    time.sleep(0.005)
    io.send_now([route, b"y"])
    assert await asyncio.wait_for(waiting, 30) == [[b"peer", b"x"]]


async def test_an_outbox_sends_a_turns_frames_as_one_message_or_at_its_limit(pair: Any) -> None:
    io, dealer = pair
    dealer.send(b"hello")
    (route, _), = await asyncio.wait_for(io.receive(1), 30)
    outbox = Outbox(lambda frames: io.send_now([route, *frames]), flush_at=3)
    outbox.put(b"a")
    outbox.put(b"b")
    assert len(outbox) == 2 and dealer.poll(0) == 0  # held to the end of the turn
    await asyncio.sleep(0)
    assert dealer.recv_multipart() == [b"a", b"b"]
    for frame in (b"c", b"d", b"e"):  # the limit: sent at once, within the turn
        outbox.put(frame)
    assert len(outbox) == 0
    assert dealer.poll(10_000) and dealer.recv_multipart() == [b"c", b"d", b"e"]
    await asyncio.sleep(0)  # the flush scheduled for c finds nothing left to send
    outbox.flush()
    assert dealer.poll(0) == 0
