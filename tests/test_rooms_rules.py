"""The pure rules of rooms, with exact times: typing relays and the message rate."""

from __future__ import annotations

import itertools
import math

import pytest

from raafd.chat.ratelimit import Bucket, take
from raafd.chat.typing import TypingState, step

TIMEOUT = 5.0


def run(events: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Feed (time, event) pairs, firing ticks when due; the relays with their times."""
    state = TypingState()
    relays: list[tuple[float, str]] = []
    due: float | None = None
    pending = sorted(events)
    while pending or due is not None:
        if due is not None and (not pending or due <= pending[0][0]):
            now, event = due, "tick"
        else:
            now, event = pending.pop(0)
        state, relay, due = step(state, event, now, TIMEOUT)  # type: ignore[arg-type]
        if relay is not None:
            relays.append((now, relay))
    assert state.idle
    return relays


def test_a_start_is_relayed_at_once_and_stops_by_itself_after_the_timeout() -> None:
    assert run([(10.0, "start")]) == [(10.0, "start"), (15.0, "stop")]


def test_refreshes_move_the_timeout_and_are_not_relayed() -> None:
    assert run([(0.0, "start"), (3.0, "start"), (6.0, "start")]) == [
        (0.0, "start"),
        (11.0, "stop"),
    ]


def test_an_explicit_stop_is_relayed() -> None:
    assert run([(0.0, "start"), (2.5, "stop")]) == [(0.0, "start"), (2.5, "stop")]


def test_a_stop_within_a_second_of_the_start_waits_for_the_second_to_end() -> None:
    assert run([(0.0, "start"), (0.25, "stop")]) == [(0.0, "start"), (1.0, "stop")]


def test_a_change_undone_within_the_second_is_never_relayed() -> None:
    assert run([(0.0, "start"), (0.2, "stop"), (0.6, "start"), (2.0, "stop")]) == [
        (0.0, "start"),
        (2.0, "stop"),
    ]


def test_at_most_one_relay_a_second_however_fast_the_client_flips() -> None:
    flips = [(i * 0.1, "start" if i % 2 == 0 else "stop") for i in range(40)]
    relays = run(flips)
    times = [t for t, _ in relays]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert relays[-1][1] == "stop"  # the others end up seeing the last state


def test_a_stop_without_a_start_says_nothing() -> None:
    state, relay, due = step(TypingState(), "stop", 1.0, TIMEOUT)
    assert (relay, due, state.idle) == (None, None, True)
    assert state.expires == math.inf


def test_the_rate_allows_a_burst_then_one_per_interval() -> None:
    bucket = None
    for _ in range(3):
        bucket, retry = take(bucket, 3, 100.0)
        assert retry is None
    bucket, retry = take(bucket, 3, 100.0)
    assert retry == pytest.approx(20.0)
    bucket, retry = take(bucket, 3, 110.0)
    assert retry == pytest.approx(10.0)
    bucket, retry = take(bucket, 3, 120.0)
    assert retry is None
    assert bucket == Bucket(0.0, 120.0)


def test_the_rate_bucket_never_holds_more_than_a_burst() -> None:
    bucket, _ = take(None, 60, 0.0)
    bucket, _ = take(bucket, 60, 10_000.0)
    assert bucket.tokens == 59.0
