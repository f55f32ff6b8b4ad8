"""Round-trip time of one small message between two processes over loopback TCP, on the same
core and across the two cores, with the responder idle between messages (as raafd is at low
load). It prices the cross-core wake-ups that every raafd token pays and that the benchmark's
``direct`` baseline (upstream and load generator on one core) does not: see
docs/performance.md. Prints medians and p99 in microseconds; not a test.

Usage: python bench/hop_latency.py [--rounds 2000] [--gap-ms 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def _echo(listener: socket.socket, core: int) -> None:
    os.sched_setaffinity(0, {core})
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(64):
        conn.sendall(data)
    os._exit(0)


def measure(server_core: int, client_core: int, rounds: int, gap_s: float) -> list[float]:
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:
        _echo(listener, server_core)
    os.sched_setaffinity(0, {client_core})
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    try:
        for _ in range(rounds):
            time.sleep(gap_s)  # let the responder go idle, as raafd is between tokens
            start = time.perf_counter()
            client.sendall(b"x")
            client.recv(64)
            rtts.append((time.perf_counter() - start) * 1e6)
    finally:
        client.close()
        listener.close()
        os.waitpid(pid, 0)
    return rtts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--gap-ms", type=float, default=5.0)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores")
    pairs = {"same core": (cores[0], cores[0]), "across cores": (cores[0], cores[1])}
    for label, (a, b) in pairs.items():
        rtts = sorted(measure(a, b, args.rounds, args.gap_ms / 1000))
        p99 = rtts[int(len(rtts) * 0.99) - 1]
        median = statistics.median(rtts)
        print(f"{label:13s} round trip: median {median:7.1f} us, p99 {p99:7.1f} us")


if __name__ == "__main__":
    main()
