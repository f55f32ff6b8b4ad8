"""A fake Ollama server: real HTTP/1.1 (h11 over trio sockets), the native ``/api/chat`` NDJSON.

Start it in a nursery and point a provider at ``fake.base_url``::

    fake = FakeOllama()
    port = await nursery.start(fake.run)

``POST /api/chat`` with ``stream: true`` answers what Ollama streams, one JSON object a line,
each line written as its own HTTP chunk::

    {"model", "created_at", "message": {"role": "assistant", "content": "tok0 "}, "done": false}
    …
    {"model", "created_at", "message": {"role": "assistant", "content": "",
                                        "tool_calls": [{"function": {"name", "arguments": {}}}]},
     "done": false}
    {"model", "created_at", "message": {"role": "assistant", "content": ""}, "done": true,
     "done_reason": "stop", "total_duration", "load_duration", "prompt_eval_count",
     "prompt_eval_duration", "eval_count", "eval_duration"}

Each request takes the next :class:`OllamaScript` pushed with :meth:`FakeOllama.push`, or the
default one. A script can answer an HTTP error with Ollama's ``{"error": "..."}`` body, put an
``{"error": "..."}`` line mid-stream (as Ollama does when the runner fails), cut the connection,
or stall. Like Ollama it answers 400 ``model is required`` to a body without a model, and a
plain-text ``404 page not found`` to other paths.

Requests are recorded as :class:`RecordedRequest` (headers, body, deltas sent, who closed the
connection and when), as by the other fakes.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import h11
import orjson
import trio

from .anthropic_upstream import ScriptedUpstream, http_chunk
from .openai_upstream import RecordedRequest

__all__ = ["FakeOllama", "OllamaScript", "OllamaToolCall"]

CREATED_AT = "2025-05-27T22:54:57.641643Z"


@attrs.frozen
class OllamaToolCall:
    """One tool call; ``arguments`` is a JSON text, sent as the object it encodes."""

    name: str
    arguments: str = "{}"


@attrs.frozen
class OllamaScript:
    """What the fake answers to one request. Counts (``close_after`` …) are in content lines:
    the text pieces, then the tool-call lines."""

    deltas: int = 16
    interval: float = 0.0  # seconds between lines
    pieces: tuple[str, ...] | None = None  # text pieces; default ``deltas`` generated words
    first_delay: float = 0.0
    model: str = "llama-fake"
    tool_calls: tuple[OllamaToolCall, ...] = ()
    split_tool_calls: bool = False  # one line per call (newer servers) instead of one for all
    done_reason: str = "stop"  # Ollama says "stop" after tool calls too
    prompt_eval_count: int = 9
    eval_count: int | None = None  # default: one per content line
    done: bool = True  # end with the done line
    crlf: bool = False  # end lines with CRLF (a proxy that rewrites them)
    # failures
    status: int = 200
    error_message: str = "fake upstream error"
    echo_authorization: bool = False  # put the request's Authorization value in the message
    headers: tuple[tuple[str, str], ...] = ()
    close_after: int | None = None  # cut the connection after this many content lines
    error_after: int | None = None  # send an ``{"error": ...}`` line after this many
    hang_after: int | None = None  # stop sending (connection kept open) after this many

    @property
    def text_pieces(self) -> tuple[str, ...]:
        if self.pieces is not None:
            return self.pieces
        return tuple(f"tok{i} " for i in range(self.deltas))


def _line(script: OllamaScript, message: dict[str, Any], **extra: Any) -> bytes:
    doc = {"model": script.model, "created_at": CREATED_AT, "message": message, **extra}
    return orjson.dumps(doc) + (b"\r\n" if script.crlf else b"\n")


def encode(script: OllamaScript) -> tuple[list[bytes], bytes]:
    """The content lines and the done line."""
    lines = [
        _line(script, {"role": "assistant", "content": piece}, done=False)
        for piece in script.text_pieces
    ]
    calls = [
        {"function": {"name": call.name, "arguments": orjson.loads(call.arguments)}}
        for call in script.tool_calls
    ]
    groups = [[call] for call in calls] if script.split_tool_calls else [calls] if calls else []
    for group in groups:
        message = {"role": "assistant", "content": "", "tool_calls": group}
        lines.append(_line(script, message, done=False))
    eval_count = script.eval_count if script.eval_count is not None else len(lines)
    done = _line(
        script,
        {"role": "assistant", "content": ""},
        done=True,
        done_reason=script.done_reason,
        total_duration=5_043_500_667,
        load_duration=5_025_959,
        prompt_eval_count=script.prompt_eval_count,
        prompt_eval_duration=325_953_000,
        eval_count=eval_count,
        eval_duration=4_709_213_000,
    )
    return lines, done


class FakeOllama(ScriptedUpstream[OllamaScript]):
    """See the module docstring."""

    def __init__(self, default: OllamaScript | None = None, *, max_recorded: int = 1024) -> None:
        super().__init__(
            default if default is not None else OllamaScript(), max_recorded=max_recorded
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def respond(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        rec: RecordedRequest,
        script: OllamaScript,
    ) -> bool:
        path = rec.path.split("?", 1)[0]
        if rec.method != "POST" or path != "/api/chat":
            await _send(stream, conn, rec, 404, b"404 page not found", "text/plain")
            return True
        try:
            body = rec.json
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            await _send_error(stream, conn, rec, 400, "invalid character in request body")
            return True
        if not body.get("model"):
            await _send_error(stream, conn, rec, 400, "model is required")
            return True
        if script.status != 200:
            message = script.error_message
            if script.echo_authorization:
                message += f" (bad token: {rec.headers.get('authorization', '')})"
            await _send_error(stream, conn, rec, script.status, message, script.headers)
            return True
        answer = functools.partial(_stream_lines, stream, conn, rec, script)
        return await self.stream_body(stream, conn, rec, answer)


async def _stream_lines(
    stream: trio.SocketStream, conn: h11.Connection, rec: RecordedRequest, script: OllamaScript
) -> bool:
    head = h11.Response(
        status_code=200,
        headers=[
            ("content-type", "application/x-ndjson"),
            ("transfer-encoding", "chunked"),
            *script.headers,
        ],
    )
    await stream.send_all(conn.send(head) or b"")
    if script.first_delay:
        await trio.sleep(script.first_delay)
    lines, done = encode(script)
    ending = done if script.done else b""
    next_at = trio.current_time()
    for i, line in enumerate(lines):
        if i == script.close_after:
            return False
        if i == script.hang_after:
            await trio.sleep_forever()
        if i == script.error_after:
            ending = orjson.dumps({"error": script.error_message}) + b"\n"
            break
        if i and script.interval:
            next_at += script.interval
            await trio.sleep_until(next_at)
        await stream.send_all(http_chunk(line))
        rec.deltas_sent += 1
    else:
        if script.close_after is not None and script.close_after >= len(lines):
            return False
        if script.hang_after is not None and script.hang_after >= len(lines):
            await trio.sleep_forever()
        if script.error_after is not None and script.error_after >= len(lines):
            ending = orjson.dumps({"error": script.error_message}) + b"\n"
    # The ending and the body's terminator in one write, as Ollama flushes them.
    await stream.send_all(
        (http_chunk(ending) if ending else b"") + (conn.send(h11.EndOfMessage()) or b"")
    )
    rec.completed = True
    return True


async def _send_error(
    stream: trio.SocketStream,
    conn: h11.Connection,
    rec: RecordedRequest,
    status: int,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    body = orjson.dumps({"error": message})
    await _send(stream, conn, rec, status, body, "application/json; charset=utf-8", headers)


async def _send(
    stream: trio.SocketStream,
    conn: h11.Connection,
    rec: RecordedRequest,
    status: int,
    body: bytes,
    content_type: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    head = h11.Response(
        status_code=status,
        headers=[("content-type", content_type), ("content-length", str(len(body))), *headers],
    )
    data = conn.send(head) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    rec.completed = True
