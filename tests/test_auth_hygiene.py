"""Error and log hygiene: a run that uses every kind of secret (static tokens, a named user's
token, a JWT HMAC secret, an upstream API key an upstream echoes back) leaves none of them in
any log line or client-visible error; audit lines (JSON) record the auth failures, permission
refusals, admin actions and config reloads."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import structlog
import trio

from raafd.admin.client import admin_call
from raafd.logging import configure_logging, set_level
from tests.fakes.openai_upstream import FakeOpenAI, Script
from tests.wsclient import open_ws

STATIC = "static-secret-token-123"
ALICE = "alice-secret-token-456"
HS = "hmac-secret-for-jwts-of-32-bytes-or-more"
API_KEY = "sk-upstream-secret-789"
SECRETS = (STATIC, ALICE, HS, API_KEY)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """structlog configured as ``raafd serve`` does (JSON, debug), into a buffer; the test
    process's defaults come back afterwards."""
    out = io.StringIO()
    configure_logging("debug", "json", out)
    yield out
    structlog.reset_defaults()
    set_level("info")


async def test_no_secret_reaches_a_log_line_or_a_client_and_audit_lines_are_json(
    start_daemon: Any,
    make_config: Any,
    nursery: trio.Nursery,
    capfd: pytest.CaptureFixture[str],
    log_output: io.StringIO,
) -> None:
    fake = FakeOpenAI(default=Script(status=401, error_message="bad key", echo_authorization=True))
    port = await nursery.start(fake.run)
    environ = {"UPKEY": API_KEY, "HS": HS, "ALICE": ALICE}
    sections: dict[str, Any] = {
        "providers": {
            "up": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{port}/v1",
                "api_key_env": "UPKEY",
                "max_retries": 0,
            }
        },
        "agents": {"assistant": {"provider": "up"}, "locked": {"provider": "demo"}},
        "auth": {
            "tokens": [STATIC],
            "users": {"alice": {"token_env": "ALICE", "roles": ["user"]}},
            "jwt": {"svc": {"algorithms": ["HS256"], "secret_env": "HS"}},
            "roles": {"user": {"agents": ["assistant"]}},
            "default_roles": ["user"],
        },
    }
    rd = await start_daemon(make_config(environ=environ, **sections), environ=environ)
    seen: list[str] = []
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            for near_miss in (STATIC + "x", ALICE[:-1], "Bearer " + HS):
                answer = await http.get(
                    "/v1/agents", headers={"authorization": f"Bearer {near_miss}"}
                )
                seen.append(answer.text)
                answer = await http.get("/v1/agents", params={"token": near_miss})
                seen.append(answer.text)
            forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, HS + "!", "HS256")
            seen.append(
                (await http.get("/v1/agents", headers={"authorization": f"Bearer {forged}"})).text
            )
            # Good tokens, in the header and in the query (URLs end up in logs).
            seen.append((await http.get("/v1/agents", params={"token": STATIC})).text)
            answer = await http.post(
                "/v1/streams",
                json={"input": "hi"},
                headers={"authorization": f"Bearer {ALICE}", "accept": "application/x-ndjson"},
            )
            seen.append(answer.text)
            assert "upstream" in answer.text  # the upstream's error reached the client …
            assert "[redacted]" in answer.text  # … with the echoed key taken out
            refused = await http.post(
                "/v1/streams",
                json={"agent": "locked", "input": "x"},
                headers={"authorization": f"Bearer {ALICE}"},
            )
            assert refused.status_code == 403
        async with open_ws(f"{rd.ws_url}?token={STATIC}") as ws:
            welcome = json.loads(await ws.get_message())
            assert welcome["user"].startswith("token-")
            await ws.send_message(json.dumps({"type": "stream.start", "input": "x", "ref": "r"}))
            while True:
                message = json.loads(await ws.get_message())
                seen.append(json.dumps(message))
                if message.get("event") in ("error", "complete"):
                    break
        await admin_call(rd.daemon.config.admin_socket_path, "log-level", {"level": "warning"})
        rd.daemon.reload(rd.daemon.config)
    out, err = capfd.readouterr()
    logs = log_output.getvalue() + out + err
    for secret in SECRETS:
        assert secret not in logs, secret
        for text in seen:
            assert secret not in text, (secret, text)
    audit = [json.loads(line) for line in logs.splitlines() if '"audit": true' in line]
    events = {line["event"] for line in audit}
    assert {
        "authentication failed",
        "permission refused",
        "admin command",
        "configuration reloaded",
    } <= events
    refusal = next(line for line in audit if line["event"] == "permission refused")
    assert refusal["user"] == "alice" and refusal["resource"] == "locked"
    # Written at level warning too: the reload came after log-level warning.
    assert any(line["event"] == "configuration reloaded" for line in audit)


def test_the_redaction_covers_text_fields_nested_values_tracebacks_and_client_errors(
    log_output: io.StringIO,
) -> None:
    from raafd.errors import UpstreamError
    from raafd.logging import get_logger, set_secrets

    out = log_output
    set_secrets({API_KEY, STATIC, "short"})
    try:
        log = get_logger("raafd.test")
        log.info(f"upstream said {API_KEY}", detail={"nested": [f"x{STATIC}y"]}, prompt_tokens=3)
        log.info("headers", authorization="Bearer anything", api_key_env="UPKEY")
        try:
            raise ValueError(f"key {API_KEY}")
        except ValueError:
            log.exception("failed")
        body = UpstreamError(f"Incorrect API key provided: {API_KEY}").to_dict()
    finally:
        set_secrets(set())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert API_KEY not in out.getvalue() and STATIC not in out.getvalue()
    assert lines[0]["event"] == "upstream said [redacted]"
    assert lines[0]["detail"] == {"nested": ["x[redacted]y"]} and lines[0]["prompt_tokens"] == 3
    assert lines[1]["authorization"] == "[redacted]" and lines[1]["api_key_env"] == "UPKEY"
    assert "ValueError: key [redacted]" in lines[2]["exception"]
    assert body["message"] == "Incorrect API key provided: [redacted]"
    assert "short" in UpstreamError("short words stay").to_dict()["message"]  # under 6 chars
