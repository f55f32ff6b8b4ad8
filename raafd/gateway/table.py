"""The gateway's command table: a client command's ``type`` → its attrs class and its handler.

A connection decodes a frame with the class its ``type`` names
(:func:`raafd.protocol.commands.parse_command`, one dict lookup) and awaits the handler with
itself (as a :class:`Peer`) and the command; a type the table does not hold gets the protocol's
``bad_request`` "unknown command type". A subsystem adds its commands with the services they use
bound in, the way its HTTP routes are added to the router::

    def add_room_commands(table: CommandTable, rooms: Rooms) -> None:
        async def join(conn: Peer, cmd: RoomJoin) -> None:
            rooms.join(cmd.room, conn.id)
            await conn.send_json({"type": "room.joined", "ref": cmd.ref, "room": cmd.room})

        table.add("room.join", RoomJoin, join)

so the connection class never changes for a new command. A subsystem that must know when a
user's connections come and go (presence, offline queues) adds a :class:`ConnectionObserver`
to the gateway's ``observers`` the same way. Handlers raise
:class:`~raafd.errors.RaafdError` for the client to see (answered as an ``error`` frame with the
command's ``ref``); anything else is a bug and costs the connection alone (close 1011).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from raafd.auth import Principal
from raafd.core.feed import Subscription
from raafd.net.delivery import Framing

__all__ = ["CommandHandler", "CommandTable", "ConnectionObserver", "Peer"]

C = TypeVar("C")


class Peer(Protocol):
    """The connection a command came from, as its handler sees it."""

    id: str
    principal: Principal  # who the connection acts as (auth off: anonymous)
    user: str  # principal.user
    authenticated: bool
    draining: bool  # the server is draining: start nothing new here

    async def send_json(self, message: dict[str, Any]) -> None:
        """Send a reply (a ``ref`` that is None is left out)."""
        ...

    def send_nowait(self, message: dict[str, Any]) -> None:
        """Send a frame pushed from another task (a presence change, a direct message)
        without waiting: written at once or queued. A connection whose queue is full is too
        far behind: it is closed with 4001 (what it missed it gets on its next connection).
        Never raises."""
        ...

    async def authenticate(self, token: str | None) -> None:
        """Check a ``hello``'s token and welcome the client; closes 4401 when it is invalid."""
        ...

    def check_room(self) -> None:
        """Raise ``too_many_streams`` when one more attachment would pass the limit."""
        ...

    def attach(
        self,
        feed_id: str,
        subscribe: Callable[[], Subscription],
        reply: dict[str, Any] | None,
        ref: str | None = None,
        *,
        framing: Framing | None = None,
    ) -> None:
        """Deliver the feed ``feed_id`` on this connection from the subscription
        ``subscribe()`` opens, ``reply`` (when given) in one write with the first events, framed
        by ``framing`` (default: ``stream.event`` frames). Errors (``conflict``,
        ``too_many_streams``, and whatever ``subscribe`` raises) come before anything is
        registered or sent."""
        ...

    def detach(self, feed_id: str) -> None:
        """Stop delivering ``feed_id`` here (its subscription closes); ``not_found`` when it
        is not attached."""
        ...


class ConnectionObserver(Protocol):
    """Told when an authenticated connection opens and closes, and of each command it sends.
    The gateway calls every observer, in the order they were added."""

    async def connected(self, conn: Peer) -> None:
        """The connection is authenticated and welcomed; runs in the connection's own task
        before its next frame is read (what it sends comes right after ``welcome``). Raising
        closes this connection (1011)."""
        ...

    def activity(self, conn: Peer, kind: str) -> None:
        """A well-formed command of type ``kind`` arrived (before its handler runs)."""
        ...

    def disconnected(self, conn: Peer) -> None:
        """The connection closed (only after :meth:`connected`); must not block or raise."""
        ...


CommandHandler = Callable[[Peer, C], Awaitable[None]]
"""Handles one decoded command of one connection."""


class CommandTable:
    """Client command types → (command class, handler). Filled while the daemon is wired
    (:meth:`add`), read by every frame."""

    __slots__ = ("handlers", "types")

    def __init__(self) -> None:
        self.types: dict[str, type[Any]] = {}
        self.handlers: dict[str, CommandHandler[Any]] = {}

    def add(self, kind: str, command: type[C], handler: CommandHandler[C]) -> None:
        """Register ``kind``: frames of that ``type`` are structured into ``command`` and
        handled by ``handler``. A type is registered once."""
        if kind in self.types:
            raise ValueError(f"the gateway command {kind!r} is registered twice")
        self.types[kind] = command
        self.handlers[kind] = handler

    def __contains__(self, kind: str) -> bool:
        return kind in self.types
