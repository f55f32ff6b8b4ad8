"""The UI message stream translation (``raafd.protocol.ui_stream``), event by event: pure, no
sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from raafd.protocol.events import StreamEvent, make_event
from raafd.protocol.ui_stream import UIMessageState, UIStreamFraming, finish_reason, usage

S = "st_t"


def events(*specs: tuple[str, dict[str, Any]]) -> list[StreamEvent]:
    return [make_event(S, i, kind, **fields) for i, (kind, fields) in enumerate(specs, 1)]


def chunks(framed: bytes) -> list[Any]:
    """The ``data:`` payloads of SSE frames, ``[DONE]`` as the string."""
    out: list[Any] = []
    for frame in framed.decode().split("\n\n"):
        for line in frame.split("\n"):
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def ids(framed: bytes) -> list[str]:
    return [line.removeprefix("id: ") for line in framed.decode().split("\n") if line[:4] == "id: "]


START = ("start", {"agent": "assistant", "model": "demo-1"})
TOOL_RUN = events(
    START,
    ("content", {"delta": "Let me "}),
    ("content", {"delta": "look."}),
    ("tool_call", {"tool_id": "c1", "tool_name": "calculator", "arguments": {"x": "1+1"}}),
    ("tool_result", {"tool_id": "c1", "result": "2", "is_error": False}),
    ("content", {"delta": "It is 2."}),
    (
        "complete",
        {
            "final_response": "Let me look.It is 2.",
            "usage": {"prompt_tokens": 10, "completion_tokens": 7},
            "finish_reason": "stop",
        },
    ),
)


def test_a_tool_run_maps_to_text_tool_parts_and_two_steps() -> None:
    framed = UIStreamFraming().batch(TOOL_RUN)
    assert chunks(framed) == [
        {
            "type": "start",
            "messageId": S,
            "messageMetadata": {"stream": S, "agent": "assistant", "model": "demo-1"},
        },
        {"type": "start-step"},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Let me "},
        {"type": "text-delta", "id": "text-2", "delta": "look."},
        {"type": "text-end", "id": "text-2"},
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "calculator"},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"x":"1+1"}'},
        {
            "type": "tool-input-available",
            "toolCallId": "c1",
            "toolName": "calculator",
            "input": {"x": "1+1"},
        },
        {"type": "tool-output-available", "toolCallId": "c1", "output": "2"},
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-6"},
        {"type": "text-delta", "id": "text-6", "delta": "It is 2."},
        {"type": "text-end", "id": "text-6"},
        {"type": "finish-step"},
        {
            "type": "finish",
            "finishReason": "stop",
            "messageMetadata": {"usage": {"inputTokens": 10, "outputTokens": 7, "totalTokens": 17}},
        },
        "[DONE]",
    ]
    # One id per event that produced chunks, on its last frame.
    assert ids(framed) == [f"{S}:{seq}" for seq in range(1, 8)]
    assert framed.endswith(b"data: [DONE]\n\n")


def test_the_id_is_on_the_last_frame_of_an_event() -> None:
    framed = UIStreamFraming().event(TOOL_RUN[0])
    first, second = [f for f in framed.split(b"\n\n") if f]
    assert not first.startswith(b"id:")
    assert second == b'id: st_t:1\ndata: {"type":"start-step"}'


@pytest.mark.parametrize("after", range(len(TOOL_RUN) + 1))
def test_a_resume_after_any_seq_frames_exactly_the_rest(after: int) -> None:
    whole = UIStreamFraming().batch(TOOL_RUN)
    head = UIStreamFraming()
    seen = b"".join(head.event(e) for e in TOOL_RUN[:after])
    rest = UIStreamFraming(skip_through=after).batch(TOOL_RUN)
    assert seen + rest == whole
    if after:
        assert b'"type":"start"' not in rest  # no second message start on a continuation


def test_events_one_by_one_frame_as_a_batch_does() -> None:
    one = UIStreamFraming()
    assert b"".join(one.event(e) for e in TOOL_RUN) == UIStreamFraming().batch(TOOL_RUN)


def test_handoff_is_a_data_part_and_starts_a_new_step() -> None:
    state = UIMessageState()
    run = events(
        START,
        ("tool_call", {"tool_id": "h", "tool_name": "transfer_to_billing", "arguments": {}}),
        ("tool_result", {"tool_id": "h", "result": "transferred", "is_error": False}),
        ("handoff", {"from_agent": "assistant", "to_agent": "billing"}),
        ("content", {"delta": "Billing here."}),
    )
    out = [c for e in run for c in state.take(e)]
    kinds = [c["type"] for c in out]
    assert kinds == [
        "start",
        "start-step",
        "tool-input-start",
        "tool-input-delta",
        "tool-input-available",
        "tool-output-available",
        "data-handoff",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
    ]
    assert out[6] == {
        "type": "data-handoff",
        "data": {"from_agent": "assistant", "to_agent": "billing"},
    }


def test_retry_paused_resumed_are_transient_data_parts() -> None:
    state = UIMessageState()
    retry = make_event(S, 2, "retry", attempt=1, reason="upstream_error", retry_after=0.5)
    assert state.take(retry) == [
        {
            "type": "data-retry",
            "data": {"attempt": 1, "reason": "upstream_error", "retry_after": 0.5},
            "transient": True,
        }
    ]
    assert state.take(make_event(S, 3, "paused")) == [
        {"type": "data-paused", "data": {}, "transient": True}
    ]
    assert state.take(make_event(S, 4, "resumed")) == [
        {"type": "data-resumed", "data": {}, "transient": True}
    ]


def test_tool_errors_and_arguments_that_are_not_json() -> None:
    state = UIMessageState()
    bad = make_event(S, 2, "tool_call", tool_id="c", tool_name="calc", arguments={"_raw": "{x"})
    assert state.take(bad) == [
        {"type": "tool-input-start", "toolCallId": "c", "toolName": "calc"},
        {"type": "tool-input-delta", "toolCallId": "c", "inputTextDelta": "{x"},
        {
            "type": "tool-input-error",
            "toolCallId": "c",
            "toolName": "calc",
            "input": "{x",
            "errorText": "the model's tool arguments are not valid JSON",
        },
    ]
    failed = make_event(S, 3, "tool_result", tool_id="c", result="bad input", is_error=True)
    assert state.take(failed) == [
        {"type": "tool-output-error", "toolCallId": "c", "errorText": "bad input"}
    ]


def test_an_error_mid_text_closes_the_text_part_then_errors_and_ends() -> None:
    framing = UIStreamFraming()
    framing.batch(events(START, ("content", {"delta": "Hal"})))
    error = make_event(S, 3, "error", error={"code": "upstream_error", "message": "it broke"})
    assert chunks(framing.event(error)) == [
        {"type": "text-end", "id": "text-2"},
        {"type": "error", "errorText": "it broke"},
        "[DONE]",
    ]


def test_a_cancel_is_an_abort_with_its_reason() -> None:
    framing = UIStreamFraming()
    framing.batch(events(START))
    assert chunks(framing.event(make_event(S, 2, "cancelled", reason="client"))) == [
        {"type": "abort", "reason": "client"},
        "[DONE]",
    ]


def test_an_empty_delta_makes_no_chunk_and_no_bytes() -> None:
    framing = UIStreamFraming()
    framing.batch(events(START))
    assert framing.event(make_event(S, 2, "content", delta="")) == b""


@pytest.mark.parametrize(
    ("raw", "mapped"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool-calls"),
        ("content_filter", "content-filter"),
        ("something_new", "other"),
        (None, "stop"),
    ],
)
def test_finish_reasons_map_to_the_sdks(raw: str | None, mapped: str) -> None:
    assert finish_reason(raw) == mapped


def test_usage_the_upstream_did_not_give_is_null_not_zero() -> None:
    assert usage({"prompt_tokens": 3, "completion_tokens": 4}) == {
        "inputTokens": 3,
        "outputTokens": 4,
        "totalTokens": 7,
    }
    assert usage({"prompt_tokens": None, "completion_tokens": 4}) == {
        "inputTokens": None,
        "outputTokens": 4,
        "totalTokens": None,
    }
    assert usage(None) == {"inputTokens": None, "outputTokens": None, "totalTokens": None}
    complete = make_event(
        S,
        2,
        "complete",
        final_response="",
        usage={"prompt_tokens": None, "completion_tokens": None},
    )
    finish = UIMessageState().take(complete)[-1]
    assert finish["messageMetadata"]["usage"]["totalTokens"] is None
