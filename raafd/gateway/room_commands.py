"""The gateway commands of rooms: ``room.create``, ``room.join``, ``room.leave``, ``room.send``,
``room.history``, ``room.cancel`` and ``typing`` (the daemon registers them with
:func:`add_room_commands`).

A joined room is an attachment of the connection like an agent stream: the room's feed,
delivered by the one :class:`~raafd.net.delivery.Delivery` with the room framing below, so its
messages are pushed from the sender's task straight to each member's socket, and a member too
far behind is closed with 4001 by the feed's policy. An agent's reply in the room is attached
the same way with the reply framing (``stream.event`` frames that carry ``room``).
"""

from __future__ import annotations

from typing import Any

import orjson

from raafd.chat.rooms import Rooms, feed_id
from raafd.errors import Gone, NotFound, RaafdError, Unavailable
from raafd.gateway.frames import text_frame
from raafd.gateway.table import CommandTable, Peer
from raafd.protocol.events import StreamEvent
from raafd.protocol.rooms import (
    RoomCancel,
    RoomCreate,
    RoomHistory,
    RoomJoin,
    RoomLeave,
    RoomSend,
    Typing,
)
from raafd.security.guard import Guard

__all__ = ["add_room_commands"]

_JOIN_TRIES = 3  # a join whose store read took longer than the feed holds messages retries


class _PrefixFraming:
    """Each event's JSON object behind a fixed prefix (``{"type":"room.message",``): the same
    bytes for every member, so the last frame made is kept and reused, and a message fanned out
    to N members is framed once, not N times."""

    __slots__ = ("_last", "_last_frame", "_prefix", "transport")

    heartbeat = b""

    def __init__(self, prefix: bytes, transport: str) -> None:
        self._prefix = prefix
        self.transport = transport
        self._last: StreamEvent | None = None
        self._last_frame = b""

    def event(self, event: StreamEvent) -> bytes:
        if event is not self._last:
            self._last = event
            self._last_frame = text_frame(self._prefix + event.json[1:])
        return self._last_frame

    def batch(self, events: list[StreamEvent]) -> bytes:
        return b"".join([self.event(e) for e in events])


_ROOM_FRAMING = _PrefixFraming(b'{"type":"room.message",', "room")


class _Member:
    """A connection joined to a room, as :class:`~raafd.chat.rooms.Room` sees it."""

    __slots__ = ("_conn", "_framings", "_rooms", "room")

    def __init__(self, conn: Peer, room: str, rooms: Rooms, framings: _ReplyFramings) -> None:
        self._conn = conn
        self._rooms = rooms
        self._framings = framings
        self.room = room

    @property
    def id(self) -> str:
        return self._conn.id

    @property
    def user(self) -> str:
        return self._conn.user

    def signal(self, message: dict[str, Any]) -> None:
        self._conn.send_nowait(message)

    def detach(self) -> None:
        try:
            self._conn.detach(feed_id(self.room))
        except NotFound:  # not attached any more
            pass

    def attach_reply(self, stream_id: str, agent: str) -> None:
        streams = self._rooms.streams
        if streams is None:
            return
        reply = {"type": "room.reply", "room": self.room, "stream": stream_id, "agent": agent}
        self._conn.attach(
            stream_id,
            lambda: streams.subscribe(stream_id, 0),
            reply,
            framing=self._framings.get(self.room),
        )


class _ReplyFramings:
    """An agent reply's events as ``stream.event`` frames carrying ``room``: one framing per
    room (bounded by ``chat.max_rooms``: forgotten when its room is), so a reply's event is
    framed once for all the room's members."""

    def __init__(self, rooms: Rooms) -> None:
        self._rooms = rooms
        self._framings: dict[str, _PrefixFraming] = {}

    def get(self, room: str) -> _PrefixFraming:
        framing = self._framings.get(room)
        if framing is None:
            if len(self._framings) >= len(self._rooms.rooms):
                for name in [n for n in self._framings if n not in self._rooms.rooms]:
                    del self._framings[name]
            prefix = b'{"type":"stream.event","room":' + orjson.dumps(room) + b","
            framing = self._framings[room] = _PrefixFraming(prefix, "websocket")
        return framing


def add_room_commands(table: CommandTable, rooms: Rooms, guard: Guard) -> None:
    """``guard`` applies the role policy first: ``room.join`` for joining, reading, typing and
    creating a room, ``room.publish`` for sending (``forbidden`` naming ``room``)."""
    framings = _ReplyFramings(rooms)

    def may(conn: Peer, action: str, room: str) -> None:
        guard.require(conn.principal, action, room, "room")

    async def create(conn: Peer, cmd: RoomCreate) -> None:
        may(conn, "room.join", cmd.room)
        room = await rooms.create(cmd.room, cmd.settings(), conn.user)
        await conn.send_json({"type": "room.created", "ref": cmd.ref, **room.describe()})

    async def join(conn: Peer, cmd: RoomJoin) -> None:
        if conn.draining:
            raise Unavailable("the server is draining; join elsewhere")
        may(conn, "room.join", cmd.room)
        conn.check_room()
        for attempt in range(_JOIN_TRIES):
            joining = await rooms.join(cmd.room, conn.user, after=cmd.after, limit=cmd.limit)
            member = _Member(conn, cmd.room, rooms, framings)
            try:
                reply, subscribe = joining.finish(member, cmd.ref)
            except Gone:
                if attempt + 1 == _JOIN_TRIES:
                    raise
                continue
            conn.attach(feed_id(cmd.room), subscribe, reply, cmd.ref, framing=_ROOM_FRAMING)
            running = reply.get("reply")
            if running is not None:
                try:
                    member.attach_reply(running["stream"], running["agent"])
                except RaafdError:  # the reply is optional (attachments full): the join stands
                    pass
            return

    async def leave(conn: Peer, cmd: RoomLeave) -> None:
        await rooms.leave(cmd.room, conn.user)
        await conn.send_json({"type": "room.left", "ref": cmd.ref, "room": cmd.room})

    async def send(conn: Peer, cmd: RoomSend) -> None:
        may(conn, "room.publish", cmd.room)
        message = await rooms.send(
            cmd.room, conn.user, cmd.text, client_id=cmd.client_id, meta=cmd.meta
        )
        answer = {"type": "room.sent", "ref": cmd.ref, "room": cmd.room, "id": message.id}
        if message.duplicate:
            answer["duplicate"] = True
        await conn.send_json(answer)

    async def history(conn: Peer, cmd: RoomHistory) -> None:
        may(conn, "room.join", cmd.room)
        found = await rooms.history(
            cmd.room, conn.user, after=cmd.after, before=cmd.before, limit=cmd.limit
        )
        await conn.send_json(
            {
                "type": "room.history",
                "ref": cmd.ref,
                "room": cmd.room,
                "messages": [m.to_wire() for m in found],
            }
        )

    async def cancel(conn: Peer, cmd: RoomCancel) -> None:
        may(conn, "room.join", cmd.room)
        stream = rooms.cancel_reply(cmd.room, conn.user)
        await conn.send_json(
            {"type": "ok", "ref": cmd.ref, "command": "room.cancel", "stream": stream}
        )

    async def typing(conn: Peer, cmd: Typing) -> None:
        may(conn, "room.join", cmd.room)
        rooms.typing(cmd.room, conn.user, conn.id, cmd.state)

    table.add("room.create", RoomCreate, create)
    table.add("room.join", RoomJoin, join)
    table.add("room.leave", RoomLeave, leave)
    table.add("room.send", RoomSend, send)
    table.add("room.history", RoomHistory, history)
    table.add("room.cancel", RoomCancel, cancel)
    table.add("typing", Typing, typing)
