"""Typing indicators: what the other members of a room see, as a pure function of time.

The rule of this file, for one user in one room:

    The others see ``start`` when the user starts typing and ``stop`` when the user stops,
    or when ``typing_timeout`` passes without a refresh (a client that went away without a
    ``stop`` does not type forever). They see at most one relay per second, and never a
    relay that changes nothing; the sender never sees its own.

:func:`step` is that rule as a function of ``(state, event, now)`` → ``(state, relay, due)``:
``relay`` is what to send to the others now (``"start"``, ``"stop"`` or None), ``due`` when to
call it again with ``"tick"`` (None: nothing pending). A change that comes within a second of
the last relay is not dropped but deferred to that second's end, so the others always end up
seeing the user's last state; a change undone within that second is never relayed at all.
A refresh (``start`` while typing) only moves the timeout.
"""

from __future__ import annotations

import math
from typing import Final, Literal

from attrs import evolve, frozen

__all__ = ["MIN_RELAY_INTERVAL", "TypingState", "step"]

MIN_RELAY_INTERVAL: Final = 1.0  # seconds between two relays of one user in one room

TypingEvent = Literal["start", "stop", "tick"]
Relay = Literal["start", "stop"] | None


@frozen
class TypingState:
    """``wanted``: what the user last said (or the timeout made of it); ``shown``: what the
    others were last told; ``expires``: when ``wanted`` turns false without a refresh;
    ``last_relay``: when the others were last told anything."""

    wanted: bool = False
    shown: bool = False
    expires: float = math.inf
    last_relay: float = -math.inf

    @property
    def idle(self) -> bool:
        """Nothing shown, nothing pending: the state may be forgotten."""
        return not self.wanted and not self.shown


def step(
    state: TypingState, event: TypingEvent, now: float, timeout: float
) -> tuple[TypingState, Relay, float | None]:
    """Apply ``event`` at ``now``; see the module docstring."""
    if event == "start":
        state = evolve(state, wanted=True, expires=now + timeout)
    elif event == "stop":
        state = evolve(state, wanted=False, expires=math.inf)
    if state.wanted and now >= state.expires:
        state = evolve(state, wanted=False, expires=math.inf)
    relay: Relay = None
    pending: float | None = None
    if state.wanted != state.shown:
        allowed = state.last_relay + MIN_RELAY_INTERVAL
        if now >= allowed:
            relay = "start" if state.wanted else "stop"
            state = evolve(state, shown=state.wanted, last_relay=now)
        else:
            pending = allowed
    dues = [t for t in (pending, state.expires if state.wanted else None) if t is not None]
    return state, relay, min(dues) if dues else None
