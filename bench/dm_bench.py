"""Direct messages through a real ``raafd serve`` on SQLite: how many ``dm.send`` a second are
answered ``dm.sent`` (each one durable: fsynced before the answer, commits shared by group
commit), their latency, the server's CPU per message; then one recipient draining its queue
(``queued`` frames, one ``ack`` per frame) and the rate of acknowledged messages. Server and
load generator are pinned to different cores (``taskset``). Prints figures; not a test.

Usage: python bench/dm_bench.py [--senders 50] [--window 4] [--seconds 10] [--core 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
import trio
from daemon_proc import Served, serving, store_line  # bench/ is sys.path[0]
from trio_websocket import open_websocket_url


async def sender(
    url: str, to: str, window: int, until: float, latencies: list[float], index: int
) -> None:
    async with open_websocket_url(url, max_message_size=16 << 20) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        sent_at: dict[str, float] = {}
        slots = trio.Semaphore(window)
        done = False
        count = 0

        async def reader() -> None:
            while True:
                message = json.loads(await ws.get_message())
                if message.get("type") == "dm.sent":
                    latencies.append(time.perf_counter() - sent_at.pop(message["ref"]))
                    slots.release()
                elif message.get("type") == "error":
                    raise RuntimeError(message)
                if done and not sent_at:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            while time.perf_counter() < until:
                await slots.acquire()
                ref = f"{index}-{count}"
                count += 1
                sent_at[ref] = time.perf_counter()
                text = f"message {ref} " + "x" * 64
                command = {"type": "dm.send", "to": to, "text": text, "client_id": ref, "ref": ref}
                await ws.send_message(json.dumps(command))
            done = True
            if not sent_at:
                nursery.cancel_scope.cancel()


async def drain(url: str, expected: int) -> tuple[int, float]:
    async with open_websocket_url(url, max_message_size=16 << 20) as ws:
        started = time.perf_counter()
        assert json.loads(await ws.get_message())["type"] == "welcome"
        acked = 0
        while acked < expected:
            message = json.loads(await ws.get_message())
            if message["type"] == "queued":
                ids = [m["id"] for m in message["messages"]]
                await ws.send_message(json.dumps({"type": "ack", "ids": ids}))
            elif message["type"] == "acked":
                acked += message["deleted"]
        return acked, time.perf_counter() - started


async def run(args: argparse.Namespace, served: Served) -> None:
    base, url = served.base, served.ws_url
    async with open_websocket_url(f"{url}?token=tok-read") as ws:
        reader_user = json.loads(await ws.get_message())["user"]
    latencies: list[float] = []
    cpu_before = served.cpu_seconds()
    began = time.perf_counter()
    until = began + args.seconds
    async with trio.open_nursery() as nursery:
        for i in range(args.senders):
            nursery.start_soon(
                sender, f"{url}?token=tok-send", reader_user, args.window, until, latencies, i
            )
    elapsed = time.perf_counter() - began
    cpu = served.cpu_seconds() - cpu_before
    headers = {"authorization": "Bearer tok-send"}
    async with httpx.AsyncClient(base_url=base, headers=headers) as http:
        stats = (await http.get("/v1/stats")).json()
    latencies.sort()
    n = len(latencies)
    print(
        f"dm.send: {args.senders} senders x {args.window} in flight, {n} answered in"
        f" {elapsed:.1f} s: {n / elapsed:,.0f} dm.sent/s"
    )
    print(
        f"  dm.sent latency: p50 {1000 * statistics.median(latencies):.2f} ms,"
        f" p99 {1000 * latencies[int(n * 0.99) - 1]:.2f} ms"
    )
    print(f"  server CPU: {1e6 * cpu / n:.0f} us per message")
    print(store_line(stats))
    if args.drain:
        cpu_before = served.cpu_seconds()
        acked, took = await drain(f"{url}?token=tok-read", n)
        cpu = served.cpu_seconds() - cpu_before
        print(
            f"drain: {acked} queued messages delivered and acknowledged in {took:.1f} s:"
            f" {acked / took:,.0f}/s, server CPU {1e6 * cpu / max(acked, 1):.0f} us each"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--senders", type=int, default=50)
    ap.add_argument("--window", type=int, default=4, help="dm.send in flight per sender")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--core", type=int, default=0, help="the server's core")
    ap.add_argument("--no-drain", dest="drain", action="store_false")
    args = ap.parse_args()
    off = "{ rate = 0.0 }"  # the rate limits have tests of their own; this measures the path
    sections = (
        '[chat]\noffline_max = 1000000\n[auth]\ntokens = ["tok-send", "tok-read"]\n'
        f"[limits.connection]\ncommands = {off}\nroom_sends = {off}\n"
        f"[limits.principal]\ncommands = {off}\nroom_sends = {off}\n"
    )
    with serving(sections, core=args.core, token="tok-read") as served:
        trio.run(run, args, served)


if __name__ == "__main__":
    main()
