"""``/v1/jobs`` and ``/v1/batches``: background agent runs over HTTP.

- ``POST /v1/jobs`` → ``202 {job, status, …}`` once the job is durable; ``200`` with the
  existing job for an ``idempotency_key`` already used within its retention;
- ``GET /v1/jobs/{id}[?wait=S]`` → the job (long-polls until it ends or S seconds);
- ``GET /v1/jobs?status=&agent=&limit=&cursor=`` → ``{jobs, next_cursor}``, newest first;
- ``DELETE /v1/jobs/{id}`` → the cancelled job (409 when it has already ended);
- ``POST /v1/jobs/{id}/retry`` → a dead job queued again;
- ``POST /v1/batches`` → ``202 {batch, jobs}``; ``GET /v1/batches/{id}[?wait=S]``;
  ``DELETE /v1/batches/{id}`` cancels what has not ended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from raafd.errors import BadRequest, Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router, decode_body
from raafd.http.context import HttpContext
from raafd.jobs.service import describe, public_batch
from raafd.protocol.jobs import BatchSubmit, JobSubmit

if TYPE_CHECKING:
    from raafd.jobs import Jobs

__all__ = ["add_job_routes", "seconds_param"]


def seconds_param(query: Mapping[str, str], name: str = "wait") -> float:
    """``?wait=S``: a non-negative number of seconds (0 without it)."""
    text = query.get(name)
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number of seconds", field=name) from None
    if not value >= 0 or value == float("inf"):
        raise BadRequest(f"{name} must be 0 or more seconds", field=name)
    return value


def add_job_routes(router: Router, ctx: HttpContext, jobs: Callable[[], Jobs | None]) -> None:
    """``jobs()``: the jobs service, None until the daemon has opened its store. Submitting
    needs the role permission ``job.submit`` for each agent (``forbidden`` naming the field)
    and is counted against ``job_submits`` (``rate_limited``)."""

    def service() -> Jobs:
        opened = jobs()
        if opened is None:
            raise Unavailable("the job store is not open yet", retry_after=1)
        return opened

    async def submit(request: Request) -> Response:
        if ctx.draining():
            raise Unavailable("the server is draining; submit the job elsewhere", retry_after=1)
        cmd = decode_body(await request.body(), JobSubmit)
        for agent, field in cmd.agents_named(ctx.config().default_agent):
            ctx.guard.require(request.principal, "job.submit", agent, field)
        ctx.guard.limit("job_submits", None, request.principal)
        job, created = await service().submit(cmd, owner=_owner(request))
        headers = {"location": f"/v1/jobs/{job.id}"}
        return JSONResponse(job.public(), 202 if created else 200, headers)

    async def status(request: Request, job_id: str) -> Response:
        job = await service().wait(job_id, seconds_param(request.query))
        return JSONResponse(job.public())

    async def listing(request: Request) -> Response:
        q = request.query
        limit_text = q.get("limit", "100")
        if not limit_text.isdigit():
            raise BadRequest("limit must be an integer 1 to 1000", field="limit")
        found, cursor = await service().find(
            state=q.get("status") or None,
            agent=q.get("agent") or None,
            limit=int(limit_text),
            cursor=q.get("cursor") or None,
        )
        return JSONResponse({"jobs": [describe(j) for j in found], "next_cursor": cursor})

    async def cancel(request: Request, job_id: str) -> Response:
        return JSONResponse((await service().cancel(job_id)).public())

    async def retry(request: Request, job_id: str) -> Response:
        return JSONResponse((await service().retry(job_id)).public(), 202)

    async def submit_batch(request: Request) -> Response:
        if ctx.draining():
            raise Unavailable("the server is draining; submit the batch elsewhere", retry_after=1)
        cmd = decode_body(await request.body(), BatchSubmit)
        if cmd.agents is not None:
            for i, name in enumerate(cmd.agents):
                ctx.guard.require(request.principal, "job.submit", name, f"agents.{i}")
        else:
            agent = cmd.agent or ctx.config().default_agent
            ctx.guard.require(request.principal, "job.submit", agent, "agent")
        ctx.guard.limit("job_submits", None, request.principal)
        batch, created = await service().submit_batch(cmd, owner=_owner(request))
        body = {"batch": batch.id, "status": batch.state, "jobs": [j.id for j in created]}
        return JSONResponse(body, 202, {"location": f"/v1/batches/{batch.id}"})

    async def batch_status(request: Request, batch_id: str) -> Response:
        batch, members = await service().wait_batch(batch_id, seconds_param(request.query))
        return JSONResponse(public_batch(batch, members))

    async def batch_cancel(request: Request, batch_id: str) -> Response:
        batch, members = await service().cancel_batch(batch_id)
        return JSONResponse(public_batch(batch, members))

    router.add("POST", "/v1/jobs", submit)
    router.add("GET", "/v1/jobs", listing)
    router.add("GET", "/v1/jobs/{job_id}", status)
    router.add("DELETE", "/v1/jobs/{job_id}", cancel)
    router.add("POST", "/v1/jobs/{job_id}/retry", retry)
    router.add("POST", "/v1/batches", submit_batch)
    router.add("GET", "/v1/batches/{batch_id}", batch_status)
    router.add("DELETE", "/v1/batches/{batch_id}", batch_cancel)


def _owner(request: Request) -> str:
    """Who submits: the request's principal."""
    return request.principal.user
