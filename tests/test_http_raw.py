"""The raw HTTP/1.1 streaming path (raafd/http/raw.py) on real sockets, byte for byte: SSE and
NDJSON framing, keep-alive and the handover to hypercorn, pipelining, HTTP/1.0, resume,
disconnects, heartbeats, errors before headers, slow readers, drain, and a failing connection."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import raafd.http.raw as raw
from raafd.http.raw import route
from raafd.http.streams import FRAMINGS, NDJSON, SSE, Framing, ndjson_line, sse_frame
from raafd.net.h1 import parse_request_head
from raafd.net.sockio import Output
from raafd.protocol.events import StreamEvent
from tests.rawhttp import RawClient, request, start_sse
from tests.waiting import wait_until

FAST = {"providers": {"demo": {"tokens_per_second": 2000.0, "reply_words": 20}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 200.0, "reply_words": 40}}}


def log_of(rd: Any, stream_id: str) -> list[StreamEvent]:
    stream = rd.daemon.streams.get(stream_id)
    assert stream.finished
    return list(stream.log.after(0))


def check_whole(events: list[StreamEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal


def metric(rd: Any, name: str) -> float:
    return float(rd.daemon.metrics.snapshot().get(name, 0))


async def test_sse_and_ndjson_back_to_back_then_hypercorn_on_the_same_connection(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        sse = await client.exchange(start_sse("one"))
        assert sse.status == 200 and sse.chunked
        stream_a = sse.headers["x-raafd-stream"]
        assert sse.headers["content-type"] == "text/event-stream"
        assert sse.headers["cache-control"] == "no-cache"
        assert sse.headers["x-accel-buffering"] == "no"
        assert "connection" not in sse.headers and "content-length" not in sse.headers
        events = log_of(rd, stream_a)
        check_whole(events)
        assert sse.body == b"".join(sse_frame(e) for e in events)
        # Chunks hold whole frames; live events went out one chunk each.
        assert all(c.endswith(b"\n\n") for c in sse.chunks)
        assert len(sse.chunks) > len(events) // 2

        nd = await client.exchange(start_sse("two", accept="application/x-ndjson"))
        assert nd.status == 200 and nd.headers["content-type"] == "application/x-ndjson"
        stream_b = nd.headers["x-raafd-stream"]
        assert stream_b != stream_a
        events_b = log_of(rd, stream_b)
        check_whole(events_b)
        assert nd.body == b"".join(ndjson_line(e) for e in events_b)

        # Not a streaming request: handed, with the connection, to hypercorn.
        status = await client.exchange(request("GET", f"/v1/streams/{stream_a}"))
        assert status.status == 200 and "content-length" in status.headers
        assert status.json()["status"] == "complete" and status.json()["id"] == stream_a
        # ... which serves the rest of the connection's life, streaming included.
        again = await client.exchange(request("GET", f"/v1/streams/{stream_b}/events"))
        assert again.status == 200 and again.body == b"".join(sse_frame(e) for e in events_b)
        await client.aclose()
        await wait_until(lambda: metric(rd, "raafd_open_connections{transport=http}") == 0)
    assert metric(rd, "raafd_connections_total{transport=http}") == 1
    assert metric(rd, "raafd_events_sent_total{transport=sse}") == len(events) + len(events_b)
    assert metric(rd, "raafd_events_sent_total{transport=ndjson}") == len(events_b)
    assert metric(rd, "raafd_http_requests_total{method=POST,status=200}") == 2
    assert metric(rd, "raafd_http_requests_total{method=GET,status=200}") == 2


async def test_pipelined_requests_are_answered_in_order(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        await client.send(
            start_sse("a")
            + start_sse("b", accept="application/x-ndjson")
            + request("GET", "/v1/streams/st_nope/events")
            + start_sse("c")
            + request("GET", "/healthz")
        )
        first = await client.read_response()
        second = await client.read_response()
        missing = await client.read_response()
        third = await client.read_response()
        health = await client.read_response()
        await client.aclose()
    framed = [(first, sse_frame), (second, ndjson_line), (third, sse_frame)]
    for answer, frame in framed:
        assert answer.status == 200
        events = log_of(rd, answer.headers["x-raafd-stream"])
        check_whole(events)
        assert answer.body == b"".join(frame(e) for e in events)
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert metric(rd, "raafd_connections_total{transport=http}") == 1


async def test_unusual_requests_go_to_hypercorn_with_every_byte_read(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    body = b'{"input": "chunked"}'
    chunked = request(
        "POST",
        "/v1/streams",
        headers={"accept": "text/event-stream", "transfer-encoding": "chunked"},
    ) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        assert (await client.exchange(start_sse())).status == 200  # the raw path
        # A chunked request body: hypercorn's, from here on.
        answer = await client.exchange(chunked)
        assert answer.status == 200 and answer.chunked
        events = log_of(rd, answer.headers["x-raafd-stream"])
        check_whole(events)
        assert answer.body == b"".join(sse_frame(e) for e in events)
        await client.aclose()

        # Expect: 100-continue after a raw stream: only the head has arrived at the handover.
        client = await RawClient.connect(rd.address)
        assert (await client.exchange(start_sse())).status == 200
        head = start_sse("expecting", headers={"expect": "100-continue"})
        split = head.index(b"\r\n\r\n") + 4
        await client.send(head[:split])
        interim = await client.read_head()
        assert interim.status == 100
        await client.send(head[split:])
        answer = await client.read_response()
        await client.aclose()
    assert answer.status == 200
    events = log_of(rd, answer.headers["x-raafd-stream"])
    assert answer.body == b"".join(sse_frame(e) for e in events)
    assert events[1].fields["delta"].startswith("expecting")


@pytest.mark.parametrize("version", ["HTTP/1.0", "close"])
async def test_http10_and_connection_close_get_a_close_delimited_body(
    start_daemon: Any, version: str
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        if version == "HTTP/1.0":
            await client.send(start_sse("old", version="HTTP/1.0"))
        else:
            await client.send(start_sse("bye", headers={"connection": "close"}))
        answer = await client.read_head()
        assert answer.status == 200 and not answer.chunked
        assert answer.headers["connection"] == "close"
        assert "transfer-encoding" not in answer.headers
        body = await client.read_to_eof()  # the body ends where the connection does
        await client.aclose()
    events = log_of(rd, answer.headers["x-raafd-stream"])
    check_whole(events)
    assert body == b"".join(sse_frame(e) for e in events)


async def test_last_event_id_resume_gives_exactly_the_remainder(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        await client.send(start_sse("resume me"))
        head = await client.read_head()
        stream_id = head.headers["x-raafd-stream"]
        got = b""
        while got.count(b"\n\n") < 5:
            got += await client.read_chunk()
        await client.aclose()
        frames = got.split(b"\n\n")[:5]
        last = int(frames[-1].split(b"\n")[0].removeprefix(b"id: "))
        assert last == 5

        client = await RawClient.connect(rd.address)
        rest = await client.exchange(
            request(
                "GET",
                f"/v1/streams/{stream_id}/events?after=1",  # Last-Event-ID wins over after
                headers={"last-event-id": str(last), "accept": "text/event-stream"},
            )
        )
        by_after = await client.exchange(
            request(
                "GET",
                f"/v1/streams/{stream_id}/events?after=3",
                headers={"accept": "application/x-ndjson"},
            )
        )
        await client.aclose()
    events = log_of(rd, stream_id)
    check_whole(events)
    assert rest.body == b"".join(sse_frame(e) for e in events[5:])
    assert b"".join(frames[i] + b"\n\n" for i in range(5)) == b"".join(
        sse_frame(e) for e in events[:5]
    )
    assert by_after.body == b"".join(ndjson_line(e) for e in events[3:])


async def _a_long_stream_detaching_after_10s(start_daemon: Any) -> tuple[Any, RawClient]:
    """A daemon whose streams run for 1000 s with a 10 s detach grace, and a client that has
    sent a request for an SSE stream."""
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1.0, "reply_words": 1000}},
        streams={"detach_grace": 10.0, "idle_timeout": 3600.0, "max_duration": 36000.0},
    )
    with trio.fail_after(10):
        client = await RawClient.connect(rd.address)
        await client.send(start_sse())
    return rd, client


async def test_client_disconnect_detaches_at_once(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd, client = await _a_long_stream_detaching_after_10s(start_daemon)
    manager = rd.daemon.streams
    with trio.fail_after(60):
        head = await client.read_head()
        stream = manager.get(head.headers["x-raafd-stream"])
        assert b"event: content" in await client.read_chunk() + await client.read_chunk()
        assert stream.subscribers == 1
        await client.aclose()
        left = trio.current_time()
        await wait_until(lambda: not stream.subscribers)
        assert trio.current_time() - left < 0.5  # the reader saw the close, not the next write
        assert stream.status == "running"
        await stream.wait()
    assert 10.0 <= trio.current_time() - left < 11.0
    assert stream.terminal is not None and stream.terminal.fields == {"reason": "detached"}


async def test_a_client_gone_before_its_response_starts_is_detached_at_once(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    # The request and the client's end of sending arrive together: the reader sees the end
    # before the response starts, and the response ends as soon as it has begun.
    rd, client = await _a_long_stream_detaching_after_10s(start_daemon)
    manager = rd.daemon.streams
    with trio.fail_after(60):
        await client.stream.send_eof()
        head = await client.read_head()
        stream = manager.get(head.headers["x-raafd-stream"])
        left = trio.current_time()
        await wait_until(lambda: not stream.subscribers)
        assert trio.current_time() - left < 0.5
        await stream.wait()
        await client.aclose()
    assert stream.terminal is not None and stream.terminal.fields == {"reason": "detached"}


async def test_a_client_sending_while_its_response_streams_is_read_one_request_deep(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    # The connection's reader keeps what a client sends during a response (the next request)
    # up to one request's worth, then reads no more: a flood fills the kernel's buffers and
    # stalls the client, not raafd's memory, and the response goes on.
    rd = await start_daemon(
        server={"max_header_bytes": 1024},
        http={"max_body_bytes": 1024},
        providers={"demo": {"tokens_per_second": 1.0, "reply_words": 1000}},
        streams={"idle_timeout": 3600.0, "max_duration": 36000.0},
    )
    with trio.fail_after(120):
        client = await RawClient.connect(rd.address)
        await client.send(start_sse())
        await client.read_head()
        with trio.move_on_after(30) as flooding:
            await client.send(b"x" * (64 << 20))  # far more than the kernel's buffers hold
        assert flooding.cancelled_caught
        chunks = [await client.read_chunk() for _ in range(3)]
        assert b"event: content" in b"".join(chunks)
        await client.aclose()


async def test_heartbeats_while_waiting_for_the_first_token(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        providers={"demo": {"first_token_delay": 40.0, "reply_words": 1}},
        http={"heartbeat_interval": 15.0},
    )
    for accept, heartbeat in ((SSE, b": heartbeat\n\n"), (NDJSON, b'{"event":"heartbeat"}\n')):
        with trio.fail_after(120):
            client = await RawClient.connect(rd.address)
            await client.send(start_sse(accept=accept))
            head = await client.read_head()
            t0 = trio.current_time()
            chunks: list[tuple[float, bytes]] = []
            while chunk := await client.read_chunk():
                chunks.append((round(trio.current_time() - t0, 1), chunk))
            await client.aclose()
        beats = [at for at, data in chunks if data == heartbeat]
        assert beats == [15.0, 30.0]  # nothing else was sent then; the first token came at 40
        body = b"".join(data for _, data in chunks if data != heartbeat)
        events = log_of(rd, head.headers["x-raafd-stream"])
        assert body == b"".join(FRAMINGS[accept].frame(e) for e in events)


async def test_keep_alive_timeout_closes_an_idle_connection(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST, server={"keep_alive_timeout": 7.0})
    with trio.fail_after(60):
        client = await RawClient.connect(rd.address)
        assert (await client.exchange(start_sse())).status == 200
        idle_from = trio.current_time()
        assert await client.at_eof()
        await client.aclose()
    assert 7.0 <= trio.current_time() - idle_from < 7.5


async def test_a_request_in_pieces_is_served_and_an_unfinished_one_times_out(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST, server={"header_timeout": 5.0})
    data = start_sse()
    head_end = data.index(b"\r\n\r\n") + 4
    with trio.fail_after(60):
        client = await RawClient.connect(rd.address)
        assert (await client.exchange(start_sse())).status == 200  # now on the raw path
        # Head and body in pieces: each read is waited for, within the header deadline.
        for piece in (data[:10], data[10:head_end], data[head_end : head_end + 3]):
            await client.send(piece)
            await trio.sleep(0.5)
        answer = await client.exchange(data[head_end + 3 :])
        assert answer.status == 200 and b"event: complete" in answer.body
        # A body that never ends: 408 at the deadline, and the connection closes.
        await client.send(data[:-2])
        sent_at = trio.current_time()
        late = await client.read_head()
        assert late.status == 408 and late.headers["connection"] == "close"
        assert 5.0 <= trio.current_time() - sent_at < 5.5
        await client.read_until(b"}}")
        assert await client.at_eof()
        await client.aclose()


async def test_drain_closes_idle_connections_and_ends_streaming_ones_with_their_stream(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1.0, "reply_words": 1000}},
        server={"keep_alive_timeout": 600.0, "shutdown_grace": 5.0},
        streams={"idle_timeout": 3600.0, "max_duration": 36000.0},
    )
    with trio.fail_after(60):
        idle = await RawClient.connect(rd.address)
        first = await idle.exchange(start_sse("[words:2]"))
        assert first.status == 200
        busy = await RawClient.connect(rd.address)
        await busy.send(start_sse())
        await busy.read_head()
        await busy.read_chunk()
        rd.daemon.request_drain()
        asked = trio.current_time()
        assert await idle.at_eof()  # long before keep_alive_timeout
        assert trio.current_time() - asked < 1.0
        rest = b""
        while chunk := await busy.read_chunk():
            rest += chunk
        ended = trio.current_time()
        assert await busy.at_eof()
        await idle.aclose()
        await busy.aclose()
    last = json.loads(rest.rstrip(b"\n").split(b"\n")[-1].removeprefix(b"data: "))
    assert last["event"] == "cancelled" and last["reason"] == "drain"
    assert 5.0 <= ended - asked < 6.0


async def test_errors_are_answered_before_any_header_as_hypercorn_answers_them(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1000.0, "reply_words": 30}},
        streams={"log_max_events": 8},
        http={"max_body_bytes": 256},
        server={"drain_delay": 600.0},  # draining, and still accepting, until the test ends
    )
    with trio.fail_after(30):
        client = await RawClient.connect(rd.address)
        done = await client.exchange(start_sse())
        stream = done.headers["x-raafd-stream"]
        events = f"/v1/streams/{stream}/events"
        sse = {"accept": "text/event-stream"}
        cases = [
            (404, request("GET", "/v1/streams/st_nope/events")),
            (410, request("GET", events + "?after=1", headers=sse)),
            (410, request("GET", events, headers={"last-event-id": "2"})),
            (400, request("GET", events + "?after=999")),
            (400, request("GET", events + "?after=x")),
            (400, request("POST", "/v1/streams", b"{not json", headers=sse)),
            (400, request("POST", "/v1/streams", b'{"inptu": "x"}', headers=sse)),
            (400, request("POST", "/v1/streams", b"", headers=sse)),
            (404, request("POST", "/v1/streams", b'{"agent": "ghost", "input": "x"}', headers=sse)),
        ]
        # The same requests on a connection hypercorn serves (it began with another request).
        hyper = await RawClient.connect(rd.address)
        assert (await hyper.exchange(request("GET", "/healthz"))).status == 200
        for status, req in cases:
            mine = await client.exchange(req)  # keep-alive holds through errors
            theirs = await hyper.exchange(req)
            assert mine.status == theirs.status == status, (req, mine.body)
            assert mine.body == theirs.body
            assert mine.headers["content-type"] == theirs.headers["content-type"]
        # Still usable: a stream on the same connection after all those errors.
        assert (await client.exchange(start_sse())).status == 200

        too_big = request("POST", "/v1/streams", b'{"input": "%s"}' % (b"x" * 300), headers=sse)
        for conn in (client, hyper):
            answer = await conn.exchange(too_big)
            assert answer.status == 413 and answer.json()["error"]["code"] == "too_large"
            assert answer.headers["connection"] == "close"
            assert await conn.at_eof()
            await conn.aclose()

        rd.daemon.request_drain()
        await wait_until(lambda: rd.daemon.draining)
        client = await RawClient.connect(rd.address)
        answer = await client.exchange(start_sse())
        assert answer.status == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "unavailable"
        # Replay of an existing stream goes on while draining.
        assert (await client.exchange(request("GET", f"{events}?after=29"))).status == 200
        await client.aclose()
    assert metric(rd, "raafd_client_errors_total{code=not_found}") >= 2
    assert metric(rd, "raafd_client_errors_total{code=gone}") >= 2


async def test_a_slow_reader_does_not_hold_back_others_and_its_pushes_fall_back_to_the_queue(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = 0

    class CountingOutput(Output):
        def write_nowait(self, data: bytes) -> bool:
            nonlocal refused
            taken = super().write_nowait(data)
            refused += not taken
            return taken

    monkeypatch.setattr(raw, "Output", CountingOutput)
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 100_000.0, "reply_words": 10}},
        http={"send_queue": 4},
    )
    manager = rd.daemon.streams
    with trio.fail_after(30):
        slow = await RawClient.connect(rd.address, rcvbuf=2048)
        await slow.send(start_sse("[words:5000]"))
        await wait_until(lambda: bool(manager.list_streams()))
        (info,) = manager.list_streams()
        stream = manager.get(info["id"])
        # It fills the socket, then its queue; then the stream waits for it (backpressure):
        # every task quiet for 50 ms (a token is due every 10 us) with the stream unfinished.
        await wait_until(lambda: refused > 0)
        await trio.testing.wait_all_tasks_blocked(0.05)
        stalled_at = stream.head
        assert stalled_at < 5000 and stream.status == "running"

        # Meanwhile other clients are served in full.
        for _ in range(3):
            other = await RawClient.connect(rd.address)
            answer = await other.exchange(start_sse())
            await other.aclose()
            check_whole(log_of(rd, answer.headers["x-raafd-stream"]))

        # The slow one reads at last, and gets everything, in order.
        answer = await slow.read_response()
        await slow.aclose()
    events = log_of(rd, stream.id)
    check_whole(events)
    assert len(events) > 5000
    assert answer.body == b"".join(sse_frame(e) for e in events)


async def test_a_failing_connection_costs_only_itself(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(event: StreamEvent) -> bytes:
        if event.kind == "content":
            raise RuntimeError("a bug in framing")
        return ndjson_line(event)

    # The first token comes later than the replay of `start`, so it is pushed live.
    rd = await start_daemon(
        providers={
            "demo": {"tokens_per_second": 200.0, "reply_words": 40, "first_token_delay": 0.3}
        }
    )
    with trio.fail_after(20):
        healthy = await RawClient.connect(rd.address)
        await healthy.send(start_sse("fine"))
        head = await healthy.read_head()
        monkeypatch.setitem(raw.FRAMINGS, NDJSON, Framing(NDJSON, "ndjson", broken, b"\n"))
        failing = await RawClient.connect(rd.address)
        await failing.send(start_sse("boom", accept=NDJSON))
        assert (await failing.read_head()).status == 200
        assert b'"event":"start"' in await failing.read_chunk()
        with pytest.raises(EOFError):  # closed: the body never ends properly
            while await failing.read_chunk():
                pass
        await failing.aclose()
        rest = await healthy.read_body(head)
        await healthy.aclose()
        # The stream the failing connection started is unharmed: detached, it runs to its end.
        healthy_id = head.headers["x-raafd-stream"]
        (other,) = [s for s in rd.daemon.streams.list_streams() if s["id"] != healthy_id]
        assert other["subscribers"] == 0
        await rd.daemon.streams.get(other["id"]).wait()
    orphan = log_of(rd, other["id"])
    check_whole(orphan)
    assert orphan[-1].kind == "complete"
    events = log_of(rd, head.headers["x-raafd-stream"])
    check_whole(events)
    assert rest.body == b"".join(sse_frame(e) for e in events)


# --- the pure parts -------------------------------------------------------------------------


def head_of(text: str) -> Any:
    return parse_request_head(text.replace("\n", "\r\n").encode() + b"\r\n", strict=True)


def test_route_serves_only_plain_streaming_requests() -> None:
    post = "POST /v1/streams HTTP/1.1\nhost: x\naccept: text/event-stream\ncontent-length: 2\n"
    served = route(head_of(post))
    assert served is not None and served.stream_id is None and served.body_length == 2
    assert served.framing.content_type == SSE
    events = route(head_of("GET /v1/streams/st_1/events?after=3 HTTP/1.0\n"))
    assert events is not None and events.stream_id == "st_1" and events.framing.transport == "sse"
    nd = route(
        head_of("GET /v1/streams/s/events HTTP/1.1\nhost: x\naccept: application/x-ndjson\n")
    )
    assert nd is not None and nd.framing.transport == "ndjson"
    for head in (
        "POST /v1/streams HTTP/1.1\nhost: x\n",  # plain JSON: 201
        post + "transfer-encoding: chunked\n",
        post + "expect: 100-continue\n",
        "POST /v1/streams HTTP/1.1\naccept: text/event-stream\n",  # no host
        "GET /v1/streams/st_1/events HTTP/1.1\nhost: x\ncontent-length: 1\n",
        "GET /v1/streams/st%31/events HTTP/1.1\nhost: x\n",
        "GET /v1/streams/st_1/events HTTP/1.1\nhost: x\nupgrade: h2c\nconnection: upgrade\n",
        "HEAD /v1/streams/st_1/events HTTP/1.1\nhost: x\n",
        "GET /v1/streams/st_1 HTTP/1.1\nhost: x\n",
        "GET /v1/ws HTTP/1.1\nhost: x\n",
    ):
        parsed = head_of(head)
        assert parsed is not None and route(parsed) is None, head


def test_strict_head_parsing_refuses_what_it_does_not_fully_understand() -> None:
    for head in (
        "GET /v1/streams/s/events HTTP/1.1\nhost : x\n",
        "GET /v1/streams/s/events HTTP/1.1\nhost: x\n folded\n",
        "GET http://x/v1/streams/s/events HTTP/1.1\nhost: x\n",
        "GET /v1/streams/s/events HTTP/1.2\nhost: x\n",
        "G(T /v1/streams/s/events HTTP/1.1\nhost: x\n",
        "GET /v1/streams/s/events HTTP/1.1\nhost: x\x00\n",
        "GET  /v1/streams/s/events HTTP/1.1\nhost: x\n",
        "GET /v1/streams/s/events HTTP/1.1\nhost: x\nHost: y\n",
        "POST /v1/streams HTTP/1.1\nhost: x\ncontent-length: 2\ncontent-length: 2\n",
    ):
        assert head_of(head) is None, head
        # The listener's lenient parse still routes most of them to hypercorn, which answers.
    lenient = parse_request_head(b"GET /x HTTP/1.1\r\nHost : x\r\n\r\n")
    assert lenient is not None and lenient.headers == {"host": "x"}


@given(st.binary(max_size=300))
def test_head_parsing_never_raises(data: bytes) -> None:
    for strict in (False, True):
        head = parse_request_head(data + b"\r\n\r\n", strict=strict)
        if head is not None and strict:
            route(head)
