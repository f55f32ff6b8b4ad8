"""How fast this machine is right now, independently of raafd's code: a reference for comparing
benchmark figures taken on different days. Prints numbers; not a test.

This machine's core speed drifts by tens of per cent from one minute to the next, and more from
one day to the next (docs/performance.md): more than most changes under test move a figure.
Two references, each pinned to one core, each the median of several rounds:

- ``python``: µs per unit of a fixed pure-Python workload shaped like a token's path in raafd
  (split an event-stream chunk, decode its JSON with orjson, build a small object and an event
  dict, encode it, frame it). It uses none of raafd's code, so it does not move when raafd does.
- ``send``: µs of the sender's CPU (user and system) per 100-byte ``send`` over loopback TCP to
  a reader on the other core that sleeps between messages, as a client does between tokens; on
  loopback the sender's call also runs the receiver's TCP processing and wakes it.

``bench/stream_bench.py`` prints the full measurement before and after its runs, and takes the
quick one before each run (``--quick``: the Python reference alone, one round after a warm-up,
about 0.2 s).

Usage: python bench/machine_speed.py [--core 0] [--other-core 1] [--rounds 5] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import orjson

_CHUNK = (
    b'data: {"id":"chatcmpl-ref","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"m","choices":[{"index":0,"delta":{"content":"word %d"},"finish_reason":null}]}'
    b"\n\n"
)


class _Delta:
    __slots__ = ("index", "text")

    def __init__(self, text: str, index: int) -> None:
        self.text = text
        self.index = index


def _unit(chunk: bytes, seq: int) -> bytes:
    line = chunk.split(b"\n", 1)[0]
    data = orjson.loads(line[6:]) if line.startswith(b"data: ") else {}
    choice = data["choices"][0]
    delta = _Delta(choice["delta"].get("content", ""), choice["index"])
    event = {"type": "content", "seq": seq, "text": delta.text, "index": delta.index}
    body = orjson.dumps(event)
    return b"\x81" + bytes((len(body),)) + body if len(body) < 126 else body


def python_us(units: int) -> float:
    """µs of CPU per unit of the reference workload."""
    chunks = [_CHUNK % i for i in range(64)]
    started = time.process_time()
    for i in range(units):
        _unit(chunks[i & 63], i)
    return (time.process_time() - started) / units * 1e6


def send_us(sends: int, other_core: int, pause_s: float = 0.0002) -> float:
    """µs of the sender's CPU per 100-byte send to an idle reader on ``other_core``."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the reader: ends at the sender's close, or after 10 s without one
        try:
            os.sched_setaffinity(0, {other_core})
            listener.settimeout(10.0)
            conn, _ = listener.accept()
            conn.settimeout(10.0)
            while conn.recv(65536):
                pass
        finally:
            os._exit(0)
    listener.close()
    spent = 0.0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = b"x" * 100
            for _ in range(sends):
                time.sleep(pause_s)  # the reader goes back to sleep, as a client between tokens
                started = time.process_time()
                sock.send(payload)
                spent += time.process_time() - started
    finally:
        os.waitpid(pid, 0)
    return spent / sends * 1e6


def measure(core: int, other_core: int, rounds: int, *, quick: bool = False) -> dict[str, float]:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        if quick:
            python_us(20_000)  # warm: the interpreter specializes the code on its first calls
            return {"python_us": round(python_us(50_000), 3)}
        python = [python_us(100_000) for _ in range(rounds)]
        send = [send_us(2_000, other_core) for _ in range(rounds)]
    finally:
        os.sched_setaffinity(0, previous)
    return {
        "python_us": round(statistics.median(python), 3),
        "python_us_min": round(min(python), 3),
        "send_us": round(statistics.median(send), 3),
        "send_us_min": round(min(send), 3),
    }


def describe(result: dict[str, float]) -> str:
    if "send_us" not in result:
        return f"machine speed: python {result['python_us']:.2f} µs/unit; lower is faster"
    return (
        f"machine speed: python {result['python_us']:.2f} µs/unit"
        f" (min {result['python_us_min']:.2f}), loopback send {result['send_us']:.2f} µs"
        f" (min {result['send_us_min']:.2f}); lower is faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", type=int, default=0, help="the core measured (raafd's)")
    parser.add_argument("--other-core", type=int, default=1, help="the loopback reader's core")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the Python reference, one round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure(args.core, args.other_core, args.rounds, quick=args.quick)
    print(json.dumps(result) if args.json else describe(result))


if __name__ == "__main__":
    main()
