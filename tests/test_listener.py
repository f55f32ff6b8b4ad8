"""The public listener's stream for hypercorn: bytes already read come first, and its sends
take turns (hypercorn closes from one task while another may be writing an error response)."""

from __future__ import annotations

import trio

from raafd.net.listener import PrefixedStream


async def test_the_prefix_is_read_first_then_the_socket() -> None:
    left, right = trio.socket.socketpair()
    with left, right:
        stream = PrefixedStream(trio.SocketStream(left), b"GET / HTTP/1.1\r\n")
        await trio.SocketStream(right).send_all(b"host: x\r\n\r\n")
        with trio.fail_after(10):
            assert await stream.receive_some(4) == b"GET "
            assert await stream.receive_some() == b"/ HTTP/1.1\r\n"
            assert await stream.receive_some() == b"host: x\r\n\r\n"


async def _race(stream: PrefixedStream) -> tuple[str, str]:
    """A send_all and a send_eof started together: how each ended."""
    sent = closed = "ok"

    async def send() -> None:
        nonlocal sent
        try:
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        except trio.ClosedResourceError:
            sent = "closed"

    async def eof() -> None:
        nonlocal closed
        try:
            await stream.send_eof()
        except trio.BusyResourceError:
            closed = "busy"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(eof)
            nursery.start_soon(send)
    return sent, closed


async def test_a_send_never_meets_a_close_in_progress_as_busy() -> None:
    # Both orders, many times (trio varies the order of tasks woken together): a send_all
    # either goes out or meets the closed stream; a send_eof either closes or finds a send
    # under way. Without the turns, send_all raised BusyResourceError during send_eof.
    outcomes: set[tuple[str, str]] = set()
    for _ in range(200):
        left, right = trio.socket.socketpair()
        with left, right:
            outcomes.add(await _race(PrefixedStream(trio.SocketStream(left), b"")))
    assert outcomes <= {("ok", "ok"), ("closed", "ok"), ("ok", "busy")}, outcomes
    assert ("closed", "ok") in outcomes  # the close went first at least once


def test_hypercorn_takes_a_busy_close_as_a_peer_gone() -> None:
    # hypercorn's TCPServer._close catches BusyResourceError from send_eof ("already gone")
    # and goes on to close the socket; PrefixedStream.send_eof relies on that.
    import inspect

    from hypercorn.trio.tcp_server import TCPServer

    source = inspect.getsource(TCPServer._close)
    assert "send_eof" in source and "BusyResourceError" in source
