"""The provider interface: an upstream turned into a bounded stream of normalised deltas.

A provider's :meth:`Provider.stream` sends :class:`Delta` (text, tool-call fragments, usage,
finish reason) and :class:`RetryNotice` items into a :class:`Sink` and returns when the
upstream answer is complete. The sink's ``send`` is the backpressure: the agent loop's sink
appends to the stream in the provider's own task and returns only once the stream takes more,
so a paused or slow stream stops the provider's reads and so the upstream's TCP window (a
trio memory channel is a sink too: tests read providers through one). Cancelling the caller's
scope closes the upstream request at once. Failures are raised as :class:`ProviderError`.
"""

from __future__ import annotations

from typing import Any, Protocol

from attrs import field, frozen

from raafd.config import ProviderConfig
from raafd.errors import UpstreamError

__all__ = [
    "Delta",
    "Provider",
    "ProviderError",
    "ProviderEvent",
    "ProviderRequest",
    "RetryNotice",
    "Sink",
    "ToolCallDelta",
    "Usage",
]


@frozen
class Usage:
    """An answer's token counts. ``None`` means the upstream did not say (some
    OpenAI-compatible servers send no usage): never a silent 0."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        """The counts of two answers together; a count either of them lacks is unknown."""
        return Usage(
            _sum(self.prompt_tokens, other.prompt_tokens),
            _sum(self.completion_tokens, other.completion_tokens),
        )


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


@frozen
class ToolCallDelta:
    """A fragment of a tool call. Fragments with the same ``index`` belong to one call; ``id``
    and ``name`` arrive on the first fragment, ``arguments`` is a piece of a JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@frozen
class Delta:
    text: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    usage: Usage | None = None
    finish_reason: str | None = None


@frozen
class RetryNotice:
    """The provider is retrying before the first token (becomes a ``retry`` stream event)."""

    attempt: int
    reason: str
    retry_after: float


ProviderEvent = Delta | RetryNotice


@frozen
class ProviderRequest:
    model: str
    messages: list[dict[str, Any]]
    instructions: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[dict[str, Any]] = field(factory=list)


class ProviderError(UpstreamError):
    """An upstream failure. ``retryable`` failures before the first token may be retried."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
        reason: str = "upstream_error",
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retryable = retryable
        self.status = status
        self.reason = reason


class Sink(Protocol):
    """Where a provider sends its events, one at a time, in order; ``send`` returns once the
    consumer takes more (the backpressure)."""

    async def send(self, value: ProviderEvent, /) -> None: ...


class Provider(Protocol):
    name: str
    config: ProviderConfig

    async def stream(self, request: ProviderRequest, send: Sink) -> None:
        """Send the answer's deltas into ``send``; return when complete; raise
        :class:`ProviderError` on failure. Does not close ``send``."""
        ...
