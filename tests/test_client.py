"""The Python client (``raafd.client``) and ``raafd chat`` against a real daemon on port 0.

Time-dependent behaviour (backoff, ``reconnect_after``, giving up) runs on the autojump clock;
the daemon fixture lets loopback bytes land before the clock jumps (``tests/waiting.py``).
Every wait has an absolute ``fail_after``.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketRequest, serve_websocket

from raafd.client import ClientError, RaafdClient, StreamHandle, backoff_delay, open_client
from raafd.client import chat as chat_cli
from tests.waiting import wait_until

FAST = {"demo": {"tokens_per_second": 1000, "reply_words": 50}}
TERMINAL = {"complete", "error", "cancelled"}


async def collect(
    handle: StreamHandle, on_event: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    events = []
    async for event in handle:
        events.append(event)
        if on_event is not None:
            on_event(event)
    return events


def assert_whole_stream(events: list[dict[str, Any]], first: int = 1) -> None:
    """Every seq from ``first`` exactly once, in order; one terminal event, the last; and the
    content adds up to the final response."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(first, first + len(events))), seqs
    terminals = [e for e in events if e["event"] in TERMINAL]
    assert terminals == [events[-1]]
    if events[-1]["event"] == "complete" and first == 1:
        text = "".join(e["delta"] for e in events if e["event"] == "content")
        assert text == events[-1]["final_response"]


def kick_all(rd: Any) -> None:
    for conn_id in list(rd.daemon.gateway.connections):
        assert rd.daemon.gateway.kick(conn_id)


# --- pure parts -------------------------------------------------------------------------------


def test_backoff_delay_grows_with_jitter_cap_and_floor() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 5.0), (30, 5.0)]:
        for _ in range(50):
            delay = backoff_delay(attempt, base=0.2, cap=5.0, rng=rng)
            assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay(1, base=0.2, cap=5.0, floor=1.0, rng=rng) == 1.0
    assert backoff_delay(9, base=0.2, cap=5.0, floor=1.0, rng=rng) >= 2.5


async def test_handle_queues_each_seq_once_and_accepts_coalesced_jumps() -> None:
    handle = StreamHandle(RaafdClient("ws://unused"), "st_x", 0, buffer=16)

    def ev(seq: int, kind: str = "content", **fields: Any) -> dict[str, Any]:
        return {"stream": "st_x", "seq": seq, "event": kind, **fields}

    offered = [
        ev(1, "start"),
        ev(2, delta="a"),
        ev(2, delta="a"),
        ev(1, "start"),
        ev(5, delta="bcd"),
        ev(3, delta="b"),
        ev(6, "complete", final_response="abcd"),
        ev(7, delta="late"),
    ]
    terminal = [handle._offer(e) for e in offered]
    assert terminal == [False] * 6 + [True, False]
    with trio.fail_after(1):
        seen = [e["seq"] async for e in handle]
    assert seen == [1, 2, 5, 6]
    assert handle.last_seq == 6 and handle.done and handle.terminal is not None


async def test_handle_overflow_drops_until_resynchronised() -> None:
    handle = StreamHandle(RaafdClient("ws://unused"), "st_x", 0, buffer=2)
    for seq in (1, 2, 3, 4):
        handle._offer({"stream": "st_x", "seq": seq, "event": "content", "delta": "x"})
    assert handle._overflow and handle._received == 2  # 3 and 4 were dropped, not queued


# --- one connection ---------------------------------------------------------------------------


async def test_stream_a_reply(start_daemon: Any) -> None:
    rd = await start_daemon(providers=FAST)
    with trio.fail_after(10):
        async with open_client(rd.ws_url) as client:
            assert client.connected and client.conn_id in rd.daemon.gateway.connections
            assert client.user == "anonymous"
            assert 0 < await client.ping() < 10  # a real round trip, answered
            handle = await client.start("hello world")
            events = await collect(handle)
            assert_whole_stream(events)
            assert events[0]["event"] == "start" and events[0]["agent"] == "assistant"
            assert events[-1]["event"] == "complete"
            assert events[-1]["final_response"].startswith("hello world streams")
            assert events[-1]["usage"]["completion_tokens"] == 52
            assert handle.last_seq == events[-1]["seq"] and handle.done
            assert client.streams == []  # a finished handle is no longer followed
            # messages, a named agent and a chosen stream id
            handle = await client.start(
                messages=[{"role": "user", "content": "again [words:3]"}],
                agent="assistant",
                stream_id="my-stream-1",
            )
            assert handle.stream_id == "my-stream-1"
            assert_whole_stream(await collect(handle))
            assert client.reconnects == 0


async def test_attach_after(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 200, "reply_words": 40}})
    with trio.fail_after(10):
        async with open_client(rd.ws_url) as first, open_client(rd.ws_url) as second:
            handle = await first.start("follow me")
            live = None
            async for event in handle:
                if event["seq"] == 5:  # a second client joins a running stream
                    live = await second.attach(handle.stream_id, after=5)
                if event["event"] in TERMINAL:
                    break
            assert live is not None and live.last_seq == 5
            followed = await collect(live)
            assert_whole_stream(followed, first=6)
            assert followed[-1] == handle.terminal
            # replay of a finished stream from the middle
            end = handle.last_seq
            replay = await collect(await second.attach(handle.stream_id, after=end - 3))
            assert [e["seq"] for e in replay] == [end - 2, end - 1, end]


async def test_server_errors_come_back_from_the_call(start_daemon: Any) -> None:
    rd = await start_daemon(providers=FAST)
    with trio.fail_after(10):
        async with open_client(rd.ws_url) as client:
            with pytest.raises(ClientError) as caught:
                await client.attach("st_nope")
            assert (caught.value.code, caught.value.field) == ("not_found", "stream")
            with pytest.raises(ClientError) as caught:
                await client.start("hi", agent="nobody")
            assert (caught.value.code, caught.value.field) == ("not_found", "agent")
            with pytest.raises(ClientError) as caught:
                await client.start("hi", stream_id="has spaces")
            assert (caught.value.code, caught.value.field) == ("bad_request", "stream")
            with pytest.raises(ClientError) as caught:
                await client.attach("st_nope", after=-1)
            assert (caught.value.code, caught.value.field) == ("bad_request", "after")
            with pytest.raises(ClientError) as caught:
                await client.start()
            assert caught.value.code == "bad_request"
            handle = await client.start("x [words:2]")
            await collect(handle)
            with pytest.raises(ClientError) as caught:
                await handle.pause()  # it has ended
            assert (caught.value.code, caught.value.field) == ("conflict", "stream")
            with pytest.raises(ClientError) as caught:
                await client.attach(handle.stream_id, after=handle.last_seq + 1)
            assert (caught.value.code, caught.value.field) == ("bad_request", "after")
            assert client.streams == []
            await client.ping()  # errors do not hurt the connection: it still answers, and
            assert client.reconnects == 0 and client.error is None  # on the same connection


async def test_pause_resume_cancel(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 100, "reply_words": 500}})
    with trio.fail_after(10):
        async with open_client(rd.ws_url) as client:
            handle = await client.start("slow")
            kinds = []
            async for event in handle:
                kinds.append(event["event"])
                if event["seq"] == 3:
                    await handle.pause()
                elif event["event"] == "paused":
                    await handle.resume()
                elif event["event"] == "resumed":
                    await handle.cancel()
            assert "paused" in kinds and "resumed" in kinds
            assert handle.terminal is not None
            assert handle.terminal["event"] == "cancelled"
            assert handle.terminal["reason"] == "client"


async def test_detach_then_attach_again(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 200, "reply_words": 60}})
    with trio.fail_after(10):
        async with open_client(rd.ws_url) as client:
            handle = await client.start("detach me")
            seen = []
            async for event in handle:
                seen.append(event)
                if event["seq"] == 4:
                    await handle.detach()
            assert handle.detached and not handle.done and client.streams == []
            assert seen[-1]["seq"] >= 4
            rest = await collect(await client.attach(handle.stream_id, after=handle.last_seq))
            assert_whole_stream(seen + rest)
            with pytest.raises(ClientError) as caught:
                again = await client.attach(handle.stream_id)
                await client.attach(handle.stream_id)  # pragma: no cover
            assert caught.value.code == "conflict"
            await again.detach()


# --- reconnecting -----------------------------------------------------------------------------


async def test_reconnect_delivers_every_event_exactly_once(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 1000, "reply_words": 300}})
    kicks = {20, 100, 101, 220}
    running_at_kick = []
    with trio.fail_after(10):
        async with open_client(rd.ws_url, backoff_base=0.01) as client:
            handle = await client.start("drop me")
            other = await client.start("and me [words:200]")  # re-attached too
            stream = rd.daemon.streams.get(handle.stream_id)

            def maybe_kick(event: dict[str, Any]) -> None:
                if event["seq"] in kicks:
                    running_at_kick.append(stream.status == "running")
                    kick_all(rd)

            events = await collect(handle, maybe_kick)
            assert_whole_stream(events)
            assert events[-1]["event"] == "complete"
            assert len(events[-1]["final_response"].split()) == 302
            assert_whole_stream(await collect(other))
            assert client.reconnects >= 3  # 100 and 101 may land on one connection
            assert any(running_at_kick)  # dropped mid-stream, not after it
            assert client.error is None


async def test_reconnect_waits_a_backoff(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(providers=FAST)
    with trio.fail_after(60):
        async with open_client(rd.ws_url, backoff_base=1.0) as client:
            kicked_at = trio.current_time()
            kick_all(rd)
            await wait_until(lambda: client.reconnects == 1)
            assert 0.5 <= trio.current_time() - kicked_at <= 1.1
            handle = await client.start("still works")
            assert_whole_stream(await collect(handle))


async def test_idle_connection_stays_up(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(providers=FAST)  # heartbeat 20 s, timeout 60 s
    with trio.fail_after(1000):
        async with open_client(rd.ws_url) as client:
            conn_id = client.conn_id
            await trio.sleep(600)  # clock seconds: pings both ways keep it open
            await client.ping()  # answered, on the connection of ten minutes ago:
            assert client.conn_id == conn_id and client.reconnects == 0
            assert conn_id in rd.daemon.gateway.connections


async def test_a_silent_server_is_dropped_by_the_heartbeat(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that stops answering (a half-open connection, say) is noticed by the ping the
    client sends every ``heartbeat`` seconds, and the client connects again."""
    accepted = 0

    async def deaf_server(request: WebSocketRequest) -> None:
        nonlocal accepted
        ws = await request.accept(subprotocol="raafd.v1")
        accepted += 1
        welcome = {"type": "welcome", "conn": f"c_fake_{accepted}", "heartbeat": 1.0}
        await ws.send_message(json.dumps(welcome))
        await trio.sleep_forever()  # reads nothing: once its queue is full, no more pongs

    server = await nursery.start(serve_websocket, deaf_server, "127.0.0.1", 0, None)
    with trio.fail_after(60):
        async with open_client(f"ws://127.0.0.1:{server.port}/v1/ws") as client:
            assert client.conn_id == "c_fake_1"
            with trio.move_on_after(0.5) as unanswered:
                await client.ping()  # fills the server's one-message queue
            assert unanswered.cancelled_caught  # a ping returns only with its pong
            await wait_until(lambda: client.reconnects == 1)
            assert client.conn_id == "c_fake_2" and client.error is None


async def test_slow_consumer_overflow_resumes_exactly(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 2000, "reply_words": 200}})
    with trio.fail_after(10):
        async with open_client(rd.ws_url, stream_buffer=4) as client:
            handle = await client.start("too fast for you")
            stream = rd.daemon.streams.get(handle.stream_id)
            await wait_until(lambda: stream.status != "running")  # consume nothing meanwhile
            events = await collect(handle)
            assert_whole_stream(events)
            assert len(events) == stream.head == 206  # start, 4 + 200 words, complete
            assert client.reconnects == 0


async def test_no_reconnect_when_disabled(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 100, "reply_words": 500}})
    with trio.fail_after(10):
        async with open_client(rd.ws_url, reconnect=False) as client:
            handle = await client.start("slow")
            with pytest.raises(ClientError) as caught:
                async for event in handle:
                    if event["seq"] == 3:
                        kick_all(rd)
            assert caught.value.code == "connection_lost"
            assert client.error is not None and client.attempts == 1
            with pytest.raises(ClientError):
                await client.ping()


async def test_gives_up_after_max_attempts(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 10, "reply_words": 500}})
    with trio.fail_after(120):
        async with open_client(rd.ws_url, max_attempts=3, backoff_base=1.0) as client:
            handle = await client.start("slow")
            await handle.__anext__()
            # The daemon stops answering: no new connection is accepted and the live one is
            # dropped, with the stream still running, so every reconnection is refused.
            await rd.daemon.listener.stop_accepting()
            kick_all(rd)
            with pytest.raises(ClientError) as caught:
                await collect(handle)
            assert caught.value.code == "unavailable"
            assert client.attempts == 4  # the first connection, then three tries
            with pytest.raises(ClientError) as caught:
                await client.start("anyone?")
            assert caught.value.code == "unavailable"


# --- auth ---------------------------------------------------------------------------------------


async def test_token_auth(start_daemon: Any, make_config: Callable[..., Any]) -> None:
    rd = await start_daemon(providers=FAST, auth={"tokens": ["s3cret"]})
    with trio.fail_after(10):
        for token, message in [("wrong", "invalid token"), (None, "requires a token")]:
            with pytest.raises(ClientError) as caught:
                async with open_client(rd.ws_url, token=token):
                    pytest.fail("connected without a valid token")  # pragma: no cover
            assert caught.value.code == "unauthorized" and message in caught.value.message

        async with open_client(rd.ws_url, token="s3cret", backoff_base=0.01) as client:
            assert client.user is not None and client.user.startswith("token-")
            handle = await client.start("authorised")
            assert_whole_stream(await collect(handle))
            # The token is revoked, then the connection drops: one refused reconnect, no loop.
            rd.daemon.reload(make_config(providers=FAST, auth={"tokens": ["other"]}))
            slow = await client.start("[words:100000] long")
            kick_all(rd)
            with pytest.raises(ClientError) as caught:
                await collect(slow)
            assert caught.value.code == "unauthorized"
            await client._stopped.wait()  # its connection task ended: no reconnect loop
            assert client.attempts == 2
            assert client.error is not None and client.error.code == "unauthorized"
            with pytest.raises(ClientError) as caught:
                await client.ping()
            assert caught.value.code == "unauthorized"


# --- drain --------------------------------------------------------------------------------------


async def test_drain_finishes_the_stream_then_reconnects_later(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 50, "reply_words": 40}})
    with trio.fail_after(60):
        async with open_client(rd.ws_url, backoff_base=0.05) as client:
            handle = await client.start("finish me")
            events = [await handle.__anext__()]
            rd.daemon.request_drain()
            await wait_until(lambda: client.shutdown_notice is not None)
            assert client.shutdown_notice == {
                "type": "shutdown",
                "reason": "drain",
                "reconnect_after": 1.0,
            }
            with pytest.raises(ClientError) as caught:
                await client.start("new work")
            assert caught.value.code == "unavailable"  # draining: no new streams here
            events += await collect(handle)
            assert_whole_stream(events)
            assert events[-1]["event"] == "complete"  # within the shutdown grace
            await wait_until(lambda: not client.connected)  # closed 1001 once it ended
            closed_at = trio.current_time()
            await wait_until(lambda: client.attempts >= 2)
            assert trio.current_time() - closed_at >= 0.99  # reconnect_after honoured
            assert client.error is None  # still trying: the daemon may come back


# --- raafd chat ---------------------------------------------------------------------------------


async def test_chat_main_prints_the_reply(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 1000, "reply_words": 5}})
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nagain [words:2]\n"))
    monkeypatch.setenv("RAAFD_TOKEN", "")
    out = io.StringIO()  # not capsys: the daemon's log lines go to sys.stdout
    with trio.fail_after(10):
        status = await trio.to_thread.run_sync(
            lambda: chat_cli.main([rd.ws_url, "--agent", "assistant"], stdout=out)
        )
    assert status == 0
    assert out.getvalue() == (
        "connected as anonymous; Ctrl-C cancels a reply, Ctrl-D leaves\n"
        "> hello streams tokens arrive in order\n"
        "[usage: 1 prompt + 6 completion tokens; stop]\n"
        "> > again streams tokens\n"
        # the second turn carried the conversation: 1 + 6 + 2 words of prompt
        "[usage: 9 prompt + 3 completion tokens; stop]\n"
        "> \n"
    )


async def test_chat_ctrl_c_cancels_the_reply(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 200, "reply_words": 5}})
    stdin = io.StringIO("[words:5000] go\nhi\n")
    stdout = io.StringIO()
    send, interrupts = trio.open_memory_channel[None](1)
    status: list[int] = []

    async def run_chat() -> None:
        status.append(
            await chat_cli.chat(
                rd.ws_url, agent=None, token=None, stdin=stdin, stdout=stdout, interrupts=interrupts
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_chat)
            await wait_until(lambda: " sequence" in stdout.getvalue())
            send.send_nowait(None)  # Ctrl-C
        out = stdout.getvalue()
    assert status == [0]
    assert "[cancelled: client]" in out
    assert "hi streams tokens arrive in order" in out
    assert out.count("[usage:") == 1


@pytest.fixture
def idle_stdin() -> Iterator[TextIO]:
    """A terminal nobody types into: ``readline`` blocks until teardown ends the input."""
    read_end, write_end = os.pipe()
    with open(read_end) as stdin, open(write_end, "w"):
        yield stdin
    # the write end closed first: a reading thread left behind sees the end of input


async def test_chat_ctrl_c_at_the_prompt_leaves(start_daemon: Any, idle_stdin: TextIO) -> None:
    rd = await start_daemon(providers=FAST)
    stdout = io.StringIO()
    send, interrupts = trio.open_memory_channel[None](1)
    status: list[int] = []

    async def run_chat() -> None:
        status.append(
            await chat_cli.chat(
                rd.ws_url,
                agent=None,
                token=None,
                stdin=idle_stdin,
                stdout=stdout,
                interrupts=interrupts,
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_chat)
            await wait_until(lambda: stdout.getvalue().endswith("> "))
            send.send_nowait(None)  # Ctrl-C
    assert status == [130]


async def test_chat_shows_tool_calls_and_errors(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1000, "max_retries": 0}},
        agents={"assistant": {"tools": ["calculator"]}},
    )
    stdin = io.StringIO('[tool:calculator {"expression": "2+3"}]\n[fail-after:2] oops\n')
    stdout = io.StringIO()
    _, interrupts = trio.open_memory_channel[None](1)
    with trio.fail_after(10):
        status = await chat_cli.chat(
            rd.ws_url, agent=None, token=None, stdin=stdin, stdout=stdout, interrupts=interrupts
        )
    out = stdout.getvalue()
    assert status == 0
    assert '[tool call calculator {"expression": "2+3"}]' in out
    assert "The tool said: 5" in out  # the daemon ran the tool and the model read its result
    assert "[error upstream_error:" in out or "[error internal:" in out


async def test_chat_bad_token_exits_1(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rd = await start_daemon(auth={"tokens": ["s3cret"]})
    _, interrupts = trio.open_memory_channel[None](1)
    with trio.fail_after(10):
        status = await chat_cli.chat(
            rd.ws_url,
            agent=None,
            token="nope",
            stdin=io.StringIO("hi\n"),
            stdout=io.StringIO(),
            interrupts=interrupts,
        )
    assert status == 1
    assert "unauthorized" in capsys.readouterr().err
