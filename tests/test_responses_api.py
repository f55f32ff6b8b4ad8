"""The OpenAI Responses API through a real daemon, driven by the official ``openai`` package."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
import trio

from raafd.providers.http import open_body
from tests.fakes.openai_upstream import FakeOpenAI, Script
from tests.test_openai_compat import sdk

# The SDK leaves its SSE async generators to the garbage collector under trio (see
# test_openai_compat.py): ResourceWarnings about the SDK's generators, not about raafd.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning"
)

FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 12}}}
PACED = {"providers": {"demo": {"tokens_per_second": 40.0, "reply_words": 40}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 2.0, "reply_words": 1000}}}


def final_response(rd: Any, response_id: str) -> str:
    """The text the stream's terminal event holds (a response id is its stream id)."""
    terminal = rd.daemon.streams.get(response_id).terminal
    assert terminal is not None and terminal.kind == "complete"
    return str(terminal.fields["final_response"])


AGENTS = {
    "assistant": {"tools": ["clock"], "handoffs": ["writer"]},
    "writer": {"instructions": "write"},
}


async def test_text_whole_and_streamed(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            whole = await client.responses.create(
                model="assistant", input="hello there", instructions="be brief", top_p=0.5
            )
            stream = await client.responses.create(model="assistant", input="again", stream=True)
            events = [event async for event in stream]
            async with client.responses.stream(model="assistant", input="helper") as helper:
                deltas = [e.delta async for e in helper if e.type == "response.output_text.delta"]
                final = await helper.get_final_response()
    assert whole.object == "response" and whole.status == "completed"
    assert whole.model == "assistant" and whole.id.startswith("resp_")
    assert whole.output_text.startswith("hello there ")  # the demo echoes, then 12 words
    assert whole.output_text == final_response(rd, whole.id)
    assert whole.usage is not None and whole.usage.output_tokens == 14
    assert whole.usage.total_tokens == whole.usage.input_tokens + 14

    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.startswith("again ") and text == events[-1].response.output_text

    assert final.status == "completed" and final.output_text == "".join(deltas)
    assert final.output_text == final_response(rd, final.id)


async def test_previous_response_id_continues_the_conversation(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            first = await client.responses.create(model="assistant", input="first")
            second = await client.responses.create(
                model="assistant", input="second", previous_response_id=first.id
            )
            with pytest.raises(openai.NotFoundError) as info:
                await client.responses.create(
                    model="assistant",
                    input="x",
                    previous_response_id="resp_" + "0" * 24 + "_" + "0" * 12,
                )
    assert info.value.param == "previous_response_id"
    session = rd.daemon.streams.get(second.id).session
    assert session == rd.daemon.streams.get(first.id).session
    kept = await rd.daemon.sessions.get(session)
    assert [(m["role"], m["content"]) for m in kept["messages"]] == [
        ("user", "first"),
        ("assistant", first.output_text),
        ("user", "second"),
        ("assistant", second.output_text),
    ]


async def test_a_tool_call_with_its_result_and_a_handoff(start_daemon: Any) -> None:
    rd = await start_daemon(agents=AGENTS, **FAST)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            tool = await client.responses.create(model="assistant", input="time? [tool:clock]")
            stream = await client.responses.create(
                model="assistant", input="[handoff:writer] please", stream=True
            )
            events = [event async for event in stream]
    call, result, message = tool.output
    assert call.type == "function_call" and call.name == "clock"
    assert orjson.loads(call.arguments) == {}
    assert result.type == "function_call_output" and result.call_id == call.call_id
    assert "UTC" in str(result.output) or "T" in str(result.output)
    assert message.type == "message" and "The tool said" in tool.output_text

    handoffs = [e for e in events if e.type == "response.raafd.handoff"]
    assert len(handoffs) == 1
    assert handoffs[0].from_agent == "assistant" and handoffs[0].to_agent == "writer"  # type: ignore[union-attr]
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.metadata == {
        "raafd_agent": "writer",
        "raafd_handoffs": "assistant>writer",
    }
    transfer = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert transfer.sequence_number < handoffs[0].sequence_number


async def test_an_error_mid_stream_and_before_it(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"max_retries": 0, "reply_words": 5}})
    with trio.fail_after(20):
        async with sdk(rd) as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.responses.create(model="assistant", input="[fail]")
            stream = await client.responses.create(
                model="assistant", input="[fail-after:3]", stream=True
            )
            events = [event async for event in stream]
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed" and failed.response.error is not None
    assert failed.response.error.code == "upstream_error"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "streams tokens arrive"
    assert failed.response.output[0].status == "incomplete"


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
            reply = await client.responses.create(model="assistant", input="x")
    assert reply.status == "completed" and reply.output_text
    assert reply.usage is None


async def test_cancel_a_background_response(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            started = await client.responses.create(
                model="assistant", input="long", background=True
            )
            assert started.status == "in_progress"
            polled = await client.responses.retrieve(started.id)
            assert polled.status == "in_progress"
            cancelled = await client.responses.cancel(started.id)
            again = await client.responses.retrieve(started.id)
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve("resp_nothing")
    assert cancelled.status == "cancelled" and again.status == "cancelled"
    terminal = rd.daemon.streams.get(started.id).terminal
    assert terminal is not None and terminal.fields["reason"] == "client"


async def test_cancel_ends_a_streamed_response(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        async with sdk(rd) as client:
            stream = await client.responses.create(model="assistant", input="long", stream=True)
            events = []
            async for event in stream:
                events.append(event)
                if event.type == "response.output_text.delta":
                    break
            response_id = events[0].response.id
            await client.responses.cancel(response_id)
            async for event in stream:
                events.append(event)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "cancelled"
    assert rd.daemon.streams.get(response_id).status == "cancelled"


async def _read_until(response: httpx.Response, number: int) -> list[dict[str, Any]]:
    """The SSE events of ``response`` up to sequence_number ``number``."""
    seen: list[dict[str, Any]] = []
    data = b""
    async with open_body(response) as chunks:
        async for chunk in chunks:
            data += chunk
            while b"\n\n" in data:
                frame, data = data.split(b"\n\n", 1)
                line = next(x for x in frame.split(b"\n") if x.startswith(b"data: "))
                seen.append(orjson.loads(line.removeprefix(b"data: ")))
                if seen[-1]["sequence_number"] >= number:
                    return seen
    return seen


async def test_resume_after_a_forced_disconnect_yields_exactly_the_rest(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**PACED)
    body = {"model": "assistant", "input": "resume me", "stream": True}
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as http:
            async with http.stream("POST", "/v1/responses", json=body) as response:
                response_id = response.headers["x-raafd-stream"]
                seen = await _read_until(response, 6)
            # the connection is gone; the stream runs on, detached
            assert rd.daemon.streams.get(response_id).status == "running"
        async with sdk(rd) as client:
            resumed = await client.responses.retrieve(
                response_id, stream=True, starting_after=seen[-1]["sequence_number"]
            )
            rest = [event async for event in resumed]
            replay = await client.responses.retrieve(response_id, stream=True)
            whole = [event async for event in replay]
            async with client.responses.stream(response_id=response_id, starting_after=6) as helper:
                later = [event.sequence_number async for event in helper]
                final = await helper.get_final_response()
    assert [e["sequence_number"] for e in seen] == list(range(7))
    assert [e.sequence_number for e in rest] == list(range(7, len(whole)))
    assert [e.to_dict() for e in rest] == [e.to_dict() for e in whole[7:]]
    assert [e.to_dict() for e in whole[:7]] == seen
    assert later == list(range(7, len(whole)))
    assert rest[-1].type == "response.completed"
    text = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
    text += "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    assert text == final_response(rd, response_id) == final.output_text


async def test_disconnect_cancels_only_when_asked(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW, streams={"detach_grace": 60.0})
    manager = rd.daemon.streams
    ids = []
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as http:
            for store in (True, False):
                body = {"model": "assistant", "input": "x", "stream": True, "store": store}
                async with http.stream("POST", "/v1/responses", json=body) as response:
                    ids.append(response.headers["x-raafd-stream"])
                    await _read_until(response, 4)
            await manager.get(ids[1]).wait()
    detached, cancelled = (manager.get(i) for i in ids)
    assert detached.status == "running" and detached.subscribers == 0
    assert cancelled.terminal is not None and cancelled.terminal.fields["reason"] == "client"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "assistant", "input": "x", "bogus": 1}, "bogus"),
        ({"model": "assistant", "input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"model": "assistant", "input": "x", "stream": "yes"}, "stream"),
        ({"input": "x"}, "model"),
    ],
)
async def test_malformed_bodies_get_openai_errors_naming_the_field(
    start_daemon: Any, body: dict[str, Any], param: str
) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            r = await client.post("/v1/responses", json=body)
            bad = await client.post("/v1/responses", content=b"{nope")
            model = await client.post("/v1/responses", json={"model": "ghost", "input": "x"})
            after = await client.get("/v1/responses/resp_x?stream=true&starting_after=-5")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "bad_request" and error["message"]
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"
    assert after.status_code == 404  # an unknown response, before its query is looked at
