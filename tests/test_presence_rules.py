"""The presence rules as a pure function of (state, event, now), at exact times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from raafd.chat.presence_rules import (
    Activity,
    Change,
    Connected,
    Disconnected,
    Event,
    PresenceRules,
    SetStatus,
    Tick,
    UserPresence,
    due,
    step,
)

RULES = PresenceRules(away_after=300.0, offline_after=15.0)


def run(
    events: list[tuple[float, Event]], state: UserPresence | None = None
) -> tuple[UserPresence, list[tuple[float, Change]]]:
    state = state or UserPresence()
    changes = []
    for now, event in events:
        state, change = step(state, event, now, RULES)
        if change is not None:
            changes.append((now, change))
    return state, changes


def test_a_first_connection_is_online_at_once() -> None:
    state, changes = run([(100.0, Connected())])
    assert changes == [(100.0, Change("online", 100.0, None))]
    assert state.connections == 1
    assert due(state, RULES) == 400.0  # away after 300 s without activity


def test_a_reconnect_within_the_linger_changes_nothing() -> None:
    state, changes = run(
        [(100.0, Connected()), (200.0, Disconnected()), (214.9, Tick()), (214.9, Connected())]
    )
    assert changes == [(100.0, Change("online", 100.0, None))]
    assert state.status == "online" and state.connections == 1 and state.gone_at is None


def test_offline_exactly_at_the_end_of_the_linger_with_last_seen_at_the_disconnect() -> None:
    state, _ = run([(100.0, Connected()), (200.0, Disconnected())])
    assert due(state, RULES) == 215.0
    early, change = step(state, Tick(), 214.999, RULES)
    assert change is None and early.status == "online"
    late, change = step(state, Tick(), 215.0, RULES)
    assert change == Change("offline", 200.0, None)
    assert due(late, RULES) is None


def test_the_linger_waits_for_the_last_of_several_connections() -> None:
    _, changes = run(
        [
            (0.0, Connected()),
            (1.0, Connected()),  # a second tab
            (10.0, Disconnected()),
            (30.0, Tick()),  # one connection is still open: nothing lingers
            (40.0, Disconnected()),
            (54.0, Tick()),
            (55.0, Tick()),
        ]
    )
    assert [(t, c.status) for t, c in changes] == [(0.0, "online"), (55.0, "offline")]
    assert changes[-1][1].last_seen == 40.0


def test_away_after_inactivity_and_online_again_at_the_next_command() -> None:
    state, changes = run(
        [
            (0.0, Connected()),
            (100.0, Activity()),  # moves the away deadline to 400
            (399.0, Tick()),
            (400.0, Tick()),
            (450.0, Activity()),
        ]
    )
    assert [(t, c.status) for t, c in changes] == [
        (0.0, "online"),
        (400.0, "away"),
        (450.0, "online"),
    ]
    assert changes[1][1].last_seen == 100.0  # what others see: when the user was last active
    assert due(state, RULES) == 750.0


def test_a_manual_away_survives_activity_until_set_online() -> None:
    meta = {"text": "lunch"}
    state, changes = run(
        [
            (0.0, Connected()),
            (5.0, SetStatus("away", meta)),
            (6.0, Activity()),
            (1000.0, Tick()),
            (1001.0, SetStatus("online", None)),
        ]
    )
    assert [(t, c.status, c.meta) for t, c in changes] == [
        (0.0, "online", None),
        (5.0, "away", meta),
        (1001.0, "online", None),
    ]
    assert due(state, RULES) == 1301.0


def test_a_meta_change_alone_is_announced_and_setting_the_same_twice_is_not() -> None:
    _, changes = run(
        [
            (0.0, Connected()),
            (1.0, SetStatus("online", {"emoji": "x"})),
            (2.0, SetStatus("online", {"emoji": "x"})),
        ]
    )
    assert [(t, c.meta) for t, c in changes] == [(0.0, None), (1.0, {"emoji": "x"})]


def test_an_away_user_who_reconnects_after_going_offline_is_online() -> None:
    _, changes = run(
        [
            (0.0, Connected()),
            (300.0, Tick()),
            (310.0, Disconnected()),
            (325.0, Tick()),
            (400.0, Connected()),
        ]
    )
    assert [(t, c.status, c.last_seen) for t, c in changes] == [
        (0.0, "online", 0.0),
        (300.0, "away", 0.0),
        (325.0, "offline", 310.0),
        (400.0, "online", 400.0),
    ]


def test_a_disconnect_never_seen_connected_changes_nothing() -> None:
    state, change = step(UserPresence(), Disconnected(), 5.0, RULES)
    assert change is None and state == UserPresence()


events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=50),
        st.sampled_from(
            [
                Connected(),
                Disconnected(),
                Activity(),
                Tick(),
                SetStatus("away", None),
                SetStatus("online", {"a": 1}),
            ]
        ),
    ),
    max_size=40,
)


@given(events)
def test_any_sequence_keeps_the_state_consistent(steps: list[tuple[float, Event]]) -> None:
    state = UserPresence()
    now = 0.0
    for gap, event in steps:
        now += gap
        before = state
        state, change = step(state, event, now, RULES)
        assert state.connections >= 0
        # Offline exactly when nobody is connected and the linger is over.
        if state.status == "offline":
            assert state.connections == 0
        if state.connections > 0:
            assert state.gone_at is None
        # A change is announced exactly when status or meta changed.
        visible = (state.status, state.meta) != (before.status, before.meta)
        assert (change is not None) == visible
        when = due(state, RULES)
        if when is not None:
            assert when >= (state.last_active or 0.0) or state.connections == 0
