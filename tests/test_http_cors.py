"""CORS from `http.cors_origins`: the pure decision, then both HTTP paths applying it (hypercorn
and the raw streaming server), preflights answered before authentication."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from raafd.http.cors import ALLOW_HEADERS, ALLOW_METHODS, EXPOSE_HEADERS, MAX_AGE, CorsAnswer, cors
from tests.rawhttp import Answer, RawClient, request, start_sse

APP = "https://app.example"
EVIL = "https://evil.example"
TOKEN = "s3cret-token-value"
FAST = {"providers": {"demo": {"tokens_per_second": 2000.0, "reply_words": 8}}}
PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type",
}
ALLOWED = {
    "access-control-allow-origin": APP,
    "access-control-allow-credentials": "true",
    "vary": "Origin",
    "access-control-expose-headers": EXPOSE_HEADERS,
}


def test_no_origin_gets_nothing() -> None:
    assert cors(None, "GET", {}, [APP]) == CorsAnswer()
    assert cors(None, "OPTIONS", PREFLIGHT, ["*"]) == CorsAnswer()  # no browser: no preflight


def test_an_allowed_origin_is_echoed_with_credentials_and_exposed_headers() -> None:
    answer = cors(APP, "POST", {"origin": APP}, [EVIL, APP])
    assert answer.preflight is None
    assert dict(answer.headers) == ALLOWED


def test_a_preflight_from_an_allowed_origin_is_answered_204() -> None:
    answer = cors(APP, "OPTIONS", {"origin": APP, **PREFLIGHT}, [APP])
    assert answer.preflight == 204
    assert dict(answer.headers) == {
        "access-control-allow-origin": APP,
        "access-control-allow-credentials": "true",
        "vary": "Origin, Access-Control-Request-Headers",
        "access-control-allow-methods": ALLOW_METHODS,
        "access-control-allow-headers": "authorization, content-type",
        "access-control-max-age": MAX_AGE,
    }
    for name in ("authorization", "content-type", "last-event-id", "accept", "x-api-key"):
        assert name in ALLOW_HEADERS.split(", ")
    # OPTIONS without Access-Control-Request-Method is no preflight: it goes on (405, 401 …).
    plain = cors(APP, "OPTIONS", {"origin": APP}, [APP])
    assert plain.preflight is None and dict(plain.headers) == ALLOWED


def test_a_preflight_gets_the_headers_it_asks_for_when_they_are_header_names() -> None:
    def allowed(asked: str | None) -> str:
        headers = {"origin": APP, "access-control-request-method": "POST"}
        if asked is not None:
            headers["access-control-request-headers"] = asked
        return dict(cors(APP, "OPTIONS", headers, [APP]).headers)["access-control-allow-headers"]

    # What the Anthropic and OpenAI SDKs send from a browser.
    sdk = "X-Api-Key, anthropic-version, content-type, x-stainless-os, x-stainless-retry-count"
    assert allowed(sdk) == sdk.lower()
    assert allowed("x-raafd-agent,x-raafd-agent") == "x-raafd-agent"
    for odd in (None, "", "bad header", "x\r\ny", ",".join(f"x-{n}" for n in range(65))):
        assert allowed(odd) == ALLOW_HEADERS, odd


def test_a_disallowed_origin_gets_no_cors_headers_and_its_preflight_403() -> None:
    for allowed in ([], [APP], [APP.upper()], [APP + ":443"]):
        assert cors(EVIL, "GET", {"origin": EVIL}, allowed) == CorsAnswer()
        assert cors(EVIL, "OPTIONS", {"origin": EVIL, **PREFLIGHT}, allowed) == CorsAnswer(
            preflight=403
        )
    assert cors("null", "GET", {"origin": "null"}, [APP]) == CorsAnswer()


def test_a_wildcard_allows_any_origin_but_never_with_credentials() -> None:
    answer = cors(EVIL, "GET", {"origin": EVIL}, ["*"])
    assert dict(answer.headers) == {
        "access-control-allow-origin": "*",
        "vary": "Origin",
        "access-control-expose-headers": EXPOSE_HEADERS,
    }
    preflight = cors(EVIL, "OPTIONS", {"origin": EVIL, **PREFLIGHT}, ["*"])
    assert preflight.preflight == 204
    assert "access-control-allow-credentials" not in dict(preflight.headers)
    # A name listed beside `*` keeps its own answer.
    assert dict(cors(APP, "GET", {}, ["*", APP]).headers) == ALLOWED


def test_cors_origins_must_be_origins() -> None:
    from raafd.config import ConfigError, parse_config

    parse_config({"http": {"cors_origins": ["*", APP, "http://localhost:3000"]}})
    for bad in (APP + "/", "https://App.example", "app.example", "null", "https://a.example/x"):
        with pytest.raises(ConfigError) as info:
            parse_config({"http": {"cors_origins": [APP, bad]}})
        (line,) = info.value.problems
        assert line.startswith(f"http.cors_origins: {bad!r} is not an origin"), line


def cors_headers(answer: Answer) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


async def test_both_http_paths_apply_it_and_preflights_come_before_auth(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": [TOKEN]}, http={"cors_origins": [APP]})
    auth = {"authorization": f"Bearer {TOKEN}"}
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        # The raw path (a fresh connection's streaming starts, see test_http_raw), and its
        # errors before the head.
        sse = await client.exchange(start_sse("hi", headers={"origin": APP, **auth}))
        assert sse.status == 200 and sse.chunked
        stream = sse.headers["x-raafd-stream"]
        assert {k: sse.headers[k] for k in ALLOWED} == ALLOWED
        refused = await client.exchange(start_sse("hi", headers={"origin": APP}))
        assert refused.status == 401 and {k: refused.headers[k] for k in ALLOWED} == ALLOWED
        evil = await client.exchange(start_sse("hi", headers={"origin": EVIL, **auth}))
        assert evil.status == 200 and cors_headers(evil) == {} and "vary" not in evil.headers

        # Hypercorn (the rest of this connection's life): a preflight with no token is 204 ...
        pre = await client.exchange(
            request("OPTIONS", "/v1/streams", headers={"origin": APP, **PREFLIGHT})
        )
        assert pre.status == 204 and pre.body == b"" and "content-length" not in pre.headers
        assert cors_headers(pre)["access-control-allow-methods"] == ALLOW_METHODS
        assert cors_headers(pre)["access-control-allow-headers"] == "authorization, content-type"
        assert cors_headers(pre)["access-control-max-age"] == MAX_AGE
        assert cors_headers(pre)["access-control-allow-origin"] == APP
        # ... on any path, known or not: it reveals nothing.
        unknown = await client.exchange(
            request("OPTIONS", "/nope", headers={"origin": APP, **PREFLIGHT})
        )
        assert unknown.status == 204 and cors_headers(unknown) == cors_headers(pre)
        # A disallowed origin's preflight: a plain 403, no CORS headers.
        no = await client.exchange(
            request("OPTIONS", "/v1/streams", headers={"origin": EVIL, **PREFLIGHT})
        )
        assert no.status == 403 and cors_headers(no) == {}
        assert no.json() == {
            "error": {
                "code": "forbidden",
                "message": "this origin may not use the API from a browser",
            }
        }
        # Requests: answers (errors too) carry the headers for an allowed origin only.
        status = await client.exchange(
            request("GET", f"/v1/streams/{stream}", headers={"origin": APP, **auth})
        )
        assert status.status == 200 and "content-length" in status.headers
        assert {k: status.headers[k] for k in ALLOWED} == ALLOWED
        missing = await client.exchange(request("GET", "/v1/stats", headers={"origin": APP}))
        assert missing.status == 401 and {k: missing.headers[k] for k in ALLOWED} == ALLOWED
        other = await client.exchange(request("GET", "/v1/stats", headers={"origin": EVIL, **auth}))
        assert other.status == 200 and cors_headers(other) == {}
        replay = await client.exchange(
            request("GET", f"/v1/streams/{stream}/events", headers={"origin": APP, **auth})
        )
        assert replay.status == 200 and {k: replay.headers[k] for k in ALLOWED} == ALLOWED
        await client.aclose()


async def test_without_cors_origins_nothing_changes_and_preflights_are_refused(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        sse = await client.exchange(start_sse("hi", headers={"origin": APP}))
        assert sse.status == 200 and cors_headers(sse) == {}
        pre = await client.exchange(
            request("OPTIONS", "/v1/stats", headers={"origin": APP, **PREFLIGHT})
        )
        assert pre.status == 403 and cors_headers(pre) == {}
        got = await client.exchange(request("GET", "/v1/stats", headers={"origin": APP}))
        assert got.status == 200 and cors_headers(got) == {}
        await client.aclose()


async def test_a_wildcard_daemon_answers_star_without_credentials(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST, http={"cors_origins": ["*"]})
    with trio.fail_after(20):
        client = await RawClient.connect(rd.address)
        sse = await client.exchange(start_sse("hi", headers={"origin": EVIL}))
        assert cors_headers(sse) == {
            "access-control-allow-origin": "*",
            "access-control-expose-headers": EXPOSE_HEADERS,
        }
        pre = await client.exchange(
            request("OPTIONS", "/v1/streams", headers={"origin": EVIL, **PREFLIGHT})
        )
        assert pre.status == 204 and pre.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in pre.headers
        await client.aclose()
