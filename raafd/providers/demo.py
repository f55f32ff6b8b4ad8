"""The demo provider: no network, deterministic, always available.

It answers with an echo of the last user message followed by ``reply_words`` generated words,
at ``tokens_per_second`` (one word per delta), after ``first_token_delay``, with optional
``jitter`` (a fraction of the token interval, from a seeded RNG so runs repeat).

Cues in the last user message drive it, for tests, examples and benchmarks:

- ``[tool:NAME {json}]``: call the tool NAME with those arguments instead of answering;
- ``[handoff:NAME]``: call ``transfer_to_NAME`` (hand the conversation to agent NAME);
- ``[fail]``: fail before the first token (a retryable upstream error);
- ``[fail-after:N]``: fail after N words;
- ``[words:N]``: reply with N generated words instead of ``reply_words``.

A tool or handoff cue is acted on only when the request offers that function (otherwise the
cue is just text), and each cue at most once after the user spoke: every cue still open is
called in one turn (so several tool cues make parallel calls). Once the cues are spent, the
answer reads back the tool results given since the user spoke ("The tool said: ..."); after a
handoff alone, the new agent answers the user's message as usual. So an agent loop always ends.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

import trio

from raafd.config import ProviderConfig
from raafd.providers.base import (
    Delta,
    ProviderError,
    ProviderRequest,
    Sink,
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
_HANDOFF_CUE = re.compile(r"\[handoff:([\w.-]+)\]")
_FAIL_AFTER_CUE = re.compile(r"\[fail-after:(\d+)\]")
_WORDS_CUE = re.compile(r"\[words:(\d+)\]")


HANDOFF_PREFIX = "transfer_to_"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _last_user(messages: list[dict[str, Any]]) -> int:
    """The index of the last user message (-1 when there is none)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return -1


def _offered(request: ProviderRequest) -> set[str]:
    names = set()
    for tool in request.tools:
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


class _Since:
    """What happened after the user spoke: calls made (by name) and results given."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.called: Counter[str] = Counter()
        self.turns = 0
        names: dict[str, str] = {}
        self.results: list[str] = []
        for message in messages:
            if message.get("role") == "assistant":
                self.turns += 1
                calls = message.get("tool_calls")
                for call in calls if isinstance(calls, list) else []:
                    function = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(function, dict):
                        continue
                    name = str(function.get("name", ""))
                    self.called[name] += 1
                    names[str(call.get("id", ""))] = name
            elif message.get("role") == "tool":
                name = names.get(str(message.get("tool_call_id", "")), "")
                if not name.startswith(HANDOFF_PREFIX):
                    self.results.append(_text(message.get("content")))


def _open_cues(text: str, offered: set[str], called: Counter[str]) -> list[tuple[str, str]]:
    """The cued calls (name, arguments JSON) offered and not yet made since the user spoke."""
    cues: list[tuple[int, str, str]] = []
    for m in _TOOL_CUE.finditer(text):
        cues.append((m.start(), m.group(1), m.group(2) or "{}"))
    for m in _HANDOFF_CUE.finditer(text):
        cues.append((m.start(), HANDOFF_PREFIX + m.group(1), "{}"))
    seen: Counter[str] = Counter()
    calls = []
    for _, name, args in sorted(cues):
        seen[name] += 1
        if name in offered and seen[name] > called[name]:
            calls.append((name, args))
    return calls


def _clean(text: str) -> str:
    for cue in (_TOOL_CUE, _HANDOFF_CUE, _WORDS_CUE, _FAIL_AFTER_CUE):
        text = cue.sub("", text)
    return " ".join(text.split())


class DemoProvider:
    """See the module docstring."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config

    async def stream(self, request: ProviderRequest, send: Sink) -> None:
        cfg = self.config
        messages = request.messages
        user = _last_user(messages)
        text = _text(messages[user].get("content")) if user >= 0 else ""
        since = _Since(messages[user + 1 :])
        rng = random.Random(cfg.seed)
        interval = 1.0 / cfg.tokens_per_second
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)

        if "[fail]" in text:
            await trio.sleep(cfg.first_token_delay)
            raise ProviderError("demo provider asked to fail", retryable=True, status=503)
        fail_after = _FAIL_AFTER_CUE.search(text)
        words_cue = _WORDS_CUE.search(text)
        n_words = int(words_cue.group(1)) if words_cue else cfg.reply_words
        calls = _open_cues(text, _offered(request), since.called)

        await trio.sleep(cfg.first_token_delay)
        if calls:
            for i, (name, args) in enumerate(calls):
                # Two fragments per call, as real upstreams split them.
                half = len(args) // 2
                call_id = f"call_demo_{since.turns}_{i}"
                await send.send(Delta(tool_calls=(ToolCallDelta(i, call_id, name, args[:half]),)))
                await send.send(Delta(tool_calls=(ToolCallDelta(i, arguments=args[half:]),)))
            await send.send(
                Delta(usage=Usage(prompt_tokens, 2 * len(calls)), finish_reason="tool_calls")
            )
            return

        if since.results:
            said = "The tool said:" if len(since.results) == 1 else "The tools said:"
            words = [said, *"; ".join(since.results).split()]
        else:
            clean = _clean(text)
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
