"""Reading SSE responses in tests with httpx, closing httpx's generator chain on early exit
(see raafd.providers.openai.open_body)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from raafd.providers.http import open_body
from raafd.providers.sse import ServerSentEvent, SSEParser

TERMINAL = ("complete", "error", "cancelled")


async def sse_events(response: httpx.Response, limit: int | None = None) -> list[ServerSentEvent]:
    """Events until a terminal one (or ``limit`` events, or the end of the body)."""
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    async with open_body(response) as chunks:
        async for chunk in chunks:
            for event in parser.feed(chunk):
                events.append(event)
                if limit is not None and len(events) >= limit:
                    return events
                if event.event in TERMINAL:
                    return events
    return events


async def stream_to_end(client: httpx.AsyncClient, stream: str) -> list[dict[str, Any]]:
    """Every event of a stream, from seq 1 to its terminal event, as dicts."""
    async with client.stream("GET", f"/v1/streams/{stream}/events") as response:
        return [json.loads(e.data) for e in await sse_events(response)]
