"""The demo provider: no network, deterministic, always available.

It answers with an echo of the last user message followed by ``reply_words`` generated words,
at ``tokens_per_second`` (one word per delta), after ``first_token_delay``, with optional
``jitter`` (a fraction of the token interval, from a seeded RNG so runs repeat).

Cues in the last user message drive it, for tests, examples and benchmarks:

- ``[tool:NAME {json}]``: emit a tool call to NAME with those arguments instead of text;
- ``[fail]``: fail before the first token (a retryable upstream error);
- ``[fail-after:N]``: fail after N words;
- ``[words:N]``: reply with N generated words instead of ``reply_words``.
"""

from __future__ import annotations

import random
import re
from typing import Any

import trio

from raafd.config import ProviderConfig
from raafd.providers.base import (
    Delta,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ToolCallDelta,
    Usage,
)

__all__ = ["DemoProvider"]

_WORDS = [
    "streams",
    "tokens",
    "arrive",
    "in",
    "order",
    "with",
    "sequence",
    "numbers",
    "so",
    "a",
    "client",
    "that",
    "drops",
    "can",
    "resume",
    "exactly",
    "where",
    "it",
    "left",
    "off",
    "while",
    "the",
    "daemon",
    "keeps",
    "every",
    "buffer",
    "bounded",
    "and",
    "every",
    "task",
    "owned",
]
_TOOL_CUE = re.compile(r"\[tool:(\w+)\s*(\{.*?\})?\]")
_FAIL_AFTER_CUE = re.compile(r"\[fail-after:(\d+)\]")
_WORDS_CUE = re.compile(r"\[words:(\d+)\]")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class DemoProvider:
    """See the module docstring."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        cfg = self.config
        text = _last_user_text(request.messages)
        rng = random.Random(cfg.seed)
        interval = 1.0 / cfg.tokens_per_second
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request.messages)

        if "[fail]" in text:
            await trio.sleep(cfg.first_token_delay)
            raise ProviderError("demo provider asked to fail", retryable=True, status=503)
        fail_after = _FAIL_AFTER_CUE.search(text)
        words_cue = _WORDS_CUE.search(text)
        n_words = int(words_cue.group(1)) if words_cue else cfg.reply_words
        tool = _TOOL_CUE.search(text)

        await trio.sleep(cfg.first_token_delay)
        if tool:
            args = tool.group(2) or "{}"
            half = len(args) // 2
            await send.send(
                Delta(tool_calls=(ToolCallDelta(0, "call_demo_0", tool.group(1), args[:half]),))
            )
            await send.send(Delta(tool_calls=(ToolCallDelta(0, arguments=args[half:]),)))
            await send.send(Delta(usage=Usage(prompt_tokens, 2), finish_reason="tool_calls"))
            return

        clean = _WORDS_CUE.sub("", _FAIL_AFTER_CUE.sub("", text)).strip()
        words = [
            *(clean.split() if clean else []),
            *(_WORDS[i % len(_WORDS)] for i in range(n_words)),
        ]
        next_at = trio.current_time()
        for i, word in enumerate(words):
            if fail_after and i == int(fail_after.group(1)):
                raise ProviderError("demo provider failed mid-stream", status=500)
            await send.send(Delta(text=word if i == 0 else " " + word))
            next_at += interval * (1.0 + cfg.jitter * (2 * rng.random() - 1))
            await trio.sleep_until(next_at)
        await send.send(Delta(usage=Usage(prompt_tokens, len(words)), finish_reason="stop"))
