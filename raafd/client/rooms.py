"""Rooms in the Python client: :meth:`RaafdClient.join` returns a :class:`RoomHandle`.

The rule of this file: **a room's messages reach the caller once each, in id order, with no
gap**, across dropped connections and a caller slower than the room. How:

- The handle remembers the last id it handed out (``last_id``). After a reconnect the client
  joins again with ``after = last_id`` (before any caller's command may go out), and the
  ``room.joined`` reply brings exactly what was missed.
- Messages wait in a bounded buffer (``room_buffer``). When it is full, further messages are not
  buffered: the handle notes that it missed some, and once the caller has drained the buffer it
  reads them with ``room.history`` (after ``last_id``) before going on. A message whose id is
  not ``last_id + 1`` (a gap) is filled the same way; one at or below ``last_id`` is a repeat
  and is skipped.
- Other room events (``typing``, ``room.member``, ``room.reply`` and the reply's ``stream.event``
  frames, which carry ``room``) are ephemeral: they are buffered while there is room and
  dropped otherwise.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["RoomHandle"]

HISTORY_PAGE = 500


class RoomHandle:
    """A joined room: ``history`` (the messages ``room.joined`` brought), ``members``, ``head``,
    and an async iterator of the room's events as dicts with their ``type`` (``room.message``,
    ``typing``, ``room.member``, ``room.reply``, ``stream.event``). Ends when :meth:`leave` is
    called or the client closes (then it raises the client's error)."""

    def __init__(
        self,
        room: str,
        joined: dict[str, Any],
        *,
        buffer: int,
        fetch: Callable[[str, int, int | None], Awaitable[list[dict[str, Any]]]],
        leave: Callable[[RoomHandle], Awaitable[None]],
    ) -> None:
        self.room = room
        self.history: list[dict[str, Any]] = list(joined.get("messages") or [])
        self.members: list[dict[str, Any]] = list(joined.get("members") or [])
        self.head: int = int(joined.get("head") or 0)
        self.last_id = self.history[-1]["id"] if self.history else self.head
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._size = buffer
        self._missed = False
        self._fetch = fetch
        self._leave = leave
        self._wake = trio.Event()
        self._ended = False
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"RoomHandle(room={self.room!r}, last_id={self.last_id})"

    @property
    def ended(self) -> bool:
        return self._ended

    # --- the client's side --------------------------------------------------------------------

    def _offer(self, event: dict[str, Any]) -> None:
        if self._ended:
            return
        if len(self._buffer) >= self._size:
            if event.get("type") == "room.message":
                self._missed = True
            return
        self._buffer.append(event)
        self._wake.set()

    def _rejoined(self, joined: dict[str, Any]) -> None:
        """A ``room.joined`` after a reconnect: the messages after ``last_id``."""
        self.members = list(joined.get("members") or [])
        for message in joined.get("messages") or []:
            self._offer({"type": "room.message", **message})

    def _end(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            self._wake.set()

    # --- the caller's side --------------------------------------------------------------------

    def __aiter__(self) -> RoomHandle:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._buffer:
                event = self._buffer.popleft()
                if event.get("type") != "room.message":
                    return event
                mid = int(event["id"])
                if mid <= self.last_id:
                    continue  # a repeat (a rejoin overlapping what was buffered)
                if mid > self.last_id + 1:
                    self._buffer.appendleft(event)
                    await self._fill(before=mid)
                    continue
                self.last_id = mid
                return event
            if self._missed and not self._ended:
                self._missed = False
                await self._fill(before=None)
                continue
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wake = trio.Event()
            await self._wake.wait()

    async def _fill(self, *, before: int | None) -> None:
        """Read the messages after ``last_id`` (and before ``before``) from the room's history
        into the front of the buffer."""
        page = await self._fetch(self.room, self.last_id, before)
        if before is None and len(page) >= HISTORY_PAGE:
            self._missed = True  # more than a page was missed: the next one after these
        for message in reversed(page):
            self._buffer.appendleft({"type": "room.message", **message})
        if before is not None and (not page or page[-1]["id"] < before - 1):
            # The room no longer keeps them: skip ahead rather than wait for ever.
            self.last_id = page[-1]["id"] if page else before - 1

    async def leave(self) -> None:
        """Leave the room (``room.leave``: the membership ends); iteration stops."""
        self._end()
        await self._leave(self)
