"""Permissions: what a principal's roles let it do, as one small object every subsystem asks
at its edge: ``policy.allows(principal, action, resource)``.

The rules:

- no ``[auth.roles]`` configured: every principal may do everything (the policy is off; auth,
  when on, only decides who connects);
- otherwise a principal may do what at least one of its roles grants; a principal without
  roles has ``auth.default_roles``; a role not configured grants nothing;
- ``agent.run`` (resource: the agent's name), ``room.join`` / ``room.publish`` (the room)
  match the role's glob patterns (``*``, ``support-*``); ``job.submit`` (the agent) needs
  ``jobs = true`` and the agent; ``events.subscribe`` (an event-bus pattern) needs a role
  pattern that covers every subject the asked pattern can match; ``admin`` (the surface, e.g.
  ``stats``) needs ``admin = true``.

Pure: the roles come with the configuration (a reload builds a new policy).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Protocol

from raafd.config import RoleConfig
from raafd.errors import BadRequest
from raafd.protocol.subjects import compile_pattern, covers

__all__ = ["ACTIONS", "Policy", "pattern_covers"]

ACTIONS = frozenset(
    {"agent.run", "room.join", "room.publish", "job.submit", "events.subscribe", "admin"}
)


class _Principal(Protocol):
    @property
    def user(self) -> str: ...

    @property
    def roles(self) -> frozenset[str]: ...


class Policy:
    """The roles of one configuration (see the module docstring)."""

    __slots__ = ("_default", "_roles", "enabled")

    def __init__(self, roles: Mapping[str, RoleConfig], default_roles: Sequence[str] = ()) -> None:
        self._roles = dict(roles)
        self._default = frozenset(default_roles)
        self.enabled = bool(self._roles)

    def roles_of(self, principal: _Principal) -> frozenset[str]:
        return principal.roles or self._default

    def allows(self, principal: _Principal, action: str, resource: str = "") -> bool:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        if not self.enabled:
            return True
        for name in self.roles_of(principal):
            role = self._roles.get(name)
            if role is not None and _grants(role, action, resource):
                return True
        return False


def _grants(role: RoleConfig, action: str, resource: str) -> bool:
    if action == "agent.run":
        return _glob(role.agents, resource)
    if action == "room.join":
        return _glob(role.rooms_join, resource)
    if action == "room.publish":
        return _glob(role.rooms_publish, resource)
    if action == "job.submit":
        return role.jobs and _glob(role.agents, resource)
    if action == "events.subscribe":
        return any(pattern_covers(allowed, resource) for allowed in role.events)
    return role.admin  # "admin"


def _glob(patterns: Sequence[str], name: str) -> bool:
    # fnmatchcase keeps its compiled patterns in a bounded cache.
    return any(p == "*" or p == name or fnmatch.fnmatchcase(name, p) for p in patterns)


def pattern_covers(allowed: str, asked: str) -> bool:
    """Whether every subject the event-bus pattern ``asked`` matches is matched by ``allowed``
    (:func:`raafd.protocol.subjects.covers`); an invalid pattern covers and is covered by
    nothing."""
    try:
        return covers(compile_pattern(allowed), compile_pattern(asked))
    except BadRequest:
        return False
