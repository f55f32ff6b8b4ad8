"""The provider interface: an upstream turned into a bounded stream of normalised deltas.

A provider's :meth:`Provider.stream` sends :class:`Delta` (text, tool-call fragments, usage,
finish reason) and :class:`RetryNotice` items into a bounded channel and returns when the
upstream answer is complete. The channel's bound is the backpressure: a slow stream stops the
provider's reads and so the upstream's TCP window. Cancelling the caller's scope closes the
upstream request at once. Failures are raised as :class:`ProviderError`.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio
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
    "ToolCallDelta",
    "Usage",
]


@frozen
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


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


class Provider(Protocol):
    name: str
    config: ProviderConfig

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        """Send the answer's deltas into ``send``; return when complete; raise
        :class:`ProviderError` on failure. Does not close ``send``."""
        ...
