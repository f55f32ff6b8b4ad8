"""The OpenAI-compatible provider and the retry layer, against a real fake upstream on a socket."""

from __future__ import annotations

import email.utils
import json
import random
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from openai import AsyncOpenAI
from trio.testing import MockClock

from raafd.config import ConfigError, ProviderConfig, parse_config
from raafd.metrics import Metrics
from raafd.providers.base import (
    Delta,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    Usage,
)
from raafd.providers.demo import DemoProvider
from raafd.providers.http import LAST_LINE_LIMIT
from raafd.providers.openai import OpenAIProvider, parse_retry_after, redact_secrets
from raafd.providers.registry import build_providers, open_upstream_client
from raafd.providers.retry import stream_with_retry
from raafd.providers.upstream import UpstreamClient
from raafd.providers.wire import ChunkedBody
from tests.fakes import FakeOpenAI, Script, ToolCallScript
from tests.fakes.openai_upstream import _encode
from tests.providers import (
    Send,
    content_deltas,
    merged_calls,
    receive_text,
    retrying,
    run_stream,
    text_of,
)
from tests.sse import stream_to_end

SECRET = "sk-test-SECRETKEY-0123456789abcdef"
KEY_ENV = "RAAFD_TEST_OPENAI_KEY"
REQUEST = ProviderRequest(
    model="",
    messages=[{"role": "user", "content": "Hello there"}],
    instructions="Be brief.",
    temperature=0.2,
    max_tokens=100,
)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def jump_clock() -> MockClock:
    """Virtual time that jumps when every task has been idle 10 real ms: retries and timeouts
    take no real time, while real socket I/O (microseconds on loopback) is never overtaken."""
    return MockClock(autojump_threshold=0.01)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOpenAI:
    fake = FakeOpenAI(Script(interval=0))
    with trio.fail_after(5):
        await nursery.start(fake.run)
    return fake


def make_provider(
    fake: FakeOpenAI,
    upstream: UpstreamClient,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> OpenAIProvider:
    settings: dict[str, Any] = {
        "type": "openai",
        "base_url": fake.base_url,
        "model": "gpt-test",
        "api_key_env": KEY_ENV,
        "headers": {"OpenAI-Organization": "org-test"},
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
    }
    settings.update(overrides)
    env = {KEY_ENV: SECRET} if environ is None else environ
    return OpenAIProvider("up", ProviderConfig(**settings), upstream, env)


def with_retry(
    provider: OpenAIProvider, metrics: Metrics | None = None, **kw: Any
) -> Callable[[Send], Awaitable[None]]:
    return retrying(provider, REQUEST, metrics=metrics, **{"base": 0.5, **kw})


def metric(metrics: Metrics, name: str, reason: str) -> float:
    value = metrics.snapshot().get(f"{name}{{provider=up,reason={reason}}}", 0.0)
    assert isinstance(value, float)
    return value


# --- streaming --------------------------------------------------------------------------------


async def test_text_streams_in_order_with_usage_and_finish(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    script = Script(deltas=64, interval=0)
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert text_of(events) == script.text  # in order (the deltas of one read come joined)
    assert events[-1] == Delta(
        usage=Usage(prompt_tokens=7, completion_tokens=64), finish_reason="stop"
    )
    assert all(isinstance(e, Delta) for e in events)

    body = fake.requests[-1].json
    assert fake.requests[-1].path == "/v1/chat/completions"
    assert body["model"] == "gpt-test"  # request.model is empty: the config's model
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 100
    assert "tools" not in body


async def test_request_model_tools_and_no_instructions(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = ProviderRequest(
        model="other-model", messages=[{"role": "user", "content": "x"}], tools=tools
    )
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, request))
    assert error is None
    body = fake.requests[-1].json
    assert body["model"] == "other-model"
    assert body["messages"] == [{"role": "user", "content": "x"}]
    assert body["tools"] == tools
    assert "temperature" not in body and "max_tokens" not in body


async def test_each_delta_is_forwarded_the_moment_its_line_arrives(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    # The upstream sends three deltas and then nothing: they must reach the consumer anyway.
    fake.push(Script(deltas=10, interval=0, hang_after=3))
    provider = make_provider(fake, upstream)
    send, recv = trio.open_memory_channel[ProviderEvent](16)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.stream, REQUEST, send)
            await receive_text(recv, "tok0 tok1 tok2 ")
            nursery.cancel_scope.cancel()
    assert fake.requests[-1].deltas_sent == 3


async def test_the_text_deltas_of_one_read_are_joined_and_nothing_else_is(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    # Writes of four deltas, one virtual second apart: six content pieces, then a tool call's
    # first chunk (id and name) and its two fragments, so the second write has text and calls.
    arguments = json.dumps({"q": "x"})
    script = Script(
        deltas=6,
        burst=4,
        interval=1.0,
        tool_calls=(ToolCallScript("lookup", arguments, id="call_a", fragments=2),),
    )
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    deltas = content_deltas(events)
    assert [d.text for d in deltas] == ["tok0 tok1 tok2 tok3 ", "tok4 tok5 ", "", "", ""]
    assert [len(d.tool_calls) for d in deltas] == [0, 0, 1, 1, 1]  # calls are never joined
    assert merged_calls(events) == {0: {"id": "call_a", "name": "lookup", "arguments": arguments}}
    assert events[-1] == Delta(usage=Usage(7, 9), finish_reason="tool_calls")


async def test_tool_call_fragments_merge_into_whole_calls(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    weather = json.dumps({"city": "Zürich", "unit": "celsius", "days": [1, 2, 3]})
    lookup = json.dumps({"query": 'a "quoted" string, with commas'})
    fake.push(
        Script(
            deltas=0,
            interval=0,
            role_content_null=True,
            usage_with_finish=True,
            tool_calls=(
                ToolCallScript("get_weather", weather, id="call_a", fragments=17),
                ToolCallScript("lookup", lookup, id="call_b", fragments=5),
            ),
        )
    )
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None

    calls: dict[int, dict[str, Any]] = {}
    for delta in content_deltas(events):
        for part in delta.tool_calls:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] = part.name or call["name"]
            call["arguments"] += part.arguments
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "arguments": weather},
        1: {"id": "call_b", "name": "lookup", "arguments": lookup},
    }
    assert len(content_deltas(events)) == 1 + 17 + 1 + 5  # one per upstream chunk
    assert events[-1] == Delta(usage=Usage(7, 24), finish_reason="tool_calls")


@pytest.mark.parametrize(
    ("script", "usage"),
    [
        (Script(deltas=3, interval=0, usage=False), None),  # [DONE] without usage
        (Script(deltas=3, interval=0, usage_with_finish=True), Usage(7, 3)),  # llama.cpp
        (Script(deltas=3, interval=0, done=False), Usage(7, 3)),  # EOF after finish, no [DONE]
        (Script(deltas=3, interval=0, usage=False, done=False, role_content_null=True), None),
        (Script(deltas=3, interval=0, close_after_finish=True), None),  # cut after the finish
    ],
    ids=["no-usage", "usage-with-finish", "no-done", "bare", "cut-after-finish"],
)
async def test_compatible_stream_shapes_are_tolerated(
    fake: FakeOpenAI, upstream: UpstreamClient, script: Script, usage: Usage | None
) -> None:
    fake.push(script)
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert text_of(events) == "tok0 tok1 tok2 "
    assert events[-1] == Delta(usage=usage, finish_reason="stop")


async def test_raw_event_stream_shapes_give_the_same_tokens(
    nursery: trio.Nursery, upstream: UpstreamClient
) -> None:
    # Byte-exact bodies: one token per chunk (the read without building events), several
    # tokens in one chunk, CRLF line endings and a split event (the full parser), and bytes
    # that are not UTF-8 inside a JSON string (replaced, as the event-stream rules decode).
    def token(text: str) -> bytes:
        return b'{"choices":[{"index":0,"delta":{"content":%s}}]}' % json.dumps(text).encode()

    bad = b'{"choices":[{"index":0,"delta":{"content":"x\xffy"}}]}'
    chunks = [
        b"data: " + token("a") + b"\n\n",
        b"data: " + token("b") + b"\n\ndata: " + token("c") + b"\n\n",
        b"data: " + token("d") + b"\r\n\r\n",
        b"data: " + token("e")[:9],
        token("e")[9:] + b"\n\n",
        b"data: " + bad + b"\n\n",
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        await stream.send_all(head + b"transfer-encoding: chunked\r\n\r\n")
        for chunk in chunks:
            await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await trio.testing.wait_all_tasks_blocked()  # read: one read per chunk
        await stream.send_all(b"0\r\n\r\n")
        while await stream.receive_some(65536):
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    config = ProviderConfig(type="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m")
    provider = OpenAIProvider("up", config, upstream, {})
    events, error = await run_stream(partial(provider.stream, REQUEST))
    assert error is None
    assert text_of(events) == "abcdex\ufffdy"
    assert events[-1] == Delta(finish_reason="stop")


async def test_a_server_that_ignores_stream_true_is_read_whole(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    fake.push(Script(deltas=4, stream=False))
    events, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    assert events == [
        Delta(text="tok0 tok1 tok2 tok3 "),
        Delta(usage=Usage(7, 4), finish_reason="stop"),
    ]


async def test_the_connection_is_reused_after_done(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    provider = make_provider(fake, upstream)
    for _ in range(3):
        _, error = await run_stream(partial(provider.stream, REQUEST))
        assert error is None
    assert fake.request_count == 3
    assert all(r.completed for r in fake.requests)
    assert not any(r.closed.is_set() for r in fake.requests)  # one keep-alive connection


# --- headers and secrets ----------------------------------------------------------------------


async def test_authorization_carries_the_key_from_the_environment(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    _, error = await run_stream(partial(make_provider(fake, upstream).stream, REQUEST))
    assert error is None
    headers = fake.requests[-1].headers
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert headers["openai-organization"] == "org-test"
    assert headers["accept"] == "text/event-stream"
    assert headers["content-type"] == "application/json"


async def test_a_missing_key_fails_before_any_request(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    events, error = await run_stream(
        partial(make_provider(fake, upstream, environ={}).stream, REQUEST)
    )
    assert error is not None
    assert not error.retryable
    assert error.reason == "config"
    assert KEY_ENV in error.message
    assert fake.request_count == 0 and events == []


async def test_bad_request_is_final_with_the_upstream_message_and_no_key(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    fake.push(
        Script(status=400, error_message="Invalid value for 'temperature'", echo_authorization=True)
    )
    metrics = Metrics()
    events, error = await run_stream(with_retry(make_provider(fake, upstream), metrics))
    assert error is not None
    assert not error.retryable
    assert error.status == 400
    assert "Invalid value for 'temperature'" in error.message
    assert "Incorrect API key provided" in error.message  # the echo is there, redacted
    for text in (str(error), repr(error), error.message, json.dumps(error.to_dict())):
        assert SECRET not in text
        assert "SECRETKEY" not in text
    assert events == []
    assert fake.request_count == 1
    assert metric(metrics, "raafd_upstream_errors_total", "bad_request") == 1
    assert metric(metrics, "raafd_upstream_retries_total", "bad_request") == 0


def test_redaction_covers_masked_keys_and_bearer_values() -> None:
    text = "Incorrect API key provided: sk-abc1***************wxyz. Authorization: Bearer tok123"
    redacted = redact_secrets(text, ("tok123",))
    assert "sk-abc1" not in redacted and "wxyz" not in redacted and "tok123" not in redacted
    prose = "Expected a bearer token and key-value pairs in the task-list"
    assert redact_secrets(prose) == prose
    assert redact_secrets("Authorization: Bearer abcdEFGH1234.xyz") == "Authorization: [redacted]"


# --- retries ----------------------------------------------------------------------------------


async def test_rate_limit_retry_after_is_honoured_before_the_first_token(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    fake.push(Script.rate_limited(retry_after="2"))
    metrics = Metrics()
    events, error = await run_stream(with_retry(make_provider(fake, upstream), metrics, base=0.1))
    assert error is None
    notice = events[0]
    assert isinstance(notice, RetryNotice)
    assert notice.attempt == 1 and notice.reason == "rate_limited"
    assert notice.retry_after >= 2.0
    assert all(isinstance(e, Delta) for e in events[1:])
    assert text_of(events) == Script().text
    first, second = fake.requests
    assert second.started_at - first.started_at >= 2.0
    assert metric(metrics, "raafd_upstream_retries_total", "rate_limited") == 1


async def test_rate_limit_with_an_http_date(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    import time

    fake.push(Script.rate_limited(retry_after=email.utils.formatdate(time.time() + 4, usegmt=True)))
    events, error = await run_stream(with_retry(make_provider(fake, upstream), base=0.1))
    assert error is None
    notice = events[0]
    assert isinstance(notice, RetryNotice)
    assert 2.0 <= notice.retry_after <= 4.0  # the date has whole seconds


async def test_server_errors_are_retried_up_to_max_retries_then_raised(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    fake.push(*[Script.server_error(503)] * 3)
    metrics = Metrics()
    started = trio.current_time()
    events, error = await run_stream(
        with_retry(make_provider(fake, upstream), metrics, max_retries=2, base=1.0, cap=3.0)
    )
    assert error is not None
    assert error.retryable and error.status == 503 and error.reason == "server_error"
    assert [(e.attempt, e.reason) for e in events if isinstance(e, RetryNotice)] == [
        (1, "server_error"),
        (2, "server_error"),
    ]
    assert not any(isinstance(e, Delta) for e in events)
    assert fake.request_count == 3
    waits = [e.retry_after for e in events if isinstance(e, RetryNotice)]
    assert 0 <= waits[0] <= 1.0 and 0 <= waits[1] <= 2.0  # full jitter under base * 2**n
    assert trio.current_time() - started >= sum(waits)
    assert metric(metrics, "raafd_upstream_errors_total", "server_error") == 3
    assert metric(metrics, "raafd_upstream_retries_total", "server_error") == 2


async def test_a_disconnect_before_the_first_token_is_retried(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    fake.push(Script(close_after=0))
    events, error = await run_stream(with_retry(make_provider(fake, upstream), max_retries=1))
    assert error is None
    assert isinstance(events[0], RetryNotice) and events[0].reason == "disconnect"
    assert text_of(events) == Script().text


async def test_a_failure_after_the_first_token_is_not_retried(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    fake.push(Script(interval=0, close_after=3))
    metrics = Metrics()
    events, error = await run_stream(with_retry(make_provider(fake, upstream), metrics))
    assert error is not None
    assert error.reason == "disconnect"
    assert text_of(events) == "tok0 tok1 tok2 "
    assert not any(isinstance(e, RetryNotice) for e in events)
    assert fake.request_count == 1
    assert metric(metrics, "raafd_upstream_errors_total", "disconnect") == 1
    assert metric(metrics, "raafd_upstream_retries_total", "disconnect") == 0


async def test_an_error_object_mid_stream_is_a_provider_error(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    fake.push(Script(interval=0, error_after=2, error_message="The model crashed"))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is not None
    assert error.reason == "upstream_error"
    assert "The model crashed" in error.message
    assert text_of(events) == "tok0 tok1 "
    assert fake.request_count == 1


async def test_a_server_error_object_before_the_first_token_is_retried(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    fake.push(Script(error_after=0, error_type="server_error", error_message="overloaded"))
    events, error = await run_stream(with_retry(make_provider(fake, upstream)))
    assert error is None
    assert isinstance(events[0], RetryNotice) and events[0].reason == "upstream_error"
    assert fake.request_count == 2


async def test_connect_errors_are_retryable(upstream: UpstreamClient) -> None:
    # A bound socket that does not listen: connecting to it is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = ProviderConfig(
            type="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", connect_timeout=2.0
        )
        provider = OpenAIProvider("up", config, upstream, {})
        events, error = await run_stream(partial(provider.stream, REQUEST), limit=5)
    assert error is not None
    assert error.retryable and error.reason == "connect"
    assert events == []


async def test_a_silent_upstream_times_out(
    fake: FakeOpenAI, upstream: UpstreamClient, jump_clock: MockClock
) -> None:
    fake.push(Script(hang_after=0))
    started = trio.current_time()
    _, error = await run_stream(
        partial(make_provider(fake, upstream, read_timeout=3.0).stream, REQUEST)
    )
    assert error is not None
    assert error.retryable and error.reason == "timeout"
    assert 3.0 <= trio.current_time() - started < 4.0
    with trio.fail_after(1):
        await fake.requests[-1].closed.wait()


async def test_a_full_connection_pool_is_a_retryable_pool_error(
    fake: FakeOpenAI, jump_clock: MockClock
) -> None:
    fake.push(Script(hang_after=0))
    async with open_upstream_client(max_connections=1, trust_env=False) as one:
        provider = make_provider(fake, one, connect_timeout=0.5, read_timeout=60.0)
        send, _ = trio.open_memory_channel[ProviderEvent](4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.stream, REQUEST, send)  # holds the only connection
            with trio.fail_after(5):
                await fake.wait_for_requests(1)
            _, error = await run_stream(partial(provider.stream, REQUEST))
            nursery.cancel_scope.cancel()
    assert error is not None
    assert error.retryable and error.reason == "pool"
    assert fake.request_count == 1


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelling_the_consumer_closes_the_upstream_within_100ms(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    fake.push(Script())  # the benchmark's pace: 64 deltas, 20 ms apart
    provider = make_provider(fake, upstream)
    send, recv = trio.open_memory_channel[ProviderEvent](4)
    with trio.fail_after(5):
        with trio.CancelScope() as consumer_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        stream_with_retry,
                        provider,
                        REQUEST,
                        send,
                        max_retries=2,
                        base=0.1,
                        cap=1.0,
                        metrics=None,
                    )
                )
                received = 0
                async for _ in recv:
                    received += 1
                    if received == 5:
                        cancelled_at = trio.current_time()
                        consumer_scope.cancel()
        assert consumer_scope.cancelled_caught
        recorded = fake.requests[-1]
        await recorded.closed.wait()
    assert recorded.closed_by_client
    assert not recorded.completed
    assert recorded.closed_at is not None
    assert recorded.closed_at - cancelled_at < 0.1
    assert recorded.deltas_sent < 64


async def test_a_stalled_consumer_stalls_the_upstream_and_cancel_still_closes_it(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    # 32 MB of answer cannot sit in socket buffers: with the consumer not reading, the provider
    # blocks in send(), stops reading, and the fake's writes block on the TCP window.
    script = Script(pieces=("x" * 1024,) * 32_768, interval=0)
    fake.push(script)
    provider = make_provider(fake, upstream)
    send, recv = trio.open_memory_channel[ProviderEvent](1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.stream, REQUEST, send)
            await recv.receive()
            recorded = fake.requests[-1]
            # Every task quiet for 50 ms: the upstream's writes have stopped.
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert not recorded.completed
            assert recorded.deltas_sent < len(script.content_pieces)
            nursery.cancel_scope.cancel()
        await recorded.closed.wait()
    assert recorded.closed_by_client


# --- the retry layer alone --------------------------------------------------------------------


class _ScriptedProvider:
    """Raises the given errors on successive calls, then streams one delta."""

    name = "up"
    config = ProviderConfig()

    def __init__(self, *errors: ProviderError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def stream(self, request: ProviderRequest, send: Send) -> None:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        await send.send(Delta(text="ok"))


class _HalfRandom(random.Random):
    def random(self) -> float:
        return 0.5


async def test_backoff_is_exponential_with_full_jitter(jump_clock: MockClock) -> None:
    provider = _ScriptedProvider(
        *[ProviderError("boom", retryable=True, reason="server_error") for _ in range(4)]
    )
    stream = partial(
        stream_with_retry,
        provider,
        REQUEST,
        max_retries=4,
        base=1.0,
        cap=5.0,
        metrics=None,
        rng=_HalfRandom(),
    )
    started = trio.current_time()
    events, error = await run_stream(stream)
    assert error is None
    waits = [e.retry_after for e in events if isinstance(e, RetryNotice)]
    assert waits == [0.5, 1.0, 2.0, 2.5]  # half of min(5, 1, 2, 4, 8)
    assert trio.current_time() - started == pytest.approx(sum(waits))
    assert events[-1] == Delta(text="ok")


async def test_retry_after_longer_than_cap_is_not_waited_for(jump_clock: MockClock) -> None:
    provider = _ScriptedProvider(
        ProviderError("slow down", retryable=True, retry_after=600.0, reason="rate_limited")
    )
    stream = partial(
        stream_with_retry, provider, REQUEST, max_retries=3, base=1.0, cap=30.0, metrics=None
    )
    events, error = await run_stream(stream)
    assert error is not None and error.retry_after == 600.0
    assert events == [] and provider.calls == 1


async def test_non_retryable_and_zero_retries_raise_at_once() -> None:
    for provider, retries in (
        (_ScriptedProvider(ProviderError("no", retryable=False)), 3),
        (_ScriptedProvider(ProviderError("no", retryable=True)), 0),
    ):
        stream = partial(
            stream_with_retry,
            provider,
            REQUEST,
            max_retries=retries,
            base=0.1,
            cap=1.0,
            metrics=None,
        )
        events, error = await run_stream(stream)
        assert error is not None and events == [] and provider.calls == 1


# --- what the upstream did not say, and a body that ends too soon ----------------------------
#
# llama.cpp's server sends no usage unless asked in its own way, and when a request overflows
# its context window it answers 200 and then cuts the body. Neither may look like something
# else: unknown usage is null, not 0; a cut body names what came.


def cut_report(script: Script, deltas: int) -> tuple[int, int, str]:
    """What raafd saw of ``script``'s body cut after ``deltas`` deltas: bytes, events (the role
    chunk and the deltas) and the last line as the error shows it."""
    frames = _encode(script)
    decoder = ChunkedBody()
    body = b"".join(decoder.feed(chunk) for chunk in (frames.head, *frames.body[:deltas]))
    line = body.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()
    if len(line) > LAST_LINE_LIMIT:
        line = line[:LAST_LINE_LIMIT] + "…"
    return len(body), 1 + deltas, line


async def test_a_200_body_cut_after_a_token_names_what_came_and_is_not_retried(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    script = Script(interval=0, close_after=3)  # the connection closes inside the chunked body
    fake.push(script)
    metrics = Metrics()
    events, error = await run_stream(with_retry(make_provider(fake, upstream), metrics))
    assert error is not None and error.reason == "disconnect"
    size, count, line = cut_report(script, 3)
    assert error.message.startswith(
        f"up: the upstream closed the stream after {size} bytes ({count} events) before the"
        " answer was complete ("
    )
    assert error.message.endswith(f"; last line: {line}")
    assert line.startswith('data: {"id":"chatcmpl-fake"') and len(line) == 201
    assert text_of(events) == "tok0 tok1 tok2 "
    assert not any(isinstance(e, RetryNotice) for e in events)
    assert fake.request_count == 1
    assert metric(metrics, "raafd_upstream_retries_total", "disconnect") == 0


async def test_a_body_that_ends_before_the_answer_is_retried_only_before_the_first_token(
    fake: FakeOpenAI, upstream: UpstreamClient
) -> None:
    # A well-framed end of the HTTP body, but no finish_reason and no [DONE].
    fake.push(Script(interval=0, end_after=0), Script(interval=0, end_after=2))
    provider = make_provider(fake, upstream)
    events, error = await run_stream(with_retry(provider, base=0.001, max_retries=1))
    assert error is not None and error.reason == "disconnect"
    retries = [e for e in events if isinstance(e, RetryNotice)]
    assert [r.reason for r in retries] == ["disconnect"]  # the first: nothing had gone out
    size, count, line = cut_report(Script(interval=0), 2)
    assert error.message == (
        f"up: the upstream closed the stream after {size} bytes ({count} events) before the"
        f" answer was complete; last line: {line}"
    )
    assert text_of(events) == "tok0 tok1 "
    assert fake.request_count == 2


def test_usage_sums_are_unknown_where_a_part_is() -> None:
    assert Usage(3, 4) + Usage(1, 2) == Usage(4, 6)
    assert Usage(3, 4) + Usage() == Usage(None, None)
    assert Usage(3, None) + Usage(1, 2) == Usage(4, None)
    assert sum([Usage(1, 1), Usage(2, 2)], Usage(0, 0)) == Usage(3, 3)


@pytest.fixture
async def daemon_on_fake(fake: FakeOpenAI, start_daemon: Callable[..., Awaitable[Any]]) -> Any:
    return await start_daemon(
        providers={"up": {"type": "openai", "base_url": fake.base_url, "max_retries": 0}},
        agents={"assistant": {"provider": "up", "tools": ["clock"]}},
    )


async def run_to_end(rd: Any, text: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        stream = (await client.post("/v1/streams", json={"input": text})).json()["stream"]
        return await stream_to_end(client, stream)


async def test_an_upstream_without_usage_gives_null_usage_not_zero(
    fake: FakeOpenAI, daemon_on_fake: Any
) -> None:
    fake.default = Script(deltas=3, interval=0, usage=False)
    with trio.fail_after(20):
        end = (await run_to_end(daemon_on_fake, "hello"))[-1]
        async with httpx.AsyncClient(base_url=daemon_on_fake.base_url) as client:
            body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
            whole = (await client.post("/v1/chat/completions", json=body)).json()
            streamed = await client.post(
                "/v1/chat/completions",
                json=body | {"stream": True, "stream_options": {"include_usage": True}},
            )
        async with AsyncOpenAI(
            base_url=daemon_on_fake.base_url + "/v1", api_key="x", max_retries=0
        ) as sdk:
            reply = await sdk.chat.completions.create(model="assistant", messages=body["messages"])
    assert end["event"] == "complete" and end["final_response"] == "tok0 tok1 tok2 "
    assert end["usage"] == {"prompt_tokens": None, "completion_tokens": None}
    assert whole["usage"] is None
    frames = [f.removeprefix("data: ") for f in streamed.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["choices"] == [] and last["usage"] is None
    assert reply.usage is None  # the official client takes a null usage
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "


async def test_a_turn_without_usage_makes_the_runs_usage_unknown(
    fake: FakeOpenAI, daemon_on_fake: Any
) -> None:
    # The first turn (a tool call) reports usage, the answer after the tool does not: a sum of
    # the first alone would be a wrong number.
    fake.push(
        Script(deltas=0, interval=0, tool_calls=(ToolCallScript("clock", "{}", fragments=2),)),
        Script(deltas=2, interval=0, usage=False),
    )
    with trio.fail_after(20):
        events = await run_to_end(daemon_on_fake, "what time is it?")
    assert [e["event"] for e in events if e["event"] in ("tool_call", "tool_result")] == [
        "tool_call",
        "tool_result",
    ]
    assert events[-1]["event"] == "complete"
    assert events[-1]["usage"] == {"prompt_tokens": None, "completion_tokens": None}
    assert fake.request_count == 2


async def test_a_cut_body_reaches_the_client_as_an_error_naming_what_came(
    fake: FakeOpenAI, daemon_on_fake: Any
) -> None:
    fake.default = Script(interval=0, close_after=3)
    with trio.fail_after(20):
        events = await run_to_end(daemon_on_fake, "hello")
    size, count, line = cut_report(Script(interval=0), 3)
    assert "".join(e["delta"] for e in events if e["event"] == "content") == "tok0 tok1 tok2 "
    end = events[-1]
    assert end["event"] == "error"
    assert f"closed the stream after {size} bytes ({count} events)" in end["error"]["message"]
    assert end["error"]["message"].endswith(f"; last line: {line}")
    assert fake.request_count == 1


# --- small pieces -----------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None


async def test_registry_builds_providers_and_config_accepts_every_type() -> None:
    async with open_upstream_client() as client:
        providers = build_providers(
            {
                "demo": ProviderConfig(type="demo"),
                "gpt": ProviderConfig(type="openai", base_url="http://127.0.0.1:1/v1"),
            },
            client,
        )
        assert isinstance(providers["demo"], DemoProvider)
        assert isinstance(providers["gpt"], OpenAIProvider)
        assert providers["gpt"].name == "gpt"
    assert client.is_closed
    # Every provider type is implemented now: config validation (check-config and serve
    # alike) accepts them, and still wants a base_url for the network ones.
    config = parse_config(
        {
            "providers": {
                "claude": {"type": "anthropic", "base_url": "https://x"},
                "llama": {"type": "ollama", "base_url": "http://x"},
            }
        }
    )
    assert [config.providers[n].type for n in ("claude", "llama")] == ["anthropic", "ollama"]
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": {"claude": {"type": "anthropic"}, "llama": {"type": "ollama"}}})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "providers.claude.base_url",
        "providers.llama.base_url",
    ]
