"""The web chat's routes without a browser: on/off by `http.web_ui` (and by a loopback host when
unset), open without a token when auth is on, the files' headers. The browser tests are in
tests/test_web.py."""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import pytest
import trio

from raafd.config import parse_config
from raafd.http.web import STATIC_FILES, web_ui_enabled


@pytest.mark.parametrize(
    ("web_ui", "host", "on"),
    [
        (None, "127.0.0.1", True),
        (None, "::1", True),
        (None, "0.0.0.0", False),
        (None, "10.1.2.3", False),
        (True, "0.0.0.0", True),
        (False, "127.0.0.1", False),
    ],
)
def test_web_ui_defaults_to_loopback_only(web_ui: bool | None, host: str, on: bool) -> None:
    http = {} if web_ui is None else {"web_ui": web_ui}
    config = parse_config(
        {"server": {"host": host, "allow_public_without_auth": True}, "http": http}, {}
    )
    assert web_ui_enabled(config) is on


async def test_page_and_files_are_open_without_a_token_and_off_when_disabled(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(auth={"tokens": ["t0ken-value"]})
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=rd.base_url) as client:
            page = await client.get("/")
            assert page.status_code == 200
            assert "default-src 'none'" in page.headers["content-security-policy"]
            assert page.headers["x-content-type-options"] == "nosniff"
            for name, content_type in STATIC_FILES.items():
                answer = await client.get(f"/static/{name}")
                assert answer.status_code == 200, name
                assert answer.headers["content-type"] == content_type
                assert answer.headers["cache-control"] == "no-cache"
                again = await client.get(
                    f"/static/{name}", headers={"if-none-match": answer.headers["etag"]}
                )
                assert again.status_code == 304 and again.content == b""
            assert (await client.get("/static/nope.js")).status_code == 404
            assert (await client.get("/v1/agents")).status_code == 401  # the API still needs one
            config = rd.daemon.config
            rd.daemon.reload(attrs.evolve(config, http=attrs.evolve(config.http, web_ui=False)))
            assert (await client.get("/")).status_code == 404
            assert (await client.get("/static/raafd.js")).status_code == 404
