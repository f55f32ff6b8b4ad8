"""How a session's history is kept within its bounds: a pure rule, shared by every backend.

Trimming drops whole turns, oldest first (a turn starts at a ``user`` message; messages before
the first one form a turn of their own), so a ``tool`` message never loses the assistant
``tool_calls`` message before it. Only when the newest turn alone is over a bound are its
middle steps dropped (each an assistant message with its tool results, never split), keeping
its user message and its last step; a turn still over the bound then goes entirely.
:func:`plan_trim` is that rule as a function of the rows; a store keeps, for each message, only
what the rule needs (:class:`Row`: its kind and its :func:`estimate_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from attrs import frozen

__all__ = ["CHARS_PER_TOKEN", "Row", "estimate_tokens", "kind_of", "plan_trim"]

CHARS_PER_TOKEN: Final = 4


def kind_of(message: dict[str, Any]) -> str:
    """``user``, ``tool`` or ``other``: what trimming needs to know of a message's role."""
    role = message.get("role")
    return role if role in ("user", "tool") else "other"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in value)
    return str(value)


def estimate_tokens(message: dict[str, Any]) -> int:
    """About 4 characters a token over role, content and tool-call names and arguments."""
    chars = len(_text(message.get("role"))) + len(_text(message.get("content")))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            if isinstance(function, dict):
                chars += len(_text(function.get("name"))) + len(_text(function.get("arguments")))
    return max(1, -(-chars // CHARS_PER_TOKEN))


@frozen
class Row:
    """What trimming knows of a stored message."""

    seq: int
    kind: str  # user, tool, other
    tokens: int


def plan_trim(rows: Sequence[Row], max_messages: int, max_tokens: int) -> list[int]:
    """The seqs to delete so that ``rows`` (one session, oldest first) fits both bounds; see
    the module docstring for the rule."""
    # A unit is never split: a message with the tool results that follow it.
    units: list[list[Row]] = []
    for row in rows:
        if row.kind == "tool" and units:
            units[-1].append(row)
        else:
            units.append([row])
    turns: list[list[list[Row]]] = []
    for unit in units:
        if unit[0].kind == "user" or not turns:
            turns.append([unit])
        else:
            turns[-1].append(unit)

    count = len(rows)
    tokens = sum(r.tokens for r in rows)
    dropped: list[int] = []

    def drop(unit: list[Row]) -> None:
        nonlocal count, tokens
        count -= len(unit)
        tokens -= sum(r.tokens for r in unit)
        dropped.extend(r.seq for r in unit)

    def over() -> bool:
        return count > max_messages or tokens > max_tokens

    while over() and len(turns) > 1:
        for unit in turns.pop(0):
            drop(unit)
    if over() and turns:
        last = turns[0]
        while over() and len(last) > 2:  # keep its first unit (the user message) and last
            drop(last.pop(1))
        if over():
            for unit in last:
                drop(unit)
    return sorted(dropped)
