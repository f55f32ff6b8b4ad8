"""Background jobs through a real ``raafd serve`` on SQLite (durability on: every 202 is fsynced
first, commits shared by group commit): N jobs on the demo provider with no delay, submitted
with ``POST /v1/jobs`` over keep-alive connections. Prints the accepted rate (POST → 202), the
completed rate end to end (first POST to last completion), the queue latency (created →
started) p50/p99 from the jobs themselves, and the server's CPU per job. Server and load
generator are pinned to different cores (``taskset``). Prints figures; not a test.

Usage: python bench/job_bench.py [--jobs 10000] [--connections 64] [--workers 64] [--core 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
import trio
from daemon_proc import Served, serving, store_line  # bench/ is sys.path[0]


async def submitter(port: int, bodies: list[bytes], statuses: list[int]) -> None:
    """One keep-alive connection POSTing its bodies one after the other (a plain HTTP/1.1
    client: the load generator must cost less than the server)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffer = b""
    async with stream:
        for body in bodies:
            await stream.send_all(
                b"POST /v1/jobs HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            buffer = buffer[length:]
            statuses.append(int(head.split(b" ", 2)[1]))


async def run(args: argparse.Namespace, served: Served) -> None:
    base, port = served.base, served.port
    bodies = [json.dumps({"input": f"job {n}"}).encode() for n in range(args.jobs)]
    shards = [bodies[i :: args.connections] for i in range(args.connections)]
    statuses: list[int] = []
    cpu_before = served.cpu_seconds()
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for shard in shards:
            nursery.start_soon(submitter, port, shard, statuses)
    accepted_in = time.perf_counter() - began
    assert statuses.count(202) == args.jobs, {s: statuses.count(s) for s in set(statuses)}
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        # /v1/stats costs the server tens of ms (it walks the process's objects): wait on the
        # last jobs' long polls instead, then ask it once.
        recent = (await http.get("/v1/jobs", params={"limit": "100"})).json()["jobs"]
        for row in recent:
            await http.get(f"/v1/jobs/{row['job']}", params={"wait": "60"})
        while True:
            stats = (await http.get("/v1/stats")).json()
            if stats["jobs"]["completed"] + stats["jobs"]["dead"] >= args.jobs:
                break
            await trio.sleep(0.5)
        listed = (await http.get("/v1/jobs", params={"limit": "1000"})).json()["jobs"]
        last_end = max(j["finished_at"] for j in listed)
        completed_in = time.perf_counter() - began - (time.time() - last_end)
        cpu = served.cpu_seconds() - cpu_before
        waits: list[float] = []
        cursor: str | None = None
        while True:
            params = {
                "status": "completed",
                "limit": "1000",
                **({"cursor": cursor} if cursor else {}),
            }
            page = (await http.get("/v1/jobs", params=params)).json()
            waits.extend(j["started_at"] - j["created_at"] for j in page["jobs"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    waits.sort()
    n = len(waits)
    print(
        f"{args.jobs} jobs, {args.connections} connections, {args.workers} workers,"
        f" demo provider ({args.words} words)"
    )
    print(f"  accepted: {args.jobs / accepted_in:,.0f} jobs/s (POST → 202, durable)")
    print(f"  completed: {stats['jobs']['completed'] / completed_in:,.0f} jobs/s end to end")
    print(
        f"  queue latency (created → started): p50 {1000 * statistics.median(waits):.1f} ms,"
        f" p99 {1000 * waits[int(n * 0.99) - 1]:.1f} ms"
    )
    print(f"  server CPU: {1e6 * cpu / args.jobs:.0f} us per job (submit, run, two writes)")
    print(store_line(stats))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--words", type=int, default=5, help="words of each demo answer")
    ap.add_argument("--core", type=int, default=0, help="the server's core")
    ap.add_argument("--profile", metavar="PATH", help="run the server under cProfile into PATH")
    args = ap.parse_args()
    sections = (
        '[providers.demo]\ntype = "demo"\ntokens_per_second = 100000.0\n'
        f"reply_words = {args.words}\n[jobs]\nworkers = {args.workers}\n"
    )
    with serving(sections, core=args.core, profile=args.profile) as served:
        trio.run(run, args, served)


if __name__ == "__main__":
    main()
