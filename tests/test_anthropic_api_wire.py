"""The Anthropic Messages translation, event by event, with no I/O
(raafd/http/anthropic_wire.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from raafd.errors import BadRequest
from raafd.http.anthropic_wire import (
    MessagesFraming,
    MessageTranslator,
    conversation,
    error_body,
    parse_request,
)
from raafd.protocol.events import StreamEvent, make_event

SID = "st_" + "c" * 24
DONE = {"final_response": "", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def log(*specs: tuple[str, dict[str, Any]]) -> list[StreamEvent]:
    events = [("start", {"agent": "assistant", "model": "demo"}), *specs]
    return [make_event(SID, seq, kind, **fields) for seq, (kind, fields) in enumerate(events, 1)]


def translate(events: list[StreamEvent]) -> tuple[MessageTranslator, list[tuple[str, Any]]]:
    translator = MessageTranslator(f"msg_{SID}")
    out: list[tuple[str, Any]] = []
    for event in events:
        out += translator.take(event)
    return translator, out


def text(delta: str) -> tuple[str, dict[str, Any]]:
    return ("content", {"delta": delta})


def test_text_is_one_block_then_the_stop_reason_and_usage() -> None:
    translator, out = translate(
        log(text("Hel"), text("lo"), ("complete", DONE | {"finish_reason": "stop"}))
    )
    assert out == [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_{SID}",
                    "type": "message",
                    "role": "assistant",
                    "model": "assistant",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": None, "output_tokens": 0},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hel"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "lo"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"input_tokens": 3, "output_tokens": 2},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    message = translator.message()
    assert message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 3, "output_tokens": 2}
    assert message["raafd"] == {"agent": "assistant", "handoffs": []}


def test_a_tool_call_its_result_and_a_handoff() -> None:
    translator, out = translate(
        log(
            text("checking"),
            ("tool_call", {"tool_id": "c1", "tool_name": "clock", "arguments": {"tz": "UTC"}}),
            ("tool_result", {"tool_id": "c1", "result": "12:00", "is_error": False}),
            ("handoff", {"from_agent": "assistant", "to_agent": "writer"}),
            text("noon"),
            ("complete", DONE | {"finish_reason": "stop"}),
        )
    )
    names = [name for name, _ in out]
    assert names == [
        "message_start",
        "content_block_start",  # 0 text
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 1 tool_use
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 2 tool_result
        "content_block_stop",
        "raafd_handoff",
        "content_block_start",  # 3 text
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert out[4][1]["content_block"] == {
        "type": "tool_use",
        "id": "c1",
        "name": "clock",
        "input": {},
    }
    assert out[5][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"tz":"UTC"}'}
    assert out[7][1]["index"] == 2
    assert out[9][1] == {"type": "raafd_handoff", "from_agent": "assistant", "to_agent": "writer"}
    assert out[10][1]["index"] == 3
    message = translator.message()
    assert message["content"] == [
        {"type": "text", "text": "checking"},
        {"type": "tool_use", "id": "c1", "name": "clock", "input": {"tz": "UTC"}},
        {"type": "tool_result", "tool_use_id": "c1", "content": "12:00", "is_error": False},
        {"type": "text", "text": "noon"},
    ]
    assert message["stop_reason"] == "end_turn"  # raafd answered the call itself
    assert message["raafd"] == {
        "agent": "writer",
        "handoffs": [{"from_agent": "assistant", "to_agent": "writer"}],
    }


def test_calls_left_for_the_client_stop_with_tool_use() -> None:
    translator, _ = translate(
        log(
            ("tool_call", {"tool_id": "c9", "tool_name": "ask", "arguments": {"_raw": "{oops"}}),
            ("complete", DONE | {"finish_reason": "tool_calls"}),
        )
    )
    assert translator.stop_reason == "tool_use"
    assert translator.content == [{"type": "tool_use", "id": "c9", "name": "ask", "input": {}}]


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
        ("x", "end_turn"),
    ],
)
def test_finish_reasons(finish_reason: str, stop_reason: str) -> None:
    translator, out = translate(
        log(text("x"), ("complete", DONE | {"finish_reason": finish_reason}))
    )
    assert out[-2][1]["delta"]["stop_reason"] == stop_reason == translator.stop_reason


def test_usage_the_upstream_did_not_give_is_null() -> None:
    translator, out = translate(log(("complete", {"final_response": "", "finish_reason": "stop"})))
    assert out[-2][1]["usage"] == {"input_tokens": None, "output_tokens": None}
    assert translator.message()["usage"] == {"input_tokens": None, "output_tokens": None}


def test_an_error_mid_stream_stops_the_block_then_is_one_error_event() -> None:
    error = {"code": "upstream_error", "message": "the provider failed"}
    translator, out = translate(log(text("par"), ("error", {"error": error})))
    assert [name for name, _ in out[-2:]] == ["content_block_stop", "error"]
    assert out[-1][1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream_error: the provider failed"},
    }
    assert translator.error == out[-1][1]
    _, out = translate(log(("cancelled", {"reason": "timeout"})))
    assert out[-1][1]["error"]["type"] == "timeout_error"
    assert "cancelled" in out[-1][1]["error"]["message"]


def test_the_framing_is_sse_named_by_event_with_ping_heartbeats() -> None:
    framing = MessagesFraming(MessageTranslator("msg_x"))
    events = log(text("a"), ("complete", DONE | {"finish_reason": "stop"}))
    frames = [f for f in framing.batch(events).split(b"\n\n") if f]
    first = frames[0].split(b"\n")
    assert first[0] == b"event: message_start"
    assert orjson.loads(first[1].removeprefix(b"data: "))["type"] == "message_start"
    assert frames[-1] == b'event: message_stop\ndata: {"type":"message_stop"}'
    assert framing.heartbeat == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_messages_become_the_conversation() -> None:
    req = parse_request(
        orjson.dumps(
            {
                "model": "assistant",
                "max_tokens": 64,
                "system": [{"type": "text", "text": "be brief"}],
                "messages": [
                    {"role": "user", "content": "time?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hm", "signature": "s"},
                            {"type": "text", "text": "let me look"},
                            {"type": "tool_use", "id": "t1", "name": "clock", "input": {}},
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t1", "content": "noon"},
                            {"type": "text", "text": "and?"},
                        ],
                    },
                ],
                "tools": [{"name": "ignored", "input_schema": {}}],
                "top_k": 3,
            }
        )
    )
    assert conversation(req) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "time?"},
        {
            "role": "assistant",
            "content": "let me look",
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "noon"},
        {"role": "user", "content": "and?"},
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [], "max_tokens": 1}, "model"),
        ({"model": "a", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"model": "a", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": "a", "max_tokens": 1, "messages": []}, "messages"),
        (
            {"model": "a", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
            "messages.0.role",
        ),
        ({"model": "a", "max_tokens": 1, "messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {"model": "a", "max_tokens": 1, "messages": [{"role": "user", "content": "x", "x": 1}]},
            "messages.0.x",
        ),
        (
            {
                "model": "a",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": [{"type": "image"}]}],
            },
            "messages.0.content.0.type",
        ),
        ({"model": "a", "max_tokens": 1, "messages": [], "bogus": True}, "bogus"),
        ({"model": "a", "max_tokens": 1, "stream": "yes", "messages": []}, "stream"),
        (
            {
                "model": "a",
                "max_tokens": 1,
                "temperature": 1.5,
                "messages": [{"role": "user", "content": "x"}],
            },
            "temperature",
        ),
    ],
)
def test_malformed_bodies_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        conversation(parse_request(orjson.dumps(body)))
    assert info.value.field == field
    shaped = error_body(400, info.value.message, info.value.field)
    assert shaped["type"] == "error" and shaped["error"]["type"] == "invalid_request_error"
    assert shaped["error"]["message"].startswith(field)
