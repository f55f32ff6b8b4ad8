"""The event bus core: patterns, history, where, once, lag notices, wait_for, permissions."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from raafd.bus import EVENT, LAGGED, Bus, BusEvent, check_where, hidden_from
from raafd.config import EventsConfig
from raafd.core.feed import Subscription
from raafd.errors import BadRequest, Forbidden, Gone
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.protocol.subjects import check_subject, compile_pattern, covers, overlaps

MATCHES = [
    # pattern, subject, matches
    ("stream.completed", "stream.completed", True),
    ("stream.completed", "stream.failed", False),
    ("stream.completed", "stream.completed.x", False),
    ("stream.*", "stream.completed", True),
    ("stream.*", "stream", False),
    ("stream.*", "stream.a.b", False),
    ("*.completed", "stream.completed", True),
    ("*.completed", "job.completed", True),
    ("*.completed", "a.b.completed", False),
    ("room.*.message", "room.lobby.message", True),
    ("room.*.message", "room.lobby.x.message", False),
    ("room.>", "room.lobby", True),
    ("room.>", "room.lobby.message", True),
    ("room.>", "room", False),  # '>' needs at least one segment
    ("room.>", "rooms.lobby", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c.d", True),
    ("stream.completed", "streamXcompleted", False),  # the dot is not a regex wildcard
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCHES)
def test_wildcards_match_as_nats_does(pattern: str, subject: str, expected: bool) -> None:
    check_subject(subject)
    assert compile_pattern(pattern).matches(subject) is expected


@pytest.mark.parametrize(
    "pattern", ["", "a..b", ".a", "a.", "a.>.b", ">.a", "a.b*", "a.>x", "a b", "x" * 300]
)
def test_bad_patterns_are_refused_with_the_field(pattern: str) -> None:
    with pytest.raises(BadRequest) as caught:
        compile_pattern(pattern)
    assert caught.value.field == "pattern"


@pytest.mark.parametrize("subject", ["", "a.*", "a.>", "a..b", "a b"])
def test_bad_subjects_are_refused(subject: str) -> None:
    with pytest.raises(BadRequest):
        check_subject(subject)


RELATIONS = [
    # outer, inner, covers(outer, inner), overlaps
    ("connection.>", "connection.>", True, True),
    ("connection.>", "connection.opened", True, True),
    ("connection.>", "connection.*", True, True),
    ("connection.>", "connection", False, False),
    ("connection.>", ">", False, True),
    ("connection.>", "*.opened", False, True),
    ("connection.>", "stream.>", False, False),
    ("connection.*", "connection.a.b", False, False),
    ("connection.*", "connection.>", False, True),
    ("*.*", "a.b", True, True),
    ("*.*", "a.>", False, True),
    ("a.b", "a.*", False, True),
    ("a.b", "a.c", False, False),
    (">", "a.b.c", True, True),
]


@pytest.mark.parametrize(("outer", "inner", "cover", "overlap"), RELATIONS)
def test_pattern_relations(outer: str, inner: str, cover: bool, overlap: bool) -> None:
    a, b = compile_pattern(outer), compile_pattern(inner)
    assert covers(a, b) is cover
    assert overlaps(a, b) is overlap
    assert overlaps(b, a) is overlap


def _bus(history: int = 100, queue: int = 10, **kwargs: Any) -> Bus:
    clock = iter(range(1000, 100000))
    return Bus(
        EventsConfig(history=history, queue=queue, **kwargs),
        Metrics(),
        clock=lambda: float(next(clock)),
    )


def _read(sub: Subscription) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    while (batch := sub.take_nowait()) is not None:
        out.extend(batch)
    return out


def test_events_get_bus_wide_seqs_a_ts_and_their_json() -> None:
    bus = _bus()
    sub = bus.subscribe(">")
    sub.open()
    bus.emit("stream.started", {"stream": "st_1"})
    bus.emit("room.lobby.message", {"text": "hi"})
    events = _read(sub)
    assert [e.json for e in events] == [
        b'{"seq":1,"subject":"stream.started","ts":1000.0,"data":{"stream":"st_1"}}',
        b'{"seq":2,"subject":"room.lobby.message","ts":1001.0,"data":{"text":"hi"}}',
    ]
    assert bus.head == 2


def test_a_subscriber_sees_only_its_pattern_and_is_pushed_only_those() -> None:
    bus = _bus()
    sub = bus.subscribe("stream.*")
    sub.open()
    pushed: list[int] = []
    sub.push = lambda event: pushed.append(event.seq) is None
    for subject in ["stream.started", "room.a.message", "stream.completed", "job.queued"]:
        bus.emit(subject, {})
    assert pushed == [1, 3]
    assert sub.cursor == 4  # caught up: the others moved its cursor without a wake
    assert sub.take_nowait() is None


def test_history_replay_since_a_seq() -> None:
    bus = _bus(history=5)
    for n in range(8):
        bus.emit(f"job.{'odd' if n % 2 else 'even'}", {"n": n})
    assert bus.oldest == 4
    sub = bus.subscribe("job.even", since=5)
    sub.open()
    assert [bus_data(e) for e in _read(sub)] == [{"n": 6}]
    with pytest.raises(Gone) as caught:
        bus.subscribe(">", since=2)
    assert "oldest available is seq 4" in caught.value.message
    with pytest.raises(BadRequest):
        bus.subscribe(">", since=9)
    found, cursor = bus.replay("job.*", 3, limit=2)
    assert [e.seq for e in found] == [4, 5] and cursor == 5


def bus_data(event: StreamEvent) -> Any:
    return event.fields["data"]


def test_where_selects_by_fields_of_the_data() -> None:
    bus = _bus()
    where = check_where({"agent": "a", "usage.ok": True})
    sub = bus.subscribe(">", where=where)
    sub.open()
    bus.emit("x", {"agent": "a", "usage": {"ok": True}})
    bus.emit("x", {"agent": "b", "usage": {"ok": True}})
    bus.emit("x", {"agent": "a", "usage": {"ok": 1}})  # 1 is not true
    bus.emit("x", {"agent": "a"})
    bus.emit("x", {"agent": "a", "usage": {"ok": True}, "more": 1})
    assert [e.seq for e in _read(sub)] == [1, 5]


@pytest.mark.parametrize(
    "where",
    [[], {"a": [1]}, {"a": {"b": 1}}, {"": 1}, {str(n): n for n in range(9)}],
)
def test_bad_where_filters_are_refused(where: Any) -> None:
    with pytest.raises(BadRequest):
        check_where(where)


def test_once_delivers_one_event_and_ends() -> None:
    bus = _bus()
    sub = bus.subscribe("job.*", once=True)
    sub.open()
    bus.emit("stream.started", {})
    bus.emit("job.done", {"n": 1})
    bus.emit("job.done", {"n": 2})
    batch = sub.take_nowait()
    assert batch is not None and [e.seq for e in batch] == [2]
    assert batch[0].terminal and sub.done
    assert sub.take_nowait() is None


def test_once_when_pushed_ends_with_that_event() -> None:
    bus = _bus()
    sub = bus.subscribe("job.*", once=True)
    sub.open()
    got: list[StreamEvent] = []
    sub.push = lambda event: got.append(event) is None
    bus.emit("job.a", {})
    bus.emit("job.b", {})
    assert [e.seq for e in got] == [1] and got[0].terminal and sub.done


def test_a_lagging_subscriber_gets_a_notice_and_the_emitter_never_waits() -> None:
    bus = _bus(history=100, queue=10)
    slow = bus.subscribe(">")
    slow.open()
    refused: list[int] = []
    slow.push = lambda event: refused.append(event.seq) and False  # its socket takes nothing
    fast = bus.subscribe(">")
    fast.open()
    taken: list[int] = []
    fast.push = lambda event: taken.append(event.seq) is None
    for n in range(30):  # synchronous: no checkpoint, nobody can be waited for
        bus.emit("tick", {"n": n})
    assert taken == list(range(1, 31))
    events = _read(slow)
    # 11 behind at seq 11: skipped to 11; not pushed to until it reads the notice, so 11
    # behind again at seq 22: skipped to 22, one notice for both.
    assert [(e.kind, e.fields) for e in events[:1]] == [
        (LAGGED, {"missed_from": 1, "missed_to": 22})
    ]
    assert [e.seq for e in events[1:]] == list(range(23, 31))
    assert refused == [1]
    assert slow.feed.subscribers == 2  # still subscribed: it goes on live
    bus.emit("tick", {})
    assert refused == [1, 31]
    assert [(e.kind, e.seq) for e in slow.take_nowait() or []] == [(EVENT, 31)]
    metrics = bus._metrics.registry
    assert metrics.get_sample_value("raafd_subscriber_lag_skips_total") == 2


def test_a_lag_notice_comes_before_anything_pushed_after_it() -> None:
    bus = _bus(history=100, queue=3)
    sub = bus.subscribe(">")
    sub.open()
    accept = False
    seen: list[tuple[str, int]] = []

    def push(event: StreamEvent) -> bool:
        if accept:
            seen.append((event.kind, event.seq))
        return accept

    sub.push = push
    for _ in range(6):
        bus.emit("a", {})
    accept = True
    bus.emit("a", {})  # not pushed: the notice is not taken yet
    assert seen == []
    batches = [sub.take_nowait(), sub.take_nowait()]
    assert [[(e.kind, e.seq) for e in b or []] for b in batches] == [
        [(LAGGED, 4)],
        [(EVENT, 5), (EVENT, 6), (EVENT, 7)],
    ]
    assert sub.take_nowait() is None  # caught up, the batch delivered: pushes again
    bus.emit("a", {})
    assert sub.take_nowait() is None
    assert seen == [(EVENT, 8)]


def test_evicted_while_behind_is_a_lag_notice_too() -> None:
    bus = _bus(history=4, queue=100)
    sub = bus.subscribe(">", since=0)
    sub.open()
    for _ in range(10):
        bus.emit("a", {})
    events = _read(sub)
    assert events[0].kind == LAGGED and events[0].fields == {"missed_from": 1, "missed_to": 6}
    assert [e.seq for e in events[1:]] == [7, 8, 9, 10]


def test_an_emit_from_inside_a_delivery_is_appended_after_it_in_order() -> None:
    bus = _bus()
    first = bus.subscribe("a")
    first.open()
    first.push = lambda event: bus.emit("b", {"after": event.seq}) is None
    every = bus.subscribe(">")
    every.open()
    bus.emit("a", {})
    assert [(e.fields["subject"], e.seq) for e in _read(every)] == [("a", 1), ("b", 2)]


def test_a_bad_emit_is_dropped_without_hurting_the_emitter() -> None:
    bus = _bus()
    bus.emit("bad subject", {})
    bus.emit("x", {"not json": object()})
    bus.emit("ok", {})
    assert bus.head == 1


async def test_wait_for_takes_a_pattern_a_predicate_and_the_callers_cancel_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = _bus()
    found: list[BusEvent] = []

    async def waiter() -> None:
        found.append(await bus.wait_for("job.*", lambda e: e.data.get("n") == 2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(4):
            bus.emit("job.done", {"n": n})
            bus.emit("other", {"n": 2})
    assert [(e.seq, e.subject, e.data) for e in found] == [(5, "job.done", {"n": 2})]
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(5):
            await bus.wait_for("never.>")
    assert bus.feed.subscribers == 0
    assert (await bus.wait_for("job.*", since=0)).seq == 1  # from the history
    nursery_found: list[BusEvent] = []
    async with trio.open_nursery() as nursery:

        async def once() -> None:
            nursery_found.append(await bus.once("late"))

        nursery.start_soon(once)
        await trio.testing.wait_all_tasks_blocked()
        bus.emit("late", {"x": 1})
    assert nursery_found[0].data == {"x": 1}


RESTRICTED = {"connection.>": ["admin"], "breaker.>": ["admin", "ops"]}


@pytest.mark.parametrize(
    ("pattern", "roles", "outcome"),
    [
        ("connection.>", [], "forbidden"),
        ("connection.opened", [], "forbidden"),
        ("connection.>", ["admin"], ""),
        ("breaker.*", ["ops"], ""),
        ("breaker.*", ["support"], "forbidden"),
        (">", [], "connection.> breaker.>"),
        (">", ["ops"], "connection.>"),
        ("*.opened", [], "connection.> breaker.>"),
        ("*.queued", ["admin"], ""),
        ("stream.>", [], ""),
    ],
)
def test_restricted_subjects_are_refused_or_hidden(
    pattern: str, roles: list[str], outcome: str
) -> None:
    compiled = compile_pattern(pattern)
    if outcome == "forbidden":
        with pytest.raises(Forbidden) as caught:
            hidden_from(RESTRICTED, frozenset(roles), compiled)
        assert caught.value.field == "pattern"
        return
    hidden = hidden_from(RESTRICTED, frozenset(roles), compiled)
    assert " ".join(p.text for p in hidden) == outcome


def test_hidden_subjects_are_never_seen_through_a_wider_pattern() -> None:
    bus = _bus()
    hidden = hidden_from(RESTRICTED, frozenset(), compile_pattern(">"))
    sub = bus.subscribe(">", deny=hidden)
    sub.open()
    for subject in ["connection.opened", "stream.started", "breaker.opened", "x"]:
        bus.emit(subject, {})
    assert [e.fields["subject"] for e in _read(sub)] == ["stream.started", "x"]
