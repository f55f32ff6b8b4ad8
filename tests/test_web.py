"""The built-in web chat and raafd.js in a real Chromium (Debian's, driven by playwright), against
a real `raafd serve`. Skipped, saying why, when playwright or chromium is missing (`make test`
and `.ci/run` install chromium when they can). A screenshot per test goes to test-artifacts/.

Everything waits on what the page shows (playwright's own waiting, with absolute timeouts),
never on fixed sleeps."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install '.[test]')"
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
RAAFD = [sys.executable, "-m", "raafd.cli"]
CHROMIUM = os.environ.get("RAAFD_CHROMIUM") or shutil.which("chromium") or ""

# Assertions wait as long as the rest (playwright's default is 5 s; a loaded machine needs more).
playwright_api.expect.set_options(timeout=20_000)

pytestmark = pytest.mark.skipif(
    not CHROMIUM, reason="no chromium on this machine (apt-get install chromium, or RAAFD_CHROMIUM)"
)

CONFIG = """
default_agent = "assistant"
[server]
port = {port}
shutdown_grace = 1.0
[state]
dir = "{tmp}/var"
[admin]
socket = "{tmp}/admin.sock"
[logging]
level = "warning"
[providers.demo]
type = "demo"
tokens_per_second = 40
reply_words = 30
[agents.assistant]
provider = "demo"
tools = ["calculator"]
handoffs = ["expert"]
[agents.expert]
provider = "demo"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        (tmp / "raafd.toml").write_text(CONFIG.format(port=self.port, tmp=tmp) + extra)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAAFD_CONFIG", None)
        self.log = (tmp / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [*RAAFD, "serve", "--config", str(tmp / "raafd.toml")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 60  # a loaded machine imports slowly
        while True:
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        "raafd did not start:\n" + (tmp / "stderr.log").read_text()
                    ) from None
                time.sleep(0.05)

    def ctl(self, *args: str) -> Any:
        out = subprocess.run(
            [*RAAFD, "ctl", "--socket", str(self.tmp / "admin.sock"), *args, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)

    def events(self, stream: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.base}/v1/streams/{stream}/events?after=0",
            headers={"accept": "application/x-ndjson"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            lines = answer.read().decode().splitlines()
        return [e for e in map(json.loads, lines) if e.get("event") != "heartbeat"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("web"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, served: Served, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(served.base + "/")
    tab.wait_for_selector("#connection:has-text('connected')")
    try:
        yield tab
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        context.close()
    assert errors == [], errors


def _send(page: Any, text: str) -> Any:
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator("#log li.reply").last
    reply.wait_for()
    return reply


def _wait_for_text(reply: Any, chars: int) -> None:
    """Until the reply shows at least ``chars`` characters (the page's CSP forbids the string
    evaluation wait_for_function needs, so this uses a locator assertion)."""
    playwright_api.expect(reply.locator(".text")).to_have_text(re.compile(f"[\\s\\S]{{{chars},}}"))


def _text(reply: Any) -> str:
    return str(reply.locator(".text").text_content())


def _streamed_text(served: Served, stream: str) -> str:
    return "".join(e.get("delta", "") for e in served.events(stream) if e["event"] == "content")


def test_a_reply_streams_token_by_token_and_completes(page: Any, served: Served) -> None:
    reply = _send(page, "hello there")
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while not reply.locator(".status").count():  # observe the text while it grows
        text = _text(reply)
        if not seen or text != seen[-1]:
            seen.append(text)
        assert time.monotonic() < deadline, f"no terminal event; seen {seen}"
        page.wait_for_timeout(25)
    growing = [t for t in seen if t]
    assert len(growing) >= 3, f"the text did not grow progressively: {seen}"
    assert all(a != b and b.startswith(a) for a, b in itertools.pairwise(growing))
    reply.locator(".status-complete").wait_for()
    assert "tokens" in str(reply.locator(".meta").text_content())
    stream = reply.get_attribute("data-stream")
    assert _text(reply) == _streamed_text(served, stream)
    assert reply.locator(".text").get_attribute("aria-busy") == "false"


def test_stop_cancels_the_reply(page: Any) -> None:
    reply = _send(page, "a long one [words:400]")
    _wait_for_text(reply, 20)
    page.click("#stop")
    reply.locator(".status-cancelled").wait_for()
    assert "cancelled (client)" in str(reply.locator(".meta").text_content())
    assert page.locator("#stop").is_disabled()


def test_tool_calls_and_handoffs_show_as_badges(page: Any) -> None:
    reply = _send(page, 'sum [tool:calculator {"expression": "2+3"}]')
    reply.locator(".status-complete").wait_for()
    assert reply.locator(".badge.tool-call").text_content() == "tool call: calculator"
    reply.locator(".badge.tool-result").wait_for()
    reply = _send(page, "ask the expert [handoff:expert]")
    reply.locator(".status-complete").wait_for()
    assert "assistant → expert" in str(reply.locator(".badge.handoff").text_content())


def test_a_kicked_connection_reconnects_and_the_reply_completes_exactly(
    page: Any, served: Served
) -> None:
    sockets: list[Any] = []
    page.on("websocket", lambda ws: sockets.append(ws))  # the page's connections from now on
    # Record every time the banner shows (it may show for a few milliseconds only).
    page.evaluate(
        """() => { window.__banner = 0; const b = document.getElementById("banner");
        new MutationObserver(() => { if (!b.hidden) window.__banner += 1; })
            .observe(b, {attributes: true}); }"""
    )
    reply = _send(page, "survive a kick [words:120]")
    _wait_for_text(reply, 30)
    stream = reply.get_attribute("data-stream")
    conns = [c["conn"] for c in served.ctl("connections") if stream in c["streams"]]
    assert len(conns) == 1, conns
    served.ctl("kick", conns[0])
    reply.locator(".status-complete").wait_for(timeout=30_000)
    assert page.evaluate("window.__banner") >= 1  # the banner showed during the reconnect
    assert page.locator("#banner").is_hidden()  # and cleared once the stream resumed
    assert sockets  # it reconnected (more than once if a first attempt failed under load)
    # Every token exactly once: the page's text is the stream's, no gap, no repeat.
    assert _text(reply) == _streamed_text(served, stream)


def test_markup_from_an_agent_is_shown_as_text(page: Any) -> None:
    attack = '<img src=x onerror="window.__raafd_xss=1"><b>bold</b>'
    reply = _send(page, attack)  # the demo agent echoes the message back
    reply.locator(".status-complete").wait_for()
    assert attack in _text(reply)
    assert page.locator("#log img").count() == 0
    assert page.locator("#log b").count() == 0
    assert page.evaluate("window.__raafd_xss") is None


def test_the_page_and_module_are_served_with_their_headers(served: Served) -> None:
    with urllib.request.urlopen(served.base + "/", timeout=10) as answer:
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert answer.headers["content-type"] == "text/html; charset=utf-8"
        assert b"<noscript>" in answer.read()
    with urllib.request.urlopen(served.base + "/static/raafd.js", timeout=10) as answer:
        assert answer.headers["content-type"] == "text/javascript; charset=utf-8"
        assert answer.headers["cache-control"] == "no-cache"
        etag = answer.headers["etag"]
    again = urllib.request.Request(
        served.base + "/static/raafd.js", headers={"if-none-match": etag}
    )
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(again, timeout=10)
    not_modified.value.close()
    assert not_modified.value.code == 304


ALICE, BOB = "alice-secret-token", "bob-secret-token"
ROOMS = """
[auth]
tokens = ["{alice}", "{bob}"]
[rooms.lobby]
title = "Lobby"
agent = "assistant"
"""


@pytest.fixture(scope="module")
def served_rooms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("rooms"), ROOMS.format(alice=ALICE, bob=BOB))
    try:
        yield server
    finally:
        server.stop()


def _signed_in(browser: Any, served: Served, token: str) -> tuple[Any, Any]:
    context = browser.new_context()
    context.set_default_timeout(20_000)
    tab = context.new_page()
    tab.goto(served.base + "/")
    tab.locator("#auth").wait_for()  # auth is on: the page asks for a token
    tab.fill("#token", token)
    tab.press("#token", "Enter")
    tab.wait_for_selector("#connection:has-text('connected as token-')")
    tab.fill("#room-name", "lobby")
    tab.press("#room-name", "Enter")
    tab.locator("#room-title:has-text('lobby')").wait_for()
    return context, tab


def test_two_browsers_in_a_room_see_messages_members_typing_and_the_agent(
    browser: Any, served_rooms: Served, request: pytest.FixtureRequest
) -> None:
    alice_ctx, alice = _signed_in(browser, served_rooms, ALICE)
    bob_ctx, bob = _signed_in(browser, served_rooms, BOB)
    try:
        alice_user = alice.locator("#connection").text_content().split()[-1]
        bob_user = bob.locator("#connection").text_content().split()[-1]
        # Presence: each sees the other as an online member.
        alice.locator(f"#members li[data-user='{bob_user}'][data-status='online']").wait_for()
        bob.locator(f"#members li[data-user='{alice_user}'][data-status='online']").wait_for()
        # Typing: Bob types, Alice sees it (and it is never echoed to Bob).
        bob.type("#room-input", "hel")
        alice.locator("#typing", has_text=f"{bob_user} is typing").wait_for()
        assert bob.locator("#typing").text_content() == ""
        # Messages both ways, each shown once on both pages.
        bob.fill("#room-input", "hello from <b>bob</b>")
        bob.press("#room-input", "Enter")
        for tab in (alice, bob):
            tab.locator("#room-log li.room-message .text").get_by_text(
                "hello from <b>bob</b>", exact=True
            ).wait_for()
            assert tab.locator("#room-log b").count() == 0
        alice.fill("#room-input", "hi bob, ask @assistant")
        alice.press("#room-input", "Enter")
        # The room's agent answers the mention: both pages see its reply stored as a message.
        for tab in (alice, bob):
            tab.locator("#room-log li.room-message .text").get_by_text(
                "hi bob, ask @assistant", exact=True
            ).wait_for()
            tab.locator("#room-log li.room-message .who", has_text="agent:assistant").wait_for(
                timeout=30_000
            )
            texts = tab.locator("#room-log li.room-message .text").all_text_contents()
            assert texts.count("hello from <b>bob</b>") == 1
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        for name, tab in (("alice", alice), ("bob", bob)):
            tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{name}.png"), full_page=True)
        alice_ctx.close()
        bob_ctx.close()
