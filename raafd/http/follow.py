"""Following a stream for a request/response protocol adapter (the Responses API, the Anthropic
Messages API): the streamed body through the one :class:`~raafd.net.delivery.Delivery`, or the
whole answer folded from the stream's events while the client waits.

The rule both keep (docs/protocol.md, "client disconnect"): a client that goes away
**detaches** (the stream keeps running for its detach grace, so a resume can find it) unless the
request asked to cancel on disconnect, and then the stream is cancelled with reason ``client``
at once, so no token is paid for after that. Neither keeps a buffer or a task of its own: the
stream's log is the buffer, and the request's task does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from raafd.errors import RaafdError
from raafd.http.asgi import Request
from raafd.http.context import StreamingContext
from raafd.logging import get_logger
from raafd.net.delivery import Framing, Sink
from raafd.protocol.events import StreamEvent

if TYPE_CHECKING:
    from raafd.core.feed import Subscription
    from raafd.streams.stream import Stream

__all__ = ["deliver", "disconnect_cancels", "fold"]

log = get_logger("raafd.http")


def disconnect_cancels(headers: Mapping[str, str], store: bool = True) -> bool:
    """Whether the request asked that a disconnect cancel its stream instead of detaching: the
    header ``x-raafd-disconnect: cancel`` (or, for the Responses API, ``store: false``)."""
    return not store or headers.get("x-raafd-disconnect", "").lower() == "cancel"


async def deliver(
    ctx: StreamingContext,
    sink: Sink,
    stream: Stream,
    subscription: Subscription,
    framing: Framing,
    *,
    failure: Callable[[RaafdError | None], bytes],
    cancel_on_disconnect: bool,
    prefix: bytes = b"",
) -> None:
    """A streamed answer's body: ``prefix``, then ``subscription`` framed to ``sink`` until
    the terminal event; ``failure``'s bytes when the delivery cannot reach it (``gone``,
    ``slow_consumer``, the subscription closed)."""
    try:
        async with subscription:
            ended = await ctx.delivery(subscription, framing, sink).run(prefix, live=False)
        if not ended:
            await sink.write(failure(None))
    except RaafdError as err:
        log.info("HTTP stream delivery ended", code=err.code, stream=stream.id)
        await sink.write(failure(err))
    finally:
        # Synchronous, so it runs even when the client's disconnect cancelled us.
        if cancel_on_disconnect and not stream.finished:
            stream.cancel("client")


async def fold(
    ctx: StreamingContext,
    request: Request,
    stream: Stream,
    take: Callable[[StreamEvent], object],
    *,
    cancel_on_disconnect: bool,
) -> None:
    """Give every event of ``stream`` from seq 1 to ``take`` until the terminal event, while
    the client waits. Subscribed (not just waiting), so the detach grace does not run while
    the client is there. Raises :class:`trio.BrokenResourceError` when the client left (no
    answer is sent), or what the subscription raises (``gone``, ``slow_consumer``)."""
    left = False
    failure: RaafdError | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal left
            await request.wait_disconnect()
            left = True
            if cancel_on_disconnect:
                stream.cancel("client")
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            async with ctx.streams.subscribe(stream.id, 0) as subscription:
                async for batch in subscription:
                    for event in batch:
                        take(event)
        except RaafdError as err:  # raised outside the nursery: no exception group
            failure = err
        nursery.cancel_scope.cancel()
    if left:
        raise trio.BrokenResourceError("client went away")
    if failure is not None:
        raise failure
