"""Per-user offline queues: the store interface and the types its implementations share.

A queue holds the messages waiting for one user (direct messages; room messages for members
who were offline), oldest first, until the user acknowledges them. Implementations:
:mod:`raafd.store.offline_sqlite` (durable, on the shared database) and
:mod:`raafd.store.offline_memory` (tests, throwaway runs). The interface is written so that a
Redis implementation can follow: ids are opaque strings that sort in queue order within a
queue, every call names the user whose queue it touches, and nothing needs a transaction across
two users' queues.

The rules every implementation keeps:

- **A returned :meth:`OfflineStore.enqueue` or :meth:`OfflineStore.ack` is durable** (for the
  durable ones): the caller answers ``dm.sent`` / ``acked`` only after it.
- A queue holds at most ``max_queue`` messages: putting one more in a full queue drops the
  oldest (counted in :attr:`Enqueued.dropped`). All queues together hold at most ``max_total``;
  past it :meth:`enqueue` raises :class:`QueueFull` and stores nothing.
- A message expires at ``expires_at`` (unix seconds): :meth:`pending` never returns it again;
  :meth:`expire` deletes it.
- ``client_id``: a sender's second message with the same ``client_id`` (a resend after a lost
  answer) stores nothing and returns the first one, with :attr:`Enqueued.duplicate`, even after
  the recipient acknowledged it, for as long as the first would have lived (its
  ``expires_at``); at most ``max_total`` such keys are remembered, the oldest forgotten first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from attrs import frozen

from raafd.errors import Unavailable

__all__ = ["Enqueued", "NewMessage", "OfflineStore", "QueueFull", "QueuedMessage"]

Kind = Literal["dm", "room"]


class QueueFull(Unavailable):
    """Every offline queue together holds ``chat.offline_max_total`` messages."""


@frozen
class NewMessage:
    """A message to put in a queue (the store gives it its id)."""

    kind: Kind
    sender: str
    text: str
    ts: float  # unix seconds, the server's
    expires_at: float
    room: str | None = None
    client_id: str | None = None

    def stored(self, id: str) -> QueuedMessage:
        """This message as the queue holds it, under ``id``."""
        return QueuedMessage(
            id, self.kind, self.sender, self.text, self.ts, self.expires_at, self.room
        )


@frozen
class QueuedMessage:
    id: str
    kind: Kind
    sender: str
    text: str
    ts: float
    expires_at: float
    room: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """As in a ``queued`` frame: ``{id, kind, from, room?, text, ts}``."""
        wire: dict[str, Any] = {"id": self.id, "kind": self.kind, "from": self.sender}
        if self.room is not None:
            wire["room"] = self.room
        wire["text"] = self.text
        wire["ts"] = round(self.ts, 3)
        return wire


@frozen
class Enqueued:
    message: QueuedMessage
    duplicate: bool = False  # the sender's client_id was seen: nothing new was stored
    dropped: int = 0  # oldest messages dropped from the full queue to make room


class OfflineStore(Protocol):
    """See the module docstring."""

    async def enqueue(
        self, user: str, message: NewMessage, *, max_queue: int, max_total: int
    ) -> Enqueued:
        """Put ``message`` at the end of ``user``'s queue; durable when it returns."""
        ...

    async def pending(self, user: str, now: float, limit: int) -> list[QueuedMessage]:
        """The first ``limit`` messages of ``user``'s queue not expired at ``now``, oldest
        first."""
        ...

    async def depth(self, user: str, now: float) -> int:
        """How many messages of ``user``'s queue have not expired at ``now``."""
        ...

    async def ack(self, user: str, ids: Sequence[str]) -> int:
        """Delete these messages from ``user``'s queue (ids not in it are ignored: acked
        already, or another user's); how many were deleted. Durable when it returns."""
        ...

    async def expire(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` messages expired at ``now`` (and the ``client_id`` keys that
        expired); how many messages were deleted."""
        ...

    def total(self) -> int:
        """Messages in all queues (expired ones not yet deleted included)."""
        ...
