"""Stream event encoding."""

from __future__ import annotations

import tracemalloc

import orjson

from raafd.protocol.events import coalesce, make_event


def test_event_json_is_the_wire_object() -> None:
    event = make_event("st_1", 3, "content", delta="Hel")
    assert orjson.loads(event.json) == {
        "stream": "st_1",
        "seq": 3,
        "event": "content",
        "delta": "Hel",
    }
    merged = coalesce(event, make_event("st_1", 4, "content", delta="lo"))
    assert merged.seq == 4 and merged.fields == {"delta": "Hello"}


def test_retained_events_cost_about_their_size() -> None:
    # Every event stays in its stream's log for the retention time; its encoding must not
    # carry a fixed large allocation (orjson 3.13 returns 4 KiB buffers for short outputs).
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [make_event("st_x", i, "content", delta=" word") for i in range(2000)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(kept) == 2000
    assert grown / 2000 < 1024, f"{grown / 2000:.0f} bytes per event"
