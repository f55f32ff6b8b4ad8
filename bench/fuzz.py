"""Black-box fuzzer: random and mutated WebSocket frames and HTTP requests against a real
raafd, while a normal client streams beside them. It prints figures; it is not a pass/fail test
(the exit status is 1 only when the daemon crashed or hung, or the normal client failed).

    .venv/bin/python bench/fuzz.py                      # 1,000,000 frames + 10,000 requests
    .venv/bin/python bench/fuzz.py --frames 50000 --requests 2000 --seed 7

The daemon (``python -m raafd.cli serve`` with a generated config: the demo provider, fast;
the per-connection command limits off so the frames reach the command decoder instead of the
rate limiter, which has its own tests; a 2 s head and body deadline) runs pinned to the first
core of this process's affinity mask, the fuzzer on the second. Every few seconds it prints the
frames and requests sent, the daemon's RSS and open fds, and the latency of a ``/healthz``
probe. A crash is the process exiting; a hang is a probe that takes longer than ``--hang``
seconds, or a fuzz connection the daemon neither answers nor closes within its deadlines.

What is sent:

- WebSocket: valid upgrades, then batches of client frames: commands from a corpus (``ping``,
  ``stream.start``, ``stream.attach``, ``hello``, unknown types, deep nesting, huge numbers …)
  mutated byte-wise (flips, inserts, deletions, duplications, truncation), fragmented messages,
  pings, binary frames, and now and then a malformed frame (bad opcode, unmasked, reserved
  bits, a length the payload does not have), after which the daemon closes and the fuzzer
  connects again;
- HTTP: request heads and bodies from a corpus (every route, both HTTP paths, preflights,
  chunked bodies) mutated the same way, on connections of their own;
- beside them, a normal client runs one stream after another over WebSocket and checks each:
  seq from 1 without gaps, exactly one terminal event, ``complete``.

``tests/test_fuzz.py`` runs :func:`fuzz` briefly against a daemon in the test's nursery.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent

COMMANDS: tuple[bytes, ...] = (
    b'{"type":"ping","ref":"p1"}',
    b'{"type":"stream.start","input":"hello there","ref":"s"}',
    b'{"type":"stream.start","messages":[{"role":"user","content":"hi"}],"agent":"assistant"}',
    b'{"type":"stream.attach","stream":"st_nope","after":0,"ref":"a"}',
    b'{"type":"stream.detach","stream":"st_nope"}',
    b'{"type":"stream.cancel","stream":"st_nope","ref":"c"}',
    b'{"type":"stream.pause","stream":"st_x"}',
    b'{"type":"workflow.start","mode":"parallel","agents":["assistant"],"input":"x"}',
    b'{"type":"hello","token":"x","client":"fuzz"}',
    b'{"type":"presence.set","status":"away"}',
    b'{"type":"room.join","room":"r1","after":0}',
    b'{"type":"no.such.type"}',
    b'{"type":"ping","ref":' + b"9" * 400 + b"}",
    b"[" * 200 + b"]" * 200,
    b'{"type":"ping","ref":"\\ud800"}',
    b'{"type":"stream.start","input":' + b'"' + b"x" * 3000 + b'"}',
    b"null",
    b'{"type":1e999}',
)

HTTP: tuple[bytes, ...] = (
    b"GET /healthz HTTP/1.1\r\nHost: f\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n",
    b"GET /v1/agents HTTP/1.1\r\nHost: f\r\n\r\n",
    b'POST /v1/streams HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"input": "hi"}',  # noqa: E501
    b'POST /v1/streams HTTP/1.1\r\nHost: f\r\nAccept: text/event-stream\r\nContent-Length: 16\r\n\r\n{"input": "hi"}',  # noqa: E501
    b"GET /v1/streams/st_x/events?after=0 HTTP/1.1\r\nHost: f\r\nAccept: application/x-ndjson\r\n\r\n",  # noqa: E501
    b'POST /v1/chat/completions HTTP/1.1\r\nHost: f\r\nContent-Length: 61\r\n\r\n{"model":"assistant","messages":[{"role":"user","content":"x"}]}',  # noqa: E501
    b'POST /v1/streams HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"inp\r\n0\r\n\r\n',  # noqa: E501
    b"OPTIONS /v1/streams HTTP/1.1\r\nHost: f\r\nOrigin: https://x.test\r\nAccess-Control-Request-Method: POST\r\n\r\n",  # noqa: E501
    b"GET /v1/ws HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\r\n",  # noqa: E501
    b"DELETE /v1/stats HTTP/1.1\r\nHost: f\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four byte-level mutations of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a byte
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and out:  # delete a range
            del out[pos : pos + rng.randint(1, 16)]
        elif op == 3 and out:  # duplicate a range
            end = min(len(out), pos + rng.randint(1, 32))
            out[pos:pos] = out[pos:end]
        elif op == 4:  # truncate
            del out[pos:]
        else:  # an interesting byte
            out[pos:pos] = rng.choice([b"\x00", b"\xff", b'"', b"{", b"\\", b"\r\n", b"\xc3"])
    return bytes(out)


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    whole = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(
        len(payload), "big"
    )


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, 0xFE, n)
    else:
        header = struct.pack("!BBQ", first, 0xFF, n)
    key = os.urandom(4)
    return header + key + _mask(payload, key)


def random_frames(rng: random.Random, count: int) -> tuple[bytes, int, bool]:
    """About ``count`` client frames for one write, how many, and True when the last is
    malformed (the daemon will close)."""
    parts: list[bytes] = []
    while len(parts) < count:
        r = rng.random()
        command = rng.choice(COMMANDS)
        if r < 0.80:
            payload = mutate(rng, command) if rng.random() < 0.7 else command
            # Mostly valid UTF-8 (invalid text closes 1007 and costs a reconnect).
            if rng.random() < 0.98:
                payload = payload.decode("utf-8", "replace").encode()
            parts.append(client_frame(0x1, payload))
        elif r < 0.88:
            parts.append(client_frame(0x9, rng.randbytes(rng.randint(0, 125))))
        elif r < 0.94:
            cut = rng.randint(0, len(command))
            parts.append(client_frame(0x1, command[:cut], fin=False))
            parts.append(client_frame(0x9, b"between"))
            parts.append(client_frame(0x0, command[cut:]))
        elif r < 0.98:
            parts.append(client_frame(0x2, rng.randbytes(rng.randint(0, 300))))
        else:
            bad = rng.randrange(4)
            if bad == 0:
                parts.append(client_frame(rng.choice([0x3, 0x7, 0xB, 0xF]), b"x"))
            elif bad == 1:
                parts.append(bytes((0x81, 5)) + b"hello")  # unmasked
            elif bad == 2:
                parts.append(client_frame(0x1, b"{}", rsv=0x40))
            else:
                parts.append(client_frame(0x8, rng.randbytes(rng.randint(0, 125))))
            return b"".join(parts), len(parts), True
    return b"".join(parts), len(parts), False


@attrs.define
class Report:
    frames: int = 0
    ws_connections: int = 0
    requests: int = 0
    http_hangs: int = 0
    normal_streams: int = 0
    normal_failures: list[str] = attrs.field(factory=list)
    probe_max: float = 0.0
    probes: int = 0
    first_stream: trio.Event | None = None  # set once the normal client finished one stream


def _upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /v1/ws HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: raafd.v1\r\n\r\n"
    ).encode()


async def _drain(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(65536):
            pass


async def _ws_fuzzer(
    host: str, port: int, rng: random.Random, report: Report, budget: list[int], batch: int
) -> None:
    while budget[0] > 0:
        stream = await trio.open_tcp_stream(host, port)
        report.ws_connections += 1
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(_upgrade_request())
            head = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {head[:80]!r}")
            nursery.start_soon(_drain, stream)
            try:
                while budget[0] > 0:
                    data, n, closing = random_frames(rng, batch)
                    await stream.send_all(data)
                    budget[0] -= n
                    report.frames += n
                    if closing:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the daemon closed the connection (a protocol error): connect again
            nursery.cancel_scope.cancel()


async def _http_fuzzer(
    host: str, port: int, rng: random.Random, report: Report, budget: list[int], wait: float
) -> None:
    while budget[0] > 0:
        budget[0] -= 1
        request = rng.choice(HTTP)
        if rng.random() < 0.8:
            request = mutate(rng, request)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(request)
            report.requests += 1
            # The daemon answers or closes within its head/body deadline (then some slack);
            # a streaming answer (SSE of a stream that started) is cut after its first bytes.
            with trio.move_on_after(wait) as scope:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.receive_some(65536)
            if scope.cancelled_caught:
                report.http_hangs += 1


async def checked_stream(ws: Any, text: str) -> tuple[int, str | None]:
    """Start a stream on the WebSocket ``ws`` and read it to its end: (events, None) when it
    was whole (seq from 1 without a gap, exactly one terminal event, ``complete``), else
    (events, what was wrong)."""
    await ws.send_message(json.dumps({"type": "stream.start", "input": text}))
    seqs: list[int] = []
    terminal: list[str] = []
    with trio.fail_after(60):
        while not terminal:
            message = json.loads(await ws.get_message())
            if message.get("type") != "stream.event":
                continue
            seqs.append(message["seq"])
            if message["event"] in ("complete", "error", "cancelled"):
                terminal.append(message["event"])
    if seqs != list(range(1, len(seqs) + 1)) or terminal != ["complete"]:
        return len(seqs), f"seqs {seqs[:5]}… end {terminal}"
    return len(seqs), None


async def _normal_client(host: str, port: int, report: Report, stop: trio.Event) -> None:
    from trio_websocket import open_websocket

    async with open_websocket(host, port, "/v1/ws", use_ssl=False) as ws:
        json.loads(await ws.get_message())  # welcome
        n = 0
        while not stop.is_set():
            n += 1
            _, wrong = await checked_stream(ws, f"normal {n}")
            if wrong is not None:
                report.normal_failures.append(f"stream {n}: {wrong}")
            report.normal_streams += 1
            if report.first_stream is not None:
                report.first_stream.set()


async def _probe(host: str, port: int) -> float:
    started = trio.current_time()
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/healthz answered {data[:60]!r}")
    return trio.current_time() - started


async def fuzz(
    address: str,
    *,
    frames: int,
    requests: int,
    seed: int = 0,
    ws_connections: int = 4,
    http_connections: int = 16,
    batch: int = 32,
    http_wait: float = 5.0,
    hang: float = 5.0,
    every: float = 5.0,
    show: Callable[[Report, float], None] | None = None,
) -> Report:
    """Fuzz the daemon at ``address`` (``host:port``) until ``frames`` frames and ``requests``
    requests went out; a normal client streams throughout, a ``/healthz`` probe runs every
    second (slower than ``hang`` seconds: ``RuntimeError``)."""
    host, port_text = address.rsplit(":", 1)
    port = int(port_text)
    rng = random.Random(seed)
    report = Report()
    frame_budget, request_budget = [frames], [requests]
    stop = trio.Event()
    first_stream = report.first_stream = trio.Event()
    started = trio.current_time()

    async def probes() -> None:
        last_show = trio.current_time()
        while True:
            with trio.fail_after(hang):
                latency = await _probe(host, port)
            report.probes += 1
            report.probe_max = max(report.probe_max, latency)
            if show is not None and trio.current_time() - last_show >= every:
                last_show = trio.current_time()
                show(report, trio.current_time() - started)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_normal_client, host, port, report, stop)
        nursery.start_soon(probes)
        async with trio.open_nursery() as work:
            for _ in range(ws_connections):
                work.start_soon(
                    _ws_fuzzer, host, port, random.Random(rng.random()), report, frame_budget, batch
                )
            for _ in range(http_connections):
                work.start_soon(
                    _http_fuzzer,
                    host,
                    port,
                    random.Random(rng.random()),
                    report,
                    request_budget,
                    http_wait,
                )
        stop.set()
        with trio.fail_after(30):
            await first_stream.wait()
        nursery.cancel_scope.cancel()
    return report


# --- the command line: a daemon of its own, pinned -------------------------------------------

# The fuzzed daemon's config beyond bench/daemon_proc.py's base: the per-connection command
# limits off (so frames reach the command decoder rather than the rate limiter), short
# retention (the fuzzers start many streams).
FUZZ_CONFIG = """
[websocket]
max_frame = 65536
[streams]
retention = 5.0
detach_grace = 2.0
[limits.connection]
commands = { rate = 0.0, burst = 1 }
stream_starts = { rate = 0.0, burst = 1 }
"""


def main(argv: list[str] | None = None) -> int:
    from daemon_proc import running_daemon  # bench/ is sys.path[0] when run as a script

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--http-connections", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hang", type=float, default=5.0, help="seconds a probe may take")
    args = parser.parse_args(argv)
    with running_daemon(FUZZ_CONFIG, header_timeout=2.0, max_connections=2000) as daemon:
        return _run(daemon, args)


def _run(daemon: Any, args: argparse.Namespace) -> int:
    rss0, fds0 = daemon.status()
    cores = f"core {daemon.server_core}, fuzzer on core {daemon.load_core}"
    print(f"raafd pid {daemon.proc.pid} on {cores}")
    print(f"seed {args.seed}; start: RSS {rss0 / 2**20:.1f} MiB, {fds0} fds")
    print(
        f"{'s':>6} {'frames':>10} {'ws conns':>9} {'requests':>9} {'RSS MiB':>8} {'fds':>5}"
        f" {'probe max ms':>12} {'normal streams':>15}"
    )
    peak = [rss0]

    def show(report: Report, elapsed: float) -> None:
        if not daemon.alive():
            raise RuntimeError(f"raafd exited with {daemon.proc.returncode}")
        rss, fds = daemon.status()
        peak[0] = max(peak[0], rss)
        print(
            f"{elapsed:6.0f} {report.frames:10,} {report.ws_connections:9,} {report.requests:9,}"
            f" {rss / 2**20:8.1f} {fds:5} {report.probe_max * 1000:12.1f}"
            f" {report.normal_streams:15,}",
            flush=True,
        )

    started = time.monotonic()
    try:
        report = trio.run(
            lambda: fuzz(
                daemon.address,
                frames=args.frames,
                requests=args.requests,
                seed=args.seed,
                hang=args.hang,
                http_connections=args.http_connections,
                show=show,
            )
        )
    except (RuntimeError, trio.TooSlowError, OSError) as exc:
        alive = daemon.alive()
        print(f"FAILED: {exc!r}; raafd {'alive' if alive else f'exited {daemon.proc.returncode}'}")
        print(daemon.log.read_text()[-3000:])
        return 1
    elapsed = time.monotonic() - started
    time.sleep(6)  # retention and detach grace of the fuzzers' streams
    rss, fds = daemon.status()
    crashed = not daemon.alive()
    errors = daemon.error_lines()
    rate = (report.frames + report.requests) / elapsed
    print()
    print(f"frames sent        {report.frames:,} on {report.ws_connections:,} connections")
    print(
        f"requests sent      {report.requests:,}; answered or closed in time: "
        f"{report.requests - report.http_hangs:,}; hangs {report.http_hangs}"
    )
    print(f"rate               {rate:,.0f} per second over {elapsed:.0f} s")
    print(f"crashes            {int(crashed)}")
    print(f"/healthz probes    {report.probes}, slowest {report.probe_max * 1000:.1f} ms")
    print(
        f"normal client      {report.normal_streams} streams, {len(report.normal_failures)} wrong"
    )
    print(
        f"RSS                start {rss0 / 2**20:.1f} MiB, peak {peak[0] / 2**20:.1f} MiB,"
        f" end {rss / 2**20:.1f} MiB; fds start {fds0}, end {fds}"
    )
    print(f"error log lines    {len(errors)}")
    seen: set[str] = set()
    for line in errors:  # each distinct failure once, with the end of its traceback
        record = json.loads(line)
        trace = str(record.get("exception", "")).splitlines()
        key = "\n".join(trace[-3:])
        if key in seen:
            continue
        seen.add(key)
        print(f"   {record.get('event')}:")
        for trace_line in trace[-14:]:
            print("     ", trace_line[:160])
    for failure in report.normal_failures[:5]:
        print("  ", failure)
    bad = crashed or report.http_hangs or report.normal_failures or errors
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
