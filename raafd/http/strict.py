"""Strict JSON request bodies for the protocol adapters (OpenAI-compatible chat completions, the
Responses API, the Anthropic Messages API): one JSON object, structured into attrs classes
with no coercion (``"true"`` is not a boolean, ``1`` is not a string) and no unknown fields,
every refusal a :class:`~raafd.errors.BadRequest` naming the field."""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs
import orjson

from raafd.errors import BadRequest
from raafd.protocol.commands import describe_structure_error

__all__ = ["json_object", "structure", "text_parts"]

T = TypeVar("T")

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict(value: Any, t: type) -> Any:
    if t is bool and not isinstance(value, bool):
        raise TypeError("expected true or false")
    if t is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError("expected an integer")
    if t is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("expected a number")
        return float(value)
    if t is str and not isinstance(value, str):
        raise TypeError("expected a string")
    return value


for _t in (bool, int, float, str):
    _converter.register_structure_hook(_t, _strict)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; :class:`BadRequest` otherwise."""
    if not raw:
        raise BadRequest("a JSON body is required")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def structure(data: dict[str, Any], cls: type[T]) -> T:
    """``data`` structured strictly into ``cls``; :class:`BadRequest` naming the field."""
    try:
        return _converter.structure(data, cls)
    except Exception as exc:
        where, reason = describe_structure_error(exc)
        raise BadRequest(f"{where}: {reason}" if where else reason, field=where) from None


def text_parts(content: Any, where: str, types: tuple[str, ...] = ("text",)) -> str | None:
    """A message's ``content``: a string, None, or a list of text parts (``{type, text}`` with
    a type in ``types``) joined; :class:`BadRequest` naming the part otherwise."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") in types
                and isinstance(part.get("text"), str)
            ):
                raise BadRequest(
                    f"only text content parts ({{type: {types[0]}, text}}) are supported",
                    field=f"{where}.{i}",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest("must be a string or a list of text parts", field=where)
