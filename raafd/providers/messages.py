"""Reading the internal message format (OpenAI chat shape), for providers that translate it.

Messages come from clients and models, so nothing here trusts a shape: a field of the wrong type
reads as empty rather than failing the request.
"""

from __future__ import annotations

from typing import Any

import orjson
from attrs import frozen

__all__ = ["ToolCall", "content_text", "read_tool_call"]


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of ``text`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


@frozen
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]  # always an object: {} when absent, {"arguments": text} if not


def read_tool_call(call: Any) -> ToolCall:
    """An assistant message's ``tool_calls`` item, with its JSON-text arguments parsed."""
    call = call if isinstance(call, dict) else {}
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    parsed: Any
    if isinstance(arguments, dict):
        parsed = arguments
    elif not arguments:
        parsed = {}
    else:
        try:
            parsed = orjson.loads(arguments)
        except (orjson.JSONDecodeError, TypeError):
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {"arguments": str(arguments)}
    return ToolCall(str(call.get("id") or ""), str(function.get("name") or ""), parsed)
