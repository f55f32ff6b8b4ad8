"""A WebSocket connection's socket: reads that always yield, writes that need not.

The gateway's hot path is one event appended to a stream and written to every caught-up
subscriber's socket. Going through a task per hop (delivery task, send channel, writer task,
trio's ``SocketStream``) costs a reschedule per hop, which is most of the CPU of a token. So
the connection owns its socket as a plain non-blocking stdlib socket, and :class:`Output` lets
the stream's own task write a frame straight to it when nothing is queued: one ``send`` system
call, no task switch. What the kernel does not take at once is queued, in order, for the
connection's writer task.

Rules:

- Bytes reach the socket in the order they were handed in, whichever path they took: a direct
  write happens only while the queue is empty and the writer is not in the middle of a send.
- The queue is bounded (``limit`` items). :meth:`Output.write_nowait` answers False at the
  bound, so the caller (a stream pushing an event) falls back to its waiting path, and
  :meth:`Output.write` waits for room: a slow socket pushes back on whoever feeds it.
- Reads (:meth:`RawSocket.receive_some`) always wait for readability first, so a client that
  floods us yields the loop on every read like any other task.
"""

from __future__ import annotations

import errno
import socket
from collections import deque

import trio

__all__ = ["Output", "RawSocket"]

_RECV_SIZE = 65536
_JOIN_LIMIT = 256 << 10  # bytes the writer joins into one send


class RawSocket:
    """A connected socket taken over from trio (``detach``), with bytes already read from it
    (the request head the listener peeked at) served first."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes = b"") -> None:
        self.sock = socket.socket(fileno=stream.socket.detach())
        self.sock.setblocking(False)
        self._prefix = prefix
        self.closed = False

    async def receive_some(self) -> bytes:
        """The next bytes; ``b""`` at end of file. Raises :class:`trio.BrokenResourceError`
        when the connection broke and :class:`trio.ClosedResourceError` once closed."""
        if self.closed:
            raise trio.ClosedResourceError("the connection is closed")
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes now; how many bytes that was."""
        if self.closed:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc

    async def send_all(self, data: bytes | memoryview) -> None:
        """Send everything, waiting for the socket to take it."""
        view = memoryview(data)
        while view:
            sent = self.send_nowait(view)
            view = view[sent:]
            if view:
                await trio.lowlevel.wait_writable(self.sock)
        await trio.lowlevel.checkpoint()

    def release(self) -> trio.SocketStream:
        """Hand the socket back to trio, open, for another server to serve the rest of the
        connection; this object is closed from then on. Prefix bytes not yet read are not
        carried over: a caller that reads them itself passes what it kept on."""
        if self.closed:
            raise trio.ClosedResourceError("the connection is closed")
        self.closed = True
        return trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))

    def close(self) -> None:
        """Close now (idempotent); tasks waiting on the socket get ClosedResourceError."""
        if self.closed:
            return
        self.closed = True
        trio.lowlevel.notify_closing(self.sock)
        try:
            self.sock.close()
        except OSError as exc:  # pragma: no cover - close of a valid fd does not fail on Linux
            if exc.errno != errno.EBADF:
                raise


class Output:
    """The ordered outgoing bytes of one connection; see the module docstring. Run
    :meth:`run_writer` in the connection's nursery."""

    def __init__(self, sock: RawSocket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._queue: deque[bytes | memoryview] = deque()
        self._writing = False
        self._closed = False
        self._has_data = trio.lowlevel.ParkingLot()  # the writer: something to send, or closed
        self._room = trio.lowlevel.ParkingLot()  # writers waiting for the queue to shrink
        self.broken = False

    @property
    def idle(self) -> bool:
        """Nothing queued and no send in progress."""
        return not self._queue and not self._writing

    def write_nowait(self, data: bytes) -> bool:
        """Hand ``data`` over without waiting: written now if the socket takes it and nothing
        is ahead of it, else queued. False, with nothing taken, when the queue is full.
        Raises :class:`trio.ClosedResourceError` once closed, and
        :class:`trio.BrokenResourceError` when the connection broke."""
        if self._closed:
            raise trio.ClosedResourceError("the output is closed")
        if self.broken:
            raise trio.BrokenResourceError("the connection broke")
        if not self._queue and not self._writing:
            try:
                sent = self._sock.send_nowait(data)
            except trio.BrokenResourceError:
                self._break()
                raise
            if sent == len(data):
                return True
            self._queue.append(memoryview(data)[sent:])
        elif len(self._queue) >= self._limit:
            return False
        else:
            self._queue.append(data)
        self._has_data.unpark_all()
        return True

    async def write(self, data: bytes) -> None:
        """Hand ``data`` over, waiting while the queue is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.write_nowait(data):
            await self._room.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        """No more writes; the writer sends what is queued and returns."""
        self._closed = True
        self._has_data.unpark_all()
        self._room.unpark_all()

    def _break(self) -> None:
        self.broken = True
        self._queue.clear()
        self._has_data.unpark_all()
        self._room.unpark_all()

    async def run_writer(self) -> None:
        """Send the queue until closed and empty. Raises :class:`trio.BrokenResourceError`
        when the connection breaks."""
        queue = self._queue
        while True:
            while not queue:
                if self._closed or self.broken:
                    if self.broken:
                        raise trio.BrokenResourceError("the connection broke")
                    return
                await self._has_data.park()
            parts: list[bytes | memoryview] = []
            size = 0
            while queue and size < _JOIN_LIMIT:
                part = queue.popleft()
                parts.append(part)
                size += len(part)
            self._room.unpark_all()
            self._writing = True
            try:
                await self._sock.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
            except trio.BrokenResourceError:
                self._break()
                raise
            finally:
                self._writing = False
