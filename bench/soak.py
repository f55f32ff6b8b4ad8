"""Soak: idle WebSocket connections and streams starting and ending continuously for a long
time; prints RSS, open fds and trio tasks every interval, the drift after warm-up, the events
lost, and whether start/cancel cycles bring the task count back to its baseline. Figures, not
a pass/fail test (exit status 1 when an event was lost or the daemon died).

    .venv/bin/python bench/soak.py                  # 30 minutes: 2,000 idle, 200 streaming
    .venv/bin/python bench/soak.py --minutes 5      # the CI-sized run
    .venv/bin/python bench/soak.py --minutes 1 --idle 200 --streamers 20 --cycles 1000

raafd (bench/daemon_proc.py) runs pinned to one core, this script on the other. Idle
connections are raw sockets after the upgrade that read and drop the server's pings (the
config's heartbeat timeout is longer than the run). Each streamer runs one stream after another
on its own connection and checks each (seq from 1 without a gap, exactly one terminal event,
``complete``); a stream that breaks those counts as lost events. At the end, one connection
starts and cancels ``--cycles`` streams, and the task count is compared with the one before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import attrs
import trio
from fuzz import _drain, _upgrade_request, checked_stream, client_frame  # bench/ is sys.path[0]

SOAK_CONFIG = """
[websocket]
heartbeat_interval = 30.0
heartbeat_timeout = 86400.0
[streams]
retention = 10.0
detach_grace = 5.0
max_streams_per_connection = 64
[limits.connection]
commands = { rate = 0.0, burst = 1 }
stream_starts = { rate = 0.0, burst = 1 }
"""


@attrs.define
class Counts:
    streams: int = 0
    events: int = 0
    lost: list[str] = attrs.field(factory=list)


async def _idle(host: str, port: int, ready: trio.Semaphore) -> None:
    async with ready:
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(_upgrade_request())
    async with stream:
        await _drain(stream)


async def _ws(host: str, port: int) -> Any:
    from trio_websocket import open_websocket

    return open_websocket(host, port, "/v1/ws", use_ssl=False)


async def _streamer(host: str, port: int, counts: Counts, stop: trio.Event) -> None:
    async with await _ws(host, port) as ws:
        json.loads(await ws.get_message())  # welcome
        n = 0
        while not stop.is_set():
            n += 1
            events, wrong = await checked_stream(ws, f"soak {n}")
            counts.streams += 1
            counts.events += events
            if wrong is not None:
                counts.lost.append(f"stream {n}: {wrong}")


async def _cycles(host: str, port: int, cycles: int) -> None:
    """Start and cancel ``cycles`` streams on one connection."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        await stream.send_all(_upgrade_request())
        nursery.start_soon(_drain, stream)
        for i in range(cycles):
            sid = f"soak-cycle-{i}"
            await stream.send_all(
                client_frame(0x1, json.dumps({"type": "stream.start", "stream": sid}).encode())
                + client_frame(0x1, json.dumps({"type": "stream.cancel", "stream": sid}).encode())
            )
            if i % 50 == 0:
                await trio.sleep(0.05)  # let the daemon keep up; this is not a flood test
        await trio.sleep(1)
        nursery.cancel_scope.cancel()


def _stats(address: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/v1/stats", timeout=10) as answer:
        return dict(json.load(answer))


async def soak(daemon: Any, args: argparse.Namespace) -> int:
    host, port = "127.0.0.1", daemon.port
    counts = Counts()
    stop = trio.Event()
    samples: list[tuple[float, int, int, int]] = []

    async def sample(label: str) -> None:
        rss, fds = daemon.status()
        stats = await trio.to_thread.run_sync(_stats, daemon.address)
        tasks = int(stats["process"].get("tasks", -1))
        elapsed = time.monotonic() - started
        samples.append((elapsed, rss, fds, tasks))
        print(
            f"{label:>8} {elapsed / 60:6.1f} {rss / 2**20:9.1f} {fds:6} {tasks:7}"
            f" {counts.streams:9,} {counts.events:11,} {len(counts.lost):5}",
            flush=True,
        )

    print(
        f"raafd on core {daemon.server_core}, load on core {daemon.load_core}; "
        f"{args.idle} idle connections, {args.streamers} streamers, {args.minutes:g} min"
    )
    print(
        f"{'':>8} {'min':>6} {'RSS MiB':>9} {'fds':>6} {'tasks':>7} {'streams':>9} "
        f"{'events':>11} {'lost':>5}"
    )
    started = time.monotonic()
    before = -1
    async with trio.open_nursery() as nursery:
        ready = trio.Semaphore(100)
        for _ in range(args.idle):
            nursery.start_soon(_idle, host, port, ready)
        for _ in range(args.streamers):
            nursery.start_soon(_streamer, host, port, counts, stop)
        await sample("start")
        deadline = started + args.minutes * 60
        while time.monotonic() < deadline:
            await trio.sleep(min(args.every, max(0.0, deadline - time.monotonic())))
            await sample("")
        stop.set()
        await trio.sleep(15)  # streamers finish their stream; retention runs out
        await sample("settled")
        before = samples[-1][3]
        await _cycles(host, port, args.cycles)
        await trio.sleep(20)  # the cancelled streams' retention (10 s) and the sweep
        await sample("cycles")
        nursery.cancel_scope.cancel()
    warm = [s for s in samples if s[0] >= args.warmup * 60] or samples
    first, last = warm[0], samples[-2]
    drift = (last[1] - first[1]) / first[1] * 100
    print()
    print(f"streams            {counts.streams:,} whole, {len(counts.lost)} with lost events")
    print(f"events             {counts.events:,}")
    print(
        f"RSS drift          {drift:+.1f} % from {first[0] / 60:.1f} min (after warm-up) to the end"
    )
    print(f"fds                {statistics.median(s[2] for s in samples):.0f} median")
    after = samples[-1][3]
    print(f"tasks              {before} before {args.cycles:,} start/cancel cycles, {after} after")
    for line in counts.lost[:5]:
        print("  ", line)
    return 1 if counts.lost or not daemon.alive() else 0


def main(argv: list[str] | None = None) -> int:
    from daemon_proc import running_daemon

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--streamers", type=int, default=200)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=1.0, help="minutes before drift counts")
    parser.add_argument("--cycles", type=int, default=10_000)
    args = parser.parse_args(argv)
    with running_daemon(SOAK_CONFIG, reply_words=40, tokens_per_second=200.0) as daemon:
        return trio.run(soak, daemon, args)


if __name__ == "__main__":
    sys.exit(main())
