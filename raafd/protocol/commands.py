"""Client commands of the WebSocket protocol, validated into attrs types (no I/O).

:func:`parse_command` turns one text frame into a command object or raises
:class:`raafd.errors.BadRequest` carrying the offending field path and the command's ``ref``
(so the error can be matched to the request). Unknown fields are refused: a typo should be an
error, not a silently ignored option.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar

import attrs
import cattrs
import orjson
from attrs import field, frozen

from raafd.errors import BadRequest

__all__ = [
    "COMMANDS",
    "Ack",
    "Command",
    "FieldError",
    "Hello",
    "Ping",
    "StreamAttach",
    "StreamControl",
    "StreamDetach",
    "StreamStart",
    "WorkflowStart",
    "describe_structure_error",
    "parse_command",
]

_MAX_ID = 128
MAX_WORKFLOW_AGENTS: Final = 16
T = TypeVar("T")


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


FieldError = _FieldError
"""Raised by a command's validator to name the field at fault (other command modules use it)."""


def _short(_: Any, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not 0 < len(value) <= _MAX_ID:
        raise _FieldError(a.name, f"must be 1 to {_MAX_ID} characters")


def _non_negative(_: Any, a: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise _FieldError(a.name, "must be 0 or more")


@frozen
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str


@frozen
class Hello:
    token: str | None = field(default=None, repr=False)
    client: str | None = None
    ref: str | None = None


@frozen
class Ping:
    ref: str | None = None


@frozen
class StreamStart:
    agent: str | None = field(default=None, validator=_short)
    input: str | None = None
    messages: list[Message] | None = None
    stream: str | None = field(default=None, validator=_short)
    session: str | None = field(default=None, validator=_short)
    ref: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' or 'messages'")

    def conversation(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [{"role": m.role, "content": m.content} for m in self.messages]
        return [{"role": "user", "content": self.input or ""}]


@frozen
class StreamAttach:
    """``stream.attach``; ``snapshot`` with ``after`` 0 asks for one ``snapshot`` event instead
    of the replay of what came before (ignored with a later ``after``: a resume)."""

    stream: str = field(validator=_short)
    after: int = field(default=0, validator=_non_negative)
    snapshot: bool = False
    ref: str | None = None


@frozen
class StreamDetach:
    stream: str = field(validator=_short)
    ref: str | None = None


@frozen
class StreamControl:
    """``stream.cancel``, ``stream.pause`` and ``stream.resume``."""

    stream: str = field(validator=_short)
    ref: str | None = None


def names(most: int, what: str) -> Callable[[Any, attrs.Attribute[Any], list[str]], None]:
    """A validator: a list of 1 to ``most`` names (``what``: "agents", "ids" …), each 1 to
    128 characters; the field path names the first one at fault."""

    def check(_: Any, a: attrs.Attribute[Any], value: list[str]) -> None:
        if not 1 <= len(value) <= most:
            raise _FieldError(a.name, f"must list 1 to {most} {what}")
        for i, name in enumerate(value):
            if not 0 < len(name) <= _MAX_ID:
                raise _FieldError(f"{a.name}.{i}", f"must be 1 to {_MAX_ID} characters")

    return check


_workflow_agents = names(MAX_WORKFLOW_AGENTS, "agents")


@frozen
class WorkflowStart:
    """``workflow.start`` (and the body of ``POST /v1/workflows``): several agents, one stream.

    ``mode`` ``sequential`` runs ``agents`` one after the other, each on the previous one's
    answer; ``parallel`` runs them concurrently on ``input``, then ``synthesizer`` (required)
    over their answers. See :mod:`raafd.agents.workflows`. (``mode``, not ``type``: a frame's
    ``type`` is its command.)"""

    mode: Literal["sequential", "parallel"]
    agents: list[str] = field(validator=_workflow_agents)
    input: str
    synthesizer: str | None = field(default=None, validator=_short)
    stream: str | None = field(default=None, validator=_short)
    ref: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.mode == "parallel":
            if self.synthesizer is None:
                raise _FieldError("synthesizer", "required for a parallel workflow")
            seen: set[str] = set()
            for i, name in enumerate(self.agents):
                if name in seen:
                    # Every event carries `agent`: twice the same name could not be told apart.
                    raise _FieldError(f"agents.{i}", f"{name!r} is listed twice")
                seen.add(name)


MAX_ACK_IDS: Final = 1000


@frozen
class Ack:
    """``ack``: queued messages (``queued``) the client has handled; they are deleted."""

    ids: list[str] = field(validator=names(MAX_ACK_IDS, "ids"))
    ref: str | None = None


Command = (
    Hello | Ping | StreamStart | StreamAttach | StreamDetach | StreamControl | WorkflowStart | Ack
)

COMMANDS: Final[dict[str, type[Any]]] = {
    "hello": Hello,
    "ping": Ping,
    "stream.start": StreamStart,
    "stream.attach": StreamAttach,
    "stream.detach": StreamDetach,
    "stream.cancel": StreamControl,
    "stream.pause": StreamControl,
    "stream.resume": StreamControl,
    "workflow.start": WorkflowStart,
}

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict(value: Any, t: type) -> Any:
    if t is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError("expected an integer")
    if t is str and not isinstance(value, str):
        raise TypeError("expected a string")
    if t is bool and not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


_converter.register_structure_hook(int, _strict)
_converter.register_structure_hook(str, _strict)
_converter.register_structure_hook(bool, _strict)


def structure(data: Any, cls: type[T]) -> T:
    """Structure ``data`` into ``cls`` with the protocol's strict rules (no coercion, no
    unknown fields); raises what cattrs raises (see :func:`describe_structure_error`)."""
    return _converter.structure(data, cls)


def parse_command(
    raw: bytes | str, commands: Mapping[str, type[Any]] = COMMANDS
) -> tuple[str, Any]:
    """One frame → ``(type, command)``, structured into the class ``commands`` maps its type
    to (the gateway passes its command table's); raises BadRequest (with ``ref`` when
    known)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("frame must be a JSON object")
    ref = data.get("ref")
    ref = ref if isinstance(ref, str) else None
    kind = data.pop("type", None)
    if not isinstance(kind, str):
        raise _with_ref(BadRequest("missing command 'type'", field="type"), ref)
    cls = commands.get(kind)
    if cls is None:
        raise _with_ref(BadRequest(f"unknown command type {kind!r}", field="type"), ref)
    try:
        return kind, _converter.structure(data, cls)
    except cattrs.ForbiddenExtraKeysError as exc:
        name = sorted(exc.extra_fields)[0]
        raise _with_ref(BadRequest(f"unknown field {name!r} for {kind}", field=name), ref) from None
    except Exception as exc:
        field_path, reason = describe_structure_error(exc)
        message = f"{kind}: {field_path + ': ' if field_path else ''}{reason}"
        raise _with_ref(BadRequest(message, field=field_path), ref) from None


def describe_structure_error(exc: BaseException) -> tuple[str | None, str]:
    """The field path and a sentence for a cattrs structuring failure."""
    path: list[str] = []
    while isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        with_notes, without = exc.group_exceptions()
        if with_notes:
            exc, note = with_notes[0]
            path.append(str(getattr(note, "name", getattr(note, "index", "?"))))
        elif without:
            exc = without[0]
        else:  # pragma: no cover
            break
    if isinstance(exc, _FieldError):
        path.append(exc.field)
    where = ".".join(path) or None
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        name = sorted(exc.extra_fields)[0]
        return ".".join([*path, name]), "unknown field"
    if isinstance(exc, KeyError):
        return where, "required field missing"
    text = str(exc)
    if "not in literal" in text:
        options = text.split("Literal[", 1)[-1].rstrip("]").replace("'", "")
        return where, f"must be one of {options}"
    return where, text or type(exc).__name__


def _with_ref(err: BadRequest, ref: str | None) -> BadRequest:
    err.ref = ref  # type: ignore[attr-defined]
    return err
