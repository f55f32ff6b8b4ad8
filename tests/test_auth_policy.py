"""The permission policy (raafd.security.policy): roles grant agents, rooms, jobs, event-bus
patterns and admin surfaces; no roles configured means no restriction."""

from __future__ import annotations

import pytest
from attrs import frozen
from hypothesis import given
from hypothesis import strategies as st

from raafd.config import RoleConfig
from raafd.security.policy import Policy, pattern_covers


@frozen
class Who:
    user: str
    roles: frozenset[str] = frozenset()


ROLES = {
    "support": RoleConfig(agents=["support-*"], rooms_join=["*"], rooms_publish=["help"]),
    "ops": RoleConfig(agents=["*"], jobs=True, events=["jobs.>", "streams.*.end"], admin=True),
}


def test_without_roles_the_policy_allows_everything() -> None:
    policy = Policy({})
    assert policy.allows(Who("x"), "admin", "stats")
    assert policy.allows(Who("x"), "agent.run", "anything")


def test_roles_grant_what_they_list_and_nothing_else() -> None:
    policy = Policy(ROLES)
    alice, bob = Who("alice", frozenset({"support"})), Who("bob", frozenset({"ops"}))
    assert policy.allows(alice, "agent.run", "support-bot")
    assert not policy.allows(alice, "agent.run", "assistant")
    assert policy.allows(alice, "room.join", "lobby")
    assert policy.allows(alice, "room.publish", "help")
    assert not policy.allows(alice, "room.publish", "lobby")
    assert not policy.allows(alice, "job.submit", "support-bot")
    assert not policy.allows(alice, "admin", "stats")
    assert policy.allows(bob, "job.submit", "assistant")
    assert policy.allows(bob, "admin", "stats")
    assert not policy.allows(bob, "room.join", "lobby")
    both = Who("carol", frozenset({"support", "ops"}))
    assert policy.allows(both, "room.publish", "help") and policy.allows(both, "admin")


def test_principals_without_roles_get_the_default_roles_and_unknown_roles_grant_nothing() -> None:
    policy = Policy(ROLES, default_roles=["support"])
    assert policy.allows(Who("anon"), "agent.run", "support-x")
    assert not policy.allows(Who("eve", frozenset({"root"})), "agent.run", "support-x")


def test_event_patterns_must_be_covered_by_a_granted_pattern() -> None:
    policy = Policy(ROLES)
    bob = Who("bob", frozenset({"ops"}))
    assert policy.allows(bob, "events.subscribe", "jobs.done")
    assert policy.allows(bob, "events.subscribe", "jobs.*.x")
    assert policy.allows(bob, "events.subscribe", "jobs.>")
    assert policy.allows(bob, "events.subscribe", "streams.st_1.end")
    assert policy.allows(bob, "events.subscribe", "streams.*.end")
    assert not policy.allows(bob, "events.subscribe", "streams.>")
    assert not policy.allows(bob, "events.subscribe", ">")
    assert not policy.allows(bob, "events.subscribe", "jobs")


def test_an_unknown_action_is_a_bug_not_a_refusal() -> None:
    with pytest.raises(ValueError):
        Policy(ROLES).allows(Who("x"), "room.destroy")


SEGMENT = st.sampled_from(["a", "b", "*"])


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, part in enumerate(p):
        if part == ">":
            return len(s) > i
        if i >= len(s) or (part != "*" and part != s[i]):
            return False
    return len(p) == len(s)


@given(
    allowed=st.lists(st.sampled_from(["a", "b", "*", ">"]), min_size=1, max_size=4),
    asked=st.lists(st.sampled_from(["a", "b", "*", ">"]), min_size=1, max_size=4),
    subject=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5),
)
def test_a_covered_pattern_matches_no_subject_the_allowed_one_does_not(
    allowed: list[str], asked: list[str], subject: list[str]
) -> None:
    # ">" only at the end, as the bus accepts patterns.
    a = ".".join(allowed[: allowed.index(">") + 1] if ">" in allowed else allowed)
    b = ".".join(asked[: asked.index(">") + 1] if ">" in asked else asked)
    s = ".".join(subject)
    if pattern_covers(a, b) and _matches(b, s):
        assert _matches(a, s)
