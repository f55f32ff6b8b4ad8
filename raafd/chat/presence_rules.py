"""Presence rules: one user's presence as a pure function of (state, event, now).

The rule of this file: **what others see changes only here, and only when the status or the
custom meta really changes.** :func:`step` takes a user's :class:`UserPresence`, one event and
the time, and returns the new state and the change to announce (or None); :func:`due` says when
the state must be looked at again with :class:`Tick` if nothing else happens. No I/O, no clock:
the service (:mod:`raafd.chat.presence`) feeds events and times in, and tests give exact ones.

A user (a principal) is one presence across all their connections:

- ``online`` from their first connection, ``away`` after ``away_after`` seconds without
  activity (a command other than the passive ones; see the service), ``online`` again at the
  next activity. ``presence.set`` with ``away`` makes the user away until they set ``online``
  (activity does not undo it); the custom ``meta`` stays until they set another.
- When their last connection closes nothing is announced at once: they become ``offline`` only
  after ``offline_after`` seconds (the linger). A connection within the linger (a page reload, a
  dropped network) keeps the status as it was, so nobody sees a leave and a join.
- ``last_seen`` is the last time raafd saw the user: their last activity while connected, the
  moment their last connection closed once offline. Times are unix seconds.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
from attrs import frozen

__all__ = [
    "STATUSES",
    "Activity",
    "Change",
    "Connected",
    "Disconnected",
    "Event",
    "PresenceRules",
    "SetStatus",
    "Status",
    "Tick",
    "UserPresence",
    "due",
    "step",
]

Status = Literal["online", "away", "offline"]
STATUSES: Final[tuple[Status, ...]] = ("online", "away", "offline")


@frozen
class PresenceRules:
    away_after: float
    offline_after: float


@frozen
class UserPresence:
    """One user's presence. ``connections``: how many are open; ``gone_at``: when the last one
    closed (None while one is open); ``manual_away``: set away by ``presence.set``."""

    status: Status = "offline"
    connections: int = 0
    last_active: float | None = None
    gone_at: float | None = None
    manual_away: bool = False
    meta: dict[str, Any] | None = None

    @property
    def last_seen(self) -> float | None:
        if self.gone_at is not None:
            return self.gone_at
        return self.last_active


@frozen
class Change:
    """What others are told: the user's status, ``last_seen`` and custom ``meta`` now."""

    status: Status
    last_seen: float | None
    meta: dict[str, Any] | None


@frozen
class Connected:
    """A connection of the user opened (and was authenticated)."""


@frozen
class Disconnected:
    """A connection of the user closed."""


@frozen
class Activity:
    """The user did something on one of their connections."""


@frozen
class SetStatus:
    """``presence.set``: ``online`` or ``away``, and the custom ``meta`` (None clears it)."""

    status: Literal["online", "away"]
    meta: dict[str, Any] | None


@frozen
class Tick:
    """Time passed (the service calls this at :func:`due`)."""


Event = Connected | Disconnected | Activity | SetStatus | Tick


def _active_status(state: UserPresence) -> Status:
    return "away" if state.manual_away else "online"


def step(
    state: UserPresence, event: Event, now: float, rules: PresenceRules
) -> tuple[UserPresence, Change | None]:
    """The state after ``event`` at ``now``, and the change to announce (None: nothing
    visible changed)."""
    new = state
    if isinstance(event, Connected):
        new = attrs.evolve(
            state,
            connections=state.connections + 1,
            last_active=now,
            gone_at=None,
            status=_active_status(state),  # a connection is activity: an auto away ends
        )
    elif isinstance(event, Disconnected):
        if state.connections <= 0:
            return state, None  # not ours to count (a connection the service never saw)
        left = state.connections - 1
        new = attrs.evolve(state, connections=left, gone_at=now if left == 0 else None)
    elif isinstance(event, Activity):
        if state.connections <= 0:
            return state, None
        active = _active_status(state) if state.status == "away" else state.status
        new = attrs.evolve(state, last_active=now, status=active)
    elif isinstance(event, SetStatus):
        manual_away = event.status == "away"
        status: Status = "away" if manual_away else "online"
        if state.connections <= 0:
            status = state.status  # set by an API call with no connection: status stays
        new = attrs.evolve(
            state, manual_away=manual_away, meta=event.meta, status=status, last_active=now
        )
    else:  # Tick
        when = due(state, rules)
        if when is None or now < when:
            return state, None
        if state.connections <= 0:
            new = attrs.evolve(state, status="offline")
        else:
            new = attrs.evolve(state, status="away")
    if new.status == state.status and new.meta == state.meta:
        return new, None
    return new, Change(new.status, new.last_seen, new.meta)


def due(state: UserPresence, rules: PresenceRules) -> float | None:
    """When :class:`Tick` may change ``state``: the linger's end while no connection is open,
    the away deadline while an online user is connected; None when only an event can."""
    if state.connections <= 0:
        if state.status != "offline" and state.gone_at is not None:
            return state.gone_at + rules.offline_after
        return None
    if state.status == "online" and state.last_active is not None:
        return state.last_active + rules.away_after
    return None
