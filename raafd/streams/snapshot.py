"""Snapshots: one event that stands for a stream's events up to a seq.

The rule of this file:

    A snapshot at seq S holds exactly what the events 1..S say, folded: ``text`` is the
    concatenation of their ``content`` deltas, ``tool_calls`` their ``tool_call`` events in
    order (each with its ``tool_result`` when that is within 1..S), ``agent`` the agent speaking
    at S. A client that renders the snapshot and then the events after S renders what a client
    given every event renders. When the fold would pass ``streams.max_snapshot_bytes``, there
    is no snapshot (never a partial one).

A stream folds the events its log evicts as they go (:class:`Fold`, fed by the log's
``on_evict``, so nothing is spent until a log is full), bounded by ``max_snapshot_bytes``; a
snapshot is that fold continued over the events the log still holds. So a snapshot is possible
after the log has evicted old events: for a client that wants the text, "beyond retention" is
no longer an error.
"""

from __future__ import annotations

from typing import Any

import orjson

from raafd.protocol.events import StreamEvent

__all__ = ["SNAPSHOT", "Fold", "snapshot_event"]

SNAPSHOT = "snapshot"


class Fold:
    """What the events up to ``seq`` say (see the module docstring), or ``overflow`` once that
    passed ``limit`` bytes (then it keeps nothing)."""

    __slots__ = ("_by_id", "_parts", "agent", "limit", "nbytes", "overflow", "seq", "tool_calls")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seq = 0
        self.agent = ""
        self._parts: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self._by_id: dict[str, int] = {}  # tool_id → index in tool_calls (for its result)
        self.nbytes = 0
        self.overflow = False

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def copy(self) -> Fold:
        other = Fold(self.limit)
        other.seq, other.agent, other.nbytes, other.overflow = (
            self.seq,
            self.agent,
            self.nbytes,
            self.overflow,
        )
        text = self.text
        other._parts = [text] if text else []
        other.tool_calls = [dict(call) for call in self.tool_calls]
        other._by_id = dict(self._by_id)
        return other

    def add(self, event: StreamEvent) -> None:
        """Fold the next event in."""
        if event.seq != self.seq + 1:
            raise ValueError(f"expected seq {self.seq + 1}, got {event.seq}")
        self.seq = event.seq
        if self.overflow:
            return
        kind, fields = event.kind, event.fields
        if kind == "content":
            delta = str(fields.get("delta", ""))
            self._parts.append(delta)
            self._grow(len(delta.encode()))
        elif kind == "tool_call":
            call = {k: fields.get(k) for k in ("tool_id", "tool_name", "arguments")}
            self._by_id[str(call["tool_id"])] = len(self.tool_calls)
            self.tool_calls.append(call)
            self._grow(len(orjson.dumps(call)))
        elif kind == "tool_result":
            at = self._by_id.get(str(fields.get("tool_id")))
            if at is not None:
                result = {"result": fields.get("result"), "is_error": fields.get("is_error")}
                self.tool_calls[at].update(result)
                self._grow(len(orjson.dumps(result)))
        if kind == "handoff":
            self.agent = str(fields.get("to_agent", self.agent))
        elif isinstance(fields.get("agent"), str):  # `start`, and every event of a workflow
            self.agent = fields["agent"]

    def _grow(self, n: int) -> None:
        self.nbytes += n
        if self.nbytes > self.limit:
            self.overflow = True
            self._parts = []
            self.tool_calls = []
            self._by_id = {}


def snapshot_event(stream: str, fold: Fold) -> StreamEvent:
    """The ``snapshot`` event of ``fold`` (its ``seq`` is the last seq it covers)."""
    fields = {"text": fold.text, "tool_calls": fold.tool_calls, "agent": fold.agent}
    json = orjson.dumps({"stream": stream, "seq": fold.seq, "event": SNAPSHOT, **fields})
    return StreamEvent(stream, fold.seq, SNAPSHOT, fields, json)
