"""One provider request as a whole stream body, with no tools and no handoffs.

Normal streams run the agent loop (:class:`~raafd.agents.runner.AgentLoop`); this is the
single-turn case of it, kept for bodies that want one plain provider answer. It reads the turn
with the loop's own reader (:func:`~raafd.agents.runner.read_turn`: ``content`` and ``retry``
events, tool-call fragments merged, backpressure through ``wait_ready``), then emits one
``tool_call`` per call the model asked for (not run), and ends the stream with ``complete``
{final_response, usage, finish_reason} or ``error`` {upstream_error}. Anything else
propagates: the stream records it as ``error`` {code: internal}.
"""

from __future__ import annotations

from typing import Any

from raafd.agents.runner import read_turn
from raafd.config import BreakerConfig
from raafd.metrics import Metrics
from raafd.providers.base import Provider, ProviderError, ProviderRequest, Usage
from raafd.providers.breaker import Breakers
from raafd.streams.stream import StreamWriter

__all__ = ["run_provider"]


async def run_provider(
    out: StreamWriter,
    provider: Provider,
    request: ProviderRequest,
    *,
    buffer: int,
    metrics: Metrics,
    breakers: Breakers | None = None,
) -> None:
    """Stream ``request`` from ``provider`` into ``out``; ends with ``complete`` or ``error``."""
    try:
        turn = await read_turn(
            out,
            [(provider, request)],
            breakers=Breakers(BreakerConfig()) if breakers is None else breakers,
            metrics=metrics,
            buffer=buffer,
        )
    except ProviderError as failure:
        extra: dict[str, Any] = {}
        if failure.retry_after is not None:
            extra["retry_after"] = failure.retry_after
        await out.emit("error", error={"code": failure.code, "message": failure.message}, **extra)
        return
    calls = turn.calls()
    for call in calls:
        await out.emit(
            "tool_call",
            tool_id=call.id or f"call_{call.index}",
            tool_name=call.name,
            arguments=call.event_arguments(),
        )
    usage = turn.usage or Usage()
    await out.emit(
        "complete",
        final_response=turn.answer,
        usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        finish_reason=turn.finish_reason or ("tool_calls" if calls else "stop"),
    )
