"""The daemon on port 0: health, readiness, stats, metrics, and the error bodies."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import wait_until

NDJSON = "application/x-ndjson"


async def test_health_ready_stats_metrics(running: Any) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=running.base_url) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).json() == {"status": "ready"}
            stats = (await client.get("/v1/stats")).json()
            assert stats["version"] and stats["draining"] is False
            assert stats["connections"]["open"] >= 1
            assert stats["process"]["rss_bytes"] > 0
            response = await client.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(response.text)}
            assert "process_resident_memory_bytes" in families
            assert "process_open_fds" in families
            assert "raafd_open_connections" in families
            http = families["raafd_http_requests"]
            assert any(s.labels == {"method": "GET", "status": "200"} for s in http.samples)


async def test_error_bodies(start_daemon: Any) -> None:
    rd = await start_daemon(http={"max_body_bytes": 64})
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=rd.base_url) as client:
            r = await client.get("/nope")
            assert r.status_code == 404
            assert r.json() == {
                "error": {"code": "not_found", "message": "no such endpoint: /nope"}
            }
            r = await client.post("/healthz")
            assert r.status_code == 405
            assert r.json()["error"]["code"] == "method_not_allowed"
            assert r.json()["error"]["message"] == "POST is not allowed on /healthz; use GET, HEAD"
            assert r.headers["allow"] == "GET, HEAD"
            # The methods of the resource, whichever HTTP path would serve its other requests.
            r = await client.post("/v1/streams/st_x/events", headers={"accept": NDJSON})
            assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")
            r = await client.get("/v1/streams")
            assert (r.status_code, r.headers["allow"]) == (405, "POST")
            r = await client.put("/v1/sessions/s1")
            assert (r.status_code, r.headers["allow"]) == (405, "DELETE, GET, HEAD")
            r = await client.post("/v1/streams", content=b"x" * 65)
            assert r.status_code == 413
            assert r.json()["error"]["code"] == "too_large"
            # Chunked bodies (no content-length) are cut off at the limit too.

            async def chunks() -> Any:
                for _ in range(10):
                    yield b"y" * 16

            r = await client.post("/v1/streams", content=chunks())
            assert r.status_code == 413
            # The daemon is still healthy.
            assert (await client.get("/healthz")).status_code == 200


async def test_readyz_turns_503_while_draining(start_daemon: Any, autojump_clock: Any) -> None:
    rd = await start_daemon(server={"drain_delay": 5.0})
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(2):
            assert (await client.get("/readyz")).status_code == 200
        rd.daemon.request_drain()
        await trio.sleep(1)  # clock seconds: inside the drain delay, still listening
        with trio.fail_after(2):
            r = await client.get("/readyz")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "unavailable"
            assert (await client.get("/healthz")).status_code == 200


async def test_unix_socket_listener(start_daemon: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "raafd.sock")
    rd = await start_daemon(server={"unix_socket": path})
    assert rd.address == path
    transport = httpx.AsyncHTTPTransport(uds=path)
    async with httpx.AsyncClient(transport=transport, base_url="http://raafd") as client:
        with trio.fail_after(10):
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            created = await client.post("/v1/streams", json={"input": "over a unix socket"})
            assert created.status_code == 201
    # A connection that begins with a streaming request: the raw HTTP path, then hypercorn for
    # the next request on the same connection.
    limits = httpx.Limits(max_connections=1)
    transport = httpx.AsyncHTTPTransport(uds=path, limits=limits)
    async with httpx.AsyncClient(transport=transport, base_url="http://raafd") as client:
        with trio.fail_after(10):
            async with client.stream(
                "POST", "/v1/streams", json={"input": "x"}, headers={"accept": NDJSON}
            ) as response:
                assert response.headers["transfer-encoding"] == "chunked"
                lines = [json.loads(line) async for line in response.aiter_lines() if line]
            assert lines[0]["seq"] == 1 and lines[-1]["event"] == "complete"
            assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert rd.daemon.metrics.snapshot()["raafd_connections_total{transport=http}"] == 2


async def test_max_connections_refuses_with_503_before_upgrade(start_daemon: Any) -> None:
    rd = await start_daemon(server={"max_connections": 2})
    host, port = rd.address.rsplit(":", 1)
    with trio.fail_after(10):
        held = [await trio.open_tcp_stream(host, int(port)) for _ in range(2)]
        await wait_until(lambda: rd.daemon.listener.open_connections == 2)
        extra = await trio.open_tcp_stream(host, int(port))
        await extra.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        answer = b""
        while chunk := await extra.receive_some(4096):
            answer += chunk
        await extra.aclose()
        for stream in held:
            await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 503")
    assert b'"code":"unavailable"' in answer
    refused = rd.daemon.metrics.snapshot()
    assert refused["raafd_connections_refused_total{reason=max_connections}"] == 1
