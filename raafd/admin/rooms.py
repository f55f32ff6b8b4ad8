"""The admin commands of rooms (``raafd ctl rooms``, ``raafd ctl room NAME``,
``raafd ctl kick --room NAME USER``):

- ``rooms`` → one row per room: name, members, connections joined, head, messages since
  start, the running reply;
- ``room`` {``room``} → the room as ``GET /v1/rooms/{room}`` shows it, with its message rate;
- ``room-kick`` {``room``, ``user``} → ends the user's membership; their connections stop
  receiving the room and the members get ``room.member`` {``leave``}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raafd.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from raafd.admin.server import Handler
    from raafd.chat.rooms import Rooms

__all__ = ["room_admin_commands"]


def _name(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"give the {key}", field=key)
    return value


def room_admin_commands(rooms: Rooms) -> dict[str, Handler]:
    async def listing(args: dict[str, Any]) -> Any:
        return [
            {
                "room": r.name,
                "members": len(r.members),
                "online": len(r.online),
                "head": r.head,
                "messages": r.messages,
                "reply": r.reply.id if r.reply is not None else None,
            }
            for r in rooms.rooms.values()
        ]

    async def one(args: dict[str, Any]) -> Any:
        return rooms.get(_name(args, "room")).describe()

    async def kick(args: dict[str, Any]) -> Any:
        room, user = _name(args, "room"), _name(args, "user")
        if not await rooms.kick(room, user):
            raise NotFound(f"{user} is not in room {room}", field="user")
        return {"room": room, "kicked": user}

    return {"rooms": listing, "room": one, "room-kick": kick}
