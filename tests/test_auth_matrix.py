"""The auth matrix against a real daemon: every bad token (alg=none, HS/RS confusion, expired,
not yet valid, wrong aud/iss, unknown kid, tampered signature, a query token where it is not
allowed) and a foreign Origin are refused before the upgrade's first command (WebSocket 4401 /
4403, before any `welcome`) and on HTTP (401); good ones resolve to principals whose roles are
enforced (`forbidden`), and the rate limits answer `rate_limited` / 429 and close 4429."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.wsclient import open_ws

HS_SECRET = "matrix-hmac-secret-of-at-least-32-bytes"
ALICE_TOKEN = "alice-static-token-value"
FAST = {"demo": {"tokens_per_second": 2000.0, "reply_words": 4}}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwks(key: rsa.RSAPrivateKey, kid: str) -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="RS256")
    return json.dumps({"keys": [jwk]})


async def _daemon(
    start_daemon: Any, make_config: Any, tmp_path: Path, key: rsa.RSAPrivateKey, **extra: Any
) -> Any:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(_jwks(key, "k1"))
    sections: dict[str, Any] = {
        "providers": FAST,
        "agents": {"secret-agent": {"provider": "demo"}},
        "auth": {
            "users": {"alice": {"token": ALICE_TOKEN, "roles": ["reader"]}},
            "jwt": {
                "idp": {
                    "algorithms": ["RS256"],
                    "jwks_file": str(jwks),
                    "audience": "raafd",
                    "issuer": "https://idp.test",
                },
                "internal": {"algorithms": ["HS256"], "secret_env": "HS"},
            },
            "roles": {
                "reader": {"agents": ["assistant"]},
                "ops": {"agents": ["*"], "admin": True},
            },
            "query_token": False,
        },
        "websocket": {"allowed_origins": ["https://app.test"]},
        **extra,
    }
    environ = {"HS": HS_SECRET}
    return await start_daemon(make_config(environ=environ, **sections), environ=environ)


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "bob", "aud": "raafd", "iss": "https://idp.test", "exp": now + 600, **extra}


def _bad_tokens(key: rsa.RSAPrivateKey) -> dict[str, str]:
    good = _claims()
    body = _b64(json.dumps(good).encode())
    none_header = _b64(b'{"alg":"none","typ":"JWT"}')
    hs_header = _b64(b'{"alg":"HS256","typ":"JWT","kid":"k1"}')
    confusion_mac = hmac.new(
        _pem(key).encode(), f"{hs_header}.{body}".encode(), hashlib.sha256
    ).digest()
    signed = jwt.encode(good, key, algorithm="RS256", headers={"kid": "k1"})
    head, _, signature = signed.split(".")
    now = int(time.time())
    return {
        "alg=none": f"{none_header}.{body}.",
        "HS/RS confusion": f"{hs_header}.{body}.{_b64(confusion_mac)}",
        "expired": jwt.encode(_claims(exp=now - 3600), key, "RS256", headers={"kid": "k1"}),
        "not yet valid": jwt.encode(_claims(nbf=now + 3600), key, "RS256", headers={"kid": "k1"}),
        "wrong aud": jwt.encode(_claims(aud="other"), key, "RS256", headers={"kid": "k1"}),
        "wrong iss": jwt.encode(_claims(iss="https://evil"), key, "RS256", headers={"kid": "k1"}),
        "unknown kid": jwt.encode(good, key, "RS256", headers={"kid": "k9"}),
        "tampered": f"{head}.{_b64(json.dumps(_claims(sub='root')).encode())}.{signature}",
        "wrong static": "alice-static-token-valuE",
    }


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def _closed_before_welcome(url: str, **kwargs: Any) -> int:
    async with open_ws(url, **kwargs) as ws:
        with pytest.raises(ConnectionClosed) as info:
            message = await recv(ws)
            pytest.fail(f"the server answered {message}")  # pragma: no cover
        assert info.value.reason is not None
        return int(info.value.reason.code)


async def test_every_bad_token_and_a_foreign_origin_are_refused_before_any_command(
    start_daemon: Any, make_config: Any, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    rd = await _daemon(start_daemon, make_config, tmp_path, rsa_key)
    bad = _bad_tokens(rsa_key)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            for name, token in bad.items():
                header = [("Authorization", f"Bearer {token}")]
                assert await _closed_before_welcome(rd.ws_url, extra_headers=header) == 4401, name
                answer = await http.get("/v1/agents", headers={"authorization": f"Bearer {token}"})
                assert answer.status_code == 401, name
                assert answer.json()["error"]["code"] == "unauthorized"
                assert token not in answer.text
            # A good token in the query string, where query_token = false.
            good = jwt.encode(_claims(), rsa_key, "RS256", headers={"kid": "k1"})
            assert await _closed_before_welcome(f"{rd.ws_url}?token={good}") == 4401
            answer = await http.get("/v1/agents", params={"token": good})
            assert answer.status_code == 401
            assert "URL" in answer.json()["error"]["message"]
            # A good token from a foreign origin: 4403 (CSWSH), before the token is looked at.
            header = [("Authorization", f"Bearer {good}"), ("Origin", "https://evil.test")]
            assert await _closed_before_welcome(rd.ws_url, extra_headers=header) == 4403
            # A bad token in a hello frame: 4401, no welcome.
            async with open_ws(rd.ws_url) as ws:
                await ws.send_message(json.dumps({"type": "hello", "token": bad["expired"]}))
                with pytest.raises(ConnectionClosed) as info:
                    await recv(ws)
                assert info.value.reason.code == 4401
                assert info.value.reason.reason == "the token has expired"
    failures = rd.daemon.metrics.snapshot()
    assert failures["raafd_auth_failures_total{transport=websocket}"] == len(bad) + 2
    assert failures["raafd_auth_failures_total{transport=http}"] == len(bad) + 1


async def test_good_tokens_are_principals_whose_roles_are_enforced(
    start_daemon: Any, make_config: Any, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    rd = await _daemon(start_daemon, make_config, tmp_path, rsa_key)
    ops = jwt.encode(_claims(sub="carol", roles=["ops"]), rsa_key, "RS256", headers={"kid": "k1"})
    internal = jwt.encode({"sub": "svc", "exp": int(time.time()) + 60}, HS_SECRET, "HS256")
    with trio.fail_after(30):
        headers = [("Authorization", f"Bearer {ALICE_TOKEN}"), ("Origin", "https://app.test")]
        async with open_ws(rd.ws_url, extra_headers=headers) as ws:
            welcome = await recv(ws)
            assert welcome["type"] == "welcome" and welcome["user"] == "alice"
            await ws.send_message(json.dumps({"type": "stream.start", "ref": "a", "input": "x"}))
            assert (await recv(ws))["type"] == "stream.started"  # the default agent: allowed
            await ws.send_message(
                json.dumps(
                    {"type": "stream.start", "ref": "b", "agent": "secret-agent", "input": "x"}
                )
            )
            while (reply := await recv(ws)).get("ref") != "b":
                pass
            assert reply["type"] == "error" and reply["code"] == "forbidden"
            assert reply["field"] == "agent"
        async with open_ws(rd.ws_url) as ws:  # a browser: the token in a hello frame
            await ws.send_message(json.dumps({"type": "hello", "token": internal}))
            assert (await recv(ws))["user"] == "svc"
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            as_alice = {"authorization": f"Bearer {ALICE_TOKEN}"}
            refused = await http.post(
                "/v1/streams", json={"agent": "secret-agent", "input": "x"}, headers=as_alice
            )
            assert refused.status_code == 403 and refused.json()["error"]["field"] == "agent"
            completion = await http.post(
                "/v1/chat/completions",
                json={"model": "secret-agent", "messages": [{"role": "user", "content": "x"}]},
                headers=as_alice,
            )
            assert completion.status_code == 403
            response = await http.post(
                "/v1/responses", json={"model": "secret-agent", "input": "x"}, headers=as_alice
            )
            assert response.status_code == 403
            message = await http.post(
                "/v1/messages",
                json={
                    "model": "secret-agent",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "x"}],
                },
                headers={"x-api-key": ALICE_TOKEN},
            )
            assert message.status_code == 403 and message.json()["type"] == "error"
            assert (await http.get("/v1/stats", headers=as_alice)).status_code == 403
            as_carol = {"authorization": f"Bearer {ops}"}
            assert (await http.get("/v1/stats", headers=as_carol)).status_code == 200
            started = await http.post(
                "/v1/streams", json={"agent": "secret-agent", "input": "x"}, headers=as_carol
            )
            assert started.status_code == 201
    snapshot = rd.daemon.metrics.snapshot()
    assert snapshot["raafd_permission_refusals_total{action=agent.run}"] == 5
    assert snapshot["raafd_permission_refusals_total{action=admin}"] == 1


async def test_a_rotated_jwks_file_is_picked_up_by_a_reload(
    start_daemon: Any, make_config: Any, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    rd = await _daemon(start_daemon, make_config, tmp_path, rsa_key)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rotated = jwt.encode(_claims(), new_key, "RS256", headers={"kid": "k2"})
    async with httpx.AsyncClient(base_url=rd.base_url) as http:
        with trio.fail_after(30):
            auth = {"authorization": f"Bearer {rotated}"}
            assert (await http.get("/v1/agents", headers=auth)).status_code == 401
            (tmp_path / "jwks.json").write_text(_jwks(new_key, "k2"))
            rd.daemon.reload(rd.daemon.config)  # what SIGHUP does after reading the file
            assert (await http.get("/v1/agents", headers=auth)).status_code == 200
            # A JWKS file broken by a reload keeps the running keys.
            (tmp_path / "jwks.json").write_text("{not json")
            from raafd.config import ConfigError

            with pytest.raises(ConfigError) as err:
                rd.daemon.reload(rd.daemon.config)
            assert err.value.problems[0].startswith("auth.jwt.idp: the key does not load")
            assert (await http.get("/v1/agents", headers=auth)).status_code == 200


async def test_rate_limits_answer_rate_limited_then_429_and_close_4429(
    start_daemon: Any, make_config: Any, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    limits = {
        "connection": {"stream_starts": {"rate": 0.001, "burst": 2}},
        "principal": {"stream_starts": {"rate": 0.001, "burst": 3}},
        "hard_limit": 5,
    }
    rd = await _daemon(start_daemon, make_config, tmp_path, rsa_key, limits=limits)
    headers = [("Authorization", f"Bearer {ALICE_TOKEN}"), ("Origin", "https://app.test")]
    with trio.fail_after(30):
        async with open_ws(rd.ws_url, extra_headers=headers) as ws:
            await recv(ws)
            refusals = []
            with pytest.raises(ConnectionClosed) as info:
                for i in range(10):
                    await ws.send_message(
                        json.dumps({"type": "stream.start", "ref": f"s{i}", "input": "x"})
                    )
                    while True:
                        reply = await recv(ws)
                        if reply.get("ref") == f"s{i}":
                            break
                    if reply["type"] == "error":
                        refusals.append(reply)
            assert info.value.reason.code == 4429
            assert len(refusals) == 4  # the 3rd to 6th; the 7th closes (5 in a row)
            assert refusals[0]["code"] == "rate_limited" and refusals[0]["retry_after"] > 0
        # The principal's bucket: 2 taken over WebSocket, one left for HTTP, then 429.
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            auth = {"authorization": f"Bearer {ALICE_TOKEN}"}
            assert (
                await http.post("/v1/streams", json={"input": "x"}, headers=auth)
            ).status_code == 201
            limited = await http.post("/v1/streams", json={"input": "x"}, headers=auth)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"]["code"] == "rate_limited"
    snapshot = rd.daemon.metrics.snapshot()
    assert snapshot["raafd_rate_limited_total{limit=connection.stream_starts}"] == 5
    assert snapshot["raafd_rate_limited_total{limit=principal.stream_starts}"] == 1


async def test_a_principals_running_streams_are_capped_across_connections_and_transports(
    start_daemon: Any, make_config: Any, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    slow = {"demo": {"tokens_per_second": 1.0, "reply_words": 200}}
    rd = await _daemon(
        start_daemon,
        make_config,
        tmp_path,
        rsa_key,
        providers=slow,
        streams={"max_streams_per_principal": 2},
    )
    headers = [("Authorization", f"Bearer {ALICE_TOKEN}"), ("Origin", "https://app.test")]
    as_alice = {"authorization": f"Bearer {ALICE_TOKEN}"}
    carol = jwt.encode(_claims(sub="carol", roles=["ops"]), rsa_key, "RS256", headers={"kid": "k1"})
    start = {"type": "stream.start", "ref": "s", "input": "x"}
    with trio.fail_after(30):
        async with (
            open_ws(rd.ws_url, extra_headers=headers) as first,
            open_ws(rd.ws_url, extra_headers=headers) as second,
            httpx.AsyncClient(base_url=rd.base_url) as http,
        ):
            await recv(first), await recv(second)
            await first.send_message(json.dumps(start))
            assert (await recv(first))["type"] == "stream.started"
            started = await http.post("/v1/streams", json={"input": "x"}, headers=as_alice)
            assert started.status_code == 201
            await second.send_message(json.dumps(start))
            while (reply := await recv(second)).get("ref") != "s":
                pass
            assert reply["type"] == "error" and reply["code"] == "too_many_streams"
            refused = await http.post("/v1/streams", json={"input": "x"}, headers=as_alice)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_streams"
            # Another principal is not held back by alice's streams.
            other = await http.post(
                "/v1/streams", json={"input": "x"}, headers={"authorization": f"Bearer {carol}"}
            )
            assert other.status_code == 201
            # A stream that ends gives its place back.
            stream = started.json()["stream"]
            cancelled = await http.post(f"/v1/streams/{stream}/cancel", headers=as_alice)
            assert cancelled.status_code == 200
            again = await http.post("/v1/streams", json={"input": "x"}, headers=as_alice)
            assert again.status_code == 201
