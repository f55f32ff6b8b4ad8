"""Memory per retained finished stream, and where it goes. Prints figures; not a test.

A finished stream stays retrievable (replay, status) for ``retention`` seconds, and a busy
daemon retains thousands of them; what each one keeps alive is the figure here. The script
builds a real :class:`~raafd.streams.manager.StreamManager` in-process (real clock, its own
nursery, logging at ``warning``) and runs a warm-up batch (``--warm``), so that lazily made
metric children, first-use caches and the peak of ``--concurrency`` streams running at once do
not count. Then it collects the garbage, marks RSS, runs ``--streams`` finished streams of
``--tokens`` ``content`` events each (``retention`` long enough that all of them are still
retained at the end), collects again and reports the growth of RSS divided by the number of
streams. Streams run ``--concurrency`` at a time, each read to its end by a subscriber (as a
client would), so the subscription's objects come and go too.

Bodies (``--body``):

- ``agent`` (default): the demo provider through the agent loop and
  :class:`~raafd.agents.bodies.AgentBodies`, as the daemon runs a normal stream (the demo reply
  is the one-word input plus ``--tokens - 1`` generated words, as fast as it can);
- ``plain``: a body that emits ``--tokens`` ``content`` events and ``complete`` and nothing else
  (the floor: the stream lifecycle and its log alone).

With ``--daemon`` the streams go through the real daemon instead: a child process runs it
in-process (as ``raafd serve`` does: a frozen heap, the collector observed; the demo provider as
above, the SQLite store in a temp dir) on a free port, and this process drives it over WebSocket
with raafd's Python client, ``--concurrency`` connections each running one stream at a time; the
child marks and reports its own RSS. This adds what the gateway, the delivery and the store keep
per stream. With ``--upstream`` the agent runs on the openai provider against
``bench/fake_upstream.mjs`` (64 deltas 20 ms apart; needs Node.js) instead of the demo provider.

With ``--trace`` tracemalloc runs from the mark (it inflates RSS; its own figure is the Python
heap that is still allocated at the end) and prints the largest allocation sites per retained
stream, by line (or by call chain with ``--frames``), and the growth in the count of objects the
collector tracks, by type.

    .venv/bin/python bench/retained_memory.py
    .venv/bin/python bench/retained_memory.py --streams 2000 --body plain
    .venv/bin/python bench/retained_memory.py --trace --frames 4 --top 15
    .venv/bin/python bench/retained_memory.py --daemon --trace
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from idle_memory import _types, growth_per, print_sites, sites_per  # bench/ is on sys.path
from stream_bench import Upstream, read_json_line, rss_bytes

from raafd.logging import configure_logging

if TYPE_CHECKING:
    from raafd.streams import StreamManager
    from raafd.streams.body import Body, StreamWriter

# The daemon's child imports only what the daemon does, so that ``--daemon`` also measures an
# older tree (``PYTHONPATH=<exported tree>``) whose streams package differs.

RETENTION = 86_400.0  # nothing is forgotten before the end of a run
TPS = 1e6  # the demo provider's tokens per second: as fast as the stream takes them


# --- measuring, in the process that holds the streams ------------------------------------------


def _collect() -> int:
    """A full collection (three: objects freed by one pass's finalizers go in the next); the
    number of unreachable objects found."""
    return sum(gc.collect() for _ in range(3))


class Marks:
    """RSS, tracked objects and (with ``trace``) the traced heap at the mark; ``report`` says
    what grew since, per stream."""

    def __init__(self, trace: bool, frames: int, top: int) -> None:
        self.trace, self.frames, self.top = trace, frames, top
        self.rss = 0
        self.types: collections.Counter[str] = collections.Counter()

    def mark(self) -> None:
        _collect()
        self.rss = rss_bytes(os.getpid())
        self.types = _types()
        if self.trace:
            tracemalloc.start(self.frames)

    def report(self, n: int, manager: StreamManager) -> dict[str, Any]:
        uncollected = rss_bytes(os.getpid())
        garbage = _collect()
        result: dict[str, Any] = {
            "rss_uncollected": uncollected,
            "garbage": garbage,
            "rss_before": self.rss,
            "rss_after": rss_bytes(os.getpid()),
            "retained": manager.stats()["retained"],
            "objects": growth_per(self.types, n, self.top),
        }
        newest = manager.get(manager.list_streams()[0]["id"])
        result["events"] = newest.head
        result["log_json"] = newest.log.nbytes
        if self.trace:
            snapshot = tracemalloc.take_snapshot()
            result["heap"] = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            result["sites"] = sites_per(snapshot, n, self.frames, self.top)
        return result


# --- in-process: a StreamManager of our own ----------------------------------------------------


def plain_body(tokens: int) -> Body:
    async def body(out: StreamWriter) -> None:
        for i in range(tokens):
            await out.emit("content", delta=f" w{i}")
        await out.emit("complete", final_response="", finish_reason="stop")

    return body


async def run_streams(
    manager: StreamManager, n: int, concurrency: int, body: str, tokens: int
) -> None:
    """``n`` streams, ``concurrency`` at a time, each read to its terminal event."""
    limiter = trio.CapacityLimiter(concurrency)

    async def one(token: object) -> None:
        try:
            if body == "plain":
                stream = manager.start(agent=None, body=plain_body(tokens))
            else:
                stream = manager.start(agent=None, messages=[{"role": "user", "content": "go"}])
            async with stream.subscribe(0) as sub:
                async for _batch in sub:
                    pass
            if stream.status != "complete":
                raise RuntimeError(f"stream {stream.id} ended {stream.status}")
        finally:
            limiter.release_on_behalf_of(token)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            token = object()
            await limiter.acquire_on_behalf_of(token)  # before start_soon: the loop slows down
            nursery.start_soon(one, token)


async def in_process(args: argparse.Namespace) -> dict[str, Any]:
    from raafd.agents.bodies import AgentBodies
    from raafd.agents.runner import AgentLoop
    from raafd.config import AgentConfig, BreakerConfig, ProviderConfig, StreamsConfig
    from raafd.metrics import Metrics
    from raafd.providers.base import Provider
    from raafd.providers.breaker import Breakers
    from raafd.providers.demo import DemoProvider
    from raafd.streams import StreamManager

    config = StreamsConfig(retention=RETENTION, max_streams=max(10_000, args.warm + args.streams))
    metrics = Metrics()
    demo = DemoProvider("demo", ProviderConfig(tokens_per_second=TPS, reply_words=args.tokens - 1))
    providers: dict[str, Provider] = {"demo": demo}
    agents = {"assistant": AgentConfig(provider="demo")}
    loop = AgentLoop(agents, providers, Breakers(BreakerConfig()), None, metrics, config)
    manager = StreamManager(
        config, agents, providers, metrics, "assistant", bodies=AgentBodies(loop)
    )
    marks = Marks(args.trace, args.frames, args.top)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await run_streams(manager, args.warm, args.concurrency, args.body, args.tokens)
        marks.mark()
        await run_streams(manager, args.streams, args.concurrency, args.body, args.tokens)
        result = marks.report(args.streams, manager)
        nursery.cancel_scope.cancel()
    return result


# --- through the daemon: a child process serves, this one is the client -----------------------


def serve(args: argparse.Namespace) -> None:
    """The child: the daemon, and ``mark`` / ``report N`` / ``quit`` on stdin."""
    with tempfile.TemporaryDirectory(prefix="raafd-retained-") as state:
        _serve(args, Path(state))


def _serve(args: argparse.Namespace, state: Path) -> None:
    from raafd.config import parse_config
    from raafd.daemon import Daemon
    from raafd.metrics import observing_gc

    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 1.0},
            "logging": {"level": "warning", "format": "json"},
            "admin": {"enabled": False, "socket": str(state / "admin.sock")},
            "state": {"dir": str(state / "var")},
            "streams": {"retention": RETENTION, "max_streams": max(10_000, args.streams * 2)},
            "providers": {
                "demo": {"type": "demo", "tokens_per_second": TPS, "reply_words": args.tokens - 1},
                "up": {
                    "type": "openai",
                    "base_url": f"http://127.0.0.1:{args.upstream_port}/v1",
                    "model": "m",
                },
            },
            "agents": {"assistant": {"provider": "up" if args.upstream_port else "demo"}},
        }
    )
    configure_logging(config.logging.level, config.logging.format)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def main() -> None:
        daemon = Daemon(config, environ={})
        gc.collect()
        gc.freeze()  # as `raafd serve` does
        gc.set_threshold(*config.server.gc_thresholds)
        marks = Marks(args.trace, args.frames, args.top)
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
                    await trio.sleep(0.5)  # let the last replies and closes settle
                    if words[0] == "mark":
                        marks.mark()
                        reply({"rss": marks.rss})
                    elif words[0] == "report":
                        reply(marks.report(int(words[1]), daemon.streams))

    trio.run(main)


async def drive(port: int, args: argparse.Namespace, ask: Callable[[str], Any]) -> Any:
    """Open ``--concurrency`` WebSocket connections; on them run the warm-up streams, ``ask``
    the child to mark, run the measured streams, and ``ask`` for the report. Each connection
    runs one stream at a time, read to its terminal event. The connections stay open from
    before the mark to after the report, so what the daemon keeps per connection (open or
    recently closed) is not counted per stream."""
    from raafd.client import open_client

    async def run(clients: list[Any], n: int) -> None:
        left = iter(range(n))

        async def connection(client: Any) -> None:
            for _ in left:
                handle = await client.start("go")
                async for _event in handle:
                    pass
                end = (handle.terminal or {}).get("event")
                if end != "complete":
                    raise RuntimeError(f"stream {handle.stream_id} ended {end}")

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(connection, client)

    with trio.fail_after(1800):
        async with contextlib.AsyncExitStack() as stack:
            url = f"ws://127.0.0.1:{port}/v1/ws"
            clients = [
                await stack.enter_async_context(open_client(url, reconnect=False))
                for _ in range(args.concurrency)
            ]
            await run(clients, args.warm)
            await trio.to_thread.run_sync(ask, "mark")
            await run(clients, args.streams)
            return await trio.to_thread.run_sync(ask, f"report {args.streams}")


def through_daemon(args: argparse.Namespace) -> dict[str, Any]:
    upstream = Upstream(ttl=1800) if args.upstream else None
    try:
        return _through_daemon(args, upstream.port if upstream else 0)
    finally:
        if upstream is not None:
            upstream.stop()


def _through_daemon(args: argparse.Namespace, upstream_port: int) -> dict[str, Any]:
    child_args = ["--serve", "--upstream-port", str(upstream_port), *sys.argv[1:]]
    child = subprocess.Popen(
        [sys.executable, __file__, *child_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def ask(command: str) -> dict[str, Any]:
        assert child.stdin is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        return read_json_line(child, timeout=300)

    try:
        port = read_json_line(child, timeout=30)["port"]
        result: dict[str, Any] = trio.run(drive, port, args, ask)
        return result
    finally:
        with contextlib.suppress(OSError, ValueError):
            assert child.stdin is not None
            child.stdin.close()
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--streams", type=int, default=1000, help="streams measured (1000)")
    ap.add_argument(
        "--warm",
        type=int,
        help="streams run before the mark (the larger of 100 and --concurrency)",
    )
    ap.add_argument("--tokens", type=int, default=64, help="content events per stream (64)")
    ap.add_argument("--concurrency", type=int, default=100, help="streams at once (100)")
    ap.add_argument("--body", choices=("agent", "plain"), default="agent", help="(agent)")
    ap.add_argument("--daemon", action="store_true", help="through the daemon, over WebSocket")
    ap.add_argument(
        "--upstream",
        action="store_true",
        help="with --daemon: the openai provider on bench/fake_upstream.mjs (64 deltas, 20 ms)",
    )
    ap.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help="tracemalloc: allocation sites")
    ap.add_argument("--frames", type=int, default=1, help="call-chain depth with --trace (1)")
    ap.add_argument("--top", type=int, default=15, help="rows of each table (15)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm is None:
        args.warm = max(100, args.concurrency)
    if args.serve:
        serve(args)
        return 0
    if args.daemon and args.body != "agent":
        ap.error("--daemon runs the agent body")
    if args.upstream and not args.daemon:
        ap.error("--upstream goes with --daemon")
    configure_logging("warning", "json")
    r = through_daemon(args) if args.daemon else trio.run(in_process, args)
    n = args.streams
    per = (r["rss_after"] - r["rss_before"]) / n
    note = " (inflated by tracemalloc)" if args.trace else ""
    how = "through the daemon" if args.daemon else "in-process"
    print(
        f"{n} finished streams {how} ({args.body} body, {r['events']} events,"
        f" {r['log_json']:,} bytes of JSON in a log), {r['retained']} retained"
    )
    print(
        f"RSS {r['rss_before'] / 2**20:.1f} -> {r['rss_after'] / 2**20:.1f} MiB:"
        f" {per:,.0f} bytes per retained stream{note}"
    )
    print(
        f"(before the full collection: {r['rss_uncollected'] / 2**20:.1f} MiB;"
        f" it found {r['garbage']:,} unreachable objects)"
    )
    if args.trace:
        print(f"Python heap per retained stream (tracemalloc): {r['heap'] / n:,.0f} bytes")
    print_sites(r.get("sites", []), r["objects"], "retained stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
