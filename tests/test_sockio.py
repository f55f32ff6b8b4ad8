"""The gateway's socket output: direct writes and the queue keep one order (sent by a writer task
or by drain tasks started only while something is queued), the queue's bound refuses without
taking anything, a cancelled drain task loses nothing, and a broken peer is reported to every
path."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from raafd.net.sockio import Output, RawSocket

Pair = tuple[RawSocket, socket.socket]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """Our end (a :class:`RawSocket` whose first bytes are ``hello``) and the peer's, both
    closed after the test, whatever it did with them."""
    ours, theirs = trio.socket.socketpair()
    # A small send buffer, so the kernel refuses part of a write soon and the queue is used.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer = socket.socket(fileno=theirs.detach())
    peer.setblocking(False)
    sock = RawSocket(trio.SocketStream(ours), b"hello")
    try:
        yield sock, peer
    finally:
        sock.close()
        peer.close()


async def _drain(peer: socket.socket, want: int) -> bytes:
    got = bytearray()
    while len(got) < want:
        await trio.lowlevel.wait_readable(peer)
        got += peer.recv(1 << 20)
    return bytes(got)


async def _read_into(peer: socket.socket, into: bytearray, want: int) -> None:
    into += await _drain(peer, want)


def _messages() -> list[bytes]:
    return [b"%06d" % i * 50 for i in range(2000)]  # 300 bytes each, 600 KB in all


async def test_direct_and_queued_writes_arrive_in_order(pair: Pair) -> None:
    sock, peer = pair
    out = Output(sock, limit=10_000)
    messages = _messages()
    with trio.fail_after(10):
        assert await sock.receive_some() == b"hello"  # the prefix comes first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run_writer)
            taken = [out.write_nowait(m) for m in messages]
            assert all(taken)
            assert not out.idle  # the kernel could not take it all: some is queued
            received = await _drain(peer, sum(map(len, messages)))
            out.close()
    assert received == b"".join(messages)


async def test_a_drain_task_runs_only_while_something_is_queued(pair: Pair) -> None:
    sock, peer = pair
    out = Output(sock, limit=10_000)
    messages = _messages()
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            out.nursery = nursery
            assert out.write_nowait(b"direct")  # the socket takes it: no task
            assert out.idle and not nursery.child_tasks
            assert all(out.write_nowait(m) for m in messages)
            assert not out.idle and len(nursery.child_tasks) == 1  # one drain task, not more
            await _read_into(peer, received, 6 + sum(map(len, messages)))
            await trio.testing.wait_all_tasks_blocked()
            assert out.idle and not nursery.child_tasks  # the queue is empty: it returned
            # The next time something is queued, a new one starts.
            assert all(out.write_nowait(m) for m in messages)
            assert len(nursery.child_tasks) == 1
            await _read_into(peer, received, sum(map(len, messages)))
    assert bytes(received) == b"direct" + b"".join(messages) * 2


async def test_a_cancelled_drain_loses_nothing_and_close_goes_last(pair: Pair) -> None:
    sock, peer = pair
    out = Output(sock, limit=10_000)
    messages = _messages()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            out.nursery = nursery
            assert all(out.write_nowait(m) for m in messages)
            assert nursery.child_tasks
            await trio.testing.wait_all_tasks_blocked()  # the drain task waits for the socket
            nursery.cancel_scope.cancel()  # as a closing connection cancels its work
        out.nursery = None
        assert not out.idle  # what the socket did not take is still queued
        out.close(b"<close>")
        with pytest.raises(trio.ClosedResourceError):
            out.write_nowait(b"too late")
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_into, peer, received, sum(map(len, messages)) + 7)
            await out.flush()
    assert bytes(received) == b"".join(messages) + b"<close>"


async def test_writes_after_the_nursery_closed_wait_for_flush(pair: Pair) -> None:
    # A connection's nursery closes (its last task gone) a moment before the connection stops
    # handing the output over (a shutdown notice, say): what gets queued then waits for flush.
    sock, peer = pair
    out = Output(sock, limit=10_000)
    messages = _messages()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            out.nursery = nursery
        assert all(out.write_nowait(m) for m in messages)  # no task could start
        assert not out.idle
        out.nursery = None
        out.close()
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_into, peer, received, sum(map(len, messages)))
            await out.flush()
    assert bytes(received) == b"".join(messages)


async def test_a_full_queue_refuses_without_taking_and_write_waits_for_room(pair: Pair) -> None:
    sock, peer = pair
    out = Output(sock, limit=2)
    big = b"x" * 1_000_000
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            out.nursery = nursery
            assert out.write_nowait(big)  # part sent, the rest queued: a drain task starts
            assert out.write_nowait(b"a")
            assert not out.write_nowait(b"b")  # the bound: nothing taken
            nursery.start_soon(_read_into, peer, received, len(big) + 2)
            await out.write(b"c")  # waits for room, then queues behind the rest
    assert bytes(received) == big + b"ac"


async def test_a_closed_peer_breaks_both_paths(pair: Pair) -> None:
    sock, peer = pair
    out = Output(sock, limit=4)
    peer.close()
    with trio.fail_after(10):
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the first sends may still be taken by the kernel
                out.write_nowait(b"x" * 65536)
        with pytest.raises(trio.BrokenResourceError):
            out.write_nowait(b"y")
        with pytest.raises(trio.BrokenResourceError):
            await out.run_writer()
        with pytest.raises(trio.BrokenResourceError):
            await out.flush()
    sock.close()
    with pytest.raises(trio.ClosedResourceError):
        await sock.receive_some()


async def test_a_peer_gone_while_queued_breaks_the_drain_task(pair: Pair) -> None:
    sock, peer = pair
    out = Output(sock, limit=10_000)
    with trio.fail_after(10):
        with pytest.RaisesGroup(trio.BrokenResourceError):
            async with trio.open_nursery() as nursery:
                out.nursery = nursery
                assert all(out.write_nowait(m) for m in _messages())
                await trio.testing.wait_all_tasks_blocked()
                peer.close()  # with unread bytes: a reset
        assert out.broken and out.idle
        with pytest.raises(trio.BrokenResourceError):
            await out.write(b"more")
