"""``POST /v1/ui/chat``, its resume and its stop, through a real daemon with httpx (the AI SDK
itself drives the same endpoints in ``test_vercel_node.py``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from raafd.providers.http import open_body
from raafd.providers.sse import ServerSentEvent, SSEParser
from tests.fakes.openai_upstream import Script
from tests.sse import sse_events
from tests.test_gateway import start_with_fake
from tests.waiting import wait_until

FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 12}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 20.0, "reply_words": 400}}}
# Running for about 5 s, then read to its end: long enough to drop and resume while it runs.
RESUMABLE = {"providers": {"demo": {"tokens_per_second": 20.0, "reply_words": 100}}}
AGENTS = {
    "assistant": {"tools": ["calculator"], "handoffs": ["billing"]},
    "billing": {"instructions": "bills"},
}


def body(chat: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": chat,
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "trigger": "submit-message",
        **extra,
    }


async def read_chunks(
    response: httpx.Response, limit: int | None = None
) -> tuple[list[Any], list[ServerSentEvent]]:
    """The ``data:`` payloads (``[DONE]`` as the string) to the end of the body (right after
    ``[DONE]``) or of ``limit`` events, and the events themselves (for their ids)."""
    seen = await sse_events(response, limit)
    return [_data(e) for e in seen], seen


def _data(event: ServerSentEvent) -> Any:
    return event.data if event.data == "[DONE]" else json.loads(event.data)


def text_of(chunks: list[Any]) -> str:
    return "".join(c["delta"] for c in chunks if isinstance(c, dict) and c["type"] == "text-delta")


def final_response(rd: Any, stream: str) -> str:
    terminal = rd.daemon.streams.get(stream).terminal
    assert terminal is not None and terminal.kind == "complete"
    return str(terminal.fields["final_response"])


async def test_a_chat_answer_is_the_ui_message_stream(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream("POST", "/v1/ui/chat", json=body("c1", "hello")) as r:
                assert r.status_code == 200
                assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
                assert r.headers["content-type"].startswith("text/event-stream")
                stream = r.headers["x-raafd-stream"]
                chunks, _ = await read_chunks(r)
    kinds = [c if c == "[DONE]" else c["type"] for c in chunks]
    assert kinds[:4] == ["start", "start-step", "text-start", "text-delta"]
    assert kinds[-4:] == ["text-end", "finish-step", "finish", "[DONE]"]
    assert chunks[0]["messageId"] == stream
    assert text_of(chunks) == final_response(rd, stream)
    assert text_of(chunks).startswith("hello ")
    finish = chunks[-2]
    assert finish["finishReason"] == "stop"
    usage = finish["messageMetadata"]["usage"]
    assert usage["outputTokens"] == 13  # the demo echoes "hello", then 12 words
    assert usage["totalTokens"] == usage["inputTokens"] + 13
    assert rd.daemon.streams.get(stream).session == "c1"


async def test_the_chat_id_is_the_session_so_the_conversation_goes_on(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            for text in ("first", "second"):
                async with client.stream("POST", "/v1/ui/chat", json=body("c2", text)) as r:
                    chunks, _ = await read_chunks(r)
                assert chunks[-2]["type"] == "finish"
            kept = (await client.get("/v1/sessions/c2")).json()["messages"]
    assert [(m["role"], m["content"].split()[0]) for m in kept] == [
        ("user", "first"),
        ("assistant", "first"),
        ("user", "second"),
        ("assistant", "second"),
    ]


async def test_tool_call_result_and_handoff_parts(start_daemon: Any) -> None:
    rd = await start_daemon(agents=AGENTS, **FAST)
    text = '[tool:calculator {"expression": "6*7"}] [handoff:billing] sum it'
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream("POST", "/v1/ui/chat", json=body("c3", text)) as r:
                chunks, _ = await read_chunks(r)
    by_type: dict[str, list[Any]] = {}
    for c in chunks[:-1]:
        by_type.setdefault(c["type"], []).append(c)
    calc = next(c for c in by_type["tool-input-available"] if c["toolName"] == "calculator")
    assert calc["input"] == {"expression": "6*7"}
    outputs = {c["toolCallId"]: c["output"] for c in by_type["tool-output-available"]}
    assert "42" in str(outputs[calc["toolCallId"]])
    assert by_type["data-handoff"] == [
        {"type": "data-handoff", "data": {"from_agent": "assistant", "to_agent": "billing"}}
    ]
    assert len(by_type["start-step"]) == len(by_type["finish-step"]) >= 2
    assert chunks[-2]["type"] == "finish"


async def test_an_error_mid_stream_is_an_error_chunk(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream(
                "POST", "/v1/ui/chat", json=body("c4", "[fail-after:3] x")
            ) as r:
                chunks, _ = await read_chunks(r)
    assert text_of(chunks)  # some text came before the failure
    assert [c if c == "[DONE]" else c["type"] for c in chunks[-3:]] == [
        "text-end",
        "error",
        "[DONE]",
    ]
    assert chunks[-2]["errorText"]


async def test_no_usage_from_the_upstream_is_null_usage(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    script = Script(deltas=3, interval=0.0, usage=False, finish_reason="length")
    rd, _ = await start_with_fake(start_daemon, nursery, script)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream("POST", "/v1/ui/chat", json=body("c5", "x")) as r:
                chunks, _ = await read_chunks(r)
    finish = chunks[-2]
    assert finish["finishReason"] == "length"
    assert finish["messageMetadata"]["usage"] == {
        "inputTokens": None,
        "outputTokens": None,
        "totalTokens": None,
    }


async def test_resume_after_a_disconnect_yields_exactly_the_rest(start_daemon: Any) -> None:
    rd = await start_daemon(**RESUMABLE)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(30):
            async with client.stream("POST", "/v1/ui/chat", json=body("c6", "go")) as r:
                stream = r.headers["x-raafd-stream"]
                first, events = await read_chunks(r, limit=8)
            # The connection is gone; the stream goes on within its detach grace.
            cursor = events[-1].id
            assert cursor.startswith(f"{stream}:")
            headers = {"last-event-id": cursor}
            async with client.stream("GET", "/v1/ui/chat/c6/stream", headers=headers) as r:
                assert r.status_code == 200
                assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
                rest, _ = await read_chunks(r)
            assert all(c == "[DONE]" or c["type"] != "start" for c in rest)
            assert text_of(first) + text_of(rest) == final_response(rd, stream)
            # Once it ended, the SDK's plain resume finds no active stream ...
            assert (await client.get("/v1/ui/chat/c6/stream")).status_code == 204
            # ... but the cursor still gets the rest while the stream is retained.
            async with client.stream("GET", f"/v1/ui/chat/c6/stream?after={cursor}") as r:
                again, _ = await read_chunks(r)
    assert again == rest


async def test_a_plain_resume_replays_the_running_answer_from_its_start(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**RESUMABLE)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(30):
            assert (await client.get("/v1/ui/chat/c7/stream")).status_code == 204
            async with client.stream("POST", "/v1/ui/chat", json=body("c7", "go")) as r:
                stream = r.headers["x-raafd-stream"]
                await read_chunks(r, limit=5)
            async with client.stream("GET", "/v1/ui/chat/c7/stream") as r:
                assert r.headers["x-raafd-stream"] == stream
                replay, _ = await read_chunks(r)
    assert replay[0]["type"] == "start" and replay[-1] == "[DONE]"
    assert text_of(replay) == final_response(rd, stream)


async def test_stop_cancels_the_stream_and_closes_the_upstream_request(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    rd, fake = await start_with_fake(start_daemon, nursery, Script(deltas=500, interval=0.02))
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream("POST", "/v1/ui/chat", json=body("c8", "x")) as r:
                parser = SSEParser()
                seen: list[ServerSentEvent] = []
                async with open_body(r) as pieces:
                    async for piece in pieces:
                        seen += parser.feed(piece)
                        if (
                            len(seen) >= 6
                            and not any(e.data == "[DONE]" for e in seen)
                            and not fake.requests[-1].closed.is_set()
                        ):
                            stop = await client.delete("/v1/ui/chat/c8/stream")
                            assert stop.status_code == 204
                            await fake.requests[-1].closed.wait()
            request = fake.requests[-1]
            assert request.closed_by_client and not request.completed
    chunks = [_data(e) for e in seen]
    assert chunks[-2:] == [{"type": "abort", "reason": "client"}, "[DONE]"]
    assert rd.daemon.streams.get(r.headers["x-raafd-stream"]).status == "cancelled"


async def test_a_disconnect_detaches_unless_the_request_asked_to_cancel(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**SLOW)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            ids = []
            for chat, extra, headers in (
                ("c9", {}, {}),
                ("c10", {"on_disconnect": "cancel"}, {}),
                ("c15", {}, {"x-raafd-disconnect": "cancel"}),
            ):
                payload = body(chat, "x", **extra)
                async with client.stream("POST", "/v1/ui/chat", json=payload, headers=headers) as r:
                    ids.append(r.headers["x-raafd-stream"])
                    await read_chunks(r, limit=4)
            detached, *cancelled = (rd.daemon.streams.get(i) for i in ids)
            for stream in cancelled:
                await wait_until(lambda stream=stream: stream.finished)
                assert stream.terminal.fields["reason"] == "client"
            await wait_until(lambda: detached.subscribers == 0)
            assert not detached.finished


async def test_a_second_message_while_one_runs_is_a_conflict(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream("POST", "/v1/ui/chat", json=body("c11", "x")) as r:
                await read_chunks(r, limit=2)
                again = await client.post("/v1/ui/chat", json=body("c11", "y"))
    assert again.status_code == 409
    assert again.json()["error"]["field"] == "session"


async def test_a_cursor_of_another_chat_is_not_found(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream("POST", "/v1/ui/chat", json=body("c12", "x")) as r:
                stream = r.headers["x-raafd-stream"]
                await read_chunks(r)
            other = await client.get(
                "/v1/ui/chat/c13/stream", headers={"last-event-id": f"{stream}:2"}
            )
            bad = await client.get("/v1/ui/chat/c12/stream", headers={"last-event-id": "7"})
            past = await client.get(
                "/v1/ui/chat/c12/stream", headers={"last-event-id": f"{stream}:9999"}
            )
    assert other.status_code == 404 and other.json()["error"]["field"] == "after"
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "after"
    assert past.status_code == 400
    assert rd.daemon.streams.get(stream).finished


async def test_the_agent_comes_from_body_header_or_query(start_daemon: Any) -> None:
    rd = await start_daemon(agents={"writer": {"instructions": "w"}}, **FAST)
    agents = []
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            for i, (url, headers, extra) in enumerate(
                [
                    ("/v1/ui/chat", {}, {"agent": "writer"}),
                    ("/v1/ui/chat", {"x-raafd-agent": "writer"}, {}),
                    ("/v1/ui/chat?agent=writer", {}, {}),
                    ("/v1/ui/chat", {}, {}),
                ]
            ):
                chat = body(f"a{i}", "x", **extra)
                async with client.stream("POST", url, json=chat, headers=headers) as r:
                    chunks, _ = await read_chunks(r)
                agents.append(chunks[0]["messageMetadata"]["agent"])
            unknown = await client.post("/v1/ui/chat", json=body("a9", "x", agent="ghost"))
    assert agents == ["writer", "writer", "writer", "assistant"]
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "agent"


def _with(**changes: Any) -> dict[str, Any]:
    return {**body("cx", "x"), **changes}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"messages": []}, "id"),
        (_with(id=""), "id"),
        (_with(bogus=1), "bogus"),
        (_with(messages=[]), "messages"),
        (_with(messages=[{"id": "m", "role": "robot", "parts": []}]), "messages.0.role"),
        (_with(messages=[{"id": "m", "role": "user"}]), "messages.0.parts"),
        (
            _with(
                messages=[
                    {"id": "m", "role": "assistant", "parts": [{"type": "text", "text": "a"}]}
                ]
            ),
            "messages.0.role",
        ),
        (
            _with(messages=[{"id": "m", "role": "user", "parts": [{"type": "file", "url": "x"}]}]),
            "messages.0.parts.0.type",
        ),
        (
            _with(messages=[{"id": "m", "role": "user", "parts": [{"type": "text"}]}]),
            "messages.0.parts.0.text",
        ),
        (_with(trigger="later"), "trigger"),
        (_with(on_disconnect="never"), "on_disconnect"),
    ],
)
async def test_malformed_bodies_name_the_field(
    start_daemon: Any, payload: dict[str, Any], field: str
) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            r = await client.post("/v1/ui/chat", json=payload)
            after = await client.get("/healthz")  # the server goes on
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_request" and error["field"] == field, error
    assert after.status_code == 200
    assert rd.daemon.streams.stats()["running"] + rd.daemon.streams.stats()["retained"] == 0


async def test_auth_is_the_same_bearer_as_everywhere(start_daemon: Any) -> None:
    rd = await start_daemon(auth={"tokens": ["sekrit"]}, **FAST)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            refused = await client.post("/v1/ui/chat", json=body("c14", "x"))
            resume = await client.get("/v1/ui/chat/c14/stream")
            headers = {"authorization": "Bearer sekrit"}
            async with client.stream(
                "POST", "/v1/ui/chat", json=body("c14", "x"), headers=headers
            ) as r:
                chunks, _ = await read_chunks(r)
    assert refused.status_code == 401 and resume.status_code == 401
    assert chunks[-1] == "[DONE]"


async def test_both_http_paths_answer_alike(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    answers = []
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            for warm in (False, True):
                if warm:  # a connection hypercorn took over serves the chat there
                    assert (await client.get("/healthz")).status_code == 200
                chat = body(f"p{warm}", "[words:3] same")
                async with client.stream("POST", "/v1/ui/chat", json=chat) as r:
                    headers = {k: r.headers[k] for k in ("content-type", "cache-control")}
                    assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
                    chunks, _ = await read_chunks(r)
                answers.append((headers, [c if c == "[DONE]" else c["type"] for c in chunks]))
    assert answers[0] == answers[1]
    assert answers[0][1][-1] == "[DONE]"


async def test_an_agent_the_roles_do_not_grant_is_forbidden(start_daemon: Any) -> None:
    rd = await start_daemon(
        agents={"writer": {"instructions": "w"}},
        auth={
            "users": {"alice": {"token": "alice-token-value", "roles": ["reader"]}},
            "roles": {"reader": {"agents": ["assistant"]}},
        },
        **FAST,
    )
    headers = {"authorization": "Bearer alice-token-value"}
    async with httpx.AsyncClient(base_url=rd.base_url, headers=headers) as client:
        with trio.fail_after(20):
            refused = await client.post("/v1/ui/chat", json=body("f1", "x", agent="writer"))
            async with client.stream("POST", "/v1/ui/chat", json=body("f2", "x")) as r:
                chunks, _ = await read_chunks(r)
    assert refused.status_code == 403
    assert refused.json()["error"] | {"message": ""} == {
        "code": "forbidden",
        "message": "",
        "field": "agent",
    }
    assert chunks[-1] == "[DONE]"
