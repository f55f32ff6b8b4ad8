"""The Anthropic provider against a real fake Messages API on a socket."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from raafd.config import ProviderConfig, parse_config
from raafd.metrics import Metrics
from raafd.providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicProvider
from raafd.providers.base import (
    Delta,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    Usage,
)
from raafd.providers.ollama import OllamaProvider
from raafd.providers.registry import build_providers, open_upstream_client
from raafd.providers.upstream import UpstreamClient
from tests.fakes.anthropic_upstream import AnthropicScript, FakeAnthropic, ToolUse, output_tokens
from tests.providers import (
    Send,
    content_deltas,
    merged_calls,
    receive_text,
    retrying,
    run_stream,
    text_of,
)

SECRET = "sk-ant-api03-SECRETKEY-0123456789abcdef"
KEY_ENV = "RAAFD_TEST_ANTHROPIC_KEY"
REQUEST = ProviderRequest(
    model="",
    messages=[{"role": "user", "content": "Hello there"}],
    instructions="Be brief.",
    temperature=0.2,
    max_tokens=100,
)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeAnthropic:
    fake = FakeAnthropic()
    with trio.fail_after(5):
        await nursery.start(fake.run)
    return fake


def jump(clock: MockClock) -> None:
    # Virtual time jumps once every task has been idle 20 real ms: retries and timeouts take
    # no real time, while loopback socket I/O (microseconds) is never overtaken.
    clock.autojump_threshold = 0.02


def make_provider(
    fake: FakeAnthropic,
    upstream: UpstreamClient,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> AnthropicProvider:
    settings: dict[str, Any] = {
        "type": "anthropic",
        "base_url": fake.base_url,
        "model": "claude-test",
        "api_key_env": KEY_ENV,
        "headers": {"anthropic-beta": "tools-2024-05-16"},
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
    }
    settings.update(overrides)
    env = {KEY_ENV: SECRET} if environ is None else environ
    return AnthropicProvider("claude", ProviderConfig(**settings), upstream, env)


def with_retry(
    provider: AnthropicProvider, request: ProviderRequest = REQUEST, **kw: Any
) -> Callable[[Send], Awaitable[None]]:
    return retrying(provider, request, **{"base": 0.1, **kw})


# --- streaming --------------------------------------------------------------------------------


async def test_text_streams_in_order_pings_ignored_usage_and_finish(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    script = AnthropicScript(deltas=24, ping_every=1)  # a ping after every delta
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert [d.text for d in content_deltas(events)] == list(script.text_pieces)
    assert len(events) == 24 + 1  # nothing for the pings, the block starts and stops
    assert events[-1] == Delta(usage=Usage(11, 24), finish_reason="stop")

    rec = fake.requests[-1]
    assert (rec.method, rec.path) == ("POST", "/v1/messages")
    assert rec.json == {
        "model": "claude-test",  # request.model is empty: the config's model
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello there"}],
        "stream": True,
        "system": "Be brief.",
        "temperature": 0.2,
    }
    assert rec.headers["x-api-key"] == SECRET
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["anthropic-beta"] == "tools-2024-05-16"
    assert rec.headers["content-type"] == "application/json"
    assert rec.headers["accept"] == "text/event-stream"
    assert "authorization" not in rec.headers


async def test_max_tokens_defaults_and_the_request_model_wins(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    request = ProviderRequest(model="claude-other", messages=[{"role": "user", "content": "x"}])
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, request))
    assert error is None
    body = fake.requests[-1].json
    assert body["model"] == "claude-other"
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS == 4096
    assert "system" not in body and "temperature" not in body and "tools" not in body


async def test_a_base_url_ending_in_v1_is_not_doubled(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    provider = make_provider(fake, upstream, base_url=fake.base_url + "/v1/")
    _, error = await run_stream(partial(provider.stream, REQUEST))
    assert error is None
    assert fake.requests[-1].path == "/v1/messages"


async def test_each_delta_is_forwarded_the_moment_its_event_arrives(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    fake.push(AnthropicScript(deltas=10, hang_after=3))
    provider = make_provider(fake, upstream)
    send, recv = trio.open_memory_channel[ProviderEvent](16)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.stream, REQUEST, send)
            await receive_text(recv, "tok0 tok1 tok2 ")
            nursery.cancel_scope.cancel()


async def test_tool_input_across_many_fragments_merges_into_whole_calls(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    weather = json.dumps({"city": "Zürich", "unit": "celsius", "days": [1, 2, 3]})
    lookup = json.dumps({"query": 'a "quoted" string, with {braces} and commas'})
    script = AnthropicScript(
        thinking=("Let me ", "think."),
        pieces=("I will ", "check."),
        tool_uses=(
            ToolUse("get_weather", weather, id="toolu_a", fragments=23),
            ToolUse("lookup", lookup, id="toolu_b", fragments=7),
        ),
        ping_every=3,
    )
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert text_of(events) == "I will check."  # the thinking block is not forwarded
    calls = merged_calls(events)
    assert calls == {
        0: {"id": "toolu_a", "name": "get_weather", "arguments": weather},
        1: {"id": "toolu_b", "name": "lookup", "arguments": lookup},
    }
    assert json.loads(calls[0]["arguments"])["city"] == "Zürich"
    fragments = [p for d in content_deltas(events) for p in d.tool_calls]
    assert len(fragments) == (1 + 23) + (1 + 7)  # the block start, then one per fragment
    assert [p.id for p in fragments if p.id] == ["toolu_a", "toolu_b"]  # only on the first
    assert events[-1] == Delta(usage=Usage(11, output_tokens(script)), finish_reason="tool_calls")


async def test_a_tool_call_without_parameters_gets_an_empty_object(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    fake.push(AnthropicScript(pieces=(), tool_uses=(ToolUse("now", "", id="toolu_n"),)))
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert merged_calls(events) == {0: {"id": "toolu_n", "name": "now", "arguments": "{}"}}
    assert events[-1].finish_reason == "tool_calls"  # type: ignore[union-attr]


async def test_output_usage_is_cumulative_so_the_last_value_is_kept(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    # message_start says output_tokens 1, then four message_delta events say 2, 5, 7, 10:
    # each is the total so far, so the answer used 10, not 25.
    script = AnthropicScript(deltas=10, usage_steps=4, cache_read_tokens=5)
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert events[-1] == Delta(usage=Usage(11 + 5, 10), finish_reason="stop")


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
async def test_stop_reasons_are_normalised(
    fake: FakeAnthropic, upstream: UpstreamClient, stop_reason: str, finish_reason: str
) -> None:
    fake.push(AnthropicScript(deltas=2, stop_reason=stop_reason))
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert events[-1] == Delta(usage=Usage(11, 2), finish_reason=finish_reason)


async def test_the_connection_is_reused_after_message_stop(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    provider = make_provider(fake, upstream)
    for _ in range(3):
        _, error = await run_stream(partial(provider.stream, REQUEST))
        assert error is None
    assert fake.request_count == 3
    assert all(r.completed for r in fake.requests)
    assert not any(r.closed.is_set() for r in fake.requests)  # one keep-alive connection


# --- request translation ----------------------------------------------------------------------


async def test_system_tools_tool_calls_and_tool_results_are_translated(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    weather_schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    request = ProviderRequest(
        model="",
        instructions="You are terse.",
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Weather in Paris and Rome? And the time?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18 °C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "24 °C"},
            {"role": "user", "content": "Thanks."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_3",
                        "type": "function",
                        "function": {"name": "now", "arguments": ""},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_3", "content": "12:00"},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parameters": weather_schema,
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ],
    )
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, request))
    assert error is None  # the fake refuses a system role or a missing max_tokens
    body = fake.requests[-1].json
    assert body["system"] == "You are terse.\n\nAnswer in French."
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome? And the time?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            # Consecutive tool results are one user turn, the user's next words after them.
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 °C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "24 °C"},
                {"type": "text", "text": "Thanks."},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_3", "name": "now", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "content": "12:00"}],
        },
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": weather_schema,
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]


# --- headers, secrets and HTTP errors ---------------------------------------------------------


async def test_a_missing_key_fails_before_any_request(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    events, error = await run_stream(
        partial(make_provider(fake, upstream, environ={}).stream, REQUEST)
    )
    assert error is not None
    assert not error.retryable and error.reason == "config"
    assert KEY_ENV in error.message
    assert fake.request_count == 0 and events == []


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (400, "invalid_request_error", "bad_request"),
        (401, "authentication_error", "auth"),
        (403, "permission_error", "auth"),
        (404, "not_found_error", "bad_request"),
    ],
)
async def test_client_errors_are_final_with_the_message_and_no_key(
    fake: FakeAnthropic, upstream: UpstreamClient, status: int, kind: str, reason: str
) -> None:
    fake.push(AnthropicScript(status=status, error_type=kind, error_message="Nope.", echo_key=True))
    metrics = Metrics()
    events, error = await run_stream(with_retry(make_provider(fake, upstream), metrics=metrics))
    assert error is not None
    assert not error.retryable
    assert (error.status, error.reason) == (status, reason)
    assert f"HTTP {status} ({kind}): Nope." in error.message
    assert "invalid x-api-key: [redacted]" in error.message  # the echo is there, redacted
    assert "request-id req_fake" in error.message
    for text in (str(error), repr(error), error.message, json.dumps(error.to_dict())):
        assert SECRET not in text and "SECRETKEY" not in text
    assert events == [] and fake.request_count == 1
    key = f"raafd_upstream_errors_total{{provider=claude,reason={reason}}}"
    assert metrics.snapshot().get(key) == 1.0


async def test_without_api_key_env_no_key_is_sent(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    _, error = await run_stream(
        partial(make_provider(fake, upstream, api_key_env="").stream, REQUEST)
    )
    assert error is not None  # the fake, like the API, wants a key
    assert error.reason == "auth" and "x-api-key header is required" in error.message
    assert "x-api-key" not in fake.requests[-1].headers


async def test_x_should_retry_overrides_the_status(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    fake.push(
        AnthropicScript(status=500, error_type="api_error", headers=(("x-should-retry", "false"),))
    )
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is not None
    assert error.status == 500 and error.reason == "server_error" and not error.retryable


# --- retries ----------------------------------------------------------------------------------


async def test_rate_limit_retry_after_is_honoured_then_the_answer_streams(
    fake: FakeAnthropic, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(AnthropicScript.rate_limited(retry_after="2"))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    notice = events[0]
    assert isinstance(notice, RetryNotice)
    assert (notice.attempt, notice.reason) == (1, "rate_limited")
    assert notice.retry_after >= 2.0
    assert text_of(events) == "".join(AnthropicScript().text_pieces)
    first, second = fake.requests
    assert second.started_at - first.started_at >= 2.0


async def test_overloaded_529_is_retryable_and_retried(
    fake: FakeAnthropic, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(AnthropicScript.overloaded())
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is not None
    assert error.retryable and error.status == 529 and error.reason == "server_error"
    assert "(overloaded_error): Overloaded" in error.message

    fake.push(AnthropicScript.overloaded(), AnthropicScript.overloaded())
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    notices = [e for e in events if isinstance(e, RetryNotice)]
    assert [(n.attempt, n.reason) for n in notices] == [(1, "server_error"), (2, "server_error")]
    assert text_of(events) == "".join(AnthropicScript().text_pieces)
    assert fake.request_count == 1 + 3


async def test_an_error_event_mid_stream_is_a_final_provider_error(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    fake.push(
        AnthropicScript(error_after=3, error_type="overloaded_error", error_message="Overloaded")
    )
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert not error.retryable  # tokens went out: a retry would repeat them
    assert error.reason == "server_error"
    assert "(overloaded_error): Overloaded" in error.message
    assert text_of(events) == "tok0 tok1 tok2 "
    assert not any(isinstance(e, RetryNotice) for e in events)
    assert fake.request_count == 1


async def test_an_overloaded_error_event_before_the_first_delta_is_retried(
    fake: FakeAnthropic, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(AnthropicScript(error_after=0, error_type="overloaded_error"))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    assert isinstance(events[0], RetryNotice) and events[0].reason == "server_error"
    assert text_of(events) == "".join(AnthropicScript().text_pieces)
    assert fake.request_count == 2


async def test_an_invalid_request_error_event_is_not_retried(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    fake.push(AnthropicScript(error_after=0, error_type="invalid_request_error"))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert not error.retryable and error.reason == "upstream_error"
    assert events == [] and fake.request_count == 1


async def test_a_cut_before_message_stop_is_a_disconnect(
    fake: FakeAnthropic, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(AnthropicScript(close_after=3))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert error.reason == "disconnect"
    assert text_of(events) == "tok0 tok1 tok2 " and fake.request_count == 1
    # What came is named: bytes, events, the last line.
    assert re.search(
        r"closed the stream after \d+ bytes \(\d+ events\) before the answer was complete \(.+\);"
        r' last line: data: \{"type":"content_block_delta".*"tok2 "',
        error.message,
    ), error.message

    fake.push(AnthropicScript(close_after=0))  # before the first delta: retried
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    assert isinstance(events[0], RetryNotice) and events[0].reason == "disconnect"

    fake.push(AnthropicScript(message_stop=False))  # the body ends without message_stop
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is not None and error.reason == "disconnect" and error.retryable


async def test_connect_errors_are_retryable(upstream: UpstreamClient) -> None:
    with socket.socket() as sock:  # bound, not listening: connecting is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = ProviderConfig(type="anthropic", base_url=f"http://127.0.0.1:{port}", model="m")
        provider = AnthropicProvider("claude", config, upstream, {})
        events, error = await run_stream(partial(provider.stream, REQUEST), limit=5)
    assert error is not None
    assert error.retryable and error.reason == "connect"
    assert events == []


async def test_a_silent_upstream_times_out(
    fake: FakeAnthropic, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(AnthropicScript(hang_after=0))
    started = trio.current_time()
    _, error = await run_stream(
        partial(make_provider(fake, upstream, read_timeout=3.0).stream, REQUEST)
    )
    assert error is not None
    assert error.retryable and error.reason == "timeout"
    assert 3.0 <= trio.current_time() - started < 4.0
    with trio.fail_after(1):
        await fake.requests[-1].closed.wait()


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelling_the_consumer_closes_the_upstream_within_100ms(
    fake: FakeAnthropic, upstream: UpstreamClient
) -> None:
    fake.push(AnthropicScript(deltas=64, interval=0.02))
    send, recv = trio.open_memory_channel[ProviderEvent](4)
    with trio.fail_after(5):
        with trio.CancelScope() as consumer_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(with_retry(make_provider(fake, upstream)), send)
                received = 0
                async for _ in recv:
                    received += 1
                    if received == 5:
                        cancelled_at = trio.current_time()
                        consumer_scope.cancel()
        assert consumer_scope.cancelled_caught
        recorded = fake.requests[-1]
        await recorded.closed.wait()
    assert recorded.closed_by_client and not recorded.completed
    assert recorded.closed_at is not None
    assert recorded.closed_at - cancelled_at < 0.1
    assert recorded.deltas_sent < 64


# --- registry and config ----------------------------------------------------------------------


async def test_the_registry_builds_anthropic_and_ollama_and_config_accepts_them() -> None:
    config = parse_config(
        {
            "providers": {
                "claude": {
                    "type": "anthropic",
                    "base_url": "https://api.anthropic.com",
                    "model": "claude-sonnet-4-5",
                    "api_key_env": "ANTHROPIC_API_KEY",
                },
                "llama": {"type": "ollama", "base_url": "http://127.0.0.1:11434"},
            }
        }
    )
    async with open_upstream_client(trust_env=False) as client:
        providers = build_providers(config.providers, client, environ={})
    claude, llama = providers["claude"], providers["llama"]
    assert isinstance(claude, AnthropicProvider) and claude.name == "claude"
    assert isinstance(llama, OllamaProvider) and llama.name == "llama"
    assert "https://api.anthropic.com/v1/messages" in repr(claude)
    assert "http://127.0.0.1:11434/api/chat" in repr(llama)
