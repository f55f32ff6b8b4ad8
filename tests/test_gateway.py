"""WebSocket gateway against a real daemon: sequencing, resume, control, limits, auth, drain."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.fakes.openai_upstream import FakeOpenAI, Script
from tests.waiting import wait_until
from tests.wsclient import open_ws as open_websocket_url

FAST = {"providers": {"demo": {"tokens_per_second": 2000.0, "reply_words": 60}}}


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(10):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict)
    return message


async def send(ws: WebSocketConnection, **message: Any) -> None:
    await ws.send_message(json.dumps(message))


async def start_stream(ws: WebSocketConnection, text: str = "hello there", **extra: Any) -> str:
    await send(ws, type="stream.start", input=text, ref="s", **extra)
    while (started := await recv(ws))["type"] == "stream.event":
        pass  # events of streams already attached here
    assert started["type"] == "stream.started" and started["ref"] == "s", started
    return str(started["stream"])


async def read_events(ws: WebSocketConnection, until_terminal: bool = True) -> list[dict[str, Any]]:
    events = []
    while True:
        message = await recv(ws)
        if message["type"] != "stream.event":
            continue
        events.append(message)
        if until_terminal and message["event"] in ("complete", "error", "cancelled"):
            return events


async def start_with_fake(
    start_daemon: Any, nursery: trio.Nursery, script: Script, **sections: Any
) -> tuple[Any, FakeOpenAI]:
    """A daemon whose default agent streams from a fake OpenAI-compatible upstream."""
    fake = FakeOpenAI(default=script)
    port = await nursery.start(fake.run)
    rd = await start_daemon(
        providers={"up": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1"}},
        agents={"assistant": {"provider": "up"}},
        **sections,
    )
    return rd, fake


def assert_contiguous(events: list[dict[str, Any]], first: int = 1) -> None:
    assert [e["seq"] for e in events] == list(range(first, first + len(events)))
    assert [e["event"] in ("complete", "error", "cancelled") for e in events].count(True) == 1
    assert events[-1]["event"] in ("complete", "error", "cancelled")


async def test_welcome_stream_and_one_terminal(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with open_websocket_url(rd.ws_url, subprotocols=["raafd.v1"]) as ws:
        assert ws.subprotocol == "raafd.v1"
        welcome = await recv(ws)
        assert welcome["type"] == "welcome" and welcome["conn"] and welcome["user"] == "anonymous"
        assert welcome["limits"] == {
            "max_frame": 1 << 20,
            "max_streams": 32,
            "max_streams_per_principal": 100,
            "heartbeat_timeout": 60.0,
        }
        stream = await start_stream(ws)
        events = await read_events(ws)
        assert_contiguous(events)
        assert events[0]["event"] == "start" and events[0]["agent"] == "assistant"
        assert all(e["stream"] == stream for e in events)
        text = "".join(e["delta"] for e in events if e["event"] == "content")
        assert text == events[-1]["final_response"] and text.startswith("hello there")


async def test_attach_at_random_after_while_live_gets_exact_remainder(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 400.0, "reply_words": 80}})
    rng = random.Random(7)
    async with open_websocket_url(rd.ws_url) as owner:
        await recv(owner)
        stream = await start_stream(owner)
        # While the owner keeps reading, other clients attach at random points.
        async with trio.open_nursery() as nursery:

            async def attach_at(fraction: float, when: int) -> None:
                live = rd.daemon.streams.get(stream)
                with trio.fail_after(10):
                    await wait_until(lambda: live.head >= when)
                after = int(live.head * fraction)
                async with open_websocket_url(rd.ws_url) as ws:
                    await recv(ws)
                    await send(ws, type="stream.attach", stream=stream, after=after, ref="a")
                    attached = await recv(ws)
                    assert attached["type"] == "stream.attached" and attached["after"] == after
                    events = await read_events(ws)
                    assert_contiguous(events, first=after + 1)

            for _ in range(6):  # at random points of the stream's ~84 events
                nursery.start_soon(attach_at, rng.random(), rng.randint(1, 60))
            full = await read_events(owner)
        assert_contiguous(full)


async def test_dropped_client_resumes_with_exact_remainder(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 300.0, "reply_words": 60}})
    seen: list[dict[str, Any]] = []
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        stream = await start_stream(ws)
        while len(seen) < 10:
            message = await recv(ws)
            if message["type"] == "stream.event":
                seen.append(message)
    # The connection is gone mid-stream; the stream keeps running within its detach grace.
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        await send(ws, type="stream.attach", stream=stream, after=seen[-1]["seq"])
        seen += await read_events(ws)
    assert_contiguous(seen)


async def test_cancel_closes_the_upstream_request_at_once(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    rd, fake = await start_with_fake(start_daemon, nursery, Script(deltas=500, interval=0.02))
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        stream = await start_stream(ws)
        events = []
        while len(events) < 5:
            message = await recv(ws)
            if message["type"] == "stream.event":
                events.append(message)
        await send(ws, type="stream.cancel", stream=stream, ref="c")
        cancelled_at = trio.current_time()
        request = fake.requests[-1]
        with trio.fail_after(2):
            await request.closed.wait()
        assert request.closed_by_client and not request.completed
        assert request.closed_at is not None and request.closed_at - cancelled_at < 0.1
        rest = await read_events(ws)
        assert rest[-1]["event"] == "cancelled" and rest[-1]["reason"] == "client"
        assert_contiguous(events + rest)


async def test_the_deltas_of_one_upstream_read_make_one_content_event(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    # The fake writes four deltas at a time; raafd reads each write in one read and makes one
    # content event of its four deltas (pump_deltas in raafd.providers.http).
    script = Script(deltas=12, burst=4, interval=0.1)
    rd, _ = await start_with_fake(start_daemon, nursery, script)
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        await start_stream(ws)
        events = await read_events(ws)
    assert_contiguous(events)
    pieces = script.content_pieces
    content = [e["delta"] for e in events if e["event"] == "content"]
    assert content == ["".join(pieces[i : i + 4]) for i in (0, 4, 8)]
    assert events[-1]["final_response"] == script.text


async def test_detach_grace_expiry_cancels_and_closes_upstream(
    start_daemon: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    rd, fake = await start_with_fake(
        start_daemon,
        nursery,
        Script(deltas=100_000, interval=0.5),
        streams={"detach_grace": 30.0, "idle_timeout": 3600.0, "max_duration": 3600.0},
    )
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        stream = await start_stream(ws)
        await send(ws, type="stream.detach", stream=stream, ref="d")
        while (await recv(ws))["type"] != "stream.detached":
            pass
    request = fake.requests[-1]
    with trio.fail_after(120):
        await request.closed.wait()
    assert request.closed_by_client
    info = rd.daemon.streams.get(stream).info()
    assert info["status"] == "cancelled"
    terminal = rd.daemon.streams.get(stream).terminal
    assert terminal.fields == {"reason": "detached"}


async def test_malformed_commands_get_errors_and_the_connection_goes_on(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**FAST)
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        cases: list[tuple[str, str, str | None]] = [
            ("not json", "bad_request", None),
            ("[1, 2]", "bad_request", None),
            ('{"ref": "r1"}', "bad_request", "type"),
            ('{"type": "nope", "ref": "r2"}', "bad_request", "type"),
            ('{"type": "stream.attach", "ref": "r3"}', "bad_request", "stream"),
            (
                '{"type": "stream.attach", "stream": "x", "after": "1", "ref": "r4"}',
                "bad_request",
                "after",
            ),
            (
                '{"type": "stream.attach", "stream": "x", "after": -1, "ref": "r5"}',
                "bad_request",
                "after",
            ),
            (
                '{"type": "stream.start", "input": "x", "colour": 1, "ref": "r6"}',
                "bad_request",
                "colour",
            ),
            ('{"type": "stream.start", "ref": "r7"}', "bad_request", None),
            (
                '{"type": "stream.start", "input": "x", "agent": "ghost", "ref": "r8"}',
                "not_found",
                "agent",
            ),
            ('{"type": "stream.attach", "stream": "st_none", "ref": "r9"}', "not_found", "stream"),
            ('{"type": "stream.cancel", "stream": "st_none", "ref": "r10"}', "not_found", "stream"),
        ]
        for raw, code, field in cases:
            await ws.send_message(raw)
            reply = await recv(ws)
            assert reply["type"] == "error", (raw, reply)
            assert reply["code"] == code, (raw, reply)
            assert reply.get("field") == field, (raw, reply)
            ref = json.loads(raw).get("ref") if raw.startswith("{") else None
            assert reply.get("ref") == ref
        await ws.send_message(b"binary")
        assert (await recv(ws))["code"] == "bad_request"
        await send(ws, type="ping", ref="p")
        assert await recv(ws) == {"type": "pong", "ref": "p"}
        await start_stream(ws)
        assert_contiguous(await read_events(ws))


async def test_oversize_frame_closes_1009(start_daemon: Any) -> None:
    rd = await start_daemon(websocket={"max_frame": 1024})
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        await send(ws, type="stream.start", input="x" * 2000)
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.reason.code == 1009


async def test_the_echo_endpoint_echoes_and_needs_the_upgrades_token(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(
        auth={"tokens": ["s3cret"]}, websocket={"echo_path": "/v1/echo", "max_frame": 4096}
    )
    echo_url = f"ws://{rd.address}/v1/echo"
    async with open_websocket_url(echo_url + "?token=s3cret") as ws:
        for message in ("hé", b"\x00\xff" * 1000, '{"type":"stream.start"}', b""):
            await ws.send_message(message)
            with trio.fail_after(10):
                assert await ws.get_message() == message  # no welcome, no command
        await ws.send_message("x" * 5000)
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            await ws.get_message()
        assert info.value.reason.code == 1009
    for headers in ([], [("Authorization", "Bearer wrong")]):
        async with open_websocket_url(echo_url, extra_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
                await ws.get_message()
            assert info.value.reason.code == 4401


async def test_the_echo_endpoint_is_off_by_default(running: Any) -> None:
    # An upgrade anywhere but /v1/ws then goes to the HTTP app, which refuses it.
    host, port = running.address.rsplit(":", 1)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            answer = await stream.receive_some()
    assert answer.startswith(b"HTTP/1.1 403 "), answer


async def test_auth_bad_token_4401_hello_and_timeout_4408(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(auth={"tokens": ["s3cret"]}, websocket={"auth_timeout": 5.0})
    async with open_websocket_url(
        rd.ws_url, extra_headers=[("Authorization", "Bearer wrong")]
    ) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.reason.code == 4401
    async with open_websocket_url(rd.ws_url + "?token=s3cret") as ws:
        assert (await recv(ws))["type"] == "welcome"
    async with open_websocket_url(rd.ws_url) as ws:  # browsers: a hello frame
        await send(ws, type="ping", ref="early")
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.reason.code == 4401
    async with open_websocket_url(rd.ws_url) as ws:
        await send(ws, type="hello", token="s3cret")
        welcome = await recv(ws)
        assert welcome["type"] == "welcome" and welcome["user"].startswith("token-")
        assert "s3cret" not in json.dumps(welcome)
    async with open_websocket_url(rd.ws_url) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)  # says nothing for longer than auth_timeout
        assert info.value.reason.code == 4408


async def test_silent_client_is_closed_4408(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(websocket={"heartbeat_interval": 5.0, "heartbeat_timeout": 15.0})
    # A raw client that completes the handshake and then never answers pings.
    stream, received = await _raw_client(rd.address)
    with trio.fail_after(60):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    assert b"\x89\x02hb" in received  # pings were sent
    close = received[received.rindex(b"\x88") :]
    assert int.from_bytes(close[2:4], "big") == 4408


async def test_each_client_frame_moves_the_silence_deadline(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    # The heartbeat is a timer in the gateway's heap armed at the earlier of the next ping and
    # the silence deadline; a frame only moves last_seen, and the timer finds it when it fires.
    rd = await start_daemon(websocket={"heartbeat_interval": 4.0, "heartbeat_timeout": 15.0})
    stream, _ = await _raw_client(rd.address)
    for _ in range(3):  # 12 s apart: under the timeout each time
        await trio.sleep(12)
        await stream.send_all(_masked_text(b'{"type":"ping","ref":"p"}'))
    last_frame = trio.current_time()
    received = b""
    with trio.fail_after(60):
        while not re.search(rb"\x88[\x02-\x7d]\x11\x38", received):  # close, 4408
            chunk = await stream.receive_some(65536)
            assert chunk
            received += chunk
    closed = trio.current_time()
    await stream.aclose()
    assert received.count(b'"type":"pong"') == 3
    assert received.count(b"\x89\x02hb") >= 10  # a ping every 4 s for about 51 s
    assert last_frame + 15 <= closed < last_frame + 15.5  # 15 s after the last frame


async def test_a_read_full_of_frames_shares_the_loop(start_daemon: Any) -> None:
    # Command replies do not yield; the reader yields every few frames instead, so one client
    # sending many small frames in one write cannot hold the loop for the whole read. (The
    # flood is over the default command rate limit, which is not what is tested here.)
    rd = await start_daemon(limits={"connection": {"commands": {"rate": 0}}})
    stream, _ = await _raw_client(rd.address, 1 << 20)
    turns = 0
    flooding = True

    async def other_task() -> None:
        nonlocal turns
        while flooding:
            turns += 1
            await trio.lowlevel.checkpoint()

    frames = 400
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await stream.send_all(_masked_text(b'{"type":"ping","ref":"f"}') * frames)
        received = b""
        with trio.fail_after(10):
            while received.count(b'"type":"pong"') < frames:
                received += await stream.receive_some(65536)
        flooding = False
    await stream.aclose()
    assert turns >= frames // 16  # the other task ran while the frames were answered


async def test_drain_sends_shutdown_then_closes_1001(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 200.0, "reply_words": 40}})
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        await start_stream(ws)
        rd.daemon.request_drain()
        events: list[dict[str, Any]] = []
        shutdown = None
        with pytest.raises(ConnectionClosed) as info:
            while True:
                message = await recv(ws)
                if message["type"] == "shutdown":
                    shutdown = message
                elif message["type"] == "stream.event":
                    events.append(message)
        assert shutdown == {"type": "shutdown", "reason": "drain", "reconnect_after": 1.0}
        assert info.value.reason.code == 1001
        assert_contiguous(events)  # the running stream finished within the grace
        assert events[-1]["event"] == "complete"


async def test_too_many_streams_per_connection(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 5.0, "reply_words": 100}},
        agents={"assistant": {}, "other": {}},
        streams={"max_streams_per_connection": 2},
    )
    async with open_websocket_url(rd.ws_url) as owner, open_websocket_url(rd.ws_url) as ws:
        await recv(owner)
        await recv(ws)
        streams = [await start_stream(owner), await start_stream(owner)]
        await send(owner, type="stream.start", input="third", ref="t")
        while (reply := await recv(owner))["type"] != "error":
            pass
        assert reply["code"] == "too_many_streams" and reply["ref"] == "t"
        # Attached to two streams it did not start: a start is refused before it begins.
        for stream in streams:
            await send(ws, type="stream.attach", stream=stream, after=0, ref="a")
            while (await recv(ws))["type"] != "stream.attached":
                pass
        await send(ws, type="stream.start", input="third", ref="t")
        workflow = {"mode": "sequential", "agents": ["assistant", "other"], "input": "x"}
        await send(ws, type="workflow.start", ref="w", **workflow)
        refused = []
        while len(refused) < 2:
            if (reply := await recv(ws))["type"] == "error":
                refused.append((reply["ref"], reply["code"]))
        assert refused == [("t", "too_many_streams"), ("w", "too_many_streams")]
        assert len(rd.daemon.streams.list_streams()) == 2


async def _raw_client(address: str, rcvbuf: int = 65536) -> tuple[trio.SocketStream, bytearray]:
    """A raw WebSocket client (tiny receive buffer) after the handshake, with the bytes that
    came after the response head."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    host, port = address.rsplit(":", 1)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    received = bytearray()
    with trio.fail_after(5):
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(4096)
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return stream, bytearray(rest)


async def read_slowly(client: trio.SocketStream, into: bytearray, live: Any) -> None:
    """Read 1 KB for every 12 events (~5 KB) the stream ``live`` makes: a fifth of its pace
    whatever the machine's speed; once it has ended, read the rest."""
    with trio.fail_after(20):
        next_read = 12
        while True:
            await wait_until(lambda n=next_read: live.head >= n or live.terminal is not None)
            next_read = live.head + 12
            if not (chunk := await client.receive_some(1024)):
                return
            into += chunk


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + body


async def test_stalled_subscriber_is_coalesced_then_closed_4001_others_keep_pace(
    start_daemon: Any,
) -> None:
    word = "w" * 400
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 250.0, "reply_words": 0}},
        websocket={"send_queue": 4},
        streams={"subscriber_buffer": 8, "max_lag": 150},
    )
    async with open_websocket_url(rd.ws_url) as owner, open_websocket_url(rd.ws_url) as other:
        await recv(owner)
        await recv(other)
        stream = await start_stream(owner, " ".join([word] * 1500))
        stalled, _ = await _raw_client(rd.address, 4096)
        attach = json.dumps({"type": "stream.attach", "stream": stream, "after": 0}).encode()
        await stalled.send_all(_masked_text(attach))
        await send(other, type="stream.attach", stream=stream, after=0)
        results: dict[str, list[dict[str, Any]]] = {}
        received = bytearray()

        async def read_into(name: str, ws: WebSocketConnection) -> None:
            results[name] = await read_events(ws)

        async with trio.open_nursery() as readers:
            readers.start_soon(read_into, "owner", owner)
            readers.start_soon(read_into, "other", other)
            # The slow reader drains a little now and then: it gets coalesced batches, falls
            # further behind, and is closed with 4001 (resume from your last seq).
            readers.start_soon(read_slowly, stalled, received, rd.daemon.streams.get(stream))
        await stalled.aclose()
        # The two readers that kept up got every event, uncoalesced.
        assert_contiguous(results["owner"])
        assert_contiguous(results["other"])
        metrics = rd.daemon.metrics.snapshot()
        assert metrics["raafd_slow_consumer_disconnects_total"] == 1
        assert metrics["raafd_coalesced_events_total"] > 0
        assert bytes(received).startswith(b"HTTP/1.1 101") is False  # head was read before
        close_at = bytes(received).rfind(b"\x88")
        assert close_at >= 0
        length = received[close_at + 1]
        code = int.from_bytes(received[close_at + 2 : close_at + 4], "big")
        assert length >= 2 and code == 4001


async def test_a_bug_in_one_connection_costs_only_that_connection(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_handler(conn: Any, cmd: Any) -> None:
        raise RuntimeError("a bug")

    rd = await start_daemon(**FAST)
    monkeypatch.setitem(rd.daemon.gateway.commands.handlers, "ping", broken_handler)
    async with open_websocket_url(rd.ws_url) as other, open_websocket_url(rd.ws_url) as victim:
        await recv(other)
        await recv(victim)
        await send(victim, type="ping")
        with pytest.raises(ConnectionClosed) as info:
            await recv(victim)
        assert info.value.reason.code == 1011
        await start_stream(other)
        assert_contiguous(await read_events(other))
    assert len(rd.daemon.gateway.connections) == 0


# --- the connection's tasks and its output ------------------------------------------------------


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame in ``data``, which ends on a frame boundary."""
    frames = []
    i = 0
    while i < len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n >= 126:
            size = 2 if n == 126 else 8
            n = int.from_bytes(data[i : i + size], "big")
            i += size
        frames.append((opcode, data[i : i + n]))
        i += n
    assert i == len(data)
    return frames


async def _until(condition: Any) -> None:
    with trio.fail_after(30):  # generous: a loaded CI machine
        await wait_until(condition)


async def test_an_idle_connection_is_one_task(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        (conn,) = rd.daemon.gateway.connections.values()
        # The reader runs in the connection's own task; no writer waits while nothing is
        # queued (memory: each idle connection is one parked task).
        assert conn._work is not None and not conn._work.child_tasks
        await start_stream(ws)
        assert_contiguous(await read_events(ws))
        await _until(lambda: not conn._work.child_tasks)  # the delivery task ended with it


async def _backed_up(
    start_daemon: Any, **config: Any
) -> tuple[Any, trio.SocketStream, bytearray, Any]:
    """A daemon with one raw WebSocket client that starts a long stream and reads nothing: the
    socket fills, then the output's queue, which a drain task waits to send; the stream waits
    on it (backpressure). Returns the daemon, the client, the bytes read so far and the
    server's connection."""
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 100_000.0, "reply_words": 0}},
        websocket={"send_queue": 4},
        **config,
    )
    client, received = await _raw_client(rd.address, 4096)
    start = json.dumps({"type": "stream.start", "input": "[words:20000]"}).encode()
    await client.send_all(_masked_text(start))
    (conn,) = rd.daemon.gateway.connections.values()
    await _until(lambda: not conn._out.idle and len(conn._work.child_tasks) == 2)
    return rd, client, received, conn


def _take_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """The complete unmasked frames at the front of ``buffer``, removed from it."""
    frames = []
    while len(buffer) >= 2:
        i, n = 2, buffer[1] & 0x7F
        if n >= 126:
            size = 2 if n == 126 else 8
            if len(buffer) < i + size:
                break
            n = int.from_bytes(buffer[i : i + size], "big")
            i += size
        if len(buffer) < i + n:
            break
        frames.append((buffer[0] & 0x0F, bytes(buffer[i : i + n])))
        del buffer[: i + n]
    return frames


async def test_a_caught_up_client_costs_no_task_per_stream(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 50.0, "reply_words": 40}})
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        await start_stream(ws)
        await start_stream(ws)
        (conn,) = rd.daemon.gateway.connections.values()
        events = []
        while len(events) < 10:
            if (message := await recv(ws))["type"] == "stream.event":
                events.append(message)
        # Two live streams, each event pushed to the socket from its stream's task.
        assert len(conn.attachments) == 2 and not conn._work.child_tasks


async def test_a_puller_runs_only_while_the_client_is_behind(start_daemon: Any) -> None:
    rd, client, received, conn = await _backed_up(start_daemon)
    (info,) = rd.daemon.streams.list_streams()
    stream = rd.daemon.streams.get(info["id"])
    stream.pause()
    events: list[dict[str, Any]] = []

    async def read_all() -> None:
        with trio.fail_after(30):
            while chunk := await client.receive_some(65536):
                received.extend(chunk)
                for _opcode, payload in _take_frames(received):
                    message = json.loads(payload)
                    if message["type"] == "stream.event":
                        events.append(message)
                        if message["event"] == "complete":
                            return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        # The client reads what was queued: the puller catches up and ends. The paused stream
        # stays attached, with no task for it.
        await _until(lambda: bool(events) and events[-1]["event"] == "paused")
        await _until(lambda: conn._out.idle and not conn._work.child_tasks)
        assert list(conn.attachments) == [stream.id] and stream.subscribers == 1
        stream.resume()
    assert_contiguous(events)
    assert [e["event"] for e in events].count("resumed") == 1
    await client.aclose()


async def test_detaching_a_backed_up_stream_stops_its_puller(start_daemon: Any) -> None:
    rd, client, received, conn = await _backed_up(start_daemon, streams={"detach_grace": 60.0})
    (info,) = rd.daemon.streams.list_streams()
    detach = json.dumps({"type": "stream.detach", "stream": info["id"], "ref": "d"}).encode()
    await client.send_all(_masked_text(detach))
    await _until(lambda: not conn.attachments and len(conn._work.child_tasks) == 1)
    stream = rd.daemon.streams.get(info["id"])
    assert stream.subscribers == 0 and stream.status == "running"  # within its grace
    with trio.fail_after(10):
        while b'"stream.detached"' not in received:
            received.extend(await client.receive_some(65536))
    await client.aclose()


async def test_a_replay_longer_than_a_batch_is_delivered_whole(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 100_000.0, "reply_words": 300}},
        streams={"subscriber_buffer": 8},
    )
    async with open_websocket_url(rd.ws_url) as ws:
        await recv(ws)
        stream = await start_stream(ws)
        full = await read_events(ws)
        await send(ws, type="stream.attach", stream=stream, after=0, ref="r")
        assert (await recv(ws))["type"] == "stream.attached"
        replay = await read_events(ws)
    assert len(full) > 300 and replay == full


async def test_queued_frames_go_out_in_order_then_the_close_frame(start_daemon: Any) -> None:
    from raafd.gateway.frames import close_frame
    from tests.test_frames import client_frame

    rd, client, received, conn = await _backed_up(start_daemon)
    rd.daemon.gateway.kick(conn.id)
    closing = close_frame(1008, "kicked by an administrator")
    with trio.fail_after(10):
        while chunk := await client.receive_some(65536):
            received += chunk
            if received.endswith(closing):  # our side of the closing handshake
                await client.send_all(client_frame(0x8, closing[2:]))
    await client.aclose()
    frames = _server_frames(bytes(received))
    messages = [json.loads(payload) for opcode, payload in frames[:-1]]
    assert [opcode for opcode, _ in frames[:-1]] == [0x1] * len(messages)
    assert [m["type"] for m in messages[:2]] == ["welcome", "stream.started"]
    events = messages[2:]
    assert len(events) > 10 and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    opcode, payload = frames[-1]  # the close frame, after everything that was queued
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008


async def test_a_client_reset_while_frames_are_queued_ends_the_connection(
    start_daemon: Any,
) -> None:
    rd, client, _, conn = await _backed_up(start_daemon, streams={"detach_grace": 60.0})
    # Close with unread bytes and no lingering: the server's next send or read gets a reset.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()
    await _until(lambda: not rd.daemon.gateway.connections)
    assert conn._out.broken
    (info,) = rd.daemon.streams.list_streams()
    assert info["status"] == "running"  # the stream waits for a resume, within its grace


async def test_fragments_control_frames_between_them_and_protocol_errors(
    start_daemon: Any,
) -> None:
    from tests.test_frames import client_frame

    rd = await start_daemon(**FAST)
    client, received = await _raw_client(rd.address, 65536)
    ping = json.dumps({"type": "ping", "ref": "p"}).encode()
    data = (
        client_frame(0x1, ping[:5], fin=False)
        + client_frame(0x9, b"are you there")
        + client_frame(0x0, ping[5:])
    )
    for i in range(0, len(data), 3):  # in pieces, as a slow network might deliver them
        await client.send_all(data[i : i + 3])
    await client.send_all(client_frame(0x1, b"not masked", masked=False))
    with trio.fail_after(10):
        while chunk := await client.receive_some(65536):
            received += chunk
    await client.aclose()
    frames = _server_frames(bytes(received))
    assert json.loads(frames[0][1])["type"] == "welcome"
    assert frames[1:3] == [(0xA, b"are you there"), (0x1, b'{"type":"pong","ref":"p"}')]
    assert frames[3][0] == 0x8 and int.from_bytes(frames[3][1][:2], "big") == 1002
    assert len(frames) == 4


class _BrokenFraming:
    """Injects a bug into one connection's delivery: framing a live event raises."""

    transport = "websocket"
    heartbeat = b""

    def event(self, event: Any) -> bytes:
        raise ValueError("a bug in this connection's framing")

    def batch(self, events: list[Any]) -> bytes:
        raise ValueError("a bug in this connection's framing")


async def test_a_failing_delivery_closes_its_own_connection_only(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 50.0, "reply_words": 30}})
    async with open_websocket_url(rd.ws_url) as owner, open_websocket_url(rd.ws_url) as ws:
        welcome = await recv(ws)
        await recv(owner)
        stream_id = await start_stream(owner)
        await send(ws, type="stream.attach", stream=stream_id, after=0, ref="a")
        while (await recv(ws))["type"] != "stream.attached":
            pass
        connection = rd.daemon.gateway.connections[welcome["conn"]]
        connection.attachments[stream_id].framing = _BrokenFraming()
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            while True:
                await recv(ws)
        assert info.value.reason.code == 1011
        events = await read_events(owner)  # the stream and its owner go on
    assert_contiguous(events, first=events[0]["seq"])
    assert events[-1]["event"] == "complete"
    assert rd.daemon.streams.get(stream_id).status == "complete"
    failures = rd.daemon.metrics.registry.get_sample_value("raafd_subscriber_failures_total")
    assert failures == 1
