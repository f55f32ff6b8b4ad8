"""The admin commands of background jobs (``raafd ctl jobs``, ``raafd ctl job``):

- ``jobs`` {``status``?, ``agent``?, ``limit``?} → one row per job, newest first;
- ``job`` {``id``, ``action``: ``show`` | ``retry`` | ``cancel``} → the job;
- ``jobs-purge`` {``status``: [states], ``older_than``: seconds} → {``purged``}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raafd.errors import BadRequest, Unavailable
from raafd.jobs.service import describe

if TYPE_CHECKING:
    from raafd.admin.server import Handler
    from raafd.jobs import Jobs

__all__ = ["job_admin_commands"]


def job_admin_commands(jobs: Callable[[], Jobs | None]) -> dict[str, Handler]:
    """The handlers, for the admin server's table; ``jobs()`` is None until the store opens."""

    def service() -> Jobs:
        opened = jobs()
        if opened is None:
            raise Unavailable("the job store is not open yet")
        return opened

    async def listing(args: dict[str, Any]) -> Any:
        status, agent, limit = args.get("status"), args.get("agent"), args.get("limit", 50)
        if status is not None and not isinstance(status, str):
            raise BadRequest("status must be a string", field="status")
        if agent is not None and not isinstance(agent, str):
            raise BadRequest("agent must be a string", field="agent")
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise BadRequest("limit must be an integer", field="limit")
        found, _ = await service().find(state=status, agent=agent, limit=limit, cursor=None)
        return [describe(job) for job in found]

    async def one(args: dict[str, Any]) -> Any:
        job_id, action = args.get("id"), args.get("action", "show")
        if not isinstance(job_id, str):
            raise BadRequest("give the job id", field="id")
        if action == "show":
            return (await service().get(job_id)).public()
        if action == "retry":
            return (await service().retry(job_id)).public()
        if action == "cancel":
            return (await service().cancel(job_id)).public()
        raise BadRequest("action is show, retry or cancel", field="action")

    async def purge(args: dict[str, Any]) -> Any:
        states, older = args.get("status"), args.get("older_than")
        if isinstance(states, str):
            states = [states]
        if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
            raise BadRequest("give the states to purge", field="status")
        if isinstance(older, bool) or not isinstance(older, int | float) or older < 0:
            raise BadRequest("older_than is a number of seconds, 0 or more", field="older_than")
        return {"purged": await service().purge(states, float(older))}

    return {"jobs": listing, "job": one, "jobs-purge": purge}
