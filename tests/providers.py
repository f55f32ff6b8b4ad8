"""Helpers shared by the provider tests: run a provider into a bounded channel, with or
without the retry wrapper, and read what it sent."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from raafd.metrics import Metrics
from raafd.providers.base import Delta, Provider, ProviderError, ProviderEvent, ProviderRequest
from raafd.providers.retry import stream_with_retry

Send = trio.MemorySendChannel[ProviderEvent]


async def run_stream(
    stream: Callable[[Send], Awaitable[None]], *, limit: float = 30
) -> tuple[list[ProviderEvent], ProviderError | None]:
    """Run a provider into a bounded channel with a consumer task; the events and the error."""
    events: list[ProviderEvent] = []
    error: ProviderError | None = None
    send, recv = trio.open_memory_channel[ProviderEvent](4)

    async def consume() -> None:
        async with recv:
            async for event in recv:
                events.append(event)

    try:
        with trio.fail_after(limit):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                async with send:
                    await stream(send)
    except* ProviderError as group:
        assert len(group.exceptions) == 1
        first = group.exceptions[0]
        assert isinstance(first, ProviderError)
        error = first
    return events, error


def retrying(
    provider: Provider,
    request: ProviderRequest,
    *,
    base: float,
    metrics: Metrics | None = None,
    **kw: Any,
) -> Callable[[Send], Awaitable[None]]:
    """``stream_with_retry`` over ``provider`` with test defaults (3 retries, seeded jitter)."""
    options: dict[str, Any] = {
        "max_retries": 3,
        "base": base,
        "cap": 10.0,
        "metrics": metrics,
        "rng": random.Random(7),
    }
    options.update(kw)
    return partial(stream_with_retry, provider, request, **options)


def content_deltas(events: list[ProviderEvent]) -> list[Delta]:
    return [e for e in events if isinstance(e, Delta) and (e.text or e.tool_calls)]


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


async def receive_text(recv: trio.MemoryReceiveChannel[ProviderEvent], text: str) -> None:
    """Receive deltas until their texts make ``text``: the deltas of one upstream read come
    joined, so a test waits for text, not for a number of deltas."""
    received = ""
    while received != text:
        event = await recv.receive()
        assert isinstance(event, Delta), event
        received += event.text
        assert text.startswith(received), received


def merged_calls(events: list[ProviderEvent]) -> dict[int, dict[str, Any]]:
    """Tool-call fragments merged by index, as a consumer does."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in content_deltas(events):
        for part in delta.tool_calls:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] = part.name or call["name"]
            call["arguments"] += part.arguments
    return calls
