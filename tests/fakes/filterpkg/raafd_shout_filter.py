"""An example output filter package, installed for the tests by putting this directory on
``sys.path`` (its ``.dist-info`` declares the entry point ``shout`` in ``raafd.filters``).

``shout`` upper-cases the text of ``content`` events and of ``final_response``; with
``{"fail_on": "WORD"}`` it raises when a delta holds WORD (to show that a failing filter ends
only its own stream).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raafd.streams.filters import Event, FilterContext


class Shout:
    def __init__(self, fail_on: str | None) -> None:
        self.fail_on = fail_on

    def open(self, context: FilterContext) -> ShoutState:
        return ShoutState(self.fail_on)


class ShoutState:
    def __init__(self, fail_on: str | None) -> None:
        self.fail_on = fail_on

    def feed(self, event: Event) -> list[Event]:
        if event.kind == "content":
            delta = event.fields["delta"]
            if self.fail_on is not None and self.fail_on in delta:
                raise RuntimeError("the shout filter was told to fail")
            return [Event("content", {**event.fields, "delta": delta.upper()})]
        if event.kind == "complete":
            text = event.fields["final_response"]
            return [Event("complete", {**event.fields, "final_response": text.upper()})]
        return [event]

    def finish(self) -> list[Event]:
        return []


def make(options: Mapping[str, Any]) -> Shout:
    """The entry point: options are checked here (a ValueError is a config problem)."""
    unknown = set(options) - {"fail_on"}
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    fail_on = options.get("fail_on")
    if fail_on is not None and not isinstance(fail_on, str):
        raise ValueError("fail_on must be a string")
    return Shout(fail_on)
