"""``POST /v1/workflows``: start a multi-agent workflow (see :mod:`raafd.agents.workflows`).

The body is the ``workflow.start`` command without ``type``: ``mode`` (``sequential`` or
``parallel``; ``type`` is accepted as its synonym here, where no frame type takes the name),
``agents``, ``input``, optional ``synthesizer`` and ``stream``. Like ``POST /v1/streams``:
``Accept: text/event-stream`` or ``application/x-ndjson`` streams the workflow's events from
seq 1 (served by the very handler of ``GET /v1/streams/{id}/events``: same framing, heartbeats
and detach rule), anything else answers ``201`` {``stream``} with ``location``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raafd.errors import BadRequest, Unavailable
from raafd.http.asgi import (
    JSONResponse,
    Request,
    Response,
    Router,
    StreamingResponse,
    decode_body,
    structure,
)
from raafd.http.context import StreamingContext
from raafd.http.streams import event_stream, framing_for
from raafd.protocol.commands import WorkflowStart

if TYPE_CHECKING:
    from raafd.streams import Stream

__all__ = ["add_workflow_routes"]


def add_workflow_routes(
    router: Router,
    ctx: StreamingContext,
    start_workflow: Callable[[WorkflowStart, str, str], Stream],
) -> None:
    """``start_workflow(cmd, owner, principal)`` checks the command against the running agents and
    starts its stream."""

    async def start(request: Request) -> Response | StreamingResponse:
        if ctx.draining():
            raise Unavailable("the server is draining", retry_after=1)
        data: dict[str, Any] = decode_body(await request.body(), dict)
        if "type" in data:
            if "mode" in data:
                raise BadRequest("give mode or its synonym type, not both", field="type")
            data["mode"] = data.pop("type")
        cmd = structure(data, WorkflowStart)
        ctx.guard.require_agents(request.principal, cmd.agents, cmd.synthesizer)
        ctx.guard.limit("stream_starts", None, request.principal)
        stream = start_workflow(cmd, f"http:{request.id}", request.principal.counted_as)
        framing = framing_for(request.headers.get("accept", ""), None)
        if framing is not None:
            return event_stream(ctx, stream.id, 0, framing)
        return JSONResponse({"stream": stream.id}, 201, {"location": f"/v1/streams/{stream.id}"})

    router.add("POST", "/v1/workflows", start)
