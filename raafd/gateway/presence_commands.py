"""The gateway commands of presence: ``presence.set``, ``presence.get`` (optionally watching
the users asked about) and ``presence.unwatch``, given the presence service (the daemon
registers them, and adds the service to the gateway's connection observers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raafd.gateway.table import CommandTable, Peer
from raafd.protocol.presence import PresenceGet, PresenceSet, PresenceUnwatch

if TYPE_CHECKING:
    from raafd.chat.presence import PresenceService

__all__ = ["add_presence_commands"]


def add_presence_commands(table: CommandTable, presence: PresenceService) -> None:
    async def set_status(conn: Peer, cmd: PresenceSet) -> None:
        view = presence.set(conn.user, cmd.status, cmd.meta)
        await conn.send_json({"type": "presence", "ref": cmd.ref, **view.to_dict()})

    async def get(conn: Peer, cmd: PresenceGet) -> None:
        if cmd.watch:  # before the answer: no change between the two is missed
            presence.watch(conn, cmd.users)
        users = [view.to_dict() for view in presence.get(cmd.users)]
        await conn.send_json({"type": "presence.list", "ref": cmd.ref, "users": users})

    async def unwatch(conn: Peer, cmd: PresenceUnwatch) -> None:
        presence.unwatch(conn, cmd.users)
        await conn.send_json({"type": "presence.unwatched", "ref": cmd.ref, "users": cmd.users})

    table.add("presence.set", PresenceSet, set_status)
    table.add("presence.get", PresenceGet, get)
    table.add("presence.unwatch", PresenceUnwatch, unwatch)
