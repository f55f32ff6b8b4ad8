"""``GET /v1/presence``: who is online.

- ``?users=a,b`` (1 to 100 names): each user's presence, in that order (a user raafd does not
  know is ``offline`` with ``last_seen`` null);
- without ``users``: the users online or away, by name, at most ``limit`` (default 100, at most
  1000).

Answer: ``{"users": [{"user", "status", "last_seen", "meta"}, …]}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from raafd.errors import BadRequest
from raafd.http.asgi import JSONResponse, Request, Response, Router
from raafd.protocol.presence import MAX_PRESENCE_USERS

if TYPE_CHECKING:
    from raafd.chat.presence import PresenceService
    from raafd.chat.rooms import Rooms
    from raafd.security.guard import Guard

__all__ = ["add_presence_routes", "add_room_member_routes", "query_limit"]

MAX_LIST: Final = 1000


def query_limit(request: Request, default: int = 100, most: int = MAX_LIST) -> int:
    """The request's ``limit`` query parameter: 1 to ``most`` (400 naming it otherwise)."""
    text = request.query.get("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise BadRequest(f"limit must be an integer from 1 to {most}", field="limit")
    return int(text)


def add_presence_routes(router: Router, presence: PresenceService) -> None:
    async def listing(request: Request) -> Response:
        names = request.query.get("users")
        if names is None:
            views = presence.present(query_limit(request))
        else:
            users = [name for name in names.split(",") if name]
            if not 1 <= len(users) <= MAX_PRESENCE_USERS or any(len(u) > 128 for u in users):
                raise BadRequest(
                    f"users must name 1 to {MAX_PRESENCE_USERS} users of 1 to 128 characters,"
                    " separated by commas",
                    field="users",
                )
            views = presence.get(users)
        return JSONResponse({"users": [view.to_dict() for view in views]})

    router.add("GET", "/v1/presence", listing)


def add_room_member_routes(router: Router, rooms: Rooms, guard: Guard) -> None:
    """``GET /v1/rooms/{room}/members`` → ``{"room", "members": [{user, online, status,
    last_seen, meta}, …]}`` (``online``: joined to the room on a connection now; ``status``:
    the user's presence). As ``GET /v1/rooms/{room}``: ``room.join`` permission, restricted
    rooms only for their allowlist."""

    async def members(request: Request, room: str) -> Response:
        guard.require(request.principal, "room.join", room, "room")
        found = rooms.get(room, request.principal.user)
        return JSONResponse({"room": found.name, "members": found.describe()["members"]})

    router.add("GET", "/v1/rooms/{room}/members", members)
