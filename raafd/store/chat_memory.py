"""The chat store in memory: the SQLite chat store's behaviour without a disk or a thread.

For tests (autojump clocks see all of its work) and ``[store] backend = "memory"``: **nothing
survives a restart.** Every call checks for cancellation first, does its work synchronously and
then yields, so a cancelled call changed nothing and a returned one is whole (as a SQLite
transaction). Bounds are the caller's, as for SQLite: ``keep``/``ttl`` per room on each append,
rooms and members checked by the room service before it writes.
"""

from __future__ import annotations

import bisect
from typing import Any

import trio
from attrs import define, evolve, field

from raafd.store.chat import NewMessage, RoomState, StoredMessage, StoredRoom

__all__ = ["MemoryChatStore"]


@define
class _Room:
    head: int = 0
    messages: list[StoredMessage] = field(factory=list)  # kept, oldest first (ids increasing)
    by_client: dict[tuple[str, str], StoredMessage] = field(factory=dict)
    members: dict[str, float] = field(factory=dict)


class MemoryChatStore:
    """:class:`~raafd.store.chat.ChatStore` in memory; see the module docstring."""

    def __init__(self) -> None:
        self._made: dict[str, StoredRoom] = {}
        self._rooms: dict[str, _Room] = {}

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _Room()
        return room

    async def rooms(self) -> list[StoredRoom]:
        await trio.lowlevel.checkpoint()
        return list(self._made.values())

    async def create_room(self, room: StoredRoom) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        made = room.name not in self._made
        if made:
            self._made[room.name] = room
        await trio.lowlevel.cancel_shielded_checkpoint()
        return made

    async def delete_room(self, name: str) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        found = self._made.pop(name, None) is not None
        self._rooms.pop(name, None)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return found

    async def state(self, name: str) -> RoomState:
        await trio.lowlevel.checkpoint()
        room = self._rooms.get(name) or _Room()
        oldest = room.messages[0].id if room.messages else room.head + 1
        return RoomState(name, room.head, oldest, dict(room.members))

    async def append(
        self, room: str, head: int, messages: list[NewMessage], keep: int, ttl: float, now: float
    ) -> list[StoredMessage]:
        await trio.lowlevel.checkpoint_if_cancelled()
        kept = self._room(room)
        if kept.head != head:
            raise RuntimeError(f"room {room}: head {head} given, {kept.head} stored")
        out: list[StoredMessage] = []
        for new in messages:
            key = (new.sender, new.client_id) if new.client_id is not None else None
            found = kept.by_client.get(key) if key is not None else None
            if found is not None:
                out.append(evolve(found, duplicate=True))
                continue
            kept.head += 1
            message = new.stored(room, kept.head)
            kept.messages.append(message)
            if key is not None:
                kept.by_client[key] = message
            out.append(message)
        self._trim(kept, keep, ttl, now)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return out

    def _trim(self, room: _Room, keep: int, ttl: float, now: float) -> None:
        drop = 0
        messages = room.messages
        while drop < len(messages) and (
            messages[drop].id <= room.head - keep or (ttl > 0 and messages[drop].ts < now - ttl)
        ):
            message = messages[drop]
            if message.client_id is not None:
                room.by_client.pop((message.sender, message.client_id), None)
            drop += 1
        if drop:
            del messages[:drop]

    async def messages(
        self, room: str, *, after: int | None = None, before: int | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        await trio.lowlevel.checkpoint()
        kept = self._rooms.get(room)
        if kept is None or limit <= 0:
            return []
        ids = [m.id for m in kept.messages]
        lo = bisect.bisect_right(ids, after) if after is not None else 0
        hi = bisect.bisect_left(ids, before) if before is not None else len(ids)
        if after is not None:
            return kept.messages[lo : min(hi, lo + limit)]
        return kept.messages[max(lo, hi - limit) : hi]

    async def add_member(self, room: str, user: str, now: float) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._room(room).members.setdefault(user, now)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def remove_member(self, room: str, user: str) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        kept = self._rooms.get(room)
        found = kept is not None and kept.members.pop(user, None) is not None
        await trio.lowlevel.cancel_shielded_checkpoint()
        return found

    def describe(self) -> dict[str, Any]:
        """Counts, for tests."""
        return {name: len(room.messages) for name, room in self._rooms.items()}
