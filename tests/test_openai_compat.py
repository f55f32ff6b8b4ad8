"""The OpenAI-compatible API, driven by the official ``openai`` package under trio."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing
from openai import AsyncOpenAI

from raafd.http.openai_compat import _Reader
from raafd.protocol.events import make_event
from raafd.providers.http import open_body

# The SDK stops reading its chain of SSE async generators at `[DONE]` and leaves them to the
# garbage collector (it finalizes them only under asyncio); under trio each one is a
# ResourceWarning about the SDK's and its HTTP client's generators, not about raafd.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning"
)

FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 12}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 2.0, "reply_words": 1000}}}


def sdk(rd: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=rd.base_url + "/v1", api_key="x", max_retries=0, timeout=20)


def final_response(rd: Any, completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-")
    terminal = rd.daemon.streams.get(completion_id.removeprefix("chatcmpl-")).terminal
    assert terminal is not None and terminal.kind == "complete"
    return str(terminal.fields["final_response"])


async def test_non_stream_completion(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            reply = await client.chat.completions.create(
                model="assistant",
                messages=[
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
                ],
                temperature=0.5,
                max_tokens=50,
                top_p=0.9,  # accepted and ignored, as the SDK's other parameters
                user="someone",
            )
    assert reply.object == "chat.completion" and reply.model == "assistant"
    choice = reply.choices[0]
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert choice.message.content.startswith("hello there ")  # the demo echoes, then 12 words
    assert choice.message.content == final_response(rd, reply.id)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 14
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 14


async def test_stream_completion_with_usage(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            stream = await client.chat.completions.create(
                model="assistant",
                messages=[{"role": "user", "content": "stream me"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == final_response(rd, chunks[0].id)
    assert text.startswith("stream me ")
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 14
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_usage_ends_with_finish_reason(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "assistant", "messages": [{"role": "user", "content": "x"}]}
                | {"stream": True},
            )
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    assert '"finish_reason":"stop"' in frames[-2] and '"usage"' not in frames[-2]


async def test_models_and_unknown_model(start_daemon: Any) -> None:
    rd = await start_daemon(agents={"writer": {"instructions": "write"}}, **FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            models = await client.models.list()
            assert sorted(m.id for m in models.data) == ["assistant", "writer"]
            assert all(m.object == "model" and m.owned_by == "raafd" for m in models.data)
            assert (await client.models.retrieve("writer")).id == "writer"
            with pytest.raises(openai.NotFoundError) as info:
                await client.models.retrieve("ghost")
            assert info.value.code == "model_not_found"
            with pytest.raises(openai.NotFoundError) as info:
                await client.chat.completions.create(
                    model="ghost", messages=[{"role": "user", "content": "x"}]
                )
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert info.value.type == "invalid_request_error"
    assert rd.daemon.streams.stats()["running"] + rd.daemon.streams.stats()["retained"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "assistant", "messages": [], "bogus": 1}, "bogus"),
        (
            {"model": "assistant", "messages": [{"role": "robot", "content": "x"}]},
            "messages.0.role",
        ),
        ({"model": "assistant", "messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {"model": "assistant", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages.0.content.0",
        ),
        (
            {"model": "assistant", "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.tool_call_id",
        ),
        (
            {"model": "assistant", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
        ({"model": "assistant", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {
                "model": "assistant",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 3,
            },
            "temperature",
        ),
        ({"model": "assistant", "messages": []}, "messages"),
        ({"messages": []}, "model"),
    ],
)
async def test_validation_errors_are_openai_shaped(
    start_daemon: Any, body: dict[str, Any], param: str
) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "bad_request" and error["message"]


async def test_not_json_is_openai_shaped(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            r = await client.post("/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_upstream_failure(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"max_retries": 0, "reply_words": 5}})
    with trio.fail_after(20):
        async with sdk(rd) as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": "[fail]"}]
                )
            assert info.value.status_code == 502 and info.value.code == "upstream_error"
            stream = await client.chat.completions.create(
                model="assistant",
                messages=[{"role": "user", "content": "[fail-after:3]"}],
                stream=True,
            )
            seen: list[str] = []
            with pytest.raises(openai.APIError) as streamed:
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content or "")
            assert streamed.value.code == "upstream_error"
            assert seen == ["", "streams", " tokens", " arrive"]


async def test_disconnect_cancels_the_completion(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        **SLOW, streams={"detach_grace": 3600.0, "idle_timeout": 3600.0, "max_duration": 36000.0}
    )
    manager = rd.daemon.streams
    body = {"model": "assistant", "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(600):
            async with client.stream(
                "POST", "/v1/chat/completions", json=body | {"stream": True}
            ) as response:
                stream_id = response.headers["x-raafd-stream"]
                seen = b""
                async with open_body(response) as chunks:
                    async for chunk in chunks:
                        seen += chunk
                        if b'"content":" streams"' in seen:
                            break
            await manager.get(stream_id).wait()
            first = manager.get(stream_id).terminal

            # Not streaming: give up while it runs.
            with trio.move_on_after(5):
                await client.post("/v1/chat/completions", json=body)
            (running,) = [s for s in manager.list_streams() if s["id"] != stream_id]
            assert running["owner"].startswith("openai:")
            await manager.get(running["id"]).wait()
            second = manager.get(running["id"]).terminal
    assert first is not None and first.kind == "cancelled" and first.fields["reason"] == "client"
    assert second is not None and second.kind == "cancelled"
    assert second.fields["reason"] == "client"


def test_tool_calls_raafd_ran_stay_inside() -> None:
    def events(*specs: tuple[str, dict[str, Any]]) -> _Reader:
        reader = _Reader()
        for seq, (kind, fields) in enumerate(specs, 1):
            reader.take(make_event("st_x", seq, kind, **fields))
        return reader

    call = ("tool_call", {"tool_id": "c1", "tool_name": "clock", "arguments": {"tz": "UTC"}})
    done = {"final_response": "noon", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    ran = events(
        call,
        ("tool_result", {"tool_id": "c1", "result": "12:00", "is_error": False}),
        ("complete", done | {"finish_reason": "stop"}),
    )
    assert ran.tool_calls() == [] and ran.finish_reason() == "stop"
    assert ran.usage() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    # A call left for the client (the answer finished with tool_calls) is passed on.
    left = events(
        call,
        ("tool_call", {"tool_id": "c2", "tool_name": "x", "arguments": {"_raw": "{oops"}}),
        ("complete", done | {"finish_reason": "tool_calls"}),
    )
    assert left.finish_reason() == "tool_calls"
    assert left.tool_calls() == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "clock", "arguments": '{"tz":"UTC"}'},
        },
        {"id": "c2", "type": "function", "function": {"name": "x", "arguments": "{oops"}},
    ]
    odd = events(("complete", {"final_response": "", "finish_reason": "max_turns"}))
    assert odd.finish_reason() == "stop" and odd.usage() is None  # no usage: unknown, not 0


async def test_a_streaming_completion_is_the_same_on_both_http_paths(start_daemon: Any) -> None:
    """raafd's raw HTTP path serves `stream: true` completions on a fresh connection;
    hypercorn serves them on a connection that began with another request. Same chunks."""
    rd = await start_daemon(**FAST)
    body = {"model": "assistant", "messages": [{"role": "user", "content": "same"}], "stream": True}
    body["stream_options"] = {"include_usage": True}

    async def frames(via_hypercorn: bool) -> list[Any]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=rd.base_url, limits=limits) as client:
            if via_hypercorn:
                assert (await client.get("/healthz")).status_code == 200
            r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        out: list[Any] = []
        for frame in r.text.split("\n\n"):
            if not frame or frame.startswith(":"):
                continue
            data = frame.removeprefix("data: ")
            if data == "[DONE]":
                out.append(data)
                continue
            chunk = json.loads(data)
            assert chunk.pop("id") == f"chatcmpl-{r.headers['x-raafd-stream']}"
            chunk.pop("created")
            out.append(chunk)
        return out

    with trio.fail_after(30):
        raw = await frames(via_hypercorn=False)
        hypercorn = await frames(via_hypercorn=True)
    assert raw == hypercorn
    assert raw[-1] == "[DONE]"
    assert raw[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert raw[-2]["choices"] == [] and raw[-2]["usage"]["completion_tokens"] == 13
    sent = rd.daemon.metrics.registry.get_sample_value(
        "raafd_events_sent_total", {"transport": "openai"}
    )
    assert sent is not None and sent > 0
