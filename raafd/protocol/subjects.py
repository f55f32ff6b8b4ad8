"""Subjects and subscription patterns of the event bus: part of the wire contract (pure).

The rules, NATS's:

- A subject is dot-separated segments, each 1 or more characters with no dot, no space and no
  wildcard: ``stream.completed``, ``room.lobby.message``. At most :data:`MAX_SEGMENTS`
  segments and :data:`MAX_LENGTH` characters.
- A pattern is a subject whose segments may be ``*`` (exactly one segment, any text) or, as
  the last segment only, ``>`` (one or more trailing segments). So ``room.*.message`` matches
  ``room.lobby.message`` but not ``room.lobby.x.message``; ``room.>`` matches
  ``room.lobby.message`` and ``room.lobby`` but not ``room`` (``>`` needs at least one
  segment); ``>`` alone matches every subject.

A pattern is compiled once (:func:`compile_pattern`) into a regular expression, so matching a
subject at each emit is one ``fullmatch`` of C code, with no split. :func:`covers` and
:func:`overlaps` compare two patterns (whether every subject of one is a subject of the other;
whether any subject is a subject of both), for permissions: a subscription may be refused
outright, or have the subjects it may not see filtered out.
"""

from __future__ import annotations

import re
from typing import Final

from attrs import frozen

from raafd.errors import BadRequest

__all__ = [
    "MAX_LENGTH",
    "MAX_SEGMENTS",
    "Pattern",
    "check_subject",
    "compile_pattern",
    "covers",
    "overlaps",
]

MAX_LENGTH: Final = 256
MAX_SEGMENTS: Final = 16
_SEGMENT = re.compile(r"[^.\s*>]+")


@frozen
class Pattern:
    """A compiled pattern: its ``text``, its segments, and :meth:`matches`."""

    text: str
    segments: tuple[str, ...]
    regex: re.Pattern[str]

    def matches(self, subject: str) -> bool:
        return self.regex.fullmatch(subject) is not None


def _segments(text: str, what: str, field: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise BadRequest(f"a {what} is a non-empty string", field=field)
    if len(text) > MAX_LENGTH:
        raise BadRequest(f"a {what} has at most {MAX_LENGTH} characters", field=field)
    segments = text.split(".")
    if len(segments) > MAX_SEGMENTS:
        raise BadRequest(f"a {what} has at most {MAX_SEGMENTS} segments", field=field)
    return segments


def check_subject(subject: str) -> None:
    """Raise :class:`~raafd.errors.BadRequest` unless ``subject`` is a valid subject (no
    wildcards)."""
    for segment in _segments(subject, "subject", "subject"):
        if not _SEGMENT.fullmatch(segment):
            raise BadRequest(
                f"subject {subject!r}: each segment is one or more characters other than"
                " '.', '*', '>' and spaces",
                field="subject",
            )


def compile_pattern(text: str, *, field: str = "pattern") -> Pattern:
    """Parse and compile ``text``; raise :class:`~raafd.errors.BadRequest` (naming
    ``field``) when it is not a valid pattern."""
    segments = _segments(text, "pattern", field)
    parts: list[str] = []
    for i, segment in enumerate(segments):
        if segment == "*":
            parts.append(r"[^.]+")
        elif segment == ">":
            if i != len(segments) - 1:
                raise BadRequest(f"pattern {text!r}: '>' may only be the last segment", field=field)
            parts.append(r".+")
        elif _SEGMENT.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            raise BadRequest(
                f"pattern {text!r}: each segment is '*', a final '>', or one or more characters"
                " other than '.', '*', '>' and spaces",
                field=field,
            )
    return Pattern(text, tuple(segments), re.compile(r"\.".join(parts)))


def covers(outer: Pattern, inner: Pattern) -> bool:
    """Whether every subject ``inner`` matches is matched by ``outer`` too."""
    a, b = outer.segments, inner.segments
    for i, seg in enumerate(a):
        if seg == ">":
            return len(b) > i  # inner has one or more segments left, each of 1+ subject segments
        if i >= len(b):
            return False
        other = b[i]
        if other == ">":
            return False  # inner matches any number of segments here; outer a fixed count
        if seg != "*" and seg != other:
            return False  # a literal covers only itself (never a wildcard)
    return len(a) == len(b)


def overlaps(a: Pattern, b: Pattern) -> bool:
    """Whether some subject is matched by both ``a`` and ``b``."""
    x, y = a.segments, b.segments
    for i in range(max(len(x), len(y))):
        if i >= len(x) or i >= len(y):
            return False
        s, t = x[i], y[i]
        if s == ">" or t == ">":
            return True  # the other has a segment here (and maybe more): '>' takes them all
        if s != "*" and t != "*" and s != t:
            return False
    return True
