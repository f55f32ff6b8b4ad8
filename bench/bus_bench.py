"""The event bus's cost per emit, in process: how an emit scales with the number of
subscriptions, when (a) nearly none of them match (each watches its own room: a compiled
pattern tried per subscription), (b) every one matches and takes the event (the fan-out itself:
a push per subscriber, as a caught-up WebSocket's write would be), (c) with a ``where`` filter
on top of a matching pattern. Pinned to one core. Prints figures; not a test.

Usage: python bench/bus_bench.py [--core 0] [--emits 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raafd.bus import Bus
from raafd.config import EventsConfig
from raafd.core.feed import Subscription
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent


def _take(event: StreamEvent) -> bool:
    return True


def measure(n: int, kind: str, emits: int) -> float:
    """Mean microseconds per emit with ``n`` subscriptions of ``kind``."""
    bus = Bus(EventsConfig(history=1000, queue=256), Metrics())
    subs: list[Subscription] = []
    for i in range(n):
        if kind == "rare":
            sub = bus.subscribe(f"room.r{i}.>")
        elif kind == "all":
            sub = bus.subscribe("room.*.message")
        else:
            sub = bus.subscribe("room.*.message", where={"user": "u1", "kind": "text"})
        sub.open()
        sub.push = _take
        subs.append(sub)
    data: dict[str, Any] = {"user": "u1", "kind": "text", "text": "hello"}
    for _ in range(200):  # warm up
        bus.emit("room.r0.message", data)
    start = time.perf_counter()
    for _ in range(emits):
        bus.emit("room.r0.message", data)
    elapsed = time.perf_counter() - start
    for sub in subs:
        sub.close()
    return elapsed / emits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--emits", type=int, default=20000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    print(f"emit cost, µs per event (mean of {args.emits} emits, core {args.core})")
    print(f"{'subscriptions':>13}  {'none match':>10}  {'all take':>9}  {'all + where':>11}")
    for n in (0, 10, 100, 1000, 10000):
        emits = max(200, args.emits // max(1, n // 100))
        rare = measure(n, "rare", emits)
        every = measure(n, "all", emits)
        where = measure(n, "where", emits)
        print(f"{n:>13}  {rare:>10.2f}  {every:>9.2f}  {where:>11.2f}")


if __name__ == "__main__":
    main()
