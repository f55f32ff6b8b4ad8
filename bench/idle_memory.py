"""Memory per idle WebSocket connection, and where it goes.

A quicker, finer twin of the idle case of ``bench/stream_bench.py``: it prints figures; it is not
a pass/fail test. A child process runs the daemon in-process (as ``raafd serve`` does: a frozen
heap, the collector observed) on a free port; ``bench/loadgen.mjs idle`` opens the connections,
each of which completes the handshake, gets its ``welcome`` and then stays silent (answering
pings). Two load-generator runs: a warm-up batch (``--warm``), after which the child marks its
RSS, then ``--n`` more; the growth of RSS divided by ``--n`` is the figure, so one-time costs
(lazily made metric children, first-use caches) do not count.

With ``--trace`` the child also runs ``tracemalloc`` (which inflates RSS; its own figure is the
Python heap) and prints the largest allocation sites per connection, by line (or by call chain
with ``--frames``), and the growth in the count of objects the collector tracks, by type.

    .venv/bin/python bench/idle_memory.py --n 15000
    .venv/bin/python bench/idle_memory.py --n 2000 --trace --top 30

Needs Node.js on ``PATH`` and an open-files limit above ``--warm`` + ``--n``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from stream_bench import read_json_line, rss_bytes  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.mjs"


# --- the child: the daemon, and measurements on request ----------------------------------------


def _types() -> collections.Counter[str]:
    return collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )


def growth_per(before: collections.Counter[str], n: int, top: int) -> list[tuple[str, float]]:
    """The object types the collector tracks that grew most since ``before``, per item of
    ``n`` (also used by retained_memory.py)."""
    return [(name, round(count / n, 2)) for name, count in (_types() - before).most_common(top)]


def sites_per(
    snapshot: tracemalloc.Snapshot, n: int, frames: int, top: int
) -> list[tuple[float, float, str]]:
    """The largest allocation sites of ``snapshot`` (by line, or by call chain when ``frames``
    > 1), as (bytes, blocks) per item of ``n`` and the site (also used by
    retained_memory.py)."""
    key = "lineno" if frames == 1 else "traceback"
    return [
        (
            round(stat.size / n, 1),
            round(stat.count / n, 2),
            " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback),
        )
        for stat in snapshot.statistics(key)[:top]
    ]


def print_sites(
    sites: list[tuple[float, float, str]], objects: list[tuple[str, float]], per: str
) -> None:
    """The allocation sites (when traced) and the object growth, per ``per``."""
    if sites:
        print(f"\n  bytes  blocks  allocation site (per {per})")
        for size, count, where in sites:
            print(f"{size:7,.1f} {count:7.2f}  {where}")
    print(f"\nobjects tracked by the collector, growth per {per}")
    for name, count in objects:
        print(f"{count:7.2f}  {name}")


def serve(trace: bool, frames: int, top: int) -> None:
    import trio

    from raafd.config import parse_config
    from raafd.daemon import Daemon
    from raafd.logging import configure_logging
    from raafd.metrics import observing_gc

    state = Path(tempfile.mkdtemp(prefix="raafd-idle-"))
    config = parse_config(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "max_connections": 60_000,
                "backlog": 4096,
                "shutdown_grace": 1.0,
            },
            "websocket": {"heartbeat_timeout": 3600.0},
            "logging": {"level": "warning", "format": "json"},
            "admin": {"enabled": False, "socket": str(state / "admin.sock")},
            "state": {"dir": str(state / "var")},
        }
    )
    configure_logging(config.logging.level, config.logging.format)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def main() -> None:
        daemon = Daemon(config, environ={})
        gc.collect()
        gc.freeze()
        mark: dict[str, Any] = {}
        with observing_gc(daemon.metrics):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(daemon.run)
                reply({"port": int(address.rsplit(":", 1)[1])})
                while True:
                    line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                    words = line.split()
                    if not words or words[0] == "quit":
                        nursery.cancel_scope.cancel()
                        return
                    await trio.sleep(0.5)  # let the last handshakes settle
                    gc.collect()
                    if words[0] == "mark":
                        mark = {"rss": rss_bytes(os.getpid()), "types": _types()}
                        if trace:
                            tracemalloc.start(frames)
                            mark["heap"] = tracemalloc.get_traced_memory()[0]
                        reply({"rss": mark["rss"], "open": len(daemon.gateway.connections)})
                    elif words[0] == "report":
                        n = int(words[1])
                        result: dict[str, Any] = {
                            "open": len(daemon.gateway.connections),
                            "rss_per_conn": (rss_bytes(os.getpid()) - mark["rss"]) / n,
                            "objects_per_conn": growth_per(mark["types"], n, top),
                        }
                        if trace:
                            snapshot = tracemalloc.take_snapshot()
                            heap = tracemalloc.get_traced_memory()[0] - mark["heap"]
                            tracemalloc.stop()
                            result["heap_per_conn"] = heap / n
                            result["sites"] = sites_per(snapshot, n, frames, top)
                        reply(result)

    trio.run(main)


# --- the parent: the load generator --------------------------------------------------------------


def _open(port: int, n: int) -> subprocess.Popen[str]:
    """``n`` idle connections, held until the generator's stdin closes."""
    proc = subprocess.Popen(
        [
            "node",
            str(LOADGEN),
            "idle",
            "--port",
            str(port),
            "--n",
            str(n),
            "--sources",
            str(max(1, math.ceil(n / 5000))),
            "--concurrency",
            "200",
            "--hold",
            "600",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = read_json_line(proc, timeout=300)
    if ready.get("open") != n:
        raise RuntimeError(f"opened {ready.get('open')} of {n}: {ready}")
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=2000, help="connections measured (2000)")
    ap.add_argument("--warm", type=int, default=200, help="connections opened before (200)")
    ap.add_argument("--trace", action="store_true", help="tracemalloc: allocation sites")
    ap.add_argument("--frames", type=int, default=1, help="call-chain depth with --trace (1)")
    ap.add_argument("--top", type=int, default=25, help="rows of each table (25)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.trace, args.frames, args.top)
        return 0

    child_args = ["--serve", "--frames", str(args.frames), "--top", str(args.top)]
    child = subprocess.Popen(
        [sys.executable, __file__, *child_args, *(["--trace"] if args.trace else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    gens: list[subprocess.Popen[str]] = []
    assert child.stdin is not None

    def ask(command: str) -> dict[str, Any]:
        assert child.stdin is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        return read_json_line(child, timeout=300)

    try:
        port = read_json_line(child, timeout=30)["port"]
        gens.append(_open(port, args.warm))
        ask("mark")
        started = time.monotonic()
        gens.append(_open(port, args.n))
        opened_in = time.monotonic() - started
        result = ask(f"report {args.n}")
    finally:
        for proc in [*gens, child]:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in [*gens, child]:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    print(
        f"{args.n} idle connections (after {args.warm}) opened in {opened_in:.1f} s; "
        f"{result['open']} open at the report"
    )
    note = " (inflated by tracemalloc)" if args.trace else ""
    print(f"RSS per connection: {result['rss_per_conn']:,.0f} bytes{note}")
    if args.trace:
        print(f"Python heap per connection (tracemalloc): {result['heap_per_conn']:,.0f} bytes")
    print_sites(result.get("sites", []), result["objects_per_conn"], "connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
