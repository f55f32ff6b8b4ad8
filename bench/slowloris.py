"""Slowloris: many sockets dribble a request head one byte at a time while real clients
connect; prints when the dribblers were closed and the real clients' latency. Figures, not a
pass/fail test (the exit status is 1 only when a dribbler outlived the deadline by more than a
second or a real client failed).

    .venv/bin/python bench/slowloris.py     # 1,000 dribblers, 50 clients, a 5 s deadline
    .venv/bin/python bench/slowloris.py --sockets 2000 --header-timeout 10

raafd (bench/daemon_proc.py) runs pinned to one core, this script on the other. Each dribbler
sends ``GET /healthz HTTP/1.1\\r\\n`` and then one byte of a never-ending header every
``--interval`` seconds; raafd must close each at ``server.header_timeout`` after it connected
(with a 408). Meanwhile each real client connects, sends ``GET /healthz`` and reads the answer,
again and again, and the time from connect to the whole answer is recorded.
``tests/test_slow_clients.py`` runs :func:`slowloris` small against a daemon of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import attrs
import trio


@attrs.define
class Result:
    closed_after: list[float] = attrs.field(factory=list)  # per dribbler: connect to close
    answered_408: int = 0
    latencies: list[float] = attrs.field(factory=list)  # per real request
    failures: list[str] = attrs.field(factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _dribbler(
    host: str, port: int, interval: float, result: Result, opened: trio.Semaphore
) -> None:
    async with opened:
        stream = await trio.open_tcp_stream(host, port)
    started = trio.current_time()
    received = bytearray()

    async def read() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await stream.receive_some(4096):
                received.extend(chunk)

    async with stream, trio.open_nursery() as nursery:
        done = trio.Event()

        async def reader() -> None:
            await read()
            done.set()
            nursery.cancel_scope.cancel()

        nursery.start_soon(reader)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
            while True:
                for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n":
                    await trio.sleep(interval)
                    await stream.send_all(bytes((byte,)))
        await done.wait()
    result.closed_after.append(trio.current_time() - started)
    if received.startswith(b"HTTP/1.1 408 "):
        result.answered_408 += 1


async def _real_client(host: str, port: int, until: float, result: Result) -> None:
    while trio.current_time() < until:
        started = trio.current_time()
        try:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(
                        b"GET /healthz HTTP/1.1\r\nHost: real\r\nConnection: close\r\n\r\n"
                    )
                    answer = b""
                    while chunk := await stream.receive_some(4096):
                        answer += chunk
            if not answer.startswith(b"HTTP/1.1 200 "):
                result.failures.append(answer[:60].decode("latin-1"))
                continue
        except (OSError, trio.TooSlowError) as exc:
            result.failures.append(repr(exc))
            continue
        result.latencies.append(trio.current_time() - started)
        await trio.sleep(0.05)


async def slowloris(
    address: str,
    *,
    sockets: int,
    clients: int,
    duration: float,
    interval: float = 0.5,
    connect_at_once: int = 200,
) -> Result:
    """``sockets`` dribblers and ``clients`` real clients for ``duration`` seconds (the real
    clients start once every dribbler is connected); returns when every dribbler was closed."""
    host, port_text = address.rsplit(":", 1)
    port = int(port_text)
    result = Result()
    opened = trio.Semaphore(connect_at_once)
    async with trio.open_nursery() as nursery:
        for _ in range(sockets):
            nursery.start_soon(_dribbler, host, port, interval, result, opened)
        until = trio.current_time() + duration
        for _ in range(clients):
            nursery.start_soon(_real_client, host, port, until, result)
    return result


def main(argv: list[str] | None = None) -> int:
    from daemon_proc import running_daemon  # bench/ is sys.path[0] when run as a script

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--header-timeout", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of real clients")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between bytes")
    args = parser.parse_args(argv)
    with running_daemon(header_timeout=args.header_timeout) as daemon:
        print(
            f"raafd on core {daemon.server_core}, load on core {daemon.load_core}; "
            f"header_timeout {args.header_timeout:g} s; {args.sockets} dribblers "
            f"(a byte every {args.interval:g} s), {args.clients} real clients for "
            f"{args.duration:g} s"
        )
        result = trio.run(
            lambda: slowloris(
                daemon.address,
                sockets=args.sockets,
                clients=args.clients,
                duration=args.duration,
                interval=args.interval,
            )
        )
        rss, fds = daemon.status()
        alive = daemon.alive()
    closed = result.closed_after
    late = [t for t in closed if t > args.header_timeout + 1.0]
    print(
        f"dribblers closed   {len(closed)} of {args.sockets}; answered 408: {result.answered_408}"
    )
    print(
        f"closed after (s)   min {min(closed):.2f}  median {statistics.median(closed):.2f}  "
        f"max {max(closed):.2f}  (deadline {args.header_timeout:g}); later than +1 s: {len(late)}"
    )
    print(
        f"real requests      {len(result.latencies)}; failed {len(result.failures)}; "
        f"connect+answer p50 {result.quantile(0.5) * 1000:.1f} ms  "
        f"p99 {result.quantile(0.99) * 1000:.1f} ms  max {max(result.latencies) * 1000:.1f} ms"
    )
    print(
        f"raafd after        {'alive' if alive else 'EXITED'}; RSS {rss / 2**20:.1f} MiB, {fds} fds"
    )
    for failure in result.failures[:5]:
        print("  ", failure)
    return 1 if late or result.failures or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
