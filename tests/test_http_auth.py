"""Bearer tokens on the HTTP API, on both HTTP paths (hypercorn and the raw streaming server):
refused without a good token, open for probes, /metrics by option, never logged or echoed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from openai import AsyncOpenAI

from raafd.admin.client import admin_call
from raafd.auth import ANONYMOUS, bearer_token, check_http, token_ok
from raafd.config import AuthConfig, Config
from raafd.errors import BadRequest, Unauthorized
from raafd.security.authenticator import build_authenticator
from tests.rawhttp import RawClient, request, start_sse
from tests.sse import sse_events

TOKEN = "s3cret-token-value"
FAST = {"providers": {"demo": {"tokens_per_second": 2000.0, "reply_words": 8}}}
SSE = {"accept": "text/event-stream"}


def refused(response: httpx.Response, message: str) -> bool:
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"error": {"code": "unauthorized", "message": message}}
    assert TOKEN not in response.text and "wrong" not in response.text
    return True


MISSING = "a token is required: send Authorization: Bearer TOKEN (or ?token=TOKEN)"
INVALID = "the token is not valid"


async def closed_endpoints(client: httpx.AsyncClient, stream: str) -> list[httpx.Response]:
    """One request to each kind of endpoint, through both HTTP paths."""
    answers = [
        await client.post("/v1/streams", json={"input": "x"}),  # hypercorn: 201 when allowed
        await client.get("/v1/stats"),
        await client.get("/v1/agents"),
        await client.get(f"/v1/streams/{stream}"),
        await client.post(f"/v1/streams/{stream}/pause"),
        await client.get("/v1/sessions/s1"),
        await client.post("/v1/workflows", json={"mode": "sequential", "agents": ["assistant"]}),
        await client.post("/v1/chat/completions", json={"model": "assistant", "messages": []}),
        await client.get("/v1/models"),
        await client.get("/nope"),  # 401, not 404: nothing about the routes is revealed
        await client.get("/metrics"),
    ]
    # The raw streaming path: SSE and NDJSON starts, and replays.
    for accept in ("text/event-stream", "application/x-ndjson"):
        answers.append(
            await client.post("/v1/streams", json={"input": "x"}, headers={"accept": accept})
        )
        answers.append(await client.get(f"/v1/streams/{stream}/events", headers={"accept": accept}))
    return answers


async def test_missing_or_wrong_token_is_refused_everywhere(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": ["other", TOKEN]})
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            created = await client.post(
                "/v1/streams", json={"input": "x"}, headers={"authorization": f"Bearer {TOKEN}"}
            )
            stream = created.json()["stream"]
            missing = await closed_endpoints(client, stream)
            client.headers["authorization"] = "Bearer wrong"
            wrong_header = await closed_endpoints(client, stream)
            del client.headers["authorization"]
            client.params = httpx.QueryParams({"token": "wrong"})
            wrong_query = await closed_endpoints(client, stream)
            # The header wins over the query: a good query token does not mend a bad header.
            client.params = httpx.QueryParams({"token": TOKEN})
            client.headers["authorization"] = "Bearer wrong"
            both = await client.get("/v1/stats")
    assert all(refused(r, MISSING) for r in missing)
    assert all(refused(r, INVALID) for r in [*wrong_header, *wrong_query, both])
    refusals = len(missing) + len(wrong_header) + len(wrong_query) + 1
    snapshot = rd.daemon.metrics.snapshot()
    assert snapshot["raafd_client_errors_total{code=unauthorized}"] == refusals
    assert rd.daemon.streams.get(stream).info()["status"] != "paused"


async def test_a_good_token_in_the_header_or_the_query_is_accepted(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": ["other", TOKEN]})
    for auth in ({"headers": {"authorization": f"Bearer {TOKEN}"}}, {"params": {"token": TOKEN}}):
        async with httpx.AsyncClient(base_url=rd.base_url, **auth) as client:  # type: ignore[arg-type]
            with trio.fail_after(20):
                answers = await closed_endpoints(client, "st_nope")
                statuses = [r.status_code for r in answers]
                # Past auth: each endpoint answers as it would without auth.
                assert statuses[:3] == [201, 200, 200]
                assert statuses[3:5] == [404, 404]  # st_nope
                assert statuses[9:11] == [404, 200]  # /nope, /metrics
                assert 401 not in statuses
                async with client.stream(
                    "POST", "/v1/streams", json={"input": "hello"}, headers=SSE
                ) as response:
                    assert response.status_code == 200
                    events = [json.loads(e.data) for e in await sse_events(response)]
                assert events[-1]["event"] == "complete"


async def test_probes_are_open_and_metrics_only_by_option(
    start_daemon: Any, make_config: Callable[..., Config]
) -> None:
    rd = await start_daemon(auth={"tokens": [TOKEN]})
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            for metrics_status in (401, 200):
                assert (await client.get("/healthz")).json() == {"status": "ok"}
                assert (await client.head("/healthz")).status_code == 200
                assert (await client.get("/readyz")).json() == {"status": "ready"}
                assert (await client.get("/metrics")).status_code == metrics_status
                # Only GET (and HEAD) of those paths; the rest stays closed.
                assert (await client.post("/healthz")).status_code == 401
                assert (await client.get("/v1/stats")).status_code == 401
                assert (await client.get("/metrics/x")).status_code == 401
                if metrics_status == 401:  # the option is reloadable
                    opened = make_config(auth={"tokens": [TOKEN]}, http={"public_metrics": True})
                    assert rd.daemon.reload(opened)["applied"] == ["http.public_metrics"]


async def test_without_tokens_everything_is_open(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            stream = (await client.post("/v1/streams", json={"input": "x"})).json()["stream"]
            statuses = [r.status_code for r in await closed_endpoints(client, stream)]
    assert 401 not in statuses
    assert statuses[:4] == [201, 200, 200, 200] and statuses[-4:] == [200, 200, 200, 200]


@pytest.mark.filterwarnings(r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning")
async def test_openai_sdk_with_its_bearer_header(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": [TOKEN]})
    with trio.fail_after(20):
        async with AsyncOpenAI(
            base_url=rd.base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=20
        ) as good:
            reply = await good.chat.completions.create(
                model="assistant", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
            chunks = [
                c
                async for c in await good.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            ]
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert [m.id async for m in good.models.list()] == ["assistant"]
        async with AsyncOpenAI(
            base_url=rd.base_url + "/v1", api_key="wrong", max_retries=0, timeout=20
        ) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                await bad.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": "hi"}]
                )
    assert info.value.status_code == 401


async def test_raw_path_refuses_before_reading_too_much_and_keeps_the_connection(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": [TOKEN]}, http={"max_body_bytes": 64})
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        # A refused request with a body in bounds leaves the connection usable...
        answer = await client.exchange(start_sse())
        assert answer.status == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "unauthorized"
        assert "connection" not in answer.headers
        good = await client.exchange(start_sse(headers={"authorization": f"bearer {TOKEN}"}))
        assert good.status == 200 and good.chunked
        replay = f"/v1/streams/{good.headers['x-raafd-stream']}/events?token={TOKEN}"
        assert (await client.exchange(request("GET", replay))).body == good.body
        # ... one over the body limit is refused as unauthorized (not too_large), and closed.
        big = request("POST", "/v1/streams", b"{" + b" " * 100 + b"}", headers=SSE)
        answer = await client.exchange(big)
        assert answer.status == 401 and answer.headers["connection"] == "close"
        assert await client.at_eof()
        await client.aclose()


async def test_tokens_reload_and_are_never_logged(
    start_daemon: Any, make_config: Callable[..., Config], capfd: pytest.CaptureFixture[str]
) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": [TOKEN]})
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            for token in (TOKEN, "wrong-one"):
                headers = {"authorization": f"Bearer {token}"}
                await client.get("/v1/stats", headers=headers)
                await client.get("/v1/stats", params={"token": token})
                await client.post("/v1/streams", json={"input": "x"}, headers=headers | SSE)
                await client.post(
                    "/v1/streams", json={"input": "x"}, params={"token": token}, headers=SSE
                )
            rd.daemon.reload(make_config(**FAST, auth={"tokens": ["fresh"]}))
            assert (await client.get("/v1/stats", params={"token": TOKEN})).status_code == 401
            assert (await client.get("/v1/stats", params={"token": "fresh"})).status_code == 200
            raw = await client.post(
                "/v1/streams", json={"input": "x"}, params={"token": TOKEN}, headers=SSE
            )
            assert raw.status_code == 401
    out, err = capfd.readouterr()
    assert "wrong-one" not in out + err and TOKEN not in out + err
    assert "stream started" in out + err  # the logs were captured


def test_the_shared_token_helpers() -> None:
    assert bearer_token({"authorization": "Bearer  abc "}, {"token": "q"}) == "abc"
    assert bearer_token({"authorization": "BEARER abc"}, {}) == "abc"
    assert bearer_token({"authorization": "Basic abc"}, {"token": "q"}) == "q"
    assert bearer_token({}, {}) is None
    assert token_ok("abc", ["x", "abc"]) and not token_ok("ab", ["abc"])
    assert not token_ok("", ["abc"]) and not token_ok("abc", [])
    off = build_authenticator(AuthConfig())
    on = build_authenticator(AuthConfig(tokens=["the-token"]))
    assert check_http("GET", "/v1/stats", {}, {}, off, public_metrics=False) == ANONYMOUS
    check_http("GET", "/readyz", {}, {}, on, public_metrics=False)
    check_http("GET", "/metrics", {}, {}, on, public_metrics=True)
    with pytest.raises(Unauthorized):
        check_http("GET", "/metrics", {}, {}, on, public_metrics=False)
    with pytest.raises(Unauthorized):
        check_http("DELETE", "/healthz", {}, {}, on, public_metrics=True)
    good = {"authorization": "Bearer the-token"}
    assert check_http("GET", "/v1/stats", good, {}, on, public_metrics=False).user.startswith(
        "token-"
    )


async def test_a_reload_whose_token_source_yields_nothing_keeps_the_old_tokens(
    start_daemon: Any,
    make_config: Callable[..., Config],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    environ = {"RAAFD_TEST_TOKENS": TOKEN}
    config = make_config(**FAST, auth={"tokens_env": "RAAFD_TEST_TOKENS"}, environ=environ)
    rd = await start_daemon(config, environ=environ)
    file = tmp_path / "reload.toml"
    file.write_text('[auth]\ntokens_env = "RAAFD_TEST_TOKENS"\n')
    rd.daemon.config_path = file
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            assert (await client.get("/v1/stats", params={"token": TOKEN})).status_code == 200
            environ["RAAFD_TEST_TOKENS"] = " "  # rotated to nothing by mistake
            with pytest.raises(BadRequest) as info:  # what `raafd ctl reload` reports
                await admin_call(rd.daemon.config.admin_socket_path, "reload")
            assert info.value.message.startswith(
                "configuration rejected: auth.tokens_env: the environment variable"
                " RAAFD_TEST_TOKENS is empty or holds no token"
            )
            assert (await client.get("/v1/stats", params={"token": TOKEN})).status_code == 200
            assert (await client.get("/v1/stats")).status_code == 401  # still closed
            refused_stream = await client.post("/v1/streams", json={"input": "x"}, headers=SSE)
            assert refused_stream.status_code == 401
    out, err = capfd.readouterr()
    (line,) = [line for line in (out + err).splitlines() if "reload rejected" in line]
    assert "warning" in line and "auth.tokens_env" in line
    assert TOKEN not in out + err
