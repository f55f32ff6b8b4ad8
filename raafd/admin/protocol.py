"""The admin wire protocol: newline-delimited JSON over a unix stream socket. No I/O here.

The rule of this module: every line a client sends gets exactly one answer line, in order,
and nothing a client sends can do more than earn an error answer.

- A request is one JSON object on one line: ``{"cmd": "stats", "args": {...}}``. ``args`` is
  optional (``{}``); no other key is allowed.
- An answer is ``{"ok": true, "result": ...}`` or
  ``{"ok": false, "error": {"code": ..., "message": ..., "field": ...}}`` (``field`` only when
  one input field is at fault). Codes are those of :mod:`raafd.errors`.
- A request line holds at most :data:`MAX_LINE` bytes, newline excluded. A longer line is
  answered with one ``too_large`` error as soon as the limit is passed; the rest of that line,
  up to its newline, is discarded unread, and the connection goes on with the next line. So a
  connection never buffers more than :data:`MAX_LINE` bytes.
- A final line without a newline (the client half-closed) is answered like any other line.
- Answers have no size limit on the server side; clients bound what they read
  (:data:`MAX_ANSWER`).

The arguments of the built-in commands are checked here (:data:`COMMAND_ARGS`): add an args
class when adding a command. A command the daemon registers without an entry here gets its
``args`` object unchecked.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Final, Literal, TypeVar

import attrs
import orjson
from attrs import field, frozen
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.preconf.orjson import OrjsonConverter, make_converter

from raafd.config import LOG_LEVELS
from raafd.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Internal,
    MethodNotAllowed,
    NotFound,
    RaafdError,
    RateLimited,
    Timeout,
    TooLarge,
    TooManyStreams,
    Unauthorized,
    Unavailable,
    UpstreamError,
)
from raafd.protocol.subjects import compile_pattern

__all__ = [
    "COMMAND_ARGS",
    "MAX_ANSWER",
    "MAX_EVENTS_LIMIT",
    "MAX_EVENTS_WAIT",
    "MAX_LINE",
    "TOO_LONG",
    "EventsArgs",
    "IdArgs",
    "LineSplitter",
    "LineTooLong",
    "LogLevelArgs",
    "NoArgs",
    "Request",
    "RoomArgs",
    "RoomKickArgs",
    "decode_answer",
    "encode_error",
    "encode_request",
    "encode_result",
    "parse_request",
    "structure_args",
]

T = TypeVar("T")

MAX_LINE: Final = 64 * 1024
"""Longest request line in bytes, newline excluded."""

MAX_ANSWER: Final = 16 * 1024 * 1024
"""Longest answer line a client reads before giving up (lists of connections can be long)."""


# --- requests ---------------------------------------------------------------------------------


@frozen
class Request:
    """One admin request, validated."""

    cmd: str
    args: dict[str, Any] = field(factory=dict)


def _arg_validator(check: Callable[[Any], str | None]) -> Callable[[Any, Any, Any], None]:
    """An attrs validator that fails with a BadRequest naming ``args.<field>``."""

    def validate(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
        problem = check(value)
        if problem is not None:
            raise BadRequest(f"args.{a.name}: {problem}", field=f"args.{a.name}")

    return validate


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _log_level(value: str) -> str | None:
    return None if value in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}; got {value!r}"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


@frozen
class NoArgs:
    """``stats``, ``connections``, ``streams``, ``rooms``, ``reload``, ``drain``."""


@frozen
class IdArgs:
    """``kick`` (a connection id) and ``cancel`` (a stream id)."""

    id: str = field(validator=_arg_validator(_non_empty))


@frozen
class LogLevelArgs:
    """``log-level``."""

    level: str = field(validator=_arg_validator(_log_level))


def _pattern(value: str) -> str | None:
    try:
        compile_pattern(value)
    except BadRequest as exc:
        return exc.message
    return None


def _optional_seq(value: int | None) -> str | None:
    return None if value is None or value >= 0 else "must be 0 or more"


def _wait(value: float) -> str | None:
    return None if 0 <= value <= MAX_EVENTS_WAIT else f"must be 0 to {MAX_EVENTS_WAIT:g} seconds"


def _limit(value: int) -> str | None:
    return None if 1 <= value <= MAX_EVENTS_LIMIT else f"must be 1 to {MAX_EVENTS_LIMIT}"


MAX_EVENTS_WAIT: Final = 30.0
MAX_EVENTS_LIMIT: Final = 1000


@frozen
class EventsArgs:
    """``events``: the bus events matching ``pattern`` after seq ``since`` (default: the
    head), at most ``limit``; with ``wait``, up to that many seconds for a first one."""

    pattern: str = field(validator=_arg_validator(_pattern))
    since: int | None = field(default=None, validator=_arg_validator(_optional_seq))
    wait: float = field(default=0.0, validator=_arg_validator(_wait))
    limit: int = field(default=100, validator=_arg_validator(_limit))


@frozen
class JobsArgs:
    """``jobs``: the listing's filters."""

    status: str | None = None
    agent: str | None = None
    limit: int = field(default=50, validator=_arg_validator(_limit))


@frozen
class JobArgs:
    """``job``: show, retry or cancel one job."""

    id: str = field(validator=_arg_validator(_non_empty))
    action: Literal["show", "retry", "cancel"] = "show"


@frozen
class JobsPurgeArgs:
    """``jobs-purge``: forget ended jobs in ``status`` that ended ``older_than`` seconds ago."""

    status: list[str]
    older_than: float = field(validator=_arg_validator(_not_negative))


@frozen
class RoomArgs:
    """``room``: one room."""

    room: str = field(validator=_arg_validator(_non_empty))


@frozen
class RoomKickArgs:
    """``room-kick``: end ``user``'s membership of ``room``."""

    room: str = field(validator=_arg_validator(_non_empty))
    user: str = field(validator=_arg_validator(_non_empty))


COMMAND_ARGS: Final[Mapping[str, type]] = {
    "room": RoomArgs,
    "room-kick": RoomKickArgs,
    "events": EventsArgs,
    "stats": NoArgs,
    "connections": NoArgs,
    "streams": NoArgs,
    "rooms": NoArgs,
    "jobs": JobsArgs,
    "job": JobArgs,
    "jobs-purge": JobsPurgeArgs,
    "reload": NoArgs,
    "drain": NoArgs,
    "log-level": LogLevelArgs,
    "kick": IdArgs,
    "cancel": IdArgs,
}


def _strict_str(value: Any, _: type) -> str:
    # cattrs would turn 5 into "5"; a command name or id is a string or a mistake.
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_describe(value)}")
    return value


def _strict_object(value: Any, _: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int | float):
        return f"the number {value}"
    return repr(value)


def _make_converter(*, strict: bool) -> OrjsonConverter:
    conv = make_converter(forbid_extra_keys=strict, detailed_validation=True)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _strict_object)
    return conv


# Requests are checked strictly; answers are read leniently, so a newer daemon may add fields.
_requests = _make_converter(strict=True)
_answers = _make_converter(strict=False)


def _bad_request(exc: BaseException, path: str = "") -> BadRequest:
    """The first problem of a cattrs failure as a BadRequest naming the field."""
    if isinstance(exc, BadRequest):
        return exc
    if isinstance(exc, ForbiddenExtraKeysError):
        key = sorted(exc.extra_fields)[0]
        return BadRequest(f"unknown key {key!r}", field=f"{path}.{key}" if path else key)
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            name = getattr(note, "name", "?")
            return _bad_request(sub, f"{path}.{name}" if path else str(name))
        for sub in without:
            return _bad_request(sub, path)
    field_path = path or None
    if isinstance(exc, KeyError):
        return BadRequest(f"{path}: required key missing", field=field_path)
    if isinstance(exc, TypeError | ValueError):
        return BadRequest(f"{path or 'request'}: {exc}", field=field_path)
    return BadRequest(f"{path or 'request'}: invalid", field=field_path)  # pragma: no cover


def parse_request(line: bytes, commands: Collection[str]) -> Request:
    """Decode and validate one request line; ``commands`` are the ones the server handles.

    Raises :class:`~raafd.errors.BadRequest` naming what is wrong: not JSON, not an object,
    a missing or mistyped ``cmd``, an unknown command, extra keys, bad arguments.
    """
    if not line.strip():
        raise BadRequest("empty request line; send one JSON object per line")
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"a request must be a JSON object, got {_describe(data)}")
    try:
        request = _requests.structure(data, Request)
    except Exception as exc:
        raise _bad_request(exc) from None
    if request.cmd not in commands:
        known = ", ".join(sorted(commands))
        raise BadRequest(f"unknown command {request.cmd!r}; known: {known}", field="cmd")
    args_type = COMMAND_ARGS.get(request.cmd)
    if args_type is not None:
        try:
            _requests.structure(request.args, args_type)
        except Exception as exc:
            raise _bad_request(exc, "args") from None
    return request


def structure_args(args: Mapping[str, Any], args_type: type[T]) -> T:
    """A handler's ``args`` (already checked by :func:`parse_request`) as ``args_type``."""
    return _requests.structure(dict(args), args_type)


def encode_request(cmd: str, args: Mapping[str, Any] | None = None) -> bytes:
    """One request line, newline included. Raises TooLarge past :data:`MAX_LINE`."""
    line = orjson.dumps({"cmd": cmd, "args": dict(args or {})})
    if len(line) > MAX_LINE:
        raise TooLarge(f"the request is {len(line)} bytes; the admin socket takes {MAX_LINE}")
    return line + b"\n"


# --- answers ----------------------------------------------------------------------------------


def encode_result(result: Any) -> bytes:
    """A success line. attrs instances in ``result`` are unstructured; anything orjson cannot
    encode raises ``TypeError`` (the server answers ``internal`` then)."""
    return _answers.dumps({"ok": True, "result": result}, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def encode_error(error: RaafdError) -> bytes:
    """An error line: the error's code, message and field, never a traceback."""
    return orjson.dumps({"ok": False, "error": error.to_dict()}) + b"\n"


@frozen
class _ErrorBody:
    code: str
    message: str
    field: str | None = None
    retry_after: float | None = None


@frozen
class _Answer:
    ok: bool
    result: Any = None
    error: _ErrorBody | None = None


_ERRORS_BY_CODE: Final[Mapping[str, type[RaafdError]]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        TooLarge,
        RateLimited,
        TooManyStreams,
        Unavailable,
        UpstreamError,
        Timeout,
        Internal,
        Gone,
    )
}


def decode_answer(line: bytes) -> Any:
    """The ``result`` of an answer line, or raise the error it carries as the matching
    :class:`~raafd.errors.RaafdError` subclass (``Internal`` for codes this version does not
    know, or for an answer that is not one)."""
    try:
        answer = _answers.structure(orjson.loads(line), _Answer)
    except Exception:
        raise Internal("the daemon sent an answer that is not an admin protocol answer") from None
    if answer.ok:
        return answer.result
    body = answer.error or _ErrorBody("internal", "the daemon answered an error without details")
    cls = _ERRORS_BY_CODE.get(body.code, Internal)
    raise cls(body.message, field=body.field, retry_after=body.retry_after)


# --- framing ----------------------------------------------------------------------------------


@frozen
class LineTooLong:
    """Stands for a request line longer than the limit (its bytes were discarded)."""

    limit: int


TOO_LONG: Final = LineTooLong(MAX_LINE)


@attrs.define
class LineSplitter:
    """Splits a byte stream into request lines, holding at most ``max_line`` bytes.

    ``feed`` returns complete lines (without the newline) and one :data:`TOO_LONG` marker per
    line that passed the limit; the remainder of such a line is skipped up to its newline.
    """

    max_line: int = MAX_LINE
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    _discarding: bool = attrs.field(default=False, init=False)

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        out: list[bytes | LineTooLong] = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline == -1:
                if not self._discarding:
                    self._buffer += data[start:]
                    if len(self._buffer) > self.max_line:
                        self._buffer.clear()
                        self._discarding = True
                        out.append(LineTooLong(self.max_line))
                return out
            if self._discarding:
                self._discarding = False
            elif len(self._buffer) + newline - start > self.max_line:
                self._buffer.clear()
                out.append(LineTooLong(self.max_line))
            else:
                self._buffer += data[start:newline]
                out.append(bytes(self._buffer))
                self._buffer.clear()
            start = newline + 1

    def end(self) -> bytes | None:
        """At end of input: the last line if it had no newline (and was not too long)."""
        if self._discarding or not self._buffer:
            return None
        line = bytes(self._buffer)
        self._buffer.clear()
        return line
