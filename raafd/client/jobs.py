"""Background jobs from the Python client: :meth:`RaafdClient.submit_job` returns a
:class:`JobHandle`, whose :meth:`~JobHandle.wait` waits for the job to end (the async runner's
``wait_for_completion(timeout:)``) and whose :meth:`~JobHandle.events` yields the events of
each attempt's stream as they happen, resumed across dropped connections (each attempt is a
stream, followed with :meth:`RaafdClient.attach`).

The server pushes no job states, so between attempts (queued, waiting to retry) a handle asks
``job.status`` every ``poll`` seconds; while an attempt runs it follows the attempt's stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from raafd.client.client import RaafdClient

__all__ = ["TERMINAL_JOB_STATES", "JobHandle"]

TERMINAL_JOB_STATES: Final = frozenset({"completed", "dead", "cancelled"})


class JobHandle:
    """One submitted job; ``data`` is the job as the server last described it."""

    def __init__(self, client: RaafdClient, data: dict[str, Any], *, poll: float = 0.5) -> None:
        self._client = client
        self.data = data
        self._poll = poll

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.status}>"

    @property
    def id(self) -> str:
        return str(self.data["job"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_JOB_STATES

    async def refresh(self) -> dict[str, Any]:
        """Ask the server for the job now (``job.status``)."""
        reply = await self._client.request({"type": "job.status", "job": self.id})
        self.data = reply["job"]
        return self.data

    async def cancel(self) -> dict[str, Any]:
        reply = await self._client.request({"type": "job.cancel", "job": self.id})
        self.data = reply["job"]
        return self.data

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """The job once it has ended, or as it is after ``timeout`` seconds (the async
        runner's ``wait_for_completion(timeout:)``, hence the parameter)."""
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            async for _ in self.events():
                pass
        if not self.done:
            await self.refresh()
        return self.data

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event of every attempt's stream, in order, until the job ends (an attempt
        that fails and is retried shows its ``error`` event, then the next attempt's)."""
        followed: set[str] = set()
        while True:
            await self.refresh()
            stream = self.data.get("stream")
            if stream is not None and stream not in followed:
                followed.add(stream)
                handle = await self._client.attach(stream, snapshot=False)
                async for event in handle:
                    yield event
                continue  # the job's state follows the stream's end: ask again at once
            if self.done:
                return
            await trio.sleep(self._poll)
