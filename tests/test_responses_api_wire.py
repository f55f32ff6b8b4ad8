"""The Responses API translation, event by event, with no I/O (raafd/http/responses_wire.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from raafd.errors import BadRequest
from raafd.http.responses_wire import (
    ResponsesFraming,
    ResponseTranslator,
    conversation,
    new_response_id,
    parse_request,
    session_of,
)
from raafd.protocol.events import StreamEvent, coalesce, make_event

RID = "resp_" + "a" * 24 + "_" + "b" * 12
DONE = {"final_response": "", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def log(*specs: tuple[str, dict[str, Any]]) -> list[StreamEvent]:
    """A stream's log: ``start`` then the given events, seq from 1."""
    events = [("start", {"agent": "assistant", "model": "demo"}), *specs]
    return [make_event(RID, seq, kind, **fields) for seq, (kind, fields) in enumerate(events, 1)]


def translate(events: list[StreamEvent]) -> tuple[ResponseTranslator, list[dict[str, Any]]]:
    translator = ResponseTranslator(RID, 1_700_000_000.5)
    out: list[dict[str, Any]] = []
    for event in events:
        out += translator.take(event)
    return translator, out


def text(delta: str) -> tuple[str, dict[str, Any]]:
    return ("content", {"delta": delta})


def test_text_becomes_a_message_item_numbered_from_zero() -> None:
    translator, out = translate(
        log(text("Hel"), text("lo"), ("complete", DONE | {"finish_reason": "stop"}))
    )
    assert [(e["type"], e["sequence_number"]) for e in out] == [
        ("response.created", 0),
        ("response.in_progress", 1),
        ("response.output_item.added", 2),
        ("response.content_part.added", 3),
        ("response.output_text.delta", 4),
        ("response.output_text.delta", 5),
        ("response.output_text.done", 6),
        ("response.content_part.done", 7),
        ("response.output_item.done", 8),
        ("response.completed", 9),
    ]
    created = out[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == RID and created["created_at"] == 1_700_000_000
    assert created["model"] == "assistant" and created["usage"] is None
    item_id = out[2]["item"]["id"]
    assert [e["delta"] for e in out[4:6]] == ["Hel", "lo"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 for e in out[3:8])
    assert out[6]["text"] == "Hello"
    done = out[-1]["response"]
    assert done["status"] == "completed" and done["error"] is None
    assert done["output"] == [
        {
            "id": item_id,
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
            ],
        }
    ]
    assert done["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": None},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": None},
        "total_tokens": 5,
    }
    assert translator.output_text == "Hello"
    assert translator.response() == done


def test_a_tool_call_its_result_and_a_handoff_are_items_and_metadata() -> None:
    call = {"tool_id": "c1", "tool_name": "clock", "arguments": {"tz": "UTC"}}
    _, out = translate(
        log(
            text("let me see"),
            ("tool_call", call),
            ("tool_result", {"tool_id": "c1", "result": "12:00", "is_error": False}),
            ("handoff", {"from_agent": "assistant", "to_agent": "writer"}),
            text("noon"),
            ("complete", DONE | {"finish_reason": "stop"}),
        )
    )
    kinds = [e["type"] for e in out]
    # the open message is closed before the call
    at = kinds.index("response.function_call_arguments.delta")
    assert kinds[at - 4 : at] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]
    assert out[at]["delta"] == '{"tz":"UTC"}'
    assert out[at + 1]["type"] == "response.function_call_arguments.done"
    assert out[at + 1]["arguments"] == '{"tz":"UTC"}'
    handoff = next(e for e in out if e["type"] == "response.raafd.handoff")
    assert handoff["from_agent"] == "assistant" and handoff["to_agent"] == "writer"
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    final = out[-1]["response"]
    assert [item["type"] for item in final["output"]] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    function_call, result = final["output"][1:3]
    assert function_call["call_id"] == "c1" and function_call["name"] == "clock"
    assert function_call["arguments"] == '{"tz":"UTC"}' and function_call["status"] == "completed"
    assert result["call_id"] == "c1" and result["output"] == "12:00"
    assert final["output"][3]["content"][0]["text"] == "noon"
    assert final["metadata"] == {"raafd_agent": "writer", "raafd_handoffs": "assistant>writer"}


def test_an_error_mid_stream_fails_the_response_and_leaves_the_message_incomplete() -> None:
    error = {"code": "upstream_error", "message": "the provider failed"}
    _, out = translate(log(text("par"), ("error", {"error": error})))
    assert [e["type"] for e in out[-4:]] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    failed = out[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == error
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "par"


def test_usage_the_upstream_did_not_give_is_null() -> None:
    no_usage = {"final_response": "x", "usage": {"prompt_tokens": None, "completion_tokens": 4}}
    _, out = translate(log(text("x"), ("complete", no_usage | {"finish_reason": "stop"})))
    assert out[-1]["response"]["usage"] is None
    _, out = translate(log(("complete", {"final_response": "", "finish_reason": "stop"})))
    assert out[-1]["response"]["usage"] is None
    assert out[-1]["response"]["output"] == []


@pytest.mark.parametrize(
    ("finish_reason", "event", "status", "details"),
    [
        ("stop", "response.completed", "completed", None),
        ("tool_calls", "response.completed", "completed", None),
        ("length", "response.incomplete", "incomplete", {"reason": "max_output_tokens"}),
        ("content_filter", "response.incomplete", "incomplete", {"reason": "content_filter"}),
    ],
)
def test_finish_reasons(
    finish_reason: str, event: str, status: str, details: dict[str, str] | None
) -> None:
    _, out = translate(log(text("x"), ("complete", DONE | {"finish_reason": finish_reason})))
    assert out[-1]["type"] == event
    assert out[-1]["response"]["status"] == status
    assert out[-1]["response"]["incomplete_details"] == details


def test_a_cancelled_stream_is_a_cancelled_response() -> None:
    _, out = translate(log(text("x"), ("cancelled", {"reason": "client"})))
    assert out[-1]["type"] == "response.incomplete"
    assert out[-1]["response"]["status"] == "cancelled"
    assert out[-1]["response"]["output"][0]["status"] == "incomplete"


def test_coalesced_deltas_keep_every_later_sequence_number() -> None:
    """A lagging subscriber of a shared stream may get adjacent content events merged; the
    numbers of the merged deltas are skipped, never reused."""
    events = log(
        text("a"), text("b"), text("c"), text("d"), ("complete", DONE | {"finish_reason": "stop"})
    )
    _, whole = translate(events)
    merged = [events[0], coalesce(events[1], events[2]), coalesce(events[3], events[4]), events[5]]
    _, out = translate(merged)
    numbers = {e["sequence_number"]: e for e in whole}
    for event in out:
        if event["type"] == "response.output_text.delta":
            continue
        assert numbers[event["sequence_number"]] == event
    deltas = [(e["sequence_number"], e["delta"]) for e in out if "delta" in e]
    assert deltas == [(5, "ab"), (7, "cd")]  # each carries the number of the last it covers


def test_resuming_after_n_frames_exactly_the_rest() -> None:
    events = log(
        text("a"),
        ("tool_call", {"tool_id": "c", "tool_name": "t", "arguments": {}}),
        ("tool_result", {"tool_id": "c", "result": {"ok": 1}, "is_error": False}),
        text("b"),
        ("complete", DONE | {"finish_reason": "stop"}),
    )
    whole = ResponsesFraming(ResponseTranslator(RID, 0)).batch(events)
    frames = [f for f in whole.split(b"\n\n") if f]
    for after in range(len(frames)):
        resumed = ResponsesFraming(ResponseTranslator(RID, 0), starting_after=after)
        # delivered in any batching: one by one here
        data = b"".join(resumed.event(e) for e in events)
        assert [f for f in data.split(b"\n\n") if f] == frames[after + 1 :]
    first = frames[0].split(b"\n")
    assert first[0] == b"event: response.created"
    assert orjson.loads(first[1].removeprefix(b"data: "))["sequence_number"] == 0


def test_response_ids_name_their_conversation() -> None:
    first, session = new_response_id()
    assert session_of(first) == session and first.startswith(session + "_")
    second, same = new_response_id(first)
    assert same == session and second != first and session_of(second) == session
    assert session_of("resp_nope") is None and session_of("st_" + "a" * 24) is None


def test_input_items_become_the_conversation() -> None:
    req = parse_request(
        orjson.dumps(
            {
                "model": "assistant",
                "instructions": "be brief",
                "input": [
                    {"role": "developer", "content": "system text"},
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hi"}],
                    },
                    {"type": "function_call", "call_id": "c1", "name": "clock", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "noon"},
                ],
                "tools": [{"type": "function", "name": "ignored"}],
                "metadata": {"k": "v"},
            }
        )
    )
    assert conversation(req) == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "system text"},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
    ]
    assert conversation(parse_request(b'{"model": "a", "input": "x"}')) == [
        {"role": "user", "content": "x"}
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": "x"}, "model"),
        ({"model": "a", "input": "x", "bogus": 1}, "bogus"),
        ({"model": "a", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "a", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "a", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "a", "input": "x", "previous_response_id": "resp_x"}, "previous_response_id"),
        ({"model": "a", "input": 7}, "input"),
        ({"model": "a", "input": []}, "input"),
        ({"model": "a", "input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"model": "a", "input": [{"role": "user"}]}, "input.0.content"),
        (
            {"model": "a", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input.0.content.0",
        ),
        ({"model": "a", "input": [{"type": "reasoning"}]}, "input.0.type"),
        (
            {"model": "a", "input": [{"type": "function_call_output", "output": "x"}]},
            "input.0.call_id",
        ),
    ],
)
def test_malformed_bodies_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        conversation(parse_request(orjson.dumps(body)))
    assert info.value.field == field and info.value.message
