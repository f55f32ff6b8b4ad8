"""What a stream runs: its body, the writer the body emits through, and the factory of the
bodies of normal streams.

This is the contract between the stream lifecycle (:mod:`raafd.streams.stream`,
:mod:`raafd.streams.manager`) and what produces a stream's events (the agent loop and workflows
in :mod:`raafd.agents`). It imports nothing else of raafd: agents import it without importing
the stream engine, and the stream manager gets a :class:`BodyFactory` from the composition root
(:mod:`raafd.daemon`) instead of importing the agent loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Body", "BodyFactory", "StreamWriter"]


class StreamWriter(Protocol):
    """What a stream's body (the agent loop, a workflow) writes through."""

    async def emit(self, kind: str, **fields: Any) -> None:
        """Append an event. A non-terminal one first waits while the stream is paused or its
        single subscriber is behind (backpressure); a terminal one ends the stream."""
        ...

    async def wait_ready(self) -> None:
        """Return once the stream takes more upstream output (not paused, subscriber keeping
        up). Call it before reading the upstream, so that pausing stops the reads."""
        ...

    def progress(self) -> None:
        """Upstream made progress without an event yet (a tool-call fragment): counts as a
        token for the first-token and idle timeouts."""
        ...


Body = Callable[[StreamWriter], Awaitable[None]]
"""A stream's work: it writes the stream's events, its terminal event included."""


class BodyFactory(Protocol):
    """Builds the body of a normal stream: ``agent`` run on ``messages``. The body ends the
    stream itself (``complete`` or ``error``)."""

    @property
    def keeps_sessions(self) -> bool:
        """Whether bodies load the conversation of their ``session`` before the run and save
        the run's messages before ``complete``. Then the manager runs at most one stream per
        session at a time; otherwise a session id is only a label."""
        ...

    def __call__(self, agent: str, messages: list[dict[str, Any]], session: str | None) -> Body:
        """The body of one run. ``session`` is None when the conversation is not kept."""
        ...
