"""The gateway commands of the event bus: ``events.subscribe`` and ``events.unsubscribe``.

A subscription is attached to the connection like a stream (one :class:`~raafd.net.delivery.
Delivery`, counted against ``streams.max_streams_per_connection``) under its name ``sub``
(default: its pattern), and delivered as ``event`` and ``events.lagged`` frames that carry
that name. See docs/protocol.md ("Event bus").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import attrs
import orjson
from attrs import field, frozen

from raafd.bus import EVENT, Bus, check_where, hidden_from
from raafd.errors import NotFound
from raafd.gateway.frames import text_frame
from raafd.gateway.table import CommandTable, Peer
from raafd.protocol.events import StreamEvent
from raafd.protocol.subjects import compile_pattern
from raafd.security.guard import Guard

__all__ = ["EventsSubscribe", "EventsUnsubscribe", "add_event_commands", "feed_key"]

_MAX_SUB = 256


def _sub_name(_: Any, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not 0 < len(value) <= _MAX_SUB:
        raise ValueError(f"{a.name} must be 1 to {_MAX_SUB} characters")


def _boolean(_: Any, a: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{a.name} must be true or false")


@frozen
class EventsSubscribe:
    """``events.subscribe``: ``pattern``; ``since`` (the last seq the client has: replay from
    the history after it; default: from now on); ``where`` (field filter); ``once``; ``sub``
    (the subscription's name in its frames and for ``events.unsubscribe``; default: the
    pattern)."""

    pattern: str
    since: int | None = None
    where: dict[str, Any] | None = None
    once: Any = field(default=False, validator=_boolean)
    sub: str | None = field(default=None, validator=_sub_name)
    ref: str | None = None


@frozen
class EventsUnsubscribe:
    sub: str = field(validator=_sub_name)
    ref: str | None = None


def feed_key(sub: str) -> str:
    """A bus subscription's key among a connection's attachments (a ``/``, which no stream id
    holds, keeps it apart from streams)."""
    return f"bus/{sub}"


class _EventFraming:
    """Bus events as ``event`` frames and lag notices as ``events.lagged`` frames, each with
    the subscription's name: the event's JSON is reused behind a prefix, not re-encoded."""

    __slots__ = ("_event", "_lagged")

    transport = "websocket"
    heartbeat = b""

    def __init__(self, sub: str) -> None:
        name = orjson.dumps(sub)
        self._event = b'{"type":"event","sub":' + name + b","
        self._lagged = b'{"type":"events.lagged","sub":' + name + b","

    def event(self, event: StreamEvent) -> bytes:
        prefix = self._event if event.kind == EVENT else self._lagged
        return text_frame(prefix + event.json[1:])

    def batch(self, events: list[StreamEvent]) -> bytes:
        return b"".join([self.event(event) for event in events])


def add_event_commands(
    table: CommandTable,
    bus: Bus,
    guard: Guard,
    restricted: Callable[[], Mapping[str, Sequence[str]]],
) -> None:
    """Register the bus commands. ``guard`` checks the pattern against the principal's roles
    (``events.subscribe``); ``restricted()`` is ``events.restricted`` now (reloadable), applied
    to the same roles."""

    async def subscribe(conn: Peer, cmd: EventsSubscribe) -> None:
        pattern = compile_pattern(cmd.pattern)
        where = check_where(cmd.where) if cmd.where is not None else None
        guard.require(conn.principal, "events.subscribe", cmd.pattern, "pattern")
        hidden = hidden_from(restricted(), guard.roles_of(conn.principal), pattern)
        if cmd.since is not None:
            bus.check_since(cmd.since)
        name = cmd.sub if cmd.sub is not None else cmd.pattern
        reply = {
            "type": "events.subscribed",
            "ref": cmd.ref,
            "sub": name,
            "pattern": cmd.pattern,
            "head": bus.head,
        }
        conn.attach(
            feed_key(name),
            partial(
                bus.subscribe,
                pattern,
                since=cmd.since,
                where=where,
                deny=hidden,
                once=cmd.once,
                context={"conn": conn.id},
            ),
            reply,
            cmd.ref,
            framing=_EventFraming(name),
        )

    async def unsubscribe(conn: Peer, cmd: EventsUnsubscribe) -> None:
        try:
            conn.detach(feed_key(cmd.sub))
        except NotFound:
            raise NotFound(f"no subscription {cmd.sub!r} here", field="sub") from None
        await conn.send_json({"type": "events.unsubscribed", "ref": cmd.ref, "sub": cmd.sub})

    table.add("events.subscribe", EventsSubscribe, subscribe)
    table.add("events.unsubscribe", EventsUnsubscribe, unsubscribe)
