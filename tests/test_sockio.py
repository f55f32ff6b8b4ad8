"""The gateway's socket output: direct writes and the writer's queue keep one order, the queue's
bound refuses without taking anything, and a broken peer is reported to both paths."""

from __future__ import annotations

import socket

import pytest
import trio

from raafd.gateway.sockio import Output, RawSocket


def _pair() -> tuple[RawSocket, socket.socket]:
    ours, theirs = trio.socket.socketpair()
    # A small send buffer, so the kernel refuses part of a write soon and the queue is used.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer = socket.socket(fileno=theirs.detach())
    peer.setblocking(False)
    return RawSocket(trio.SocketStream(ours), b"hello"), peer


async def _drain(peer: socket.socket, want: int) -> bytes:
    got = bytearray()
    while len(got) < want:
        await trio.lowlevel.wait_readable(peer)
        got += peer.recv(1 << 20)
    return bytes(got)


async def test_direct_and_queued_writes_arrive_in_order() -> None:
    sock, peer = _pair()
    out = Output(sock, limit=10_000)
    messages = [b"%06d" % i * 50 for i in range(2000)]  # 300 bytes each, 600 KB in all
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
    sock.close()
    peer.close()


async def test_a_full_queue_refuses_without_taking_and_write_waits() -> None:
    sock, peer = _pair()
    out = Output(sock, limit=2)
    big = b"x" * 1_000_000
    with trio.fail_after(10):
        assert out.write_nowait(big)  # part sent, the rest queued
        assert out.write_nowait(b"a")
        assert not out.write_nowait(b"b")  # the bound: nothing taken
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run_writer)
            await out.write(b"c")  # waits for room, then queues behind the rest
            received = await _drain(peer, len(big) + 2)
            out.close()
    assert received == big + b"ac"
    sock.close()
    peer.close()


async def test_a_closed_peer_breaks_both_paths() -> None:
    sock, peer = _pair()
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
    sock.close()
    with pytest.raises(trio.ClosedResourceError):
        await sock.receive_some()
