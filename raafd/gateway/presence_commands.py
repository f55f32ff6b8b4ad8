"""The gateway commands of presence: ``presence.set``, ``presence.get`` (optionally watching
the users asked about) and ``presence.unwatch``, given the presence service (the daemon
registers them, and adds the service to the gateway's connection observers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from raafd.errors import NotFound
from raafd.gateway.table import CommandTable, Peer
from raafd.protocol.presence import PresenceGet, PresenceSet, PresenceUnwatch

if TYPE_CHECKING:
    from raafd.chat.presence import PresenceService

__all__ = ["add_presence_commands"]


RoomMembers = Callable[[Peer, str], list[str]]
"""The members of a room the connection may see (raises ``not_found``, ``forbidden``)."""


def add_presence_commands(
    table: CommandTable, presence: PresenceService, room_members: RoomMembers | None = None
) -> None:
    async def set_status(conn: Peer, cmd: PresenceSet) -> None:
        view = presence.set(conn.user, cmd.status, cmd.meta)
        await conn.send_json({"type": "presence", "ref": cmd.ref, **view.to_dict()})

    async def get(conn: Peer, cmd: PresenceGet) -> None:
        if cmd.users is not None:
            names = cmd.users
        elif room_members is not None and cmd.room is not None:
            names = room_members(conn, cmd.room)
        else:
            raise NotFound("rooms are not available here", field="room")
        if cmd.watch:  # before the answer: no change between the two is missed
            presence.watch(conn, names)
        users = [view.to_dict() for view in presence.get(names)]
        reply = {"type": "presence.list", "ref": cmd.ref, "users": users}
        if cmd.room is not None:
            reply["room"] = cmd.room
        await conn.send_json(reply)

    async def unwatch(conn: Peer, cmd: PresenceUnwatch) -> None:
        presence.unwatch(conn, cmd.users)
        await conn.send_json({"type": "presence.unwatched", "ref": cmd.ref, "users": cmd.users})

    table.add("presence.set", PresenceSet, set_status)
    table.add("presence.get", PresenceGet, get)
    table.add("presence.unwatch", PresenceUnwatch, unwatch)
