"""What the steps of a stream's start cost hot (run back to back) and cold (after the caches
were flushed by unrelated work), in µs, medians. Prints numbers; not a test.

Why it exists: under load, raafd's per-token path runs thousands of times a second and stays in
the CPU caches, while the code and objects of a stream's start (one frame parsed, one command
validated, one stream built, one task spawned) have been evicted by the time the next stream
starts. The start path of a stream then costs ten times or more what a microbenchmark of it
says, and that is what the first token waits for. So objects built per stream, and code run
once per stream, are judged here by their cold cost.

    .venv/bin/python bench/cold_costs.py [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from collections.abc import Callable

import trio
from wsproto.connection import Connection as WSFrames
from wsproto.connection import ConnectionType

from raafd.config import StreamsConfig
from raafd.logging import configure_logging
from raafd.metrics import Metrics
from raafd.protocol.commands import parse_command
from raafd.protocol.events import make_event
from raafd.streams.stream import Stream
from raafd.timers import Timers

_FLUSH = bytearray(8 << 20)  # larger than this machine's L2, a good part of its L3 share


def flush_caches() -> None:
    """Touch one byte per cache line of 8 MiB and build a dict: unrelated work in between."""
    for i in range(0, len(_FLUSH), 64):
        _FLUSH[i] = (_FLUSH[i] + 1) & 255
    _ = {i: str(i) for i in range(2000)}


def command_frame() -> bytes:
    """A masked client text frame carrying the load generator's ``stream.start``."""
    payload = b'{"type":"stream.start","input":"bench","ref":"r12"}'
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def measure(runs: int) -> None:
    configure_logging("warning")
    metrics, config, timers = Metrics(), StreamsConfig(), Timers()
    frame = command_frame()
    frames = WSFrames(ConnectionType.SERVER)

    def ws_frame() -> None:
        frames.receive_data(frame)
        for _ in frames.events():
            pass

    async def nothing() -> None:
        pass

    async with trio.open_nursery() as nursery:
        steps: dict[str, Callable[[], object]] = {
            "wsproto: one client frame": ws_frame,
            "parse_command (orjson + cattrs)": lambda: parse_command(
                '{"type":"stream.start","input":"bench","ref":"r12"}'
            ),
            "Stream(...)": lambda: Stream(
                agent="a", model="m", config=config, metrics=metrics, timers=timers
            ),
            "nursery.start_soon": lambda: nursery.start_soon(nothing),
            "make_event (start)": lambda: make_event("st_x", 1, "start", agent="a", model="m"),
            "trio.CancelScope()": trio.CancelScope,
            "trio.Event()": trio.Event,
            "ParkingLot()": trio.lowlevel.ParkingLot,
            "secrets.token_hex(12)": lambda: secrets.token_hex(12),
        }
        print(f"{'step':34} {'hot µs':>8} {'cold µs':>8} {'ratio':>6}")
        for name, step in steps.items():
            medians = []
            for cold in (False, True):
                samples = []
                for i in range(runs):
                    if cold:
                        flush_caches()
                    t0 = time.perf_counter()
                    step()
                    samples.append((time.perf_counter() - t0) * 1e6)
                    if i % 20 == 0:
                        await trio.lowlevel.checkpoint()  # let spawned tasks finish
                medians.append(statistics.median(samples))
            hot, cold_cost = medians
            print(f"{name:34} {hot:8.1f} {cold_cost:8.1f} {cold_cost / hot:6.0f}")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="samples per step and mode")
    args = parser.parse_args()
    trio.run(measure, args.runs)


if __name__ == "__main__":
    main()
