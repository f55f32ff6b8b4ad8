"""``raafd chat [URL] [--agent NAME] [--token TOKEN]``: a terminal chat on the WebSocket client.

Each line you type is sent with the conversation so far; the reply prints as it streams, tool
calls, retries and errors as bracketed lines, and a usage line ends it. Ctrl-C during a reply
cancels that stream (``stream.cancel``) and returns to the prompt; Ctrl-C at the prompt, or the
end of input (Ctrl-D), leaves. The token defaults to ``$RAAFD_TOKEN``.
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
        return trio.run(_main, args.url, args.agent, token, *streams)
    except KeyboardInterrupt:  # before the chat took over SIGINT (while connecting)
        return EXIT_INTERRUPTED


async def _main(
    url: str, agent: str | None, token: str | None, stdin: TextIO, stdout: TextIO
) -> int:
    send, interrupts = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        # Signals can only be caught on the main thread (tests run the chat on another one).
        if threading.current_thread() is threading.main_thread():
            await nursery.start(_forward_interrupts, send)
        status = await chat(
            url, agent=agent, token=token, stdin=stdin, stdout=stdout, interrupts=interrupts
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
) -> int:
    """Run the chat until end of input (0), an interrupt at the prompt (130) or a connection
    that cannot be had (1). Each message on ``interrupts`` is one Ctrl-C."""
    status = EXIT_ERROR
    try:
        async with open_client(url, token=token, agent=agent) as client:
            status = await _Chat(client, stdin, stdout, interrupts).run()
    except ClientError as err:  # the first connection failed
        print(f"raafd chat: {err}", file=sys.stderr)
        return EXIT_ERROR
    return status


class _Chat:
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
        self.history: list[dict[str, str]] = []
        self._line_start = True

    # --- output -------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        if text:
            self.stdout.write(text)
            self.stdout.flush()
            self._line_start = text.endswith("\n")

    def _say(self, line: str) -> None:
        """A line of its own, after whatever was being streamed."""
        self._write(("" if self._line_start else "\n") + line + "\n")

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
