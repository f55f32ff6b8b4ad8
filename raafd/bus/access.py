"""Who may see which subjects of the event bus (pure).

``events.restricted`` maps a pattern to the roles that may see its subjects (by default
``connection.>`` and ``breaker.>``: role ``admin``). For a principal without any of a rule's
roles:

- a subscription whose every subject is inside the rule (``connection.>``,
  ``connection.opened``) is refused with ``forbidden``;
- a wider one that only overlaps it (``>``, ``*.opened``) is allowed, and never sees the rule's
  subjects (they are filtered out for that subscriber, as if they did not match);
- one that does not overlap it is unaffected.

The admin socket (``raafd ctl events``) is an administrator's by definition and sees every
subject.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence

from raafd.errors import Forbidden
from raafd.protocol.subjects import Pattern, compile_pattern, covers, overlaps

__all__ = ["hidden_from"]


@functools.lru_cache(maxsize=256)  # configured patterns only: bounded by the config
def _rule(text: str) -> Pattern:
    return compile_pattern(text, field="events.restricted")


def hidden_from(
    restricted: Mapping[str, Sequence[str]], roles: Collection[str], pattern: Pattern
) -> tuple[Pattern, ...]:
    """The restricted patterns a subscription to ``pattern`` by a principal with ``roles``
    must not see; raises :class:`~raafd.errors.Forbidden` when that is all of it."""
    hidden: list[Pattern] = []
    for text, allowed in restricted.items():
        if any(role in roles for role in allowed):
            continue
        rule = _rule(text)
        if covers(rule, pattern):
            raise Forbidden(
                f"subjects matching {text!r} are only for the roles {', '.join(allowed)}",
                field="pattern",
            )
        if overlaps(rule, pattern):
            hidden.append(rule)
    return tuple(hidden)
