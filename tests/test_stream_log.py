"""EventLog: the pure, bounded log every replay and live delivery reads."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raafd.core import EventLog
from raafd.errors import BadRequest, Gone
from raafd.protocol.events import StreamEvent, make_event


def content(seq: int, text: str = "word") -> StreamEvent:
    return make_event("st_t", seq, "content", delta=text)


def filled(n: int, *, max_events: int = 1000, max_bytes: int = 1 << 20) -> EventLog:
    log = EventLog(max_events, max_bytes)
    for seq in range(1, n + 1):
        log.append(content(seq))
    return log


def test_empty_log() -> None:
    log = EventLog(10, 1000)
    assert (log.head, log.oldest, len(log), log.nbytes) == (0, 1, 0, 0)
    assert log.after(0) == []
    assert log.terminal is None


def test_append_takes_exactly_the_next_seq() -> None:
    log = filled(3)
    with pytest.raises(ValueError, match="expected seq 4"):
        log.append(content(5))
    with pytest.raises(ValueError, match="expected seq 4"):
        log.append(content(3))
    log.append(content(4))
    assert log.head == 4


def test_nothing_after_the_terminal_event() -> None:
    log = filled(2)
    log.append(make_event("st_t", 3, "complete", final_response="", usage={}, finish_reason="stop"))
    assert log.closed
    with pytest.raises(ValueError, match="terminal"):
        log.append(content(4))


def test_after_answers_the_remainder_with_a_limit() -> None:
    log = filled(10)
    assert [e.seq for e in log.after(0)] == list(range(1, 11))
    assert [e.seq for e in log.after(7)] == [8, 9, 10]
    assert [e.seq for e in log.after(2, limit=3)] == [3, 4, 5]
    assert log.after(10) == []
    assert log.after(50) == []


def test_bad_after_values() -> None:
    log = filled(3)
    with pytest.raises(BadRequest):
        log.after(-1)
    with pytest.raises(BadRequest, match="last event is seq 3"):
        log.check(4)
    log.check(3)


def test_evicts_oldest_at_the_event_bound_and_gone_names_the_oldest() -> None:
    log = filled(25, max_events=10)
    assert len(log) == 10
    assert (log.oldest, log.head) == (16, 25)
    assert [e.seq for e in log.after(15)] == list(range(16, 26))
    with pytest.raises(Gone, match="oldest available is seq 16") as info:
        log.after(14)
    assert info.value.field == "after"


def test_evicts_oldest_at_the_byte_bound() -> None:
    size = content(20).size  # every seq from 10 on encodes to the same size
    log = filled(20, max_bytes=size * 5 + 1)
    assert len(log) == 5
    assert log.nbytes == 5 * size
    assert log.oldest == 16


def test_terminal_event_is_never_evicted_even_alone_over_the_bound() -> None:
    log = EventLog(3, 200)
    for seq in range(1, 5):
        log.append(content(seq))
    big = make_event("st_t", 5, "error", error={"code": "internal", "message": "x" * 500})
    log.append(big)
    assert len(log) == 1
    terminal = log.terminal
    assert terminal == big and terminal.json == big.json and terminal.fields == big.fields
    assert log.after(4) == [big]
    with pytest.raises(Gone, match="seq 5"):
        log.after(3)


def test_compaction_keeps_reads_right() -> None:
    log = filled(1000, max_events=7)
    assert [e.seq for e in log.after(995)] == [996, 997, 998, 999, 1000]
    assert len(log) == 7


@given(
    n=st.integers(0, 200),
    max_events=st.integers(1, 50),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=200),
    after=st.integers(0, 200),
)
def test_after_is_exact_or_gone(n: int, max_events: int, sizes: list[int], after: int) -> None:
    log = EventLog(max_events, 400)
    for seq in range(1, n + 1):
        log.append(content(seq, "x" * sizes[seq % len(sizes)]))
        assert len(log) >= 1 and len(log) <= max_events
        assert log.nbytes <= 400 or len(log) == 1
    after = min(after, n)
    if after + 1 < log.oldest:
        with pytest.raises(Gone):
            log.after(after)
    else:
        assert [e.seq for e in log.after(after)] == list(range(after + 1, n + 1))


def test_rebuilt_events_are_the_appended_ones() -> None:
    # The log keeps events flat and rebuilds them on read: kind, seq, JSON and fields all come
    # back as appended, through eviction and compaction, for every kind of event.
    log = EventLog(50, 1 << 20)
    appended = [make_event("st_t", 1, "start", agent="a", model="m")]
    for seq in range(2, 200):
        if seq % 7 == 0:
            event = make_event(
                "st_t", seq, "tool_call", tool_id=f"c{seq}", tool_name="t", arguments={"x": [1]}
            )
        else:
            event = content(seq, f"w{seq}é ")
        appended.append(event)
    appended.append(make_event("st_t", 200, "complete", final_response="done", usage={}))
    for event in appended:
        log.append(event)
    held = log.after(log.oldest - 1)
    assert len(held) == 50
    for got, want in zip(held, appended[-50:], strict=True):
        assert (got.stream, got.seq, got.kind, got.json) == (
            want.stream,
            want.seq,
            want.kind,
            want.json,
        )
        assert got.fields == want.fields
    assert log.nbytes == sum(e.size for e in appended[-50:])


def exact_size(log: EventLog) -> int:
    """What a log holding its events costs with no slack: an empty log, plus its JSON bytes, a
    4-byte end offset and a kind byte per event (and the NUL each bytearray ends with)."""
    return sys.getsizeof(EventLog(1, 1)) + log.nbytes + 5 * len(log) + 2


def test_a_closed_log_holds_its_events_at_exact_size() -> None:
    # A finished stream's log is kept for `retention`, thousands of them: at the terminal event
    # the evicted slots are cut off and the buffers lose the slack their growth left.
    log = filled(65, max_events=40)  # 25 evicted, still in the buffers (not compacted yet)
    assert sys.getsizeof(log) > exact_size(log)
    end = make_event("st_t", 66, "complete", final_response="", usage={}, finish_reason="stop")
    held = [e.json for e in log.after(log.oldest)] + [end.json]
    log.append(end)
    assert sys.getsizeof(log) == exact_size(log)
    assert (len(log), log.oldest, log.head) == (40, 27, 66)
    assert [e.json for e in log.after(log.oldest - 1)] == [*(e.json for e in log.after(26))]
    assert [e.json for e in log.after(26)] == held
    assert log.terminal == end
    with pytest.raises(Gone, match="oldest available is seq 27"):
        log.after(25)


@given(n=st.integers(0, 150), max_events=st.integers(1, 60), size=st.integers(1, 300))
def test_a_closed_log_answers_as_before_it_was_sealed(n: int, max_events: int, size: int) -> None:
    log = EventLog(max_events, 2000)
    for seq in range(1, n + 1):
        log.append(content(seq, "x" * (size + seq % 7)))
    log.append(make_event("st_t", n + 1, "cancelled", reason="client"))
    assert sys.getsizeof(log) == exact_size(log)
    assert log.nbytes <= 2000 or len(log) == 1
    oldest = log.oldest
    assert [e.seq for e in log.after(oldest - 1)] == list(range(oldest, n + 2))
    assert [e.kind for e in log.after(n)] == ["cancelled"]
    if oldest > 1:
        with pytest.raises(Gone):
            log.after(oldest - 2)
