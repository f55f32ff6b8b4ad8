"""Stream events: the one object every transport carries.

A :class:`StreamEvent` is immutable and encodes itself to JSON once (``json``); the WebSocket
gateway, SSE and NDJSON all frame those same bytes, so a token fanned out to many subscribers
is serialised exactly once.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

__all__ = [
    "CANCEL_REASONS",
    "EVENT_KINDS",
    "TERMINAL_KINDS",
    "StreamEvent",
    "build_event",
    "coalesce",
    "make_event",
]

EVENT_KINDS: Final = frozenset(
    {
        "start",
        "content",
        "tool_call",
        "tool_result",
        "handoff",
        "retry",
        "paused",
        "resumed",
        "complete",
        "error",
        "cancelled",
    }
)
TERMINAL_KINDS: Final = frozenset({"complete", "error", "cancelled"})
CANCEL_REASONS: Final = frozenset({"client", "timeout", "drain", "detached", "admin"})


def _encode(stream: str, seq: int, kind: str, fields: dict[str, Any]) -> bytes:
    encoded = orjson.dumps({"stream": stream, "seq": seq, "event": kind, **fields})
    # orjson (3.13) returns bytes that keep a 4 KiB allocation whatever their length; events
    # stay in a stream's log for its whole retention, so keep an exact-size copy (~40x less).
    return memoryview(encoded).tobytes()


class StreamEvent:
    """One sequenced event of one stream. ``json`` is its wire encoding, made once.

    Immutable by convention (nothing assigns to an event after it is built) and compared by
    ``(stream, seq, kind)``. ``fields`` is the event's payload: given when the event is made,
    or decoded from ``json`` on first use when the event is rebuilt from a log (which keeps only
    ``(seq, kind, json)``, see :class:`~raafd.core.log.EventLog`)."""

    __slots__ = ("_fields", "json", "kind", "seq", "stream")

    def __init__(
        self, stream: str, seq: int, kind: str, fields: dict[str, Any] | None, json: bytes
    ) -> None:
        self.stream = stream
        self.seq = seq
        self.kind = kind
        self._fields = fields
        self.json = json

    @property
    def fields(self) -> dict[str, Any]:
        if self._fields is None:
            decoded = orjson.loads(self.json)
            for key in ("stream", "seq", "event"):
                decoded.pop(key, None)  # a feed may leave some out (the event bus has no stream)
            self._fields = decoded
        return self._fields

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS

    @property
    def size(self) -> int:
        return len(self.json)

    def to_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "seq": self.seq, "event": self.kind, **self.fields}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamEvent):
            return NotImplemented
        return (self.stream, self.seq, self.kind) == (other.stream, other.seq, other.kind)

    def __hash__(self) -> int:
        return hash((self.stream, self.seq, self.kind))

    def __repr__(self) -> str:
        return (
            f"StreamEvent(stream={self.stream!r}, seq={self.seq}, kind={self.kind!r},"
            f" fields={self.fields!r})"
        )


def make_event(stream: str, seq: int, kind: str, **fields: Any) -> StreamEvent:
    """Build and encode an event. ``kind`` must be one of :data:`EVENT_KINDS`."""
    return build_event(stream, seq, kind, fields)


def build_event(stream: str, seq: int, kind: str, fields: dict[str, Any]) -> StreamEvent:
    """:func:`make_event` with the fields as a dict, which the event keeps as its ``fields``
    (the caller must not change it afterwards)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown stream event kind {kind!r}")
    return StreamEvent(stream, seq, kind, fields, _encode(stream, seq, kind, fields))


def coalesce(first: StreamEvent, second: StreamEvent) -> StreamEvent:
    """Merge two adjacent ``content`` events; the result carries the later seq (lossless)."""
    if first.kind != "content" or second.kind != "content" or first.stream != second.stream:
        raise ValueError("only adjacent content events of one stream coalesce")
    return make_event(
        second.stream, second.seq, "content", delta=first.fields["delta"] + second.fields["delta"]
    )
