"""The event bus: subjects, patterns, subscriptions, permissions and webhooks.

Components do not import it: each takes an ``emit(subject, data)`` callable, which the daemon
binds to :meth:`Bus.emit`. See :mod:`raafd.bus.bus` for the rules.
"""

from raafd.bus.access import hidden_from
from raafd.bus.bus import (
    EVENT,
    LAGGED,
    Bus,
    BusEvent,
    Emit,
    Where,
    bus_event,
    check_where,
    no_emit,
)

__all__ = [
    "EVENT",
    "LAGGED",
    "Bus",
    "BusEvent",
    "Emit",
    "Where",
    "bus_event",
    "check_where",
    "hidden_from",
    "no_emit",
]
