"""Agents through a real daemon: listing, sessions across streams and restarts, breakers."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_upstream import FakeOpenAI, Script
from tests.sse import stream_to_end


async def test_agents_listing_has_no_secrets(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={
            "up": {
                "type": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "model": "m1",
                "api_key_env": "SECRET_KEY_VAR",
                "headers": {"X-Team": "t"},
            }
        },
        agents={"helper": {"provider": "up", "tools": ["clock"], "fallback": ["demo"]}},
    )
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(10):
            body = (await client.get("/v1/agents")).json()
    agents = {a["name"]: a for a in body["agents"]}
    assert agents["assistant"]["default"] is True
    assert agents["helper"] == {
        "name": "helper",
        "provider": "up",
        "model": "m1",
        "tools": ["clock"],
        "handoffs": [],
        "fallback": ["demo"],
        "max_turns": 10,
        "default": False,
    }
    assert "SECRET_KEY_VAR" not in str(body) and "X-Team" not in str(body)


async def _complete(client: httpx.AsyncClient, text: str, session: str) -> dict[str, Any]:
    stream = (await client.post("/v1/streams", json={"input": text, "session": session})).json()
    events = await stream_to_end(client, stream["stream"])
    assert events[-1]["event"] == "complete", events[-1]
    return events[-1]


async def test_session_continues_across_streams_and_a_restart(
    start_daemon: Any, make_config: Any, nursery: trio.Nursery
) -> None:
    fake = FakeOpenAI(default=Script(deltas=3, interval=0.0))
    port = await nursery.start(fake.run)
    config = make_config(
        providers={"up": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1"}},
        agents={"assistant": {"provider": "up"}},
    )
    first = await start_daemon(config)
    async with httpx.AsyncClient(base_url=first.base_url) as client:
        with trio.fail_after(20):
            await _complete(client, "my name is Ada", "s1")
            await _complete(client, "what is my name?", "s1")
    # The second request carried the first turn.
    sent = [m["content"] for m in fake.requests[-1].json["messages"] if m["role"] == "user"]
    assert sent == ["my name is Ada", "what is my name?"]
    first.cancel_scope.cancel()

    second = await start_daemon(config)  # same state directory: a restart
    async with httpx.AsyncClient(base_url=second.base_url) as client:
        with trio.fail_after(20):
            await _complete(client, "and again?", "s1")
            kept = (await client.get("/v1/sessions/s1")).json()["messages"]
    sent = [m["content"] for m in fake.requests[-1].json["messages"] if m["role"] == "user"]
    assert sent == ["my name is Ada", "what is my name?", "and again?"]
    assert [m["role"] for m in kept] == ["user", "assistant"] * 3


async def test_breaker_opens_and_shows_in_stats_and_metrics(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={
            "down": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0},
        },
        agents={"assistant": {"provider": "down", "fallback": ["demo"]}},
        breaker={"failure_threshold": 2, "cooldown": 600.0},
    )
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            for _ in range(3):
                event = await _complete(client, "hello", f"x{_}")
                assert event["final_response"].startswith("hello")  # answered by the fallback
            stats = (await client.get("/v1/stats")).json()
            metrics = (await client.get("/metrics")).text
    assert stats["breakers"]["down"]["state"] == "open"
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    (sample,) = [
        s for s in families["raafd_breaker_state"].samples if s.labels["provider"] == "down"
    ]
    assert sample.value == 2


async def test_reload_reaches_the_agent_loop_breakers_and_sessions(
    start_daemon: Any, make_config: Any
) -> None:
    rd = await start_daemon()
    new = make_config(
        agents={"poet": {"provider": "demo", "instructions": "Rhyme."}},
        breaker={"failure_threshold": 2},
        sessions={"max_messages": 10},
    )
    report = rd.daemon.reload(new)
    assert "agents.poet" in report["applied"] or "agents" in report["applied"]
    assert rd.daemon.breakers.config.failure_threshold == 2
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            created = await client.post("/v1/streams", json={"input": "hi", "agent": "poet"})
            assert created.status_code == 201
            events = await stream_to_end(client, created.json()["stream"])
    assert events[0]["agent"] == "poet"
    assert events[-1]["event"] == "complete", events[-1]
