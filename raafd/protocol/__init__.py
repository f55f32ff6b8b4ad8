"""Wire types and encoding (no I/O)."""

from raafd.protocol.events import (
    CANCEL_REASONS,
    EVENT_KINDS,
    TERMINAL_KINDS,
    StreamEvent,
    coalesce,
    make_event,
)

__all__ = [
    "CANCEL_REASONS",
    "EVENT_KINDS",
    "TERMINAL_KINDS",
    "StreamEvent",
    "coalesce",
    "make_event",
]
