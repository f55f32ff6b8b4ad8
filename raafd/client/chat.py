"""``raafd chat [URL] [--agent NAME] [--token TOKEN] [--room NAME]``: a terminal chat on the
WebSocket client.

Each line you type is sent with the conversation so far; the reply prints as it streams, tool
calls, retries and errors as bracketed lines, and a usage line ends it. Ctrl-C during a reply
cancels that stream (``stream.cancel``) and returns to the prompt; Ctrl-C at the prompt, or the
end of input (Ctrl-D), leaves. The token defaults to ``$RAAFD_TOKEN``.

With ``--room NAME`` it joins a room instead: the room's recent messages, then each line you
type is sent to the room and everyone's messages print as ``[user] text``; an agent's reply
streams on its own line (``[agent:NAME] …``), ended before anyone else's message prints and
taken up again after it, so the two never mix within a line. Typing and membership changes
print on a status line (``* bob is typing``, ``* carol joined``). Reconnects rejoin where the
room left off.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, Final, TextIO

import trio

from raafd.client.client import DEFAULT_URL, ClientError, RaafdClient, StreamHandle, open_client
from raafd.client.rooms import RoomHandle

__all__ = ["build_parser", "chat", "main"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130
MAX_HISTORY: Final = 40  # messages sent with each turn
CANCEL_WAIT: Final = 5.0  # for the `cancelled` event after Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raafd chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    parser.add_argument("--agent", help="agent name (default: the server's default agent)")
    parser.add_argument("--token", help="bearer token (default: $RAAFD_TOKEN)")
    parser.add_argument("--room", help="join this room and chat there")
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """Entry point of ``raafd chat``; returns the exit status. ``stdin`` and ``stdout``
    default to the process's."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    token = args.token or os.environ.get("RAAFD_TOKEN") or None
    streams = (stdin or sys.stdin, stdout or sys.stdout)
    try:
        return trio.run(_main, args.url, args.agent, token, *streams, args.room)
    except KeyboardInterrupt:  # before the chat took over SIGINT (while connecting)
        return EXIT_INTERRUPTED


async def _main(
    url: str,
    agent: str | None,
    token: str | None,
    stdin: TextIO,
    stdout: TextIO,
    room: str | None = None,
) -> int:
    send, interrupts = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        # Signals can only be caught on the main thread (tests run the chat on another one).
        if threading.current_thread() is threading.main_thread():
            await nursery.start(_forward_interrupts, send)
        status = await chat(
            url,
            agent=agent,
            token=token,
            stdin=stdin,
            stdout=stdout,
            interrupts=interrupts,
            room=room,
        )
        nursery.cancel_scope.cancel()
    return status


async def _forward_interrupts(
    send: trio.MemorySendChannel[None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            try:
                send.send_nowait(None)
            except trio.WouldBlock:
                pass  # one pending interrupt is enough


async def chat(
    url: str,
    *,
    agent: str | None,
    token: str | None,
    stdin: TextIO,
    stdout: TextIO,
    interrupts: trio.MemoryReceiveChannel[None],
    room: str | None = None,
) -> int:
    """Run the chat until end of input (0), an interrupt at the prompt (130) or a connection
    that cannot be had (1). Each message on ``interrupts`` is one Ctrl-C. With ``room``, chat
    in that room (see the module docstring)."""
    status = EXIT_ERROR
    try:
        async with open_client(url, token=token, agent=agent) as client:
            if room is not None:
                status = await _RoomChat(client, room, stdin, stdout, interrupts).run()
            else:
                status = await _Chat(client, stdin, stdout, interrupts).run()
    except ClientError as err:  # the first connection failed
        print(f"raafd chat: {err}", file=sys.stderr)
        return EXIT_ERROR
    return status


class _Terminal:
    """Lines in and text out, shared by the two chats."""

    def __init__(
        self,
        client: RaafdClient,
        stdin: TextIO,
        stdout: TextIO,
        interrupts: trio.MemoryReceiveChannel[None],
    ) -> None:
        self.client = client
        self.stdin = stdin
        self.stdout = stdout
        self.interrupts = interrupts
        self._line_start = True

    def _write(self, text: str) -> None:
        if text:
            self.stdout.write(text)
            self.stdout.flush()
            self._line_start = text.endswith("\n")

    def _say(self, line: str) -> None:
        """A line of its own, after whatever was being streamed."""
        self._write(("" if self._line_start else "\n") + line + "\n")

    async def _read_line(self) -> str | None:
        """The next line ("" at end of input), or None when interrupted first."""
        lines: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cancel_on_interrupt, nursery.cancel_scope)
            # The thread is left behind on interrupt: a blocking read cannot be cancelled.
            lines.append(await trio.to_thread.run_sync(self.stdin.readline, abandon_on_cancel=True))
            nursery.cancel_scope.cancel()
        return lines[0] if lines else None

    async def _cancel_on_interrupt(self, scope: trio.CancelScope) -> None:
        await self.interrupts.receive()
        scope.cancel()


class _Chat(_Terminal):
    """The chat with an agent: each line is sent with the conversation so far (``history``)."""

    history: list[dict[str, str]]

    # --- output -------------------------------------------------------------------------------

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "content":
            self._write(str(event.get("delta", "")))
        elif kind == "tool_call":
            arguments = json.dumps(event.get("arguments", {}), ensure_ascii=False)
            self._say(f"[tool call {event.get('tool_name')} {arguments}]")
        elif kind == "tool_result":
            flag = " (error)" if event.get("is_error") else ""
            self._say(f"[tool result{flag} {event.get('tool_id')}: {event.get('result')}]")
        elif kind == "handoff":
            self._say(f"[handoff {event.get('from_agent')} -> {event.get('to_agent')}]")
        elif kind == "retry":
            wait = event.get("retry_after")
            after = f", next try in {wait:g} s" if isinstance(wait, int | float) else ""
            self._say(f"[retry {event.get('attempt')}: {event.get('reason')}{after}]")
        elif kind in ("paused", "resumed"):
            self._say(f"[{kind}]")
        elif kind == "complete":
            usage = event.get("usage") or {}
            prompt, completion = (
                "?" if usage.get(key) is None else usage[key]  # null: the upstream did not say
                for key in ("prompt_tokens", "completion_tokens")
            )
            self._say(
                f"[usage: {prompt} prompt + {completion} completion tokens; "
                f"{event.get('finish_reason')}]"
            )
        elif kind == "error":
            error = event.get("error") or {}
            self._say(f"[error {error.get('code')}: {error.get('message')}]")
        elif kind == "cancelled":
            self._say(f"[cancelled: {event.get('reason')}]")

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> int:
        self.history = []
        self._say(f"connected as {self.client.user}; Ctrl-C cancels a reply, Ctrl-D leaves")
        while True:
            self._write("> ")
            line = await self._read_line()
            self._line_start = True  # the terminal echoed the line and its newline
            if line is None:
                self._write("\n")
                return EXIT_INTERRUPTED
            if not line:
                self._write("\n")
                return EXIT_OK
            text = line.strip()
            if not text:
                continue
            self.history.append({"role": "user", "content": text})
            try:
                handle = await self.client.start(messages=self.history[-MAX_HISTORY:])
            except ClientError as err:
                self.history.pop()
                if self.client.error is not None:  # the client is done for good
                    print(f"raafd chat: {err}", file=sys.stderr)
                    return EXIT_ERROR
                self._say(f"[error {err}]")
                continue
            terminal = await self._reply(handle)
            if terminal is not None and terminal.get("event") == "complete":
                response = str(terminal.get("final_response", ""))
                self.history.append({"role": "assistant", "content": response})
            else:
                self.history.pop()  # no answer: forget the question too
            if self.client.error is not None:
                print(f"raafd chat: {self.client.error}", file=sys.stderr)
                return EXIT_ERROR

    async def _reply(self, handle: StreamHandle) -> dict[str, Any] | None:
        """Print the stream; on Ctrl-C cancel it. Returns its terminal event, if seen."""
        with trio.CancelScope() as streaming:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_interrupt, streaming)
                try:
                    async for event in handle:
                        self._show(event)
                except ClientError as err:
                    self._say(f"[error {err}]")
                nursery.cancel_scope.cancel()
        if not streaming.cancelled_caught:
            return handle.terminal
        # Interrupted: cancel the stream, skip what it had streamed meanwhile, show its end.
        with trio.move_on_after(CANCEL_WAIT):
            try:
                await handle.cancel()
                async for event in handle:
                    if event is handle.terminal:
                        self._show(event)
            except ClientError as err:
                self._say(f"[error {err}]")
        if handle.terminal is None:
            self._say("[cancelled]")
        return handle.terminal


class _RoomChat(_Terminal):
    """``raafd chat --room NAME``: see the module docstring."""

    def __init__(
        self,
        client: RaafdClient,
        room: str,
        stdin: TextIO,
        stdout: TextIO,
        interrupts: trio.MemoryReceiveChannel[None],
    ) -> None:
        super().__init__(client, stdin, stdout, interrupts)
        self.room = room
        self._streaming: str | None = None  # the reply stream whose text ends the current line
        self._agents: dict[str, str] = {}  # reply stream → agent (bounded: forgotten at its end)

    def _say(self, line: str) -> None:
        """A line of its own: a streaming reply's line is ended first."""
        super()._say(line)
        self._streaming = None

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "room.message":
            stream = event.get("stream")
            if stream is not None and stream == self._streaming:
                self._write("\n")  # its text has been streamed: end its line
                self._streaming = None
            elif stream is None or stream not in self._agents:
                self._say(f"[{event.get('from')}] {event.get('text')}")
            self._agents.pop(str(stream), None)
        elif kind == "room.reply":
            self._agents[str(event.get("stream"))] = str(event.get("agent"))
        elif kind == "stream.event":
            self._show_reply(event)
        elif kind == "typing":
            if event.get("state") == "start":
                self._say(f"* {event.get('user')} is typing")
        elif kind == "room.member":
            verb = {"join": "joined", "leave": "left"}.get(str(event.get("event")), "changed")
            self._say(f"* {event.get('user')} {verb}")

    def _show_reply(self, event: dict[str, Any]) -> None:
        stream = str(event.get("stream"))
        kind = event.get("event")
        if kind == "content":
            if self._streaming != stream:
                agent = self._agents.get(stream, "agent")
                self._say_start(f"[agent:{agent}] ")
                self._streaming = stream
            self._write(str(event.get("delta", "")))
        elif kind == "handoff":
            self._say(f"[handoff {event.get('from_agent')} -> {event.get('to_agent')}]")
            self._agents[stream] = str(event.get("to_agent"))
        elif kind in ("error", "cancelled"):
            error = event.get("error") or {}
            detail = error.get("message") if kind == "error" else event.get("reason")
            self._say(f"[reply {kind}: {detail}]")
            self._agents.pop(stream, None)

    def _say_start(self, prefix: str) -> None:
        self._write(("" if self._line_start else "\n") + prefix)

    async def run(self) -> int:
        try:
            joined = await self.client.join(self.room)
        except ClientError as err:
            print(f"raafd chat: {err}", file=sys.stderr)
            return EXIT_ERROR
        self._say(f"joined {self.room} as {self.client.user}; Ctrl-D leaves")
        for message in joined.history:
            self._show({"type": "room.message", **message})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._print_events, joined)
            status = await self._read_lines()
            nursery.cancel_scope.cancel()
        return status

    async def _print_events(self, joined: RoomHandle) -> None:
        try:
            async for event in joined:
                self._show(event)
        except ClientError as err:
            self._say(f"[error {err}]")

    async def _read_lines(self) -> int:
        while True:
            line = await self._read_line()
            if line is None:
                return EXIT_INTERRUPTED
            if not line:
                return EXIT_OK
            text = line.strip()
            if not text:
                continue
            try:
                await self.client.send(self.room, text)
            except ClientError as err:
                if self.client.error is not None:
                    print(f"raafd chat: {err}", file=sys.stderr)
                    return EXIT_ERROR
                self._say(f"[error {err}]")
