"""Client commands of presence and direct messages, validated into attrs types (no I/O).

- ``presence.set`` {``status``: ``online`` | ``away``, ``meta``: a small JSON object or null}
- ``presence.get`` {``users``: 1 to 100 names, or ``room``, ``watch``: bool} (``watch``: send
  ``presence`` frames at their changes from now on)
- ``presence.unwatch`` {``users``}
- ``dm.send`` {``to``, ``text``, ``client_id``}

Bounds that come from the configuration (``chat.presence_meta_bytes``,
``chat.max_message_length``) are checked by the services, which know it.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
from attrs import field, frozen

from raafd.protocol.commands import _FieldError, _short, names

__all__ = ["MAX_PRESENCE_USERS", "DmSend", "PresenceGet", "PresenceSet", "PresenceUnwatch"]

MAX_PRESENCE_USERS: Final = 100


_users = names(MAX_PRESENCE_USERS, "users")


def _text(_: Any, a: attrs.Attribute[Any], value: str) -> None:
    if not value.strip():
        raise _FieldError(a.name, "must not be empty")


def _object(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise _FieldError(a.name, "must be a JSON object or null")


@frozen
class PresenceSet:
    status: Literal["online", "away"] = "online"
    meta: Any = field(default=None, validator=_object)  # a JSON object or None
    ref: str | None = None


def _optional_users(inst: Any, a: attrs.Attribute[Any], value: list[str] | None) -> None:
    if value is not None:
        _users(inst, a, value)


@frozen
class PresenceGet:
    """Exactly one of ``users`` and ``room`` (its members)."""

    users: list[str] | None = field(default=None, validator=_optional_users)
    room: str | None = field(default=None, validator=_short)
    watch: bool = False
    ref: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.users is None) == (self.room is None):
            raise _FieldError("users", "give exactly one of 'users' or 'room'")


@frozen
class PresenceUnwatch:
    users: list[str] = field(validator=_users)
    ref: str | None = None


@frozen
class DmSend:
    to: str = field(validator=_short)
    text: str = field(validator=_text)
    client_id: str | None = field(default=None, validator=_short)
    ref: str | None = None
