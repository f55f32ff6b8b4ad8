"""A circuit breaker per provider: stop calling an upstream that keeps failing.

The rule of this module: it is a pure state machine over (state, event, now). Nothing here
sleeps, reads a clock or does I/O; ``now`` is passed in (the trio clock in the daemon, any
number in tests), so every transition is tested synchronously.

The states:

- ``closed``: calls go through. ``failure_threshold`` consecutive failures open it; a
  success resets the count.
- ``open``: calls are refused (the fallback runner skips to the next provider) until
  ``cooldown`` seconds have passed since it opened.
- ``half_open``: the cooldown is over. Exactly one call, the trial, is let through; every
  other call sees the circuit as open. The trial's success closes the circuit; its failure
  opens it again with a fresh cooldown. A trial that ends with no verdict (cancelled, or an
  answer that says nothing about the upstream's health) is *released*: the next call becomes
  the trial.

Late outcomes of calls let through before the circuit opened are kept simple: a failure while
open only counts, a success while open changes nothing (the trial will tell), a success while
half-open closes the circuit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import trio
from attrs import evolve, frozen

from raafd.config import BreakerConfig

__all__ = [
    "Breaker",
    "BreakerState",
    "Breakers",
    "CircuitState",
    "effective_state",
    "on_failure",
    "on_release",
    "on_request",
    "on_success",
]

CircuitState = Literal["closed", "open", "half_open"]


@frozen
class BreakerState:
    """One provider's circuit. ``opened_at`` is the clock when it last opened; ``trial`` is
    True while the half-open trial call is in flight."""

    state: CircuitState = "closed"
    failures: int = 0  # consecutive failures
    opened_at: float | None = None
    trial: bool = False


# --- the transitions (pure) -------------------------------------------------------------------


def _cooled(s: BreakerState, now: float, config: BreakerConfig) -> bool:
    return s.opened_at is not None and now - s.opened_at >= config.cooldown


def effective_state(s: BreakerState, now: float, config: BreakerConfig) -> CircuitState:
    """The state a call made at ``now`` would find (an open circuit whose cooldown is over
    is half-open)."""
    if s.state == "open" and _cooled(s, now, config):
        return "half_open"
    return s.state


def on_request(s: BreakerState, now: float, config: BreakerConfig) -> tuple[BreakerState, bool]:
    """A call wants to go through: the new state, and whether it may."""
    if s.state == "closed":
        return s, True
    if s.state == "open":
        if not _cooled(s, now, config):
            return s, False
        return evolve(s, state="half_open", trial=True), True
    if s.trial:  # half-open, the trial is in flight: everyone else sees it open
        return s, False
    return evolve(s, trial=True), True


def on_success(s: BreakerState, now: float) -> BreakerState:
    """A call let through succeeded."""
    if s.state == "open":
        return s
    return BreakerState()


def on_failure(s: BreakerState, now: float, config: BreakerConfig) -> BreakerState:
    """A call let through failed."""
    failures = s.failures + 1
    if s.state == "half_open":
        return BreakerState(state="open", failures=failures, opened_at=now)
    if s.state == "open":
        return evolve(s, failures=failures)
    if failures >= config.failure_threshold:
        return BreakerState(state="open", failures=failures, opened_at=now)
    return evolve(s, failures=failures)


def on_release(s: BreakerState) -> BreakerState:
    """A call let through ended with no verdict; a half-open trial slot is freed."""
    if s.state == "half_open" and s.trial:
        return evolve(s, trial=False)
    return s


# --- the holders ------------------------------------------------------------------------------


Emit = Callable[[str, dict[str, Any]], None]


def _no_emit(subject: str, data: dict[str, Any]) -> None:
    pass


class Breaker:
    """One provider's breaker: a :class:`BreakerState` and the transitions applied to it.
    ``emit`` is told ``breaker.opened`` when the circuit opens (from closed, or again after a
    failed trial) and ``breaker.closed`` when it closes again, with the provider's ``name``."""

    def __init__(
        self,
        config: BreakerConfig,
        state: BreakerState | None = None,
        *,
        name: str = "",
        emit: Emit = _no_emit,
    ) -> None:
        self.config = config
        self.state = state or BreakerState()
        self.name = name
        self._emit = emit

    def allow(self, now: float) -> bool:
        """May a call go through now? A True from a half-open circuit makes this call the
        trial: report its outcome with :meth:`record_success`, :meth:`record_failure` or
        :meth:`release`."""
        self.state, allowed = on_request(self.state, now, self.config)
        return allowed

    def record_success(self, now: float) -> None:
        before = self.state.state
        self.state = on_success(self.state, now)
        if before != "closed" and self.state.state == "closed":
            self._emit("breaker.closed", {"provider": self.name})

    def record_failure(self, now: float) -> None:
        before = self.state
        self.state = after = on_failure(before, now, self.config)
        if after.state == "open" and after.opened_at != before.opened_at:
            self._emit(
                "breaker.opened",
                {
                    "provider": self.name,
                    "failures": after.failures,
                    "cooldown": self.config.cooldown,
                },
            )

    def release(self) -> None:
        self.state = on_release(self.state)

    def retry_in(self, now: float) -> float:
        """Seconds until an open circuit lets a trial through (0 otherwise)."""
        s = self.state
        if s.state != "open" or s.opened_at is None:
            return 0.0
        return max(0.0, s.opened_at + self.config.cooldown - now)

    def snapshot(self, now: float) -> dict[str, Any]:
        s = self.state
        return {
            "state": effective_state(s, now, self.config),
            "failures": s.failures,
            "opened_at": s.opened_at,
            "retry_in": round(self.retry_in(now), 3),
        }


class Breakers:
    """One :class:`Breaker` per provider name, made on first use. Bounded by the configured
    providers: :meth:`reload` forgets the breakers of providers no longer configured."""

    def __init__(self, config: BreakerConfig, *, emit: Emit = _no_emit) -> None:
        self._config = config
        self._emit = emit
        self._breakers: dict[str, Breaker] = {}

    @property
    def config(self) -> BreakerConfig:
        return self._config

    def get(self, provider: str) -> Breaker:
        breaker = self._breakers.get(provider)
        if breaker is None:
            breaker = self._breakers[provider] = Breaker(
                self._config, name=provider, emit=self._emit
            )
        return breaker

    def reload(self, config: BreakerConfig, providers: Iterable[str] | None = None) -> None:
        """Apply a new ``[breaker]`` section (states are kept); with ``providers``, forget the
        breakers of every other provider."""
        self._config = config
        for breaker in self._breakers.values():
            breaker.config = config
        if providers is not None:
            keep = set(providers)
            for name in [n for n in self._breakers if n not in keep]:
                del self._breakers[name]

    def snapshot(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """``{provider: {state, failures, opened_at, retry_in}}`` for ``/v1/stats``;
        ``now`` defaults to the trio clock."""
        at = trio.current_time() if now is None else now
        return {name: b.snapshot(at) for name, b in sorted(self._breakers.items())}
