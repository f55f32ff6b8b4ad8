"""The Anthropic Messages API through a real daemon, driven by the official ``anthropic``
package."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest
import trio
from anthropic import AsyncAnthropic

from tests.fakes.openai_upstream import FakeOpenAI, Script

# As with the openai package: under trio the SDK leaves its SSE generators to the garbage
# collector; ResourceWarnings about the SDK's and its HTTP client's generators, not raafd's.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(anthropic|httpx|httpcore|httpx2|httpcore2)\.:ResourceWarning"
)

FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 12}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 2.0, "reply_words": 1000}}}
AGENTS = {
    "assistant": {"tools": ["clock"], "handoffs": ["writer"]},
    "writer": {"instructions": "write"},
}
TOKEN = "anthropic-secret"


def sdk(rd: Any, key: str = "x") -> AsyncAnthropic:
    return AsyncAnthropic(base_url=rd.base_url, api_key=key, max_retries=0, timeout=20)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def final_response(rd: Any, message_id: str) -> str:
    terminal = rd.daemon.streams.get(message_id.removeprefix("msg_")).terminal
    assert terminal is not None and terminal.kind == "complete"
    return str(terminal.fields["final_response"])


async def test_text_whole_and_streamed(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            whole = await client.messages.create(
                model="assistant",
                max_tokens=100,
                system="be brief",
                messages=user("hello there"),
                metadata={"user_id": "u1"},  # validated, not used
                stop_sequences=["zz"],  # accepted and ignored, as the SDK's other parameters
                speed="standard",
            )
            raw = await client.messages.create(
                model="assistant", max_tokens=100, messages=user("again"), stream=True
            )
            events = [event async for event in raw]
            async with client.messages.stream(
                model="assistant", max_tokens=100, messages=user("helper")
            ) as stream:
                texts = [text async for text in stream.text_stream]
                final = await stream.get_final_message()
    assert whole.type == "message" and whole.role == "assistant" and whole.model == "assistant"
    assert whole.stop_reason == "end_turn"
    (block,) = whole.content
    assert block.type == "text" and block.text.startswith("hello there ")
    assert block.text == final_response(rd, whole.id)
    assert whole.usage.output_tokens == 14 and whole.usage.input_tokens > 0

    assert [e.type for e in events[:2]] == ["message_start", "content_block_start"]
    assert [e.type for e in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta")  # type: ignore[union-attr]
    assert streamed.startswith("again ")
    delta = events[-2]
    assert delta.type == "message_delta" and delta.usage.output_tokens == 13

    assert "".join(texts) == final.content[0].text == final_response(rd, final.id)  # type: ignore[union-attr]
    assert final.usage.input_tokens is not None and final.usage.output_tokens == 13


async def test_a_tool_call_with_its_result_and_a_handoff(start_daemon: Any) -> None:
    rd = await start_daemon(agents=AGENTS, **FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            tool = await client.messages.create(
                model="assistant", max_tokens=100, messages=user("time? [tool:clock]")
            )
            async with client.messages.stream(
                model="assistant", max_tokens=100, messages=user("[tool:clock] now")
            ) as stream:
                json_deltas = [e.partial_json async for e in stream if e.type == "input_json"]  # type: ignore[union-attr]
                streamed = await stream.get_final_message()
            raw = await client.messages.create(
                model="assistant", max_tokens=100, messages=user("[handoff:writer] go"), stream=True
            )
            events = [event async for event in raw]
    call, result, answer = tool.content
    assert call.type == "tool_use" and call.name == "clock" and call.input == {}
    assert result.type == "tool_result"
    assert result.tool_use_id == call.id  # type: ignore[attr-defined]
    assert result.is_error is False  # type: ignore[attr-defined]
    assert answer.type == "text" and answer.text == f"The tool said: {result.content}"  # type: ignore[attr-defined]
    assert tool.stop_reason == "end_turn"  # raafd ran the tool; nothing is left for the client

    assert json_deltas == ["{}"]
    assert [b.type for b in streamed.content] == ["tool_use", "tool_result", "text"]

    handoffs = [e for e in events if e.type == "raafd_handoff"]  # type: ignore[comparison-overlap]
    assert len(handoffs) == 1
    assert handoffs[0].to_dict() == {
        "type": "raafd_handoff",
        "from_agent": "assistant",
        "to_agent": "writer",
    }
    uses = [e for e in events if e.type == "content_block_start"]
    assert uses[0].content_block.type == "tool_use"  # type: ignore[union-attr]
    assert uses[0].content_block.name == "transfer_to_writer"  # type: ignore[union-attr]
    assert events[-1].type == "message_stop"


async def test_an_error_mid_stream_and_before_it(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"max_retries": 0, "reply_words": 5}})
    with trio.fail_after(20):
        async with sdk(rd) as client:
            with pytest.raises(anthropic.InternalServerError) as before:
                await client.messages.create(
                    model="assistant", max_tokens=100, messages=user("[fail]")
                )
            raw = await client.messages.create(
                model="assistant", max_tokens=100, messages=user("[fail-after:3]"), stream=True
            )
            texts: list[str] = []
            with pytest.raises(anthropic.APIStatusError) as during:
                async for event in raw:
                    if event.type == "content_block_delta":
                        texts.append(event.delta.text)  # type: ignore[union-attr]
    assert before.value.status_code == 502
    assert before.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream_error: demo provider asked to fail"},
    }
    assert "".join(texts) == "streams tokens arrive"
    assert isinstance(during.value.body, dict)
    assert during.value.body["error"]["type"] == "api_error"
    assert during.value.body["error"]["message"].startswith("upstream_error: ")


async def test_usage_is_null_when_the_upstream_sent_none(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    fake = FakeOpenAI(default=Script(deltas=3, interval=0.0, usage=False))
    port = await nursery.start(fake.run)
    rd = await start_daemon(
        providers={"up": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1"}},
        agents={"assistant": {"provider": "up"}},
    )
    with trio.fail_after(20):
        async with sdk(rd) as client:
            whole = await client.messages.create(
                model="assistant", max_tokens=9, messages=user("x")
            )
            async with client.messages.stream(
                model="assistant", max_tokens=9, messages=user("x")
            ) as stream:
                streamed = await stream.get_final_message()
    for message in (whole, streamed):
        assert message.content[0].text  # type: ignore[union-attr]
        assert message.usage.input_tokens is None and message.usage.output_tokens is None


async def test_cancel_ends_a_streamed_message_with_an_error_event(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        async with sdk(rd) as client, httpx.AsyncClient(base_url=rd.base_url) as http:
            raw = await client.messages.create(
                model="assistant", max_tokens=100, messages=user("long"), stream=True
            )
            stream_id = raw.response.headers["x-raafd-stream"]
            with pytest.raises(anthropic.APIStatusError) as info:
                async for event in raw:
                    if event.type == "content_block_delta":
                        r = await http.post(f"/v1/streams/{stream_id}/cancel")
                        assert r.status_code == 200
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["message"] == "cancelled: the message was cancelled (client)"
    assert rd.daemon.streams.get(stream_id).status == "cancelled"


async def test_disconnect_detaches_unless_asked_to_cancel(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW, streams={"detach_grace": 60.0})
    manager = rd.daemon.streams
    body = {"model": "assistant", "max_tokens": 10, "messages": user("x"), "stream": True}
    ids = []
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as http:
            for headers in ({}, {"x-raafd-disconnect": "cancel"}):
                async with http.stream("POST", "/v1/messages", json=body, headers=headers) as r:
                    ids.append(r.headers["x-raafd-stream"])
                    async for line in r.aiter_lines():
                        if line.startswith("event: content_block_delta"):
                            break
            await manager.get(ids[1]).wait()
    detached, cancelled = (manager.get(i) for i in ids)
    assert detached.status == "running" and detached.subscribers == 0
    assert cancelled.terminal is not None and cancelled.terminal.fields["reason"] == "client"


async def test_the_key_may_come_as_x_api_key(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST, auth={"tokens": [TOKEN]})
    with trio.fail_after(20):
        async with sdk(rd, TOKEN) as good, sdk(rd, "wrong") as bad:
            reply = await good.messages.create(model="assistant", max_tokens=9, messages=user("x"))
            with pytest.raises(anthropic.AuthenticationError):
                await bad.messages.create(model="assistant", max_tokens=9, messages=user("x"))
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            elsewhere = await http.get("/v1/agents", headers={"x-api-key": TOKEN})
    assert reply.content[0].text  # type: ignore[union-attr]
    assert elsewhere.status_code == 401  # x-api-key is the Messages API's alone


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "assistant", "messages": user("x")}, "max_tokens"),
        ({"model": "assistant", "max_tokens": 5, "messages": user("x"), "bogus": 1}, "bogus"),
        (
            {
                "model": "assistant",
                "max_tokens": 5,
                "messages": [{"role": "robot", "content": "x"}],
            },
            "messages.0.role",
        ),
    ],
)
async def test_malformed_bodies_get_anthropic_errors_naming_the_field(
    start_daemon: Any, body: dict[str, Any], field: str
) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as http:
        with trio.fail_after(20):
            r = await http.post("/v1/messages", json=body)
            not_json = await http.post("/v1/messages", content=b"{nope")
            model = await http.post(
                "/v1/messages", json={"model": "ghost", "max_tokens": 5, "messages": user("x")}
            )
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith(field + ": ")
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    assert model.status_code == 404 and model.json()["error"]["type"] == "not_found_error"
    assert model.json()["error"]["message"].startswith("model: ")
