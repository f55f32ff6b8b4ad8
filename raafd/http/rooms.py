"""The rooms HTTP API: the same rooms as the WebSocket, for services and operators.

- ``GET /v1/rooms`` → ``{"rooms": [{room, title, restricted, agent, members, online, head}]}``:
  the rooms the principal may enter;
- ``POST /v1/rooms`` (body as ``room.create``, without ``type``/``ref``) → 201, the room;
- ``GET /v1/rooms/{room}`` → the room: attributes, ``head``, ``oldest``, ``members``
  [{user, online}], counts, the running agent reply;
- ``GET /v1/rooms/{room}/messages?after=&before=&limit=`` → ``{"room", "messages"}``: kept
  messages with ``after < id < before``, the first ``limit`` after ``after``, else the last
  ``limit`` (default 100, at most 1000);
- ``POST /v1/rooms/{room}/messages`` {``text``, ``client_id``?, ``meta``?} → 201
  ``{"room", "id"}`` once the message is durable (``duplicate: true`` for a resend with a kept
  ``client_id``): published as the request's principal, who need not be a member.

A restricted room is ``403 forbidden`` to a principal outside its allowlist, on every route;
so is a room the principal's roles do not grant (``room.join`` to read, ``room.publish`` to
post).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raafd.errors import BadRequest
from raafd.http.asgi import JSONResponse, Request, Response, Router
from raafd.http.presence import query_limit
from raafd.protocol.rooms import MAX_PAGE, RoomCreate, RoomPublish

if TYPE_CHECKING:
    from raafd.chat.rooms import Rooms
    from raafd.security.guard import Guard

__all__ = ["add_room_routes"]


def _id(request: Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise BadRequest(f"{name} must be a message id (0 or more)", field=name)
    return int(text)


def add_room_routes(router: Router, rooms: Rooms, guard: Guard) -> None:
    """``guard``: the role policy, as on the WebSocket (``room.join`` to read a room or create
    one, ``room.publish`` to post to it)."""

    def may(request: Request, action: str, room: str) -> None:
        guard.require(request.principal, action, room, "room")

    async def listing(request: Request) -> Response:
        return JSONResponse({"rooms": rooms.listing(request.principal.user)})

    async def create(request: Request) -> Response:
        cmd = await request.json(RoomCreate)
        may(request, "room.join", cmd.room)
        room = await rooms.create(cmd.room, cmd.settings(), request.principal.user)
        return JSONResponse(room.describe(), 201, {"location": f"/v1/rooms/{room.name}"})

    async def one(request: Request, room: str) -> Response:
        may(request, "room.join", room)
        return JSONResponse(rooms.get(room, request.principal.user).describe())

    async def messages(request: Request, room: str) -> Response:
        may(request, "room.join", room)
        found = await rooms.history(
            room,
            request.principal.user,
            after=_id(request, "after"),
            before=_id(request, "before"),
            limit=query_limit(request, 100, MAX_PAGE),
        )
        return JSONResponse({"room": room, "messages": [m.to_wire() for m in found]})

    async def publish(request: Request, room: str) -> Response:
        may(request, "room.publish", room)
        body = await request.json(RoomPublish)
        message = await rooms.send(
            room,
            request.principal.user,
            body.text,
            client_id=body.client_id,
            meta=body.meta,
            member=False,
        )
        answer = {"room": room, "id": message.id}
        if message.duplicate:
            answer["duplicate"] = True
        return JSONResponse(answer, 201)

    router.add("GET", "/v1/rooms", listing)
    router.add("POST", "/v1/rooms", create)
    router.add("GET", "/v1/rooms/{room}", one)
    router.add("GET", "/v1/rooms/{room}/messages", messages)
    router.add("POST", "/v1/rooms/{room}/messages", publish)
