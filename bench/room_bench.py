"""Room fan-out through a real ``raafd serve`` on SQLite: members on separate connections, one
publisher per room sending at a steady rate (each message durable before ``room.sent``);
prints deliveries a second, delivery latency (publisher's send to a member's receipt) p50/p99,
and the server's CPU per delivery. The server is pinned to one core and the load generator
(``node bench/loadgen.mjs room``: raw sockets) to another (``taskset``). Prints figures; not a
test.

Usage: python bench/room_bench.py [--members 1000] [--rooms 1] [--rate 100] [--seconds 10]
                                  [--publishers 4] [--core 0] [--profile PATH]

The issue's two shapes: ``--members 1000 --rooms 1 --rate 100`` (100,000 deliveries/s at
1,000 members) and ``--members 1000 --rooms 100 --rate 10`` (100 rooms of 10).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess

import httpx
from daemon_proc import ROOT, serving, store_line  # bench/ is sys.path[0]


def config(args: argparse.Namespace) -> str:
    off = "{ rate = 0.0 }"
    rooms = "\n".join(
        f"[rooms.room-{r}]\nmax_members = {args.members + 10}\nrate_limit = 100000\n"
        f"history = 5000\n"
        for r in range(args.rooms)
    )
    return (
        f"[chat]\nmax_rooms = {args.rooms + 10}\nmax_rooms_per_user = {args.rooms + 10}\n"
        f"max_lag = 100000\nsend_queue = 100000\n"
        f"[limits.connection]\ncommands = {off}\nroom_sends = {off}\n"
        f"[limits.principal]\ncommands = {off}\nroom_sends = {off}\n"
        f"{rooms}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--rooms", type=int, default=1)
    ap.add_argument("--rate", type=float, default=100.0, help="messages a second per room")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--window", type=int, default=64, help="room.send in flight per publisher")
    ap.add_argument(
        "--publishers",
        type=int,
        default=4,
        help="sending connections per room (one connection's commands are answered in order)",
    )
    ap.add_argument("--core", type=int, default=0, help="the server's core")
    ap.add_argument("--profile", metavar="PATH", help="run the server under cProfile into PATH")
    args = ap.parse_args()
    pin = shutil.which("taskset")
    server = f"max_connections = {args.members + 100}"
    with serving(config(args), server=server, core=args.core, profile=args.profile) as served:
        other, port = served.load_core, served.port
        cpu_before = served.cpu_seconds()
        loadgen = [
            *([pin, "-c", str(other)] if pin else []),
            "node",
            str(ROOT / "bench" / "loadgen.mjs"),
            "room",
            "--port",
            str(port),
            "--n",
            str(args.members),
            "--rooms",
            str(args.rooms),
            "--rate",
            str(args.rate),
            "--duration",
            str(int(args.seconds * 1000)),
            "--window",
            str(args.window),
            "--publishers",
            str(args.publishers),
            "--sources",
            "8",
        ]
        out = subprocess.run(loadgen, capture_output=True, text=True, timeout=args.seconds + 300)
        cpu = served.cpu_seconds() - cpu_before
        stats = httpx.get(f"{served.base}/v1/stats").json()
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"the load generator printed nothing: {out.stderr[-2000:]}")
        result = json.loads(lines[-1])
        deliveries = max(int(result["deliveries"]), 1)
        latency = result["latency_ms"]
        per_room = args.members // args.rooms
        print(
            f"rooms: {args.rooms} x {per_room} members ({result['joined']} joined), "
            f"{args.rate:g} messages/s per room for {args.seconds:g} s; server on core "
            f"{args.core}, load generator on core {other}"
        )
        print(
            f"  sent {result['sent']}, acknowledged {result['acked']}, errors {result['errors']};"
            f" deliveries {result['deliveries']}: {result['deliveries_per_s']:,} deliveries/s"
        )
        print(
            f"  delivery latency: p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms,"
            f" max {latency.get('max')} ms"
        )
        print(
            f"  server CPU: {cpu:.2f} s, {1e6 * cpu / deliveries:.1f} us per delivery;"
            f" closed 4001: {result['closed_4001']}, other closes: {result['closed_other']},"
            f" id gaps: {result['gaps']}"
        )
        print(f"  load generator CPU: {result['loadgen_cpu_ms'] / 1000:.2f} s")
        print(store_line(stats))


if __name__ == "__main__":
    main()
