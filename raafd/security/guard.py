"""What the transports call at their edges: :meth:`Guard.require` (the role policy: refuse
with ``forbidden``) and :meth:`Guard.limit` (the rate limits: refuse with ``rate_limited``),
each refusal counted and written as an audit line. Subsystems get the guard, never the
configuration behind it; both read the running configuration at each call (SIGHUP applies at
once)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from raafd.auth import Principal
from raafd.errors import Forbidden, RateLimited
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.security.authenticator import Authenticator
from raafd.security.limiter import ConnectionLimits, Limiter

__all__ = ["Guard"]

audit = get_logger("raafd.audit")

_VERBS = {
    "agent.run": "run the agent",
    "room.join": "join the room",
    "room.publish": "send to the room",
    "job.submit": "submit jobs to the agent",
    "events.subscribe": "subscribe to the events",
    "admin": "use the admin surface",
}


class Guard:
    """The policy and the limits of the running configuration."""

    __slots__ = ("_authenticator", "limiter", "metrics")

    def __init__(
        self, authenticator: Callable[[], Authenticator], limiter: Limiter, metrics: Metrics
    ) -> None:
        self._authenticator = authenticator
        self.limiter = limiter
        self.metrics = metrics

    def auth_failed(self, transport: str, reason: str, address: str) -> None:
        """Count and audit a refused token (never the token itself)."""
        self.metrics.auth_failures.labels(transport).inc()
        audit.audit("authentication failed", transport=transport, reason=reason, peer=address)

    def limit_ip(self, kind: str, address: str) -> None:
        """Raise ``rate_limited`` when ``address`` is over ``limits.ip.<kind>``."""
        wait = self.limiter.check_ip(kind, address)
        if wait:
            raise RateLimited(
                "too many requests from this address: slow down", retry_after=math.ceil(wait)
            )

    def roles_of(self, principal: Principal) -> frozenset[str]:
        """The principal's roles, or ``auth.default_roles`` when it carries none."""
        return self._authenticator().policy.roles_of(principal)

    def allows(self, principal: Principal, action: str, resource: str = "") -> bool:
        return self._authenticator().policy.allows(principal, action, resource)

    def require(
        self, principal: Principal, action: str, resource: str = "", field: str | None = None
    ) -> None:
        """Raise ``forbidden`` (naming ``field``) unless the policy allows the action."""
        if self.allows(principal, action, resource):
            return
        self.metrics.permission_refusals.labels(action).inc()
        audit.audit("permission refused", user=principal.user, action=action, resource=resource)
        raise Forbidden(
            f"{principal.user} may not {_VERBS[action]} {resource!r}".rstrip(" '"), field=field
        )

    def require_agents(
        self, principal: Principal, agents: Sequence[str], synthesizer: str | None = None
    ) -> None:
        """``agent.run`` for every agent of a workflow (fields ``agents.N``, ``synthesizer``)."""
        for i, name in enumerate(agents):
            self.require(principal, "agent.run", name, f"agents.{i}")
        if synthesizer is not None:
            self.require(principal, "agent.run", synthesizer, "synthesizer")

    def admit_run(self, principal: Principal, agent: str, field: str) -> None:
        """What every HTTP stream start checks before it starts: ``forbidden`` unless the
        principal may run ``agent`` (named by ``field``), then ``rate_limited`` past its
        ``stream_starts``. One method, so no endpoint can start a stream with only half of it.
        (The WebSocket gateway limits per connection as well, in its command loop.)"""
        self.require(principal, "agent.run", agent, field)
        self.limit("stream_starts", None, principal)

    def limit(self, action: str, conn: ConnectionLimits | None, principal: Principal) -> None:
        """Raise ``rate_limited`` when ``action`` is over a limit (see
        :meth:`~raafd.security.limiter.Limiter.check`)."""
        self.limiter.check(action, conn, principal.user)
