"""The demo provider's cues, called directly (no stream, no agent loop), on trio's autojump
clock."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from raafd.agents.base import ToolSpec
from raafd.config import ProviderConfig
from raafd.providers.base import Delta, ProviderError, ProviderEvent, ProviderRequest
from raafd.providers.demo import DemoProvider

LIMIT = 100


def tools(*names: str) -> list[dict[str, Any]]:
    return [ToolSpec(n, "", {"type": "object"}).to_openai() for n in names]


async def run(
    messages: list[dict[str, Any]] | str,
    offered: list[dict[str, Any]] | None = None,
    **config: Any,
) -> list[ProviderEvent]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    provider = DemoProvider("demo", ProviderConfig(**{"reply_words": 3, **config}))
    request = ProviderRequest(model="demo", messages=messages, tools=offered or [])
    send, receive = trio.open_memory_channel[ProviderEvent](1000)
    with trio.fail_after(LIMIT):
        await provider.stream(request, send)
    send.close()
    return [item async for item in receive]


def text_of(items: list[ProviderEvent]) -> str:
    return "".join(i.text for i in items if isinstance(i, Delta))


def calls_of(items: list[ProviderEvent]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call, merged from fragments by index."""
    merged: dict[int, list[str]] = {}
    for item in items:
        assert isinstance(item, Delta)
        for f in item.tool_calls:
            entry = merged.setdefault(f.index, ["", "", ""])
            entry[0] = f.id or entry[0]
            entry[1] = f.name or entry[1]
            entry[2] += f.arguments
    return [(a, b, c) for a, b, c in (merged[i] for i in sorted(merged))]


def end_of(items: list[ProviderEvent]) -> Delta:
    last = items[-1]
    assert isinstance(last, Delta) and last.finish_reason is not None
    return last


async def test_plain_answer_echoes_then_generates_words(
    autojump_clock: trio.testing.MockClock,
) -> None:
    items = await run("hello there", tokens_per_second=10)
    assert text_of(items) == "hello there streams tokens arrive"
    assert end_of(items).finish_reason == "stop"
    assert end_of(items).usage is not None and end_of(items).usage.completion_tokens == 5
    assert trio.current_time() == pytest.approx(0.5)  # one word every 0.1 s


async def test_words_cue(autojump_clock: trio.testing.MockClock) -> None:
    assert text_of(await run("[words:1] hi")) == "hi streams"
    assert text_of(await run("[words:0]")) == ""


async def test_fail_cue_fails_before_the_first_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(ProviderError) as failed:
        await run("[fail]")
    assert failed.value.retryable and failed.value.status == 503


async def test_fail_after_cue(autojump_clock: trio.testing.MockClock) -> None:
    provider = DemoProvider("demo", ProviderConfig(reply_words=10))
    send, receive = trio.open_memory_channel[ProviderEvent](100)
    request = ProviderRequest(
        model="demo", messages=[{"role": "user", "content": "[fail-after:2]"}]
    )
    with pytest.raises(ProviderError, match="mid-stream") as failed:
        await provider.stream(request, send)
    assert not failed.value.retryable
    send.close()
    assert len([i async for i in receive]) == 2


async def test_tool_cue_calls_an_offered_tool(autojump_clock: trio.testing.MockClock) -> None:
    items = await run('ask [tool:lookup {"q": "x"}]', tools("lookup"))
    assert calls_of(items) == [("call_demo_0_0", "lookup", '{"q": "x"}')]
    assert len([i for i in items if isinstance(i, Delta) and i.tool_calls]) == 2  # fragments
    assert end_of(items).finish_reason == "tool_calls"
    assert text_of(items) == ""
    # No arguments given: an empty object.
    assert calls_of(await run("[tool:lookup]", tools("lookup"))) == [
        ("call_demo_0_0", "lookup", "{}")
    ]


async def test_a_cue_for_a_tool_not_offered_is_just_text(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for offered in (None, tools("other")):
        items = await run('ask [tool:lookup {"q": "x"}] [handoff:billing] now', offered)
        assert calls_of(items) == []
        assert text_of(items) == "ask now streams tokens arrive"


async def test_handoff_cue(autojump_clock: trio.testing.MockClock) -> None:
    items = await run("[handoff:billing] my bill", tools("transfer_to_billing"))
    assert calls_of(items) == [("call_demo_0_0", "transfer_to_billing", "{}")]


async def test_several_cues_are_parallel_calls_in_one_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    text = '[tool:a {"n": 1}] [handoff:b] [tool:a {"n": 2}] [tool:c]'
    items = await run(text, tools("a", "transfer_to_b"))
    assert calls_of(items) == [
        ("call_demo_0_0", "a", '{"n": 1}'),
        ("call_demo_0_1", "transfer_to_b", "{}"),
        ("call_demo_0_2", "a", '{"n": 2}'),
    ]


def after_calls(text: str, *calls: tuple[str, str, str]) -> list[dict[str, Any]]:
    """A conversation: the user's text, an assistant turn with ``calls`` (id, name, result),
    and the tool answers."""
    return [
        {"role": "user", "content": text},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": i, "type": "function", "function": {"name": n, "arguments": "{}"}}
                for i, n, _ in calls
            ],
        },
        *({"role": "tool", "tool_call_id": i, "content": r} for i, _, r in calls),
    ]


async def test_after_tool_results_it_reads_them_back_instead_of_calling_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    messages = after_calls("[tool:clock]", ("c1", "clock", "it is noon"))
    items = await run(messages, tools("clock"))
    assert calls_of(items) == []
    assert text_of(items) == "The tool said: it is noon"
    two = after_calls("[tool:a] [tool:b]", ("c1", "a", "one"), ("c2", "b", "two"))
    assert text_of(await run(two, tools("a", "b"))) == "The tools said: one; two"


async def test_only_the_cues_not_yet_called_are_called(
    autojump_clock: trio.testing.MockClock,
) -> None:
    messages = after_calls("[tool:a] [tool:b]", ("c1", "a", "one"))
    items = await run(messages, tools("a", "b"))
    assert calls_of(items) == [("call_demo_1_0", "b", "{}")]  # ids stay unique across turns


async def test_after_a_handoff_alone_the_new_agent_answers_the_user(
    autojump_clock: trio.testing.MockClock,
) -> None:
    messages = after_calls(
        "[handoff:billing] my bill", ("c1", "transfer_to_billing", "transferred to billing")
    )
    # The target agent does not offer transfer_to_billing; a cue to it is spent anyway.
    for offered in (None, tools("transfer_to_billing")):
        items = await run(messages, offered)
        assert calls_of(items) == []
        assert text_of(items) == "my bill streams tokens arrive"


async def test_a_new_user_message_opens_the_cues_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    messages = [
        *after_calls("[tool:a]", ("c1", "a", "one")),
        {"role": "assistant", "content": "The tool said: one"},
        {"role": "user", "content": "again [tool:a]"},
    ]
    assert calls_of(await run(messages, tools("a"))) == [("call_demo_0_0", "a", "{}")]


async def test_odd_history_from_a_client_is_no_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "[tool:a]"},
        {"role": "assistant", "content": None, "tool_calls": "junk"},
        {"role": "assistant", "content": None, "tool_calls": ["junk", {"function": 3}]},
        {"role": "tool", "content": None},
    ]
    # No call was recognised in that history, so the cue is still open.
    assert calls_of(await run(messages, tools("a"))) == [("call_demo_2_0", "a", "{}")]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"text": "you"}]}]
    assert text_of(await run(parts)) == "hi you streams tokens arrive"


async def test_deterministic_with_jitter(autojump_clock: trio.testing.MockClock) -> None:
    times: list[list[float]] = []
    for _ in range(2):
        provider = DemoProvider("demo", ProviderConfig(reply_words=20, jitter=0.5, seed=3))
        send, receive = trio.open_memory_channel[ProviderEvent](0)
        request = ProviderRequest(model="demo", messages=[{"role": "user", "content": "x"}])
        seen: list[float] = []
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.stream, request, send)
            for _ in range(22):
                await receive.receive()
                seen.append(trio.current_time() - start)
        times.append(seen)
    assert times[0] == pytest.approx(times[1])
    gaps = {round(b - a, 6) for a, b in zip(times[0], times[0][1:], strict=False)}
    assert len(gaps) > 3  # jittered, yet the same both times
