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
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        with trio.fail_after(60):
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


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


async def run(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/v1/ws"
    await wait_ready(base)
    async with open_websocket_url(f"{url}?token=tok-read") as ws:
        reader_user = json.loads(await ws.get_message())["user"]
    latencies: list[float] = []
    cpu_before = cpu_seconds(proc.pid)
    began = time.perf_counter()
    until = began + args.seconds
    async with trio.open_nursery() as nursery:
        for i in range(args.senders):
            nursery.start_soon(
                sender, f"{url}?token=tok-send", reader_user, args.window, until, latencies, i
            )
    elapsed = time.perf_counter() - began
    cpu = cpu_seconds(proc.pid) - cpu_before
    headers = {"authorization": "Bearer tok-send"}
    async with httpx.AsyncClient(base_url=base, headers=headers) as http:
        store = (await http.get("/v1/stats")).json().get("store", {})
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
    print(
        f"  store: {store.get('commits')} commits, mean batch {store.get('mean_batch')},"
        f" largest {store.get('largest_batch')}, mean commit {store.get('mean_commit_ms')} ms"
    )
    if args.drain:
        cpu_before = cpu_seconds(proc.pid)
        acked, took = await drain(f"{url}?token=tok-read", n)
        cpu = cpu_seconds(proc.pid) - cpu_before
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
    cores = sorted(os.sched_getaffinity(0))
    others = [c for c in cores if c != args.core]
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="dm_bench."))
    config = tmp / "raafd.toml"
    config.write_text(
        f'[server]\nport = {port}\n[state]\ndir = "{tmp / "var"}"\n'
        f'[admin]\nsocket = "{tmp / "admin.sock"}"\n[logging]\nlevel = "warning"\n'
        "[chat]\noffline_max = 1000000\n"
        '[auth]\ntokens = ["tok-send", "tok-read"]\n'
    )
    pin = ["taskset", "-c", str(args.core)] if shutil.which("taskset") else []
    proc = subprocess.Popen(
        [*pin, sys.executable, "-m", "raafd.cli", "serve", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if others:
            os.sched_setaffinity(0, {others[0]})  # the load generator: another core
        trio.run(run, args, proc, port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
