"""The OpenAI Responses API without I/O: a request body → a conversation, and a raafd stream's
events → Responses stream events and ``response`` objects.

The rule of this file:

    A response's events are a pure function of its stream's log. The same log gives the same
    events with the same ``sequence_number`` whether they go out live, are replayed from the
    start, or resume after ``starting_after``; so a client that resumes gets exactly the rest.

How it is kept: :class:`ResponseTranslator` folds the log from seq 1 (``start``, which becomes
``response.created`` and ``response.in_progress``) and numbers what it emits from 0. A resumed
delivery folds the same events again and drops what the client has seen. Every ``content`` event
takes exactly one number for its delta, so when a lagging subscriber of a shared stream is given
adjacent ``content`` events coalesced into one (whose seq is the last it covers), the translator
skips the numbers of the merged ones and every later event keeps its number (a client sees a gap
in ``sequence_number``, never a renumbering). Everything a ``response`` object says comes from
the log too (the request's ``instructions`` and ``metadata`` are not echoed), so a retrieved
response equals the one that was streamed.

Ids: a response's id is its raafd stream's id, ``resp_<conversation>_<turn>`` (hex), and the
session keeping its conversation is ``resp_<conversation>``. ``previous_response_id`` therefore
names its session by itself: no map from response ids to sessions is kept, it survives restarts,
and it is as bounded as the session store.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Final

import attrs
import orjson
from attrs import frozen

from raafd.errors import BadRequest
from raafd.http.openai_compat import arguments_text
from raafd.http.strict import json_object, structure, text_parts
from raafd.protocol.events import StreamEvent

__all__ = [
    "IGNORED_FIELDS",
    "ResponseTranslator",
    "ResponsesFraming",
    "ResponsesRequest",
    "conversation",
    "new_response_id",
    "parse_request",
    "session_of",
    "sse",
    "usage_of",
]

# Parameters of the official SDK's `responses.create` that raafd accepts and ignores: the
# agent's own configuration (instructions, tools, sampling) applies.
IGNORED_FIELDS: Final = frozenset(
    {
        "context_management",
        "include",
        "max_tool_calls",
        "parallel_tool_calls",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "stream_options",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)
_RESPONSE_ID: Final = re.compile(r"(resp_[0-9a-f]{24})_[0-9a-f]{12}")
_METADATA_VALUE_MAX: Final = 512
_MAX_METADATA: Final = 16


# --- ids --------------------------------------------------------------------------------------


def new_response_id(previous: str | None = None) -> tuple[str, str]:
    """A fresh response id and the session it runs in: a new conversation, or the one of
    ``previous`` (a response id, already checked with :func:`session_of`)."""
    session = session_of(previous) if previous is not None else None
    if session is None:
        session = "resp_" + secrets.token_hex(12)
    return f"{session}_{secrets.token_hex(6)}", session


def session_of(response_id: str) -> str | None:
    """The session of a response id raafd made; None for anything else."""
    match = _RESPONSE_ID.fullmatch(response_id)
    return match[1] if match else None


# --- the request ------------------------------------------------------------------------------


@frozen
class ResponsesRequest:
    model: str
    input: Any
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    metadata: dict[str, str] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None


def parse_request(raw: bytes) -> ResponsesRequest:
    """A ``POST /v1/responses`` body → a validated request; :class:`BadRequest` naming the
    field otherwise (the input items are checked by :func:`conversation`)."""
    data = json_object(raw)
    for name in IGNORED_FIELDS.intersection(data):
        del data[name]
    req: ResponsesRequest = structure(data, ResponsesRequest)
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", field="temperature")
    if req.max_output_tokens is not None and req.max_output_tokens <= 0:
        raise BadRequest("max_output_tokens must be greater than 0", field="max_output_tokens")
    if req.metadata is not None and len(req.metadata) > _MAX_METADATA:
        raise BadRequest(f"at most {_MAX_METADATA} metadata keys", field="metadata")
    if req.previous_response_id is not None and session_of(req.previous_response_id) is None:
        raise BadRequest(
            f"previous response {req.previous_response_id!r} is not a response id raafd made",
            field="previous_response_id",
        )
    if req.background and req.stream:
        raise BadRequest("background responses are not streamed here", field="background")
    return req


def _text(content: Any, where: str) -> str:
    text = text_parts(content, where, ("input_text", "output_text", "text"))
    if text is None:
        raise BadRequest("must be a string or a list of text parts", field=where)
    return text


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise BadRequest("required, a string", field=f"{where}.{name}")
    return value


def _item(item: Any, where: str) -> dict[str, Any]:
    """One input item → one message of the agent loop's conversation (OpenAI chat shape)."""
    if not isinstance(item, dict):
        raise BadRequest("an input item must be an object", field=where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(
                "must be one of user, assistant, system, developer", field=f"{where}.role"
            )
        if "content" not in item:
            raise BadRequest("required field missing", field=f"{where}.content")
        content = _text(item["content"], f"{where}.content")
        return {"role": "system" if role == "developer" else role, "content": content}
    if kind == "function_call":
        call_id = _string(item, "call_id", where)
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": _string(item, "name", where),
                        "arguments": _string(item, "arguments", where),
                    },
                }
            ],
        }
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _text(output, f"{where}.output")
        return {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text}
    raise BadRequest(
        "must be one of message, function_call, function_call_output", field=f"{where}.type"
    )


def conversation(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's ``instructions`` and ``input`` as the agent loop takes them."""
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        out.append({"role": "user", "content": req.input})
    elif isinstance(req.input, list):
        if not req.input:
            raise BadRequest("at least one input item is required", field="input")
        out += [_item(item, f"input.{i}") for i, item in enumerate(req.input)]
    else:
        raise BadRequest("must be a string or a list of input items", field="input")
    return out


# --- the translation --------------------------------------------------------------------------


def usage_of(terminal: StreamEvent) -> dict[str, Any] | None:
    """A ``complete`` event's usage in the Responses shape; None (JSON null) when the upstream
    did not give both counts: unknown is not 0. raafd does not know cached or reasoning tokens,
    so their details are null."""
    usage = terminal.fields.get("usage") or {}
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": None},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": None},
        "total_tokens": prompt + completion,
    }


def _result_text(result: Any) -> str:
    return result if isinstance(result, str) else orjson.dumps(result).decode()


_INCOMPLETE: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponseTranslator:
    """Folds one stream's events, in seq order from 1, into Responses stream events (dicts with
    ``type`` and ``sequence_number``) and the ``response`` object as it stands."""

    def __init__(self, response_id: str, created_at: float) -> None:
        self.id = response_id
        self.created_at = int(created_at)
        self.model = ""
        self.agent = ""
        self.status = "in_progress"
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.output: list[dict[str, Any]] = []
        self.handoffs: list[str] = []
        self._next = 0  # the next sequence_number
        self._seq = 0  # the last stream seq taken
        self._message: dict[str, Any] | None = None  # the open message item
        self._text: list[str] = []  # its text so far

    # --- the response object ------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        """The ``response`` object as the events taken so far make it."""
        metadata = {"raafd_agent": self.agent}
        if self.handoffs:
            metadata["raafd_handoffs"] = ">".join(self.handoffs)[:_METADATA_VALUE_MAX]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": None,
            "metadata": metadata,
            "model": self.model,
            "output": [dict(item) for item in self.output],
            "parallel_tool_calls": True,
            "temperature": None,
            "tool_choice": "auto",
            "tools": [],
            "top_p": None,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": self.usage,
        }

    @property
    def output_text(self) -> str:
        return "".join(
            part["text"]
            for item in self.output
            if item["type"] == "message"
            for part in item["content"]
        )

    # --- events -------------------------------------------------------------------------------

    def _event(self, out: list[dict[str, Any]], kind: str, **fields: Any) -> None:
        out.append({"type": kind, "sequence_number": self._next, **fields})
        self._next += 1

    def _add_item(self, out: list[dict[str, Any]], item: dict[str, Any]) -> int:
        index = len(self.output)
        self.output.append(item)
        self._event(out, "response.output_item.added", output_index=index, item=dict(item))
        return index

    def _open_message(self, out: list[dict[str, Any]]) -> dict[str, Any]:
        index = len(self.output)
        item = {
            "id": f"msg_{self.id}_{index}",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self._add_item(out, item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._event(
            out,
            "response.content_part.added",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            part=part,
        )
        self._message = item
        self._text = []
        return item

    def _close_message(self, out: list[dict[str, Any]], status: str = "completed") -> None:
        item = self._message
        if item is None:
            return
        self._message = None
        index = len(self.output) - 1
        text = "".join(self._text)
        self._text = []
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item["content"] = [part]
        item["status"] = status
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        self._event(out, "response.output_text.done", **where, text=text, logprobs=[])
        self._event(out, "response.content_part.done", **where, part=part)
        self._event(out, "response.output_item.done", output_index=index, item=dict(item))

    def take(self, event: StreamEvent) -> list[dict[str, Any]]:
        """The Responses events for the next stream event (its seq must follow the last one
        taken, or skip only coalesced ``content`` events)."""
        out: list[dict[str, Any]] = []
        kind = event.kind
        fields = event.fields
        skipped = event.seq - self._seq - 1
        self._seq = event.seq
        if kind == "content":
            item = self._message or self._open_message(out)
            self._next += skipped  # the numbers of the deltas merged into this one
            delta = str(fields.get("delta") or "")
            if delta:
                self._text.append(delta)
                self._event(
                    out,
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=delta,
                    logprobs=[],
                )
            else:
                self._next += 1
        elif kind == "start":
            self.model = self.agent = str(fields.get("agent", ""))
            self._event(out, "response.created", response=self.response())
            self._event(out, "response.in_progress", response=self.response())
        elif kind == "tool_call":
            self._close_message(out)
            self._function_call(out, fields)
        elif kind == "tool_result":
            self._close_message(out)
            item = {
                "id": f"fco_{self.id}_{len(self.output)}",
                "type": "function_call_output",
                "call_id": str(fields.get("tool_id", "")),
                "output": _result_text(fields.get("result")),
                "status": "completed",
            }
            index = self._add_item(out, item)
            self._event(out, "response.output_item.done", output_index=index, item=dict(item))
        elif kind == "handoff":
            self._close_message(out)
            source, target = str(fields.get("from_agent", "")), str(fields.get("to_agent", ""))
            if not self.handoffs:
                self.handoffs.append(source)
            self.handoffs.append(target)
            self.agent = target
            self._event(out, "response.raafd.handoff", from_agent=source, to_agent=target)
        elif event.terminal:
            self._finish(out, event)
        # retry, paused, resumed: nothing a Responses client knows of
        return out

    def _function_call(self, out: list[dict[str, Any]], fields: dict[str, Any]) -> None:
        index = len(self.output)
        arguments = arguments_text(fields.get("arguments"))
        item = {
            "id": f"fc_{self.id}_{index}",
            "type": "function_call",
            "call_id": str(fields.get("tool_id", "")),
            "name": str(fields.get("tool_name", "")),
            "arguments": "",
            "status": "in_progress",
        }
        self._add_item(out, item)
        where = {"item_id": item["id"], "output_index": index}
        self._event(out, "response.function_call_arguments.delta", **where, delta=arguments)
        self._event(out, "response.function_call_arguments.done", **where, arguments=arguments)
        item["arguments"] = arguments
        item["status"] = "completed"
        self._event(out, "response.output_item.done", output_index=index, item=dict(item))

    def _finish(self, out: list[dict[str, Any]], event: StreamEvent) -> None:
        fields = event.fields
        if event.kind == "complete":
            reason = _INCOMPLETE.get(str(fields.get("finish_reason") or "stop"))
            self._close_message(out, "incomplete" if reason else "completed")
            self.usage = usage_of(event)
            if reason is None:
                self.status = "completed"
                self._event(out, "response.completed", response=self.response())
            else:
                self.status = "incomplete"
                self.incomplete = {"reason": reason}
                self._event(out, "response.incomplete", response=self.response())
        elif event.kind == "error":
            self._close_message(out, "incomplete")
            error = fields.get("error") or {}
            self.status = "failed"
            self.error = {
                "code": str(error.get("code", "internal")),
                "message": str(error.get("message", "internal error")),
            }
            self._event(out, "response.failed", response=self.response())
        else:  # cancelled
            self._close_message(out, "incomplete")
            self.status = "cancelled"
            self._event(out, "response.incomplete", response=self.response())


def sse(item: dict[str, Any]) -> bytes:
    """One protocol event as an SSE frame named by its ``type``."""
    return b"event: %s\ndata: %s\n\n" % (item["type"].encode(), orjson.dumps(item))


@attrs.define
class ResponsesFraming:
    """A response's events as SSE (a :class:`~raafd.net.delivery.Framing`, one per delivery:
    it folds what it frames). Events numbered up to ``starting_after`` are not sent."""

    translator: ResponseTranslator
    starting_after: int = -1
    transport: str = "responses"
    heartbeat: bytes = b": heartbeat\n\n"

    def event(self, event: StreamEvent) -> bytes:
        return self.batch([event])

    def batch(self, events: list[StreamEvent]) -> bytes:
        after = self.starting_after
        out: list[bytes] = []
        for event in events:
            for item in self.translator.take(event):
                if item["sequence_number"] > after:
                    out.append(sse(item))
        return b"".join(out)
