"""The client's side of offline queues: ``queued`` messages handed to the caller's handler, and
acknowledged only after it returned.

The rule of this file: **a message is acknowledged only after the caller's handler returned for
it, and the handler sees each message once per client however often the server delivers it.**

- The reader offers each ``queued`` frame's messages (:meth:`QueuedInbox.offer`): synchronous,
  never waiting. Ids already buffered or already handled are skipped; a full buffer takes no
  more (the server delivers them again: unacknowledged messages are redelivered).
- One consumer task per connection (:meth:`QueuedInbox.consume`) awaits the handler for each
  message in order, then sends ``ack`` and waits for ``acked``. A handler that raises is logged
  and its message is not acknowledged (the server delivers it again, and the handler is called
  again).
- An id whose handler returned but whose ``ack`` was not answered (the connection dropped) is
  remembered: when the server delivers it again it is acknowledged without calling the handler
  twice. At most ``buffer`` such ids are remembered, the oldest forgotten first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["QueuedHandler", "QueuedInbox"]

log = logging.getLogger("raafd.client")

QueuedHandler = Callable[[dict[str, Any]], Awaitable[None]]
"""Called with each queued message (``{id, kind, from, room?, text, ts}``)."""

Acker = Callable[[list[str]], Awaitable[Any]]


class QueuedInbox:
    def __init__(self, handler: QueuedHandler, buffer: int) -> None:
        self.handler = handler
        self.buffer = buffer
        self._waiting: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._handled: OrderedDict[str, None] = OrderedDict()  # handled, ack not answered
        self._arrived = trio.Event()

    def offer(self, messages: Any) -> None:
        """A ``queued`` frame's messages, from the reader (never waits)."""
        if not isinstance(messages, list):
            return
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("id"), str):
                continue
            key = message["id"]
            if key in self._waiting:
                continue
            if key not in self._handled and len(self._waiting) >= self.buffer:
                continue  # full: the server delivers it again later
            self._waiting[key] = message
        if self._waiting:
            self._arrived.set()

    async def consume(self, ack: Acker) -> None:
        """Hand each waiting message to the handler, then acknowledge it; until cancelled."""
        while True:
            while not self._waiting:
                self._arrived = trio.Event()
                await self._arrived.wait()
            key, message = next(iter(self._waiting.items()))
            if key not in self._handled:
                try:
                    await self.handler(dict(message))
                except Exception:
                    log.exception("the queued-message handler failed; %s is not acknowledged", key)
                    del self._waiting[key]
                    continue
                self._handled[key] = None
                while len(self._handled) > self.buffer:
                    self._handled.popitem(last=False)
            await ack([key])  # raises when the connection drops: the consumer ends with it
            self._waiting.pop(key, None)
            self._handled.pop(key, None)
