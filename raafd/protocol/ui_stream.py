"""The Vercel AI SDK's UI message stream (v1): raafd stream events → UI message chunks.

Pure: no I/O, no tasks, no buffers beyond the few fields of one response's state. The HTTP
adapter (:mod:`raafd.http.ui_chat`) gives :class:`UIStreamFraming` to the one
:class:`~raafd.net.delivery.Delivery`; this module decides every byte of the answer.

The rule of this file:

    Every chunk a stream event produces is a pure function of that event and of the state the
    events before it left (:class:`UIMessageState`), so translating events 1..N and then the
    rest gives the same chunks as translating 1..end in one go. A resume after seq N folds
    1..N into the state without output (``skip_through``) and frames only the rest, and the
    SSE ``id:`` (``<stream>:<seq>``) sits on the *last* frame of each event's chunks, so a
    client that saw an id has every chunk of that event.

The mapping (the AI SDK's names, ``ai`` 6.0 as pinned in ``tests/node/package.json``):

==================  ========================================================================
raafd event         UI message chunks
==================  ========================================================================
``start``           ``start`` {``messageId`` = stream id, ``messageMetadata`` {stream, agent,
                    model}}, ``start-step``
``content``         ``text-start`` (when no text part is open), ``text-delta``; after a tool
                    result or a handoff first ``finish-step``, ``start-step`` (a new model turn)
``tool_call``       ``text-end`` (an open text part), ``tool-input-start``,
                    ``tool-input-delta`` (the arguments' JSON), ``tool-input-available``; or
                    ``tool-input-error`` when the model sent arguments that are not JSON
``tool_result``     ``tool-output-available`` {``output``}, or ``tool-output-error``
                    {``errorText``} when ``is_error``
``handoff``         ``data-handoff`` {``from_agent``, ``to_agent``} (kept in the message)
``retry``           ``data-retry`` {``attempt``, ``reason``, ``retry_after``}, transient
``paused``/...      ``data-paused`` / ``data-resumed`` {}, transient
``complete``        ``text-end``, ``finish-step``, ``finish`` {``finishReason``,
                    ``messageMetadata`` {``usage`` {inputTokens, outputTokens, totalTokens}}}
``error``           ``text-end``, ``error`` {``errorText``}
``cancelled``       ``text-end``, ``abort`` {``reason``}
==================  ========================================================================

and after the terminal event's chunks ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from raafd.protocol.events import StreamEvent

__all__ = [
    "DONE",
    "FINISH_REASONS",
    "HEADERS",
    "UIMessageState",
    "UIStreamFraming",
    "finish_reason",
    "usage",
]

# The response headers the SDK's transports expect (besides content-type).
HEADERS: Final = {
    "x-vercel-ai-ui-message-stream": "v1",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
DONE: Final = b"data: [DONE]\n\n"
_HEARTBEAT: Final = b": heartbeat\n\n"

# raafd's (OpenAI's) finish reasons → the SDK's; anything else is "other".
FINISH_REASONS: Final = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}


def finish_reason(raw: Any) -> str:
    """The SDK's ``finishReason`` for raafd's ``finish_reason`` (``stop`` when none was given:
    the answer ended normally)."""
    if raw is None or raw == "":
        return "stop"
    return FINISH_REASONS.get(str(raw), "other")


def usage(raw: Any) -> dict[str, int | None]:
    """The SDK's usage names for raafd's ``usage``: a count the upstream did not give is
    ``None`` (JSON null), never 0, and so is the total then."""
    raw = raw if isinstance(raw, dict) else {}
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None
    completion = (
        completion if isinstance(completion, int) and not isinstance(completion, bool) else None
    )
    total = prompt + completion if prompt is not None and completion is not None else None
    return {"inputTokens": prompt, "outputTokens": completion, "totalTokens": total}


class UIMessageState:
    """What the chunks of the next event depend on: the open text part, whether a step is
    open, and whether the next output starts a new step (a tool result or a handoff came since
    the model's last output)."""

    __slots__ = ("boundary", "step", "text")

    def __init__(self) -> None:
        self.text: str | None = None  # the open text part's id
        self.step = False
        self.boundary = False

    def take(self, event: StreamEvent) -> list[dict[str, Any]]:
        """The chunks for ``event`` (possibly none), the state moved past it."""
        kind = event.kind
        f = event.fields
        if kind == "content":
            delta = f.get("delta")
            if not delta:
                return []
            out = self._open_step()
            if self.text is None:
                self.text = f"text-{event.seq}"
                out.append({"type": "text-start", "id": self.text})
            out.append({"type": "text-delta", "id": self.text, "delta": delta})
            return out
        if kind == "tool_call":
            out = self._open_step()
            self._close_text(out)
            tool_id = str(f.get("tool_id", ""))
            name = str(f.get("tool_name", ""))
            arguments = f.get("arguments")
            out.append({"type": "tool-input-start", "toolCallId": tool_id, "toolName": name})
            if isinstance(arguments, dict) and set(arguments) == {"_raw"}:
                raw = str(arguments["_raw"])
                out.append(
                    {"type": "tool-input-delta", "toolCallId": tool_id, "inputTextDelta": raw}
                )
                out.append(
                    {
                        "type": "tool-input-error",
                        "toolCallId": tool_id,
                        "toolName": name,
                        "input": raw,
                        "errorText": "the model's tool arguments are not valid JSON",
                    }
                )
                return out
            arguments = arguments if arguments is not None else {}
            text = orjson.dumps(arguments).decode()
            out.append({"type": "tool-input-delta", "toolCallId": tool_id, "inputTextDelta": text})
            out.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": tool_id,
                    "toolName": name,
                    "input": arguments,
                }
            )
            return out
        if kind == "tool_result":
            out = []
            self._close_text(out)
            self.boundary = True
            tool_id = str(f.get("tool_id", ""))
            result = f.get("result")
            if f.get("is_error"):
                text = result if isinstance(result, str) else orjson.dumps(result).decode()
                out.append({"type": "tool-output-error", "toolCallId": tool_id, "errorText": text})
            else:
                out.append(
                    {"type": "tool-output-available", "toolCallId": tool_id, "output": result}
                )
            return out
        if kind == "handoff":
            out = []
            self._close_text(out)
            self.boundary = True
            data = {"from_agent": f.get("from_agent"), "to_agent": f.get("to_agent")}
            out.append({"type": "data-handoff", "data": data})
            return out
        if kind == "retry":
            data = {k: f.get(k) for k in ("attempt", "reason", "retry_after")}
            return [{"type": "data-retry", "data": data, "transient": True}]
        if kind in ("paused", "resumed"):
            return [{"type": f"data-{kind}", "data": {}, "transient": True}]
        if kind == "start":
            self.step = True
            metadata = {"stream": event.stream, "agent": f.get("agent"), "model": f.get("model")}
            return [
                {"type": "start", "messageId": event.stream, "messageMetadata": metadata},
                {"type": "start-step"},
            ]
        if kind == "complete":
            out = []
            self._close_text(out)
            if self.step:
                self.step = False
                out.append({"type": "finish-step"})
            out.append(
                {
                    "type": "finish",
                    "finishReason": finish_reason(f.get("finish_reason")),
                    "messageMetadata": {"usage": usage(f.get("usage"))},
                }
            )
            return out
        if kind == "error":
            out = []
            self._close_text(out)
            error = f.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            out.append({"type": "error", "errorText": str(message or "the stream failed")})
            return out
        if kind == "cancelled":
            out = []
            self._close_text(out)
            out.append({"type": "abort", "reason": str(f.get("reason", ""))})
            return out
        return []  # a kind this version does not translate

    def _open_step(self) -> list[dict[str, Any]]:
        if not self.boundary:
            return []
        self.boundary = False
        out: list[dict[str, Any]] = [{"type": "finish-step"}] if self.step else []
        self.step = True
        out.append({"type": "start-step"})
        return out

    def _close_text(self, out: list[dict[str, Any]]) -> None:
        if self.text is not None:
            out.append({"type": "text-end", "id": self.text})
            self.text = None


class UIStreamFraming:
    """A stream's events as the UI message stream's SSE (a
    :class:`~raafd.net.delivery.Framing`, one per response: it keeps a
    :class:`UIMessageState`). Events up to ``skip_through`` only move the state (a resume
    after that seq); the terminal event's chunks are followed by ``data: [DONE]``."""

    transport = "vercel"
    heartbeat = _HEARTBEAT

    __slots__ = ("_skip", "state")

    def __init__(self, skip_through: int = 0) -> None:
        self.state = UIMessageState()
        self._skip = skip_through

    def event(self, event: StreamEvent) -> bytes:
        chunks = self.state.take(event)
        if event.seq <= self._skip:
            return b""
        out = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
        if out:
            out[-1] = b"id: %s:%d\n%s" % (event.stream.encode(), event.seq, out[-1])
        if event.terminal:
            out.append(DONE)
        return b"".join(out)

    def batch(self, events: list[StreamEvent]) -> bytes:
        return b"".join([self.event(e) for e in events])
