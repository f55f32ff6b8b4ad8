"""A connection's socket: reads that always yield, writes that need not, and a writer task only
while something waits to be written.

The gateway's hot path is one event appended to a stream and written to every caught-up
subscriber's socket. Going through a task per hop (delivery task, send channel, writer task,
trio's ``SocketStream``) costs a reschedule per hop, which is most of the CPU of a token. So
the connection owns its socket as a plain non-blocking stdlib socket, and :class:`Output` lets
the stream's own task write a frame straight to it when nothing is queued: one ``send`` system
call, no task switch. What the kernel does not take at once is queued, in order, for a task
that waits for the socket to take more: either a writer task that lives as long as the
connection (:meth:`Output.run_writer`), or, when :attr:`Output.nursery` is set instead, a drain
task started in that nursery when something is queued and gone once the queue is empty. An idle
connection then holds no writer task at all (memory: tens of thousands of idle connections).

Rules:

- Bytes reach the socket in the order they were handed in, whichever path they took: a direct
  write happens only while the queue is empty, and bytes leave the queue only from its head, in
  one synchronous step (``sendmsg`` of the queued items, then drop what the kernel took). So a
  drain task cancelled while it waits for the socket loses nothing, and :meth:`Output.flush`
  can send the rest later.
- The queue is bounded (``limit`` items; an item counts until the kernel took all of it).
  :meth:`Output.write_nowait` answers False at the bound, so the caller (a stream pushing an
  event) falls back to its waiting path, and :meth:`Output.write` waits for room: a slow
  socket pushes back on whoever feeds it.
- One task at a time waits for the socket to take the queue (trio allows one waiter per
  direction): the writer, a drain task, or the caller of :meth:`Output.flush`.
- Reads (:meth:`RawSocket.receive_some`) always wait for readability first, so a client that
  floods us yields the loop on every read like any other task.
"""

from __future__ import annotations

import errno
import socket

import trio

__all__ = ["Output", "RawSocket"]

_RECV_SIZE = 65536
_IOV_MAX = 512  # buffers handed to one sendmsg (Linux takes up to 1024)


class RawSocket:
    """A connected socket taken over from trio (``detach``), with bytes already read from it
    (the request head the listener peeked at) served first."""

    __slots__ = ("_prefix", "closed", "sock")

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

    def send_many_nowait(self, buffers: list[bytes | memoryview]) -> int:
        """Send what the kernel takes now of ``buffers``, in order, in one system call (no
        join); how many bytes that was."""
        if self.closed:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            return self.sock.sendmsg(buffers)
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
    """The ordered outgoing bytes of one connection; see the module docstring. Either run
    :meth:`run_writer` in the connection's nursery, or set :attr:`nursery` for drain tasks and
    :meth:`flush` what is left once it is gone."""

    __slots__ = (
        "_closed",
        "_draining",
        "_limit",
        "_queue",
        "_room",
        "_sock",
        "_writer",
        "broken",
        "nursery",
    )

    def __init__(self, sock: RawSocket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._queue: list[bytes | memoryview] = []
        self._closed = False
        self._draining = False  # a drain task is started and has not returned
        # Made when first needed: most connections never wait for either.
        self._writer: trio.lowlevel.ParkingLot | None = None  # run_writer: something to send
        self._room: trio.lowlevel.ParkingLot | None = None  # writers waiting for room
        #: Where a drain task starts when something is queued and no writer runs. While it is
        #: None, cancelled or closed, none starts: what is queued waits for :meth:`flush`.
        self.nursery: trio.Nursery | None = None
        self.broken = False

    @property
    def idle(self) -> bool:
        """Nothing queued."""
        return not self._queue

    def write_nowait(self, data: bytes) -> bool:
        """Hand ``data`` over without waiting: written now if the socket takes it and nothing
        is ahead of it, else queued. False, with nothing taken, when the queue is full.
        Raises :class:`trio.ClosedResourceError` once closed, and
        :class:`trio.BrokenResourceError` when the connection broke."""
        if self._closed:
            raise trio.ClosedResourceError("the output is closed")
        if self.broken:
            raise trio.BrokenResourceError("the connection broke")
        queue = self._queue
        if not queue:
            try:
                sent = self._sock.send_nowait(data)
            except trio.BrokenResourceError:
                self._break()
                raise
            if sent == len(data):
                return True
            queue.append(memoryview(data)[sent:])
        elif len(queue) >= self._limit:
            return False
        else:
            queue.append(data)
        self._queued()
        return True

    async def write(self, data: bytes) -> None:
        """Hand ``data`` over, waiting while the queue is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.write_nowait(data):
            if self._room is None:
                self._room = trio.lowlevel.ParkingLot()
            await self._room.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self, last: bytes = b"") -> None:
        """No more writes. ``last`` (a close frame) goes behind what is queued, over the bound;
        the writer sends what is queued and returns (or :meth:`flush` sends it)."""
        if not self._closed and not self.broken and last:
            self._queue.append(last)
            self._queued()
        self._closed = True
        if self._writer is not None:
            self._writer.unpark_all()
        if self._room is not None:
            self._room.unpark_all()

    async def flush(self) -> None:
        """Send what is queued, in this task; for when no writer or drain task runs (the
        connection's last words, after its nursery is gone). Raises
        :class:`trio.BrokenResourceError` when the connection breaks."""
        if self._draining or self._writer is not None:
            raise trio.BusyResourceError("a writer task sends this output")
        if not self._queue:
            await trio.lowlevel.checkpoint()
        await self._send_queue()

    async def run_writer(self) -> None:
        """Send the queue until closed and empty. Raises :class:`trio.BrokenResourceError`
        when the connection breaks."""
        if self._writer is not None or self._draining:
            raise trio.BusyResourceError("another task sends this output")
        self._writer = trio.lowlevel.ParkingLot()
        try:
            while True:
                await self._send_queue()
                if self._closed:
                    return
                await self._writer.park()
        finally:
            self._writer = None

    def _queued(self) -> None:
        # Something is queued: wake the writer, or start a drain task if none runs. None starts
        # in a cancelled nursery (it would stop at once) or a closed one (a connection ending):
        # what is queued then waits for flush().
        if self._writer is not None:
            self._writer.unpark_all()
        elif not self._draining and self.nursery is not None:
            if self.nursery.cancel_scope.cancel_called:
                return
            try:
                self.nursery.start_soon(self._drain)
            except RuntimeError:  # closed to new arrivals
                return
            self._draining = True

    async def _drain(self) -> None:
        try:
            await self._send_queue()
        finally:
            self._draining = False

    async def _send_queue(self) -> None:
        # Until the queue is empty: wait for the socket, send what it takes. A direct write
        # could not take all of what is queued, so the socket is full: wait first.
        while self._queue:
            await trio.lowlevel.wait_writable(self._sock.sock)
            self._send_now()
        if self.broken:
            raise trio.BrokenResourceError("the connection broke")

    def _send_now(self) -> None:
        # One synchronous step from the head of the queue: nothing else runs in between. An
        # item leaves the queue once all of it is sent (the bound counts what is not sent).
        queue = self._queue
        sock = self._sock
        while queue:
            offered = queue[:_IOV_MAX]
            try:
                if len(offered) == 1:
                    sent = sock.send_nowait(offered[0])
                else:
                    sent = sock.send_many_nowait(offered)
            except trio.BrokenResourceError:
                self._break()
                raise
            done = 0
            for part in offered:
                if sent < len(part):
                    break
                sent -= len(part)
                done += 1
            del queue[:done]
            if done < len(offered):
                if sent:
                    queue[0] = memoryview(queue[0])[sent:]
                break
        if self._room is not None and len(queue) < self._limit:
            self._room.unpark_all()

    def _break(self) -> None:
        self.broken = True
        self._queue.clear()
        if self._writer is not None:
            self._writer.unpark_all()
        if self._room is not None:
            self._room.unpark_all()
