"""The admin ``events`` command: the event bus read over the admin socket, for
``raafd ctl events PATTERN [--since N] [--follow]``.

One request, one answer (the admin protocol's rule): the held events matching ``pattern``
after ``since`` (default: the head, so only what comes next), at most ``limit``; when there is
none yet and ``wait`` is given, the answer waits up to ``wait`` seconds for one (a long poll:
``--follow`` asks again from the ``next`` seq it was given). Events the history no longer holds
are reported as ``lagged {missed_from, missed_to}``. The admin socket is the administrator's:
every subject is visible (``events.restricted`` does not apply).
"""

from __future__ import annotations

from typing import Any

import trio

from raafd.admin.protocol import EventsArgs, structure_args
from raafd.admin.server import Handler
from raafd.bus import Bus
from raafd.errors import BadRequest, Gone
from raafd.protocol.subjects import compile_pattern

__all__ = ["events_handler"]


def events_handler(bus: Bus) -> Handler:
    async def events(raw: dict[str, Any]) -> Any:
        args = structure_args(raw, EventsArgs)
        pattern = compile_pattern(args.pattern)
        since = bus.head if args.since is None else args.since
        if since > bus.head:
            raise BadRequest(
                f"since is {since} but the last event is seq {bus.head} (the bus's seqs start"
                " again at 1 when the daemon restarts)",
                field="args.since",
            )
        lagged = None
        if since + 1 < bus.oldest:
            lagged = {"missed_from": since + 1, "missed_to": bus.oldest - 1}
            since = bus.oldest - 1
        found, cursor = bus.replay(pattern, since, limit=args.limit)
        if not found and args.wait > 0:
            with trio.move_on_after(args.wait):
                await bus.wait_for(pattern, since=cursor)
            try:
                found, cursor = bus.replay(pattern, cursor, limit=args.limit)
            except Gone:  # evicted while waiting: a burst larger than the history
                lagged = {"missed_from": cursor + 1, "missed_to": bus.oldest - 1}
                found, cursor = bus.replay(pattern, bus.oldest - 1, limit=args.limit)
        return {
            "events": [
                {"seq": e.seq, "subject": e.subject, "ts": e.ts, "data": e.data} for e in found
            ],
            "next": cursor,
            "head": bus.head,
            "lagged": lagged,
        }

    return events
