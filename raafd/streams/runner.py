"""Run one provider request and turn its output into stream events.

This is a stream's *body* (see :data:`raafd.streams.stream.Body`): it knows the provider
interface and the event schema, and nothing about subscribers, timers or control, which the
:class:`~raafd.streams.stream.Stream` around it owns. The agent loop (tools, handoffs) will
replace it behind the same :class:`~raafd.streams.stream.StreamWriter`.

The mapping:

- ``Delta.text`` → ``content`` {delta};
- tool-call fragments, merged by index → one ``tool_call`` {tool_id, tool_name, arguments} per
  call when the answer finishes (``arguments`` is the parsed JSON object, or {"_raw": text}
  when the text is not a JSON object);
- ``RetryNotice`` → ``retry`` {attempt, reason, retry_after};
- the end of the answer → ``complete`` {final_response, usage, finish_reason};
- :class:`~raafd.providers.base.ProviderError` → ``error`` {error: {code: upstream_error,
  message}}. Anything else propagates: the stream records it as ``error`` {code: internal}.

The provider runs in this function's nursery and sends into a memory channel of ``buffer``
items; the loop here reads it only when the writer is ready, so a paused stream or a slow
single subscriber fills the channel and blocks the provider (backpressure up to the upstream).
"""

from __future__ import annotations

from typing import Any

import orjson
import trio
from attrs import define, field

from raafd.metrics import Metrics
from raafd.providers.base import (
    Delta,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    Usage,
)
from raafd.providers.retry import stream_with_retry
from raafd.streams.stream import StreamWriter

__all__ = ["run_provider"]


@define
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(factory=list)

    def parsed_arguments(self) -> dict[str, Any]:
        text = "".join(self.arguments)
        if not text.strip():
            return {}
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return {"_raw": text}
        return value if isinstance(value, dict) else {"_raw": text}


@define
class _Answer:
    """What the upstream said so far, besides the events already emitted."""

    text: list[str] = field(factory=list)
    tool_calls: dict[int, _ToolCall] = field(factory=dict)
    usage: Usage | None = None
    finish_reason: str | None = None


async def run_provider(
    out: StreamWriter,
    provider: Provider,
    request: ProviderRequest,
    *,
    buffer: int,
    metrics: Metrics,
) -> None:
    """Stream ``request`` from ``provider`` into ``out``; ends with ``complete`` or ``error``."""
    send, receive = trio.open_memory_channel[ProviderEvent](buffer)
    answer = _Answer()
    failures: list[ProviderError] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_produce, provider, request, send, metrics)
            async with receive:
                while True:
                    await out.wait_ready()
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        break
                    if isinstance(item, RetryNotice):
                        await out.emit(
                            "retry",
                            attempt=item.attempt,
                            reason=item.reason,
                            retry_after=item.retry_after,
                        )
                    else:
                        await _take(out, answer, item)
    except* ProviderError as group:
        failures.extend(_leaves(group))
    if failures:
        failure = failures[0]  # counted in upstream_errors by stream_with_retry
        error: dict[str, Any] = {"code": "upstream_error", "message": failure.message}
        extra: dict[str, Any] = {}
        if failure.retry_after is not None:
            extra["retry_after"] = failure.retry_after
        await out.emit("error", error=error, **extra)
        return
    for index in sorted(answer.tool_calls):
        call = answer.tool_calls[index]
        await out.emit(
            "tool_call",
            tool_id=call.id or f"call_{index}",
            tool_name=call.name,
            arguments=call.parsed_arguments(),
        )
    usage = answer.usage or Usage()
    await out.emit(
        "complete",
        final_response="".join(answer.text),
        usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        finish_reason=answer.finish_reason or ("tool_calls" if answer.tool_calls else "stop"),
    )


async def _produce(
    provider: Provider,
    request: ProviderRequest,
    send: trio.MemorySendChannel[ProviderEvent],
    metrics: Metrics,
) -> None:
    cfg = provider.config
    async with send:  # closing it is how the reader learns the answer is complete
        await stream_with_retry(
            provider,
            request,
            send,
            max_retries=cfg.max_retries,
            base=cfg.retry_base,
            cap=cfg.retry_max,
            metrics=metrics,
        )


async def _take(out: StreamWriter, answer: _Answer, delta: Delta) -> None:
    if delta.tool_calls:
        out.progress()
        for fragment in delta.tool_calls:
            call = answer.tool_calls.setdefault(fragment.index, _ToolCall())
            if fragment.id:
                call.id = fragment.id
            if fragment.name:
                call.name = fragment.name
            if fragment.arguments:
                call.arguments.append(fragment.arguments)
    if delta.usage is not None:
        answer.usage = delta.usage
    if delta.finish_reason is not None:
        answer.finish_reason = delta.finish_reason
    if delta.text:
        answer.text.append(delta.text)
        await out.emit("content", delta=delta.text)


def _leaves(group: BaseExceptionGroup[ProviderError]) -> list[ProviderError]:
    found: list[ProviderError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found
