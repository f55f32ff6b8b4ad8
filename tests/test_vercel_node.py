"""The Vercel AI SDK itself (the ``ai`` npm package, pinned in ``tests/node/package.json``)
against a real daemon: its transport and stream reader, ``useChat``'s chat class with a dropped
connection and ``resumeStream()``, and ``stop()``.

Needs node (18 or later) and the package installed in ``tests/node/node_modules`` (``.ci/run``
does it; so does this module, with ``npm install``, the first time). Without node the tests are
skipped, saying so; without the package and no way to install it, too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.openai_upstream import Script
from tests.test_gateway import start_with_fake

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "ui_chat.mjs"
FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 12}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 40.0, "reply_words": 120}}}
AGENTS = {
    "assistant": {"tools": ["calculator"], "handoffs": ["billing"]},
    "billing": {"instructions": "bills"},
}


def _node_ready() -> str | None:
    """None when the tests can run, else why not."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed (the AI SDK tests need node 18+; .ci/run installs it)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 18:
        return f"node {version.stdout.strip()} is too old for the AI SDK (18+ needed)"
    if not (NODE_DIR / "node_modules" / "ai" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            return "npm is missing, so the pinned `ai` package cannot be installed"
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if installed.returncode != 0:
            return f"`npm install` of the pinned `ai` failed: {installed.stderr.strip()[-300:]}"
    return None


_WHY_NOT = _node_ready()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


async def sdk(scenario: str, rd: Any, chat: str, text: str) -> dict[str, Any]:
    """Run one scenario of ``ui_chat.mjs`` against the daemon; its JSON result."""
    with trio.fail_after(60):
        done = await trio.run_process(
            ["node", str(SCRIPT), scenario, rd.base_url, chat, text],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def terminal(rd: Any, message: dict[str, Any]) -> Any:
    stream = message["metadata"]["stream"]
    event = rd.daemon.streams.get(stream).terminal
    assert event is not None
    return event


async def test_the_sdk_reads_text_tool_parts_and_a_handoff(start_daemon: Any) -> None:
    rd = await start_daemon(agents=AGENTS, **FAST)
    text = '[tool:calculator {"expression": "6*7"}] [handoff:billing] sum it'
    result = await sdk("read", rd, "n1", text)
    message = result["message"]
    assert result["errors"] == []
    end = terminal(rd, message)
    assert end.kind == "complete"
    assert result["text"] == end.fields["final_response"]
    tools = [p for p in message["parts"] if p["type"] == "tool-calculator"]
    assert len(tools) == 1 and tools[0]["state"] == "output-available"
    assert tools[0]["input"] == {"expression": "6*7"} and "42" in str(tools[0]["output"])
    handoffs = [p for p in message["parts"] if p["type"] == "data-handoff"]
    assert handoffs == [
        {"type": "data-handoff", "data": {"from_agent": "assistant", "to_agent": "billing"}}
    ]
    assert message["metadata"]["usage"]["outputTokens"] == end.fields["usage"]["completion_tokens"]


async def test_the_sdk_sees_an_error_mid_stream(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    result = await sdk("read", rd, "n2", "[fail-after:3] x")
    assert result["text"]  # the text before the failure
    assert len(result["errors"]) == 1 and "fail" in result["errors"][0].lower()


async def test_use_chat_resumes_after_a_dropped_connection_by_replay(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    result = await sdk("resumeReplay", rd, "n3", "go")
    assert result["afterDrop"]["status"] == "error"  # the SDK saw the connection drop
    end = terminal(rd, result["message"])
    assert end.kind == "complete"
    assert len(result["afterDrop"]["text"]) < len(result["text"])
    assert result["text"] == end.fields["final_response"]  # no gap, no duplicate
    assert result["assistants"] == 1 and result["status"] == "ready"


async def test_the_sdk_reader_gets_exactly_the_rest_after_the_last_id(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    result = await sdk("resumeRest", rd, "n4", "go")
    end = terminal(rd, result["message"])
    assert end.kind == "complete"
    assert result["text"] == end.fields["final_response"]  # no gap, no duplicate
    assert result["text"].startswith(result["firstText"])
    assert len(result["firstText"]) < len(result["text"])
    # Only the rest came again: no second message start, and nothing seen before the id.
    seq = int(result["lastId"].rpartition(":")[2])
    types = result["restTypes"]
    assert "start" not in types and types[-1] == "finish"
    assert types.count("text-delta") == end.seq - seq - 1  # one per content event left


async def test_stop_cancels_the_run_and_its_upstream_request(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    rd, fake = await start_with_fake(start_daemon, nursery, Script(deltas=2000, interval=0.01))
    result = await sdk("stop", rd, "n5", "go")
    assert result["status"] == "ready" and result["stops"] == [204]
    end = terminal(rd, result["message"])
    assert end.kind == "cancelled" and end.fields["reason"] == "client"
    request = fake.requests[-1]
    with trio.fail_after(5):
        await request.closed.wait()
    assert request.closed_by_client and not request.completed
