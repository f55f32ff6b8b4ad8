"""Room commands of the WebSocket protocol (and the bodies of the rooms HTTP API), validated
into attrs types (no I/O). See docs/protocol.md, "Rooms".

Shapes and sizes are checked here (a room name, a ``client_id``, a page size); what depends on
the room (its message length, its members, its rate) is checked by the room service.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import attrs
from attrs import field, frozen

from raafd.protocol.commands import FieldError

__all__ = [
    "MAX_PAGE",
    "ROOM_NAME",
    "RoomCancel",
    "RoomCreate",
    "RoomHistory",
    "RoomJoin",
    "RoomLeave",
    "RoomPublish",
    "RoomSend",
    "Typing",
]

ROOM_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PAGE: Final = 1000  # messages per room.history / GET .../messages page
_MAX_ID: Final = 128


def _room_name(_: Any, a: attrs.Attribute[Any], value: str) -> None:
    if not ROOM_NAME.fullmatch(value):
        raise FieldError(a.name, "a room name is 1 to 64 letters, digits or _ . -")


def _short(_: Any, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not 0 < len(value) <= _MAX_ID:
        raise FieldError(a.name, f"must be 1 to {_MAX_ID} characters")


def _seq(_: Any, a: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise FieldError(a.name, "must be 0 or more")


def _page(_: Any, a: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_PAGE:
        raise FieldError(a.name, f"must be 1 to {MAX_PAGE}")


def _positive(_: Any, a: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise FieldError(a.name, "must be greater than 0")


def _users(_: Any, a: attrs.Attribute[Any], value: list[str] | None) -> None:
    if value is None:
        return
    if len(value) > 1000:
        raise FieldError(a.name, "at most 1000 principals")
    for i, user in enumerate(value):
        if not 0 < len(user) <= _MAX_ID:
            raise FieldError(f"{a.name}.{i}", f"must be 1 to {_MAX_ID} characters")


@frozen
class RoomCreate:
    """``room.create`` and ``POST /v1/rooms``: a new room; attributes left out take the
    defaults of ``[rooms.NAME]``."""

    room: str = field(validator=_room_name)
    title: str | None = field(default=None, validator=_short)
    description: str | None = None
    max_members: int | None = field(default=None, validator=_positive)
    history: int | None = field(default=None, validator=_positive)
    history_ttl: float | None = None
    restricted: bool | None = None
    allow: list[str] | None = field(default=None, validator=_users)
    agent: str | None = field(default=None, validator=_short)
    agent_reply: Literal["mention", "every_message", "off"] | None = None
    agent_cancel: bool | None = None
    offline_delivery: bool | None = None
    max_message_length: int | None = field(default=None, validator=_positive)
    rate_limit: int | None = field(default=None, validator=_positive)
    ref: str | None = None

    def settings(self) -> dict[str, Any]:
        """The attributes given (not None), as ``[rooms.NAME]`` keys."""
        skip = {"room", "ref"}
        return {
            a.name: getattr(self, a.name)
            for a in attrs.fields(RoomCreate)
            if a.name not in skip and getattr(self, a.name) is not None
        }


@frozen
class RoomJoin:
    """``room.join``: ``after`` for exactly the messages after it, else the last ``limit``
    (default: the room's whole kept history, up to :data:`MAX_PAGE`)."""

    room: str = field(validator=_room_name)
    after: int | None = field(default=None, validator=_seq)
    limit: int | None = field(default=None, validator=_page)
    ref: str | None = None


@frozen
class RoomLeave:
    room: str = field(validator=_room_name)
    ref: str | None = None


@frozen
class RoomSend:
    room: str = field(validator=_room_name)
    text: str
    client_id: str | None = field(default=None, validator=_short)
    meta: dict[str, Any] | None = None
    ref: str | None = None


@frozen
class RoomPublish:
    """The body of ``POST /v1/rooms/{room}/messages`` (the room is in the path)."""

    text: str
    client_id: str | None = field(default=None, validator=_short)
    meta: dict[str, Any] | None = None


@frozen
class RoomHistory:
    """``room.history``: kept messages with ``after < id < before``, a page of ``limit``."""

    room: str = field(validator=_room_name)
    after: int | None = field(default=None, validator=_seq)
    before: int | None = field(default=None, validator=_seq)
    limit: int = field(default=100, validator=_page)
    ref: str | None = None


@frozen
class RoomCancel:
    """``room.cancel``: cancel the agent's running reply in the room (if the room allows it)."""

    room: str = field(validator=_room_name)
    ref: str | None = None


@frozen
class Typing:
    room: str = field(validator=_room_name)
    state: Literal["start", "stop"]
    ref: str | None = None
