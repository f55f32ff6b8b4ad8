"""The circuit breaker state machine: every transition, synchronously, with ``now`` given."""

from __future__ import annotations

import pytest

from raafd.config import BreakerConfig
from raafd.providers.breaker import (
    Breaker,
    Breakers,
    BreakerState,
    effective_state,
    on_failure,
    on_release,
    on_request,
    on_success,
)

CFG = BreakerConfig(failure_threshold=3, cooldown=10.0)


def opened(at: float = 100.0, failures: int = 3) -> BreakerState:
    return BreakerState(state="open", failures=failures, opened_at=at)


def test_closed_lets_calls_through_and_counts_consecutive_failures() -> None:
    s = BreakerState()
    s, allowed = on_request(s, 0.0, CFG)
    assert allowed and s == BreakerState()
    s = on_failure(s, 1.0, CFG)
    s = on_failure(s, 2.0, CFG)
    assert (s.state, s.failures) == ("closed", 2)
    s = on_success(s, 3.0)  # a success resets the count: failures must be consecutive
    assert s == BreakerState()
    for t in (4.0, 5.0):
        s = on_failure(s, t, CFG)
    assert s.state == "closed"


def test_threshold_failures_open_the_circuit() -> None:
    s = BreakerState(failures=2)
    s = on_failure(s, 50.0, CFG)
    assert s == BreakerState(state="open", failures=3, opened_at=50.0)


def test_threshold_one_opens_on_the_first_failure() -> None:
    s = on_failure(BreakerState(), 7.0, BreakerConfig(failure_threshold=1, cooldown=1.0))
    assert s.state == "open" and s.opened_at == 7.0


def test_open_refuses_until_the_cooldown_is_over() -> None:
    s = opened(at=100.0)
    for now in (100.0, 105.0, 109.999):
        s2, allowed = on_request(s, now, CFG)
        assert not allowed and s2 == s
        assert effective_state(s, now, CFG) == "open"
    assert effective_state(s, 110.0, CFG) == "half_open"


def test_after_the_cooldown_exactly_one_trial_goes_through() -> None:
    s, allowed = on_request(opened(at=100.0), 110.0, CFG)
    assert allowed
    assert (s.state, s.trial) == ("half_open", True)
    for now in (110.0, 111.0, 500.0):  # everyone else sees it open while the trial runs
        s2, other = on_request(s, now, CFG)
        assert not other and s2 == s


def test_trial_success_closes() -> None:
    s, _ = on_request(opened(), 110.0, CFG)
    assert on_success(s, 111.0) == BreakerState()


def test_trial_failure_reopens_with_a_fresh_cooldown() -> None:
    s, _ = on_request(opened(at=100.0), 110.0, CFG)
    s = on_failure(s, 112.0, CFG)
    assert (s.state, s.opened_at, s.trial, s.failures) == ("open", 112.0, False, 4)
    assert not on_request(s, 121.9, CFG)[1]
    s, allowed = on_request(s, 122.0, CFG)
    assert allowed and s.state == "half_open"


def test_released_trial_frees_the_slot_for_the_next_call() -> None:
    s, _ = on_request(opened(), 110.0, CFG)
    s = on_release(s)
    assert (s.state, s.trial) == ("half_open", False)
    s, allowed = on_request(s, 111.0, CFG)
    assert allowed and s.trial
    assert not on_request(s, 111.0, CFG)[1]


def test_release_elsewhere_changes_nothing() -> None:
    for s in (BreakerState(), BreakerState(failures=2), opened()):
        assert on_release(s) == s


def test_late_outcomes_while_open() -> None:
    s = opened(at=100.0)
    assert on_success(s, 101.0) == s  # the trial will tell
    late = on_failure(s, 101.0, CFG)
    assert (late.state, late.opened_at, late.failures) == ("open", 100.0, 4)


def test_breaker_wraps_the_transitions() -> None:
    b = Breaker(CFG)
    assert b.allow(0.0)
    for t in (1.0, 2.0, 3.0):
        b.record_failure(t)
    assert b.state.state == "open"
    assert not b.allow(5.0)
    assert b.retry_in(5.0) == pytest.approx(8.0)
    assert b.snapshot(5.0) == {"state": "open", "failures": 3, "opened_at": 3.0, "retry_in": 8.0}
    assert b.snapshot(13.0)["state"] == "half_open"
    assert b.allow(13.0)  # the trial
    assert not b.allow(13.5)
    b.release()
    assert b.allow(14.0)
    b.record_success(15.0)
    assert b.state == BreakerState()
    assert b.retry_in(15.0) == 0.0


def test_breakers_one_per_provider_snapshot_and_reload() -> None:
    breakers = Breakers(CFG)
    a, b = breakers.get("a"), breakers.get("b")
    assert breakers.get("a") is a
    a.record_failure(1.0)
    b.record_failure(1.0)
    b.record_failure(1.0)
    b.record_failure(1.0)
    assert breakers.snapshot(2.0) == {
        "a": {"state": "closed", "failures": 1, "opened_at": None, "retry_in": 0.0},
        "b": {"state": "open", "failures": 3, "opened_at": 1.0, "retry_in": 9.0},
    }
    longer = BreakerConfig(failure_threshold=3, cooldown=60.0)
    breakers.reload(longer, providers=["b"])
    assert breakers.config is longer
    assert set(breakers.snapshot(2.0)) == {"b"}  # a provider no longer configured is forgotten
    assert breakers.get("b") is b and b.config is longer
    assert breakers.snapshot(2.0)["b"]["retry_in"] == 59.0  # the state was kept
