"""What a chat store keeps for rooms: the rooms themselves, their members and their history.

The rule of this interface: **a returned write is durable, and a room's message ids are
1, 2, 3, ... with no gap.** Every backend (SQLite, memory for tests, Redis later) keeps it:

- :meth:`ChatStore.append` takes a batch of messages for one room and the id the room's last
  message has (``head``); it gives each new message the next id, in order, in one durable
  write. A message whose ``(room, sender, client_id)`` is already stored is not stored again:
  the stored one comes back with ``duplicate`` set (a resend after a dropped connection). The
  caller (one room, one batch at a time) is the only writer of a room's messages, so ``head``
  is always the stored head.
- History is bounded per room: the same write forgets messages more than ``keep`` behind the
  new head and, with ``ttl``, those older than ``ttl`` seconds. A ``client_id`` is therefore
  recognised only while its message is kept.
- Rooms made at run time (``room.create``) are kept with their attributes; rooms from the
  config are not stored, only their messages and members are.

Everything is bounded by the caller's configuration (``chat.max_rooms``, ``max_members``,
``history``), which the room service checks before it writes.
"""

from __future__ import annotations

from typing import Any, Protocol

from attrs import frozen

__all__ = ["ChatStore", "NewMessage", "RoomState", "StoredMessage", "StoredRoom"]


@frozen
class StoredRoom:
    """A room made at run time: its name, who made it, when, and its attributes (the
    :class:`~raafd.config.RoomConfig` fields, as a plain mapping)."""

    name: str
    created_by: str
    created_at: float
    settings: dict[str, Any]


@frozen
class NewMessage:
    """A message to store: ``ts`` is the server's unix time, ``client_id`` the sender's key for
    an idempotent resend, ``stream`` the agent stream a reply came from."""

    sender: str
    text: str
    ts: float
    meta: dict[str, Any] | None = None
    client_id: str | None = None
    stream: str | None = None

    def stored(self, room: str, id_: int) -> StoredMessage:
        """This message, stored in ``room`` as ``id_``."""
        return StoredMessage(
            room, id_, self.sender, self.text, self.ts, self.meta, self.client_id, self.stream
        )


@frozen
class StoredMessage:
    room: str
    id: int
    sender: str
    text: str
    ts: float
    meta: dict[str, Any] | None = None
    client_id: str | None = None
    stream: str | None = None
    duplicate: bool = False  # append found it already stored (same sender and client_id)

    def to_wire(self) -> dict[str, Any]:
        """The message as ``room.message`` carries it (without ``type``)."""
        out: dict[str, Any] = {
            "room": self.room,
            "id": self.id,
            "from": self.sender,
            "text": self.text,
            "ts": self.ts,
            "meta": self.meta,
        }
        if self.stream is not None:
            out["stream"] = self.stream
        return out


@frozen
class RoomState:
    """What a room needs at start: its last message id (0 for none), the oldest id kept
    (``head + 1`` for none), and its members with the time each joined."""

    name: str
    head: int
    oldest: int
    members: dict[str, float]


class ChatStore(Protocol):
    """Rooms, members and history. See the module docstring for the rules."""

    async def rooms(self) -> list[StoredRoom]:
        """Every room made at run time."""
        ...

    async def create_room(self, room: StoredRoom) -> bool:
        """Keep a new room; False (and nothing changed) when one of that name is kept."""
        ...

    async def delete_room(self, name: str) -> bool:
        """Forget a room made at run time, its members and its history."""
        ...

    async def state(self, name: str) -> RoomState:
        """A room's head, oldest kept id and members (for a room never written: empty)."""
        ...

    async def append(
        self, room: str, head: int, messages: list[NewMessage], keep: int, ttl: float, now: float
    ) -> list[StoredMessage]:
        """Store ``messages`` after ``head`` in one durable write (see the module docstring);
        one result per message, in order."""
        ...

    async def messages(
        self, room: str, *, after: int | None = None, before: int | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        """Kept messages with ``after < id < before``, oldest first, at most ``limit``: the
        first ``limit`` of them when ``after`` is given, else the last ``limit`` (the newest,
        or the page just before ``before``)."""
        ...

    async def add_member(self, room: str, user: str, now: float) -> None:
        """Make ``user`` a member (durable; a member already is one)."""
        ...

    async def remove_member(self, room: str, user: str) -> bool:
        """Forget a membership; False when there was none."""
        ...
