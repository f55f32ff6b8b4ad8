"""The Ollama provider against a real fake ``/api/chat`` on a socket, and its NDJSON splitter."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from raafd.config import ProviderConfig
from raafd.providers.base import (
    Delta,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    Usage,
)
from raafd.providers.ndjson import NDJSONError, NDJSONSplitter
from raafd.providers.ollama import OllamaProvider
from raafd.providers.upstream import UpstreamClient
from tests.fakes.ollama_upstream import FakeOllama, OllamaScript, OllamaToolCall
from tests.providers import (
    Send,
    content_deltas,
    merged_calls,
    receive_text,
    retrying,
    run_stream,
    text_of,
)

SECRET = "ollama-SECRETKEY-0123456789abcdef"
KEY_ENV = "RAAFD_TEST_OLLAMA_KEY"
REQUEST = ProviderRequest(
    model="",
    messages=[{"role": "user", "content": "Hello there"}],
    instructions="Be brief.",
    temperature=0.2,
    max_tokens=100,
)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOllama:
    fake = FakeOllama()
    with trio.fail_after(5):
        await nursery.start(fake.run)
    return fake


def jump(clock: MockClock) -> None:
    # Virtual time jumps once every task has been idle 20 real ms: retries and timeouts take
    # no real time, while loopback socket I/O (microseconds) is never overtaken.
    clock.autojump_threshold = 0.02


def make_provider(
    fake: FakeOllama,
    upstream: UpstreamClient,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> OllamaProvider:
    settings: dict[str, Any] = {
        "type": "ollama",
        "base_url": fake.base_url,
        "model": "llama3.2",
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
    }
    settings.update(overrides)
    return OllamaProvider("llama", ProviderConfig(**settings), upstream, environ or {})


def with_retry(provider: OllamaProvider, **kw: Any) -> Callable[[Send], Awaitable[None]]:
    return retrying(provider, REQUEST, **{"base": 0.1, **kw})


# --- streaming --------------------------------------------------------------------------------


async def test_text_streams_in_order_with_usage_from_the_done_line(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    script = OllamaScript(deltas=24)
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert text_of(events) == "".join(script.text_pieces)  # the deltas of one read come joined
    assert all(isinstance(e, Delta) and e.text for e in events[:-1])
    assert events[-1] == Delta(usage=Usage(9, 24), finish_reason="stop")

    rec = fake.requests[-1]
    assert (rec.method, rec.path) == ("POST", "/api/chat")
    assert rec.json == {
        "model": "llama3.2",  # request.model is empty: the config's model
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        "stream": True,
        "options": {"temperature": 0.2, "num_predict": 100},
    }
    assert rec.headers["content-type"] == "application/json"
    assert "authorization" not in rec.headers


async def test_no_options_without_temperature_or_max_tokens(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    request = ProviderRequest(model="qwen3", messages=[{"role": "user", "content": "x"}])
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, request))
    assert error is None
    body = fake.requests[-1].json
    assert body == {
        "model": "qwen3",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
    }


async def test_each_line_is_forwarded_the_moment_it_arrives(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    fake.push(OllamaScript(deltas=10, hang_after=3))
    provider = make_provider(fake, upstream)
    send, recv = trio.open_memory_channel[ProviderEvent](16)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.stream, REQUEST, send)
            await receive_text(recv, "tok0 tok1 tok2 ")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("split_tool_calls", [False, True], ids=["one-line", "line-per-call"])
async def test_whole_tool_calls_become_one_fragment_each_with_generated_ids(
    fake: FakeOllama, upstream: UpstreamClient, split_tool_calls: bool
) -> None:
    weather = {"city": "Zürich", "days": [1, 2, 3], "unit": "celsius"}
    fake.push(
        OllamaScript(
            pieces=("Checking.",),
            tool_calls=(
                OllamaToolCall("get_weather", json.dumps(weather)),
                OllamaToolCall("now"),
            ),
            split_tool_calls=split_tool_calls,
            eval_count=31,
        )
    )
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert text_of(events) == "Checking."
    calls = merged_calls(events)
    assert {i: (c["id"], c["name"]) for i, c in calls.items()} == {
        0: ("call_0", "get_weather"),
        1: ("call_1", "now"),
    }
    assert json.loads(calls[0]["arguments"]) == weather
    assert calls[1]["arguments"] == "{}"
    fragments = [p for d in content_deltas(events) for p in d.tool_calls]
    assert len(fragments) == 2  # whole calls: one fragment each
    # Ollama says done_reason "stop" after tool calls; the answer asks for the calls.
    assert events[-1] == Delta(usage=Usage(9, 31), finish_reason="tool_calls")


@pytest.mark.parametrize(
    ("done_reason", "finish_reason"), [("stop", "stop"), ("length", "length"), ("load", "stop")]
)
async def test_done_reasons_are_normalised(
    fake: FakeOllama, upstream: UpstreamClient, done_reason: str, finish_reason: str
) -> None:
    fake.push(OllamaScript(deltas=2, done_reason=done_reason))
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert events[-1] == Delta(usage=Usage(9, 2), finish_reason=finish_reason)


async def test_crlf_line_ends_are_read(fake: FakeOllama, upstream: UpstreamClient) -> None:
    fake.push(OllamaScript(deltas=3, crlf=True))
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert text_of(events) == "tok0 tok1 tok2 "


async def test_the_connection_is_reused_after_the_done_line(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    provider = make_provider(fake, upstream)
    for _ in range(3):
        _, error = await run_stream(partial(provider.stream, REQUEST))
        assert error is None
    assert fake.request_count == 3
    assert all(r.completed for r in fake.requests)
    assert not any(r.closed.is_set() for r in fake.requests)


# --- request translation ----------------------------------------------------------------------


async def test_tool_calls_results_and_tools_are_translated(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    request = ProviderRequest(
        model="",
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_x",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_y",
                        "type": "function",
                        "function": {"name": "now", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_x", "content": "18 °C"},
            {"role": "tool", "tool_call_id": "call_y", "content": "12:00"},
            {"role": "tool", "tool_call_id": "unknown", "content": "?"},
        ],
        tools=tools,
    )
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, request))
    assert error is None
    body = fake.requests[-1].json
    assert body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "18 °C", "tool_name": "get_weather"},
        {"role": "tool", "content": "12:00", "tool_name": "now"},
        {"role": "tool", "content": "?"},
    ]
    assert body["tools"] == tools


# --- errors -----------------------------------------------------------------------------------


async def test_an_error_line_mid_stream_is_a_final_provider_error(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    fake.push(OllamaScript(error_after=3, error_message="llama runner process has terminated"))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert not error.retryable and error.reason == "upstream_error"
    assert "llama runner process has terminated" in error.message
    assert text_of(events) == "tok0 tok1 tok2 "
    assert not any(isinstance(e, RetryNotice) for e in events)
    assert fake.request_count == 1


async def test_an_error_line_before_the_first_token_is_retried(
    fake: FakeOllama, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(OllamaScript(error_after=0))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    assert isinstance(events[0], RetryNotice) and events[0].reason == "upstream_error"
    assert text_of(events) == "".join(OllamaScript().text_pieces)
    assert fake.request_count == 2


async def test_a_missing_model_is_a_final_bad_request_with_the_message(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    events, error = await run_stream(with_retry(make_provider(fake, upstream, model="")))
    assert error is not None
    assert not error.retryable and error.status == 400 and error.reason == "bad_request"
    assert error.message == "llama: the upstream answered HTTP 400: model is required"
    assert events == [] and fake.request_count == 1


async def test_model_not_found_is_final(fake: FakeOllama, upstream: UpstreamClient) -> None:
    fake.push(OllamaScript(status=404, error_message='model "llama9" not found, try pulling it'))
    _, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert not error.retryable and error.status == 404 and error.reason == "bad_request"
    assert 'model "llama9" not found' in error.message


async def test_rate_limit_retry_after_is_honoured_then_the_answer_streams(
    fake: FakeOllama, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(
        OllamaScript(status=429, error_message="too many requests", headers=(("retry-after", "2"),))
    )
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    notice = events[0]
    assert isinstance(notice, RetryNotice)
    assert (notice.attempt, notice.reason) == (1, "rate_limited")
    assert notice.retry_after >= 2.0
    assert text_of(events) == "".join(OllamaScript().text_pieces)
    first, second = fake.requests
    assert second.started_at - first.started_at >= 2.0


async def test_server_busy_is_retried(
    fake: FakeOllama, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    busy = OllamaScript(
        status=503,
        error_message="server busy, please try again.  maximum pending requests exceeded",
    )
    fake.push(busy, busy)
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    assert [(e.attempt, e.reason) for e in events if isinstance(e, RetryNotice)] == [
        (1, "server_error"),
        (2, "server_error"),
    ]
    assert fake.request_count == 3


async def test_the_key_goes_in_a_bearer_header_and_never_into_errors(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    provider = make_provider(fake, upstream, {KEY_ENV: SECRET}, api_key_env=KEY_ENV)
    _, error = await run_stream(partial(provider.stream, REQUEST))
    assert error is None
    assert fake.requests[-1].headers["authorization"] == f"Bearer {SECRET}"

    fake.push(OllamaScript(status=401, error_message="unauthorized", echo_authorization=True))
    _, error = await run_stream(partial(provider.stream, REQUEST))
    assert error is not None
    assert not error.retryable and error.reason == "auth"
    assert "unauthorized (bad token: Bearer [redacted])" in error.message
    for text in (str(error), repr(error), error.message, json.dumps(error.to_dict())):
        assert SECRET not in text and "SECRETKEY" not in text


async def test_a_missing_key_fails_before_any_request(
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    provider = make_provider(fake, upstream, {}, api_key_env=KEY_ENV)
    events, error = await run_stream(partial(provider.stream, REQUEST))
    assert error is not None
    assert not error.retryable and error.reason == "config" and KEY_ENV in error.message
    assert fake.request_count == 0 and events == []


async def test_a_stream_without_its_done_line_is_a_disconnect(
    fake: FakeOllama, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(OllamaScript(close_after=3))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert error.reason == "disconnect"
    assert text_of(events) == "tok0 tok1 tok2 " and fake.request_count == 1
    # What came is named: bytes, lines, the last line.
    assert re.search(
        r"closed the stream after \d+ bytes \(3 events\) before the answer was complete \(.+\);"
        r' last line: \{.*"tok2 "',
        error.message,
    ), error.message

    fake.push(OllamaScript(done=False))  # the body ends properly, but without a done line
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is not None and error.reason == "disconnect" and error.retryable

    fake.push(OllamaScript(close_after=0))  # before the first token: retried
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    assert isinstance(events[0], RetryNotice) and events[0].reason == "disconnect"


async def test_connect_errors_are_retryable(upstream: UpstreamClient) -> None:
    with socket.socket() as sock:  # bound, not listening: connecting is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = ProviderConfig(type="ollama", base_url=f"http://127.0.0.1:{port}", model="m")
        provider = OllamaProvider("llama", config, upstream, {})
        events, error = await run_stream(partial(provider.stream, REQUEST), limit=5)
    assert error is not None
    assert error.retryable and error.reason == "connect"
    assert events == []


async def test_a_silent_upstream_times_out(
    fake: FakeOllama, upstream: UpstreamClient, autojump_clock: MockClock
) -> None:
    jump(autojump_clock)
    fake.push(OllamaScript(hang_after=0))
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
    fake: FakeOllama, upstream: UpstreamClient
) -> None:
    fake.push(OllamaScript(deltas=64, interval=0.02))
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


# --- the NDJSON splitter ----------------------------------------------------------------------


def test_splitter_lines_blank_lines_crlf_and_the_unterminated_last_line() -> None:
    splitter = NDJSONSplitter()
    assert splitter.feed(b'{"a":1}\n\n  \r\n{"b"') == [b'{"a":1}']
    assert splitter.pending
    assert splitter.feed(b":2}\r") == []
    assert splitter.feed(b"\n") == [b'{"b":2}']
    assert not splitter.pending
    assert splitter.feed(b'{"c":3}') == []
    assert splitter.close() == [b'{"c":3}']
    assert splitter.close() == []


def test_splitter_bounds_a_line() -> None:
    splitter = NDJSONSplitter(max_line=8)
    assert splitter.feed(b"12345678\n") == [b"12345678"]
    with pytest.raises(NDJSONError):
        splitter.feed(b"123456789")  # no newline yet, already too long
    with pytest.raises(NDJSONError):
        NDJSONSplitter(max_line=8).feed(b"123456789\n")  # complete, but too long
    assert NDJSONSplitter(max_line=8).feed(b"12345678\r\n") == [b"12345678"]


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\r\n")), max_size=8),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_splitter_lines_do_not_depend_on_the_chunking(
    lines: list[str], crlf: bool, cuts: list[int]
) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = b"".join(line.encode() + end for line in lines)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    splitter = NDJSONSplitter()
    got = [line for chunk in chunks for line in splitter.feed(chunk)] + splitter.close()
    assert got == [line.encode() for line in lines if line.encode().strip()]
