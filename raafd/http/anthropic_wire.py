"""The Anthropic Messages API without I/O: a request body → a conversation, and a raafd stream's
events → Messages stream events and ``message`` objects.

The rule of this file:

    A message's events are a pure function of its stream's log, folded from seq 1: content
    blocks are numbered (``index``) in the order the log opens them, a block is stopped before
    the next one starts, and the stream ends with ``message_delta`` (the stop reason and the
    cumulative usage) and ``message_stop``, or with one ``error`` event.

raafd runs the agent's tools itself, so a message can hold, besides ``text`` blocks, a
``tool_use`` block (the call, its input as one ``input_json_delta``) followed by a
``tool_result`` block (what raafd's tool answered); ``stop_reason`` is ``tool_use`` only when
calls were left for the client. A handoff is a ``raafd_handoff`` event between blocks (clients
skip event types they do not know). Unknown usage is ``null``, never a silent 0.
"""

from __future__ import annotations

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
    "MessageTranslator",
    "MessagesFraming",
    "MessagesRequest",
    "conversation",
    "error_body",
    "error_type",
    "parse_request",
]

# Parameters of the official SDK's `messages.create` that raafd accepts and ignores: the
# agent's own configuration (instructions, tools, sampling) applies.
IGNORED_FIELDS: Final = frozenset(
    {
        "cache_control",
        "container",
        "context_management",
        "diagnostics",
        "inference_geo",
        "mcp_servers",
        "output_config",
        "output_format",
        "service_tier",
        "speed",
        "stop_sequences",
        "thinking",
        "tool_choice",
        "tools",
        "top_k",
        "top_p",
        "user_profile_id",
        "workspace_id",
    }
)

# The error types of Anthropic's error shape, by HTTP status.
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
_STOP_REASONS: Final = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _ERROR_TYPES.get(status, "api_error")


def error_body(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape; the field at fault leads the message (the shape has no place of
    its own for it)."""
    if field and not message.startswith(f"{field}:"):
        message = f"{field}: {message}"
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


# --- the request ------------------------------------------------------------------------------


@frozen
class MessagesRequest:
    model: str
    messages: list[Any]
    max_tokens: int
    system: Any = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    temperature: float | None = None


def parse_request(raw: bytes) -> MessagesRequest:
    """A ``POST /v1/messages`` body → a validated request; :class:`BadRequest` naming the field
    otherwise (the messages' blocks are checked by :func:`conversation`)."""
    data = json_object(raw)
    for name in IGNORED_FIELDS.intersection(data):
        del data[name]
    req = structure(data, MessagesRequest)
    if req.max_tokens <= 0:
        raise BadRequest("max_tokens must be greater than 0", field="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise BadRequest("temperature must be between 0 and 1", field="temperature")
    if not req.messages:
        raise BadRequest("at least one message is required", field="messages")
    return req


def _text(content: Any, where: str) -> str:
    text = text_parts(content, where)
    if text is None:
        raise BadRequest("must be a string or a list of text blocks", field=where)
    return text


def _block_field(block: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = block.get(name)
    if not isinstance(value, kind):
        raise BadRequest(f"required, {'a string' if kind is str else 'an object'}", field=where)
    return value


def _user(content: list[Any], where: str) -> list[dict[str, Any]]:
    """A user turn's blocks → tool messages (its tool results), then a user message."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for i, block in enumerate(content):
        at = f"{where}.{i}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_block_field(block, "text", str, f"{at}.text"))
        elif kind == "tool_result":
            result = block.get("content", "")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": _block_field(block, "tool_use_id", str, f"{at}.tool_use_id"),
                    "content": _text(result, f"{at}.content"),
                }
            )
        else:
            raise BadRequest("must be one of text, tool_result", field=f"{at}.type")
    if texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.{i}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_block_field(block, "text", str, f"{at}.text"))
        elif kind == "tool_use":
            arguments = _block_field(block, "input", dict, f"{at}.input")
            calls.append(
                {
                    "id": _block_field(block, "id", str, f"{at}.id"),
                    "type": "function",
                    "function": {
                        "name": _block_field(block, "name", str, f"{at}.name"),
                        "arguments": orjson.dumps(arguments).decode(),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # a client replaying a model's thinking: nothing raafd's agents read
        else:
            raise BadRequest("must be one of text, tool_use, thinking", field=f"{at}.type")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def conversation(req: MessagesRequest) -> list[dict[str, Any]]:
    """The request's ``system`` and ``messages`` as the agent loop takes them (OpenAI shape)."""
    out: list[dict[str, Any]] = []
    if req.system is not None:
        system = _text(req.system, "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise BadRequest("a message must be an object", field=where)
        unknown = set(message) - {"role", "content"}
        if unknown:
            raise BadRequest("unknown field", field=f"{where}.{sorted(unknown)[0]}")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest("must be one of user, assistant", field=f"{where}.role")
        if "content" not in message:
            raise BadRequest("required field missing", field=f"{where}.content")
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            at = f"{where}.content"
            if role == "user":
                out += _user(content, at)
            else:
                out.append(_assistant(content, at))
        else:
            raise BadRequest("must be a string or a list of blocks", field=f"{where}.content")
    return out


# --- the translation --------------------------------------------------------------------------


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    return value if isinstance(value, int) else None


def _result_text(result: Any) -> str:
    return result if isinstance(result, str) else orjson.dumps(result).decode()


_CANCEL_TYPES: Final = {"timeout": "timeout_error", "drain": "overloaded_error"}


class MessageTranslator:
    """Folds one stream's events, in seq order from 1, into Messages stream events
    (``(name, data)`` pairs) and the ``message`` object as it stands."""

    def __init__(self, message_id: str) -> None:
        self.id = message_id
        self.model = ""
        self.agent = ""
        self.content: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.usage: dict[str, int | None] = {"input_tokens": None, "output_tokens": 0}
        self.handoffs: list[dict[str, str]] = []
        self.error: dict[str, Any] | None = None  # the error event's data, once it ended so
        self._open = False  # the last block is open (receives deltas)
        self._pending: set[str] = set()  # tool calls nobody answered (yet)

    def message(self) -> dict[str, Any]:
        """The ``message`` object as the events taken so far make it."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [dict(block) for block in self.content],
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": dict(self.usage),
            "raafd": {"agent": self.agent, "handoffs": list(self.handoffs)},
        }

    def _start_block(self, out: list[tuple[str, dict[str, Any]]], block: dict[str, Any]) -> int:
        self._stop_block(out)
        index = len(self.content)
        self.content.append(block)
        start = {"type": "content_block_start", "index": index, "content_block": dict(block)}
        out.append(("content_block_start", start))
        self._open = True
        return index

    def _stop_block(self, out: list[tuple[str, dict[str, Any]]]) -> None:
        if self._open:
            self._open = False
            index = len(self.content) - 1
            out.append(("content_block_stop", {"type": "content_block_stop", "index": index}))

    def take(self, event: StreamEvent) -> list[tuple[str, dict[str, Any]]]:
        """The Messages events for the next stream event."""
        out: list[tuple[str, dict[str, Any]]] = []
        kind = event.kind
        fields = event.fields
        if kind == "content":
            delta = str(fields.get("delta") or "")
            if not delta:
                return out
            if not (self._open and self.content[-1]["type"] == "text"):
                self._start_block(out, {"type": "text", "text": ""})
            index = len(self.content) - 1
            self.content[index]["text"] += delta
            data = {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": delta},
            }
            out.append(("content_block_delta", data))
        elif kind == "start":
            self.model = self.agent = str(fields.get("agent", ""))
            message = self.message()
            del message["raafd"]
            out.append(("message_start", {"type": "message_start", "message": message}))
        elif kind == "tool_call":
            tool_id = str(fields.get("tool_id", ""))
            arguments = fields.get("arguments")
            call: dict[str, Any] = {
                "type": "tool_use",
                "id": tool_id,
                "name": str(fields.get("tool_name", "")),
                "input": {},
            }
            index = self._start_block(out, call)
            json_text = arguments_text(arguments)
            parsed = isinstance(arguments, dict) and set(arguments) != {"_raw"}
            # A model's unparsable arguments ({"_raw": text}) went out as text in the delta.
            self.content[index]["input"] = arguments if parsed else {}
            self._pending.add(tool_id)
            data = {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": json_text},
            }
            out.append(("content_block_delta", data))
            self._stop_block(out)
        elif kind == "tool_result":
            tool_id = str(fields.get("tool_id", ""))
            self._pending.discard(tool_id)
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": tool_id,
                "content": _result_text(fields.get("result")),
                "is_error": bool(fields.get("is_error")),
            }
            self._start_block(out, block)
            self._stop_block(out)
        elif kind == "handoff":
            self._stop_block(out)
            handoff = {
                "from_agent": str(fields.get("from_agent", "")),
                "to_agent": str(fields.get("to_agent", "")),
            }
            self.handoffs.append(handoff)
            self.agent = handoff["to_agent"]
            out.append(("raafd_handoff", {"type": "raafd_handoff", **handoff}))
        elif event.terminal:
            self._stop_block(out)
            self._finish(out, event)
        # retry, paused, resumed: nothing a Messages client knows of
        return out

    def _finish(self, out: list[tuple[str, dict[str, Any]]], event: StreamEvent) -> None:
        fields = event.fields
        if event.kind == "complete":
            reason = str(fields.get("finish_reason") or "stop")
            if reason == "tool_calls":
                self.stop_reason = "tool_use" if self._pending else "end_turn"
            else:
                self.stop_reason = _STOP_REASONS.get(reason, "end_turn")
            usage = fields.get("usage") or {}
            self.usage = {
                "input_tokens": _count(usage, "prompt_tokens"),
                "output_tokens": _count(usage, "completion_tokens"),
            }
            delta = {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                "usage": dict(self.usage),
            }
            out.append(("message_delta", delta))
            out.append(("message_stop", {"type": "message_stop"}))
            return
        if event.kind == "error":
            error = fields.get("error") or {}
            code = str(error.get("code", "internal"))
            kind = {"timeout": "timeout_error", "rate_limited": "rate_limit_error"}.get(
                code, "api_error"
            )
            message = f"{code}: {error.get('message', 'internal error')}"
        else:  # cancelled
            reason = str(fields.get("reason", ""))
            kind = _CANCEL_TYPES.get(reason, "api_error")
            message = f"cancelled: the message was cancelled ({reason})"
        self.error = {"type": "error", "error": {"type": kind, "message": message}}
        out.append(("error", self.error))


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One Messages event as an SSE frame."""
    return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))


@attrs.define
class MessagesFraming:
    """A message's events as SSE (a :class:`~raafd.net.delivery.Framing`, one per delivery: it
    folds what it frames). The heartbeat is Anthropic's own ``ping`` event."""

    translator: MessageTranslator
    transport: str = "anthropic"
    heartbeat: bytes = b'event: ping\ndata: {"type":"ping"}\n\n'

    def event(self, event: StreamEvent) -> bytes:
        return self.batch([event])

    def batch(self, events: list[StreamEvent]) -> bytes:
        take = self.translator.take
        return b"".join([sse(name, data) for event in events for name, data in take(event)])
