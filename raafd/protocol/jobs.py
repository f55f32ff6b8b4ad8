"""The wire types of jobs and batches: the body of ``POST /v1/jobs`` (also the WebSocket
``job.submit`` command), ``POST /v1/batches``, and the ``job.status`` / ``job.cancel`` /
``job.watch`` commands. Validated by cattrs with the protocol's strict rules; what depends on the
running configuration (the agent exists, metadata size, delay and timeout bounds) is checked by
the jobs service."""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
from attrs import field, frozen

from raafd.protocol.commands import Message, WorkflowStart, _FieldError

__all__ = ["BatchRef", "BatchSubmit", "JobRef", "JobSubmit", "JobWorkflow", "check_priority"]

_MAX_ID: Final = 128
_MAX_URL: Final = 2048


def check_priority(value: Any) -> int:
    """``high`` (0), ``normal`` (5), ``low`` (9) or an integer 0-9 → 0-9; ValueError else."""
    names = {"high": 0, "normal": 5, "low": 9}
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
        return value
    raise ValueError("must be high, normal, low or an integer 0 to 9")


def _priority(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
    try:
        check_priority(value)
    except ValueError as exc:
        raise _FieldError(a.name, str(exc)) from None


def _non_negative(_: Any, a: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value >= 0:
        raise _FieldError(a.name, "must be 0 or more")


def _positive(_: Any, a: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise _FieldError(a.name, "must be greater than 0")


def _short(_: Any, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not 0 < len(value) <= _MAX_ID:
        raise _FieldError(a.name, f"must be 1 to {_MAX_ID} characters")


def _url(_: Any, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if len(value) > _MAX_URL or not value.startswith(("http://", "https://")):
        raise _FieldError(a.name, f"must be an http:// or https:// URL of at most {_MAX_URL}")


def _attempts(_: Any, a: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 1 <= value <= 100:
        raise _FieldError(a.name, "must be 1 to 100")


@frozen
class JobSubmit:
    """``POST /v1/jobs`` and ``job.submit``: one agent run in the background. Give ``input``
    or ``messages``; ``delay`` (seconds) or ``run_at`` (unix time) for a later start."""

    agent: str | None = field(default=None, validator=_short)
    workflow: JobWorkflow | None = None
    input: str | None = None
    messages: list[Message] | None = None
    session: str | None = field(default=None, validator=_short)
    priority: Any = field(default="normal", validator=_priority)
    delay: float | None = field(default=None, validator=_non_negative)
    run_at: float | None = field(default=None, validator=_non_negative)
    every: float | None = field(default=None, validator=_positive)
    max_attempts: int | None = field(default=None, validator=_attempts)
    backoff: float | None = field(default=None, validator=_positive)
    timeout: float | None = field(default=None, validator=_positive)
    callback_url: str | None = field(default=None, validator=_url)
    idempotency_key: str | None = field(default=None, validator=_short)
    metadata: dict[str, Any] | None = None
    ref: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.input is None) == (self.messages is None):
            raise _FieldError("input", "give exactly one of 'input' or 'messages'")
        if self.delay is not None and self.run_at is not None:
            raise _FieldError("run_at", "give at most one of 'delay' or 'run_at'")
        if self.workflow is not None:
            if self.agent is not None:
                raise _FieldError("workflow", "give 'agent' or 'workflow', not both")
            if self.input is None:
                raise _FieldError("input", "a workflow runs on 'input', not 'messages'")

    def agents_named(self, default_agent: str) -> list[tuple[str, str]]:
        """The agents the job runs, each with the field that names it (permission checks)."""
        if self.workflow is None:
            return [(self.agent or default_agent, "agent")]
        flow = self.workflow
        named = [(name, f"workflow.agents.{i}") for i, name in enumerate(flow.agents)]
        if flow.synthesizer is not None:
            named.append((flow.synthesizer, "workflow.synthesizer"))
        return named

    def conversation(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [{"role": m.role, "content": m.content} for m in self.messages]
        return [{"role": "user", "content": self.input or ""}]


def _max_concurrent(_: Any, a: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= 1000:
        raise _FieldError(a.name, "must be 1 to 1000")


def _names(_: Any, a: attrs.Attribute[Any], value: list[str] | None) -> None:
    if value is None:
        return
    if not value:
        raise _FieldError(a.name, "must not be empty")
    for i, name in enumerate(value):
        if not 0 < len(name) <= _MAX_ID:
            raise _FieldError(f"{a.name}.{i}", f"must be 1 to {_MAX_ID} characters")


def _inputs(_: Any, a: attrs.Attribute[Any], value: list[str] | None) -> None:
    if value is not None and not value:
        raise _FieldError(a.name, "must not be empty")


@frozen
class JobWorkflow:
    """A job's ``workflow``: several agents over its ``input``, as ``workflow.start`` runs them
    (``mode`` sequential, or parallel with a ``synthesizer``)."""

    mode: Literal["sequential", "parallel"]
    agents: list[str] = field(validator=_names)
    synthesizer: str | None = field(default=None, validator=_short)

    def __attrs_post_init__(self) -> None:
        try:
            WorkflowStart(
                mode=self.mode, agents=self.agents, input="", synthesizer=self.synthesizer
            )
        except _FieldError as exc:
            raise _FieldError(exc.field, str(exc)) from None


@frozen
class BatchSubmit:
    """``POST /v1/batches``: ``inputs`` through one ``agent``, or one ``input`` through each of
    ``agents``; at most ``max_concurrent`` of its jobs run at once."""

    agent: str | None = field(default=None, validator=_short)
    inputs: list[str] | None = field(default=None, validator=_inputs)
    agents: list[str] | None = field(default=None, validator=_names)
    input: str | None = None
    max_concurrent: int = field(default=4, validator=_max_concurrent)
    priority: Any = field(default="normal", validator=_priority)
    max_attempts: int | None = field(default=None, validator=_attempts)
    timeout: float | None = field(default=None, validator=_positive)
    callback_url: str | None = field(default=None, validator=_url)
    metadata: dict[str, Any] | None = None
    ref: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.inputs is not None:
            if self.agents is not None or self.input is not None:
                raise _FieldError("inputs", "give 'inputs' (one agent) or 'agents' + 'input'")
        elif self.agents is None or self.input is None:
            raise _FieldError("inputs", "give 'inputs' (one agent) or 'agents' + 'input'")

    def runs(self) -> list[tuple[str | None, str]]:
        """(agent, input) of each job, in input order."""
        if self.inputs is not None:
            return [(self.agent, text) for text in self.inputs]
        return [(name, self.input or "") for name in self.agents or []]


@frozen
class JobRef:
    """``job.status``, ``job.cancel`` and ``job.watch``: ``job`` is the job id; ``after`` (for
    ``job.watch``) the last seq already seen of the current attempt's stream."""

    job: str = field(validator=_short)
    after: int = field(default=0, validator=_non_negative)
    ref: str | None = None


@frozen
class BatchRef:
    """``batch.status``: ``batch`` is the batch id."""

    batch: str = field(validator=_short)
    ref: str | None = None
