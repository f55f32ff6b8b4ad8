"""Output filters: a stream's events pass through its agent's filters before they enter the log.

So live delivery, replay, snapshots, sessions and the OpenAI-compatible API all see the same
filtered output. The rule of this file:

    The events a filtered stream's log receives are exactly what the chain of filters makes of
    the events its body emits, in order; a filter that holds text back holds a bounded amount
    for a bounded time; and a filter's failure ends only its own stream (``error`` {internal},
    logged).

The interface (built-ins and entry-point plugins alike, see ``docs/filters.md``):

- an :class:`OutputFilter` is configured once per agent (at start and on reload) and opens a
  :class:`FilterState` per stream;
- a state's ``feed(event)`` returns the events to pass on (none, the same, changed, more);
  ``finish()`` returns what it still holds, and is called once, just before the stream's
  terminal event is fed (which the state sees too: ``redact`` rewrites ``final_response``);
- a state that holds text for a time has ``due`` (the trio clock time it wants ``tick``, or
  ``inf``) and ``tick(now)``. The stream runs those in a task of a nursery inside the stream's
  own body scope (so the stream owns and cancels it), sleeping in a cancel scope whose deadline
  is moved after each event: the only extra task, and only for chains that have such a filter.
- a terminal event a filter returns (``block`` → ``content_filtered``, ``max_output_chars`` →
  ``output_limit``) ends the stream; nothing after it is passed on.

Built-ins: ``redact`` (regex → replacement, catching a match split over deltas by holding back
only as many characters as the longest pattern can span; unbounded patterns are refused),
``buffer`` (joins deltas until ``min_chars`` or ``max_delay_ms`` after the first held one),
``max_output_chars`` and ``block``. A stream whose agent has no filters runs its body unwrapped:
it costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

import attrs
import trio

from raafd.config import BUILTIN_FILTERS, AgentConfig, ConfigError, FilterConfig
from raafd.logging import get_logger
from raafd.protocol.codes import ErrorCode
from raafd.protocol.events import TERMINAL_KINDS
from raafd.streams.body import Body, StreamWriter

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_SPAN",
    "Block",
    "Buffer",
    "Event",
    "FilterChain",
    "FilterContext",
    "FilterState",
    "MaxOutputChars",
    "OutputFilter",
    "Redact",
    "build_filters",
    "filtered_body",
    "pattern_span",
]

log = get_logger("raafd.filters")

# The regex parser of the standard library (what `re` compiles from): private, but the only
# way to know how long a match can be. Its public names (sre_parse) warn since 3.11.
sre_parse: Any = importlib.import_module("re._parser")
sre_constants: Any = importlib.import_module("re._constants")

ENTRY_POINT_GROUP: Final = "raafd.filters"
MAX_SPAN: Final = 1024
"""The longest text a ``redact`` or ``block`` pattern may match: what a stream holds back."""


class Event(NamedTuple):
    """An event on its way to a stream's log: its kind and its fields (``delta`` for
    ``content``, ``final_response`` for ``complete`` …, as in ``docs/protocol.md``)."""

    kind: str
    fields: dict[str, Any]


@attrs.frozen
class FilterContext:
    """What a filter may know of the stream it opens a state for. ``clock`` is the trio clock
    (a fake one in tests)."""

    stream: str
    agent: str
    clock: Callable[[], float]


@runtime_checkable
class FilterState(Protocol):
    """One filter's state for one stream."""

    def feed(self, event: Event) -> Iterable[Event]:
        """The events to pass on for ``event``."""
        ...

    def finish(self) -> Iterable[Event]:
        """What the state still holds; called once, before the terminal event is fed."""
        ...


class OutputFilter(Protocol):
    """A configured filter: what an entry point's factory returns for its options."""

    def open(self, context: FilterContext) -> FilterState:
        """A fresh state for one stream."""
        ...


# --- patterns ---------------------------------------------------------------------------------

_BOUNDARY: Final = frozenset({sre_constants.AT_BOUNDARY, sre_constants.AT_NON_BOUNDARY})


def _walk(items: Any, out: list[str]) -> None:
    for op, av in items:
        if op is sre_constants.AT and av not in _BOUNDARY:
            out.append("anchors (^ $ \\A \\Z) are not allowed: a stream's text has no lines")
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            out.append("lookahead and lookbehind are not allowed")
        if isinstance(av, sre_parse.SubPattern):  # an atomic group
            _walk(av, out)
            continue
        for part in av if isinstance(av, tuple | list) else ():
            if isinstance(part, sre_parse.SubPattern):
                _walk(part, out)
            elif isinstance(part, list):  # a branch's alternatives
                for sub in part:
                    if isinstance(sub, sre_parse.SubPattern):
                        _walk(sub, out)


def pattern_span(pattern: str) -> int:
    """The most characters ``pattern`` can match; ``ValueError`` (a sentence) when it does not
    compile, can match empty text, can match more than :data:`MAX_SPAN` characters (``+``,
    ``*``, ``{n,}``: give a bound, like ``{1,64}``), or uses anchors or lookaround (``\\b`` and
    ``\\B`` are allowed)."""
    try:
        re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    problems: list[str] = []
    _walk(parsed, problems)
    if problems:
        raise ValueError(problems[0])
    lo, hi = parsed.getwidth()
    if lo == 0:
        raise ValueError("the pattern can match empty text")
    if hi > MAX_SPAN:
        raise ValueError(
            f"the pattern can match more than {MAX_SPAN} characters (use a bounded repeat such"
            " as {1,64} instead of + or *)"
        )
    return int(hi)


class _Patterns:
    """Several patterns as one regex (leftmost match wins, the first listed on a tie), and how
    many characters a decision at one position may need to see: the longest span, plus one for
    a ``\\b`` after it."""

    __slots__ = ("holdback", "regex")

    def __init__(self, patterns: Sequence[str]) -> None:
        spans = [pattern_span(p) for p in patterns]
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns))
        self.holdback = max(spans) + 1


class _Scanner:
    """Streaming leftmost-first search over text that arrives in pieces. ``scan`` splits the
    text seen so far into final pieces: plain text (``str``) and matches (``re.Match``), and
    keeps the rest (fewer than ``holdback`` characters). A match attempt at position p depends
    on at most ``holdback`` characters from p (and one before, for ``\\b``), so a position is
    decided once that many have arrived, or at the end: the pieces of any split of a text are
    those of the whole text."""

    __slots__ = ("_buf", "_ctx", "_patterns")

    def __init__(self, patterns: _Patterns) -> None:
        self._patterns = patterns
        self._ctx = ""  # the last character already passed on (for \b)
        self._buf = ""  # not decided yet

    @property
    def held(self) -> str:
        return self._buf

    def scan(self, text: str, final: bool) -> list[str | re.Match[str]]:
        ctx = self._ctx
        whole = ctx + self._buf + text
        i = len(ctx)
        end = len(whole)
        # Positions up to `last` are decided: a match attempt there sees all it may need.
        last = end if final else end - self._patterns.holdback
        out: list[str | re.Match[str]] = []
        search = self._patterns.regex.search
        while i <= last:
            m = search(whole, i)
            if m is None or m.start() > last:
                break
            if m.start() > i:
                out.append(whole[i : m.start()])
            out.append(m)
            i = m.end()
        cut = end if final else max(i, last + 1)
        if cut > i:
            out.append(whole[i:cut])
        # At the end the text is over: what comes after it (another turn's) starts afresh.
        self._ctx = whole[cut - 1] if cut > 0 and not final else ""
        self._buf = whole[cut:]
        return out


# --- built-in filters -------------------------------------------------------------------------


def _terminal(code: str, message: str) -> Event:
    return Event("error", {"error": {"code": code, "message": message}})


def _rest(fields: dict[str, Any]) -> dict[str, Any] | None:
    """A content event's fields other than ``delta`` (workflows tag ``agent``), or None."""
    if len(fields) == 1:
        return None
    return {k: v for k, v in fields.items() if k != "delta"}


class _TextFilter:
    """Common shape of the filters that act on the text of ``content`` events: a change of
    the other fields (another agent of a parallel workflow) or any other event is a boundary,
    at which what is held goes first."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest: dict[str, Any] | None = None

    def _content(self, delta: str, final: bool) -> list[Event]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _other(self, event: Event) -> list[Event]:
        return [event]

    def _out(self, delta: str) -> Event:
        rest = self._rest
        return Event("content", {"delta": delta} if rest is None else {"delta": delta, **rest})

    def feed(self, event: Event) -> list[Event]:
        if event.kind == "content":
            rest = _rest(event.fields)
            if rest != self._rest:
                out = self._content("", True)
                self._rest = rest
                return out + self._content(str(event.fields.get("delta", "")), False)
            return self._content(str(event.fields.get("delta", "")), False)
        return self._content("", True) + self._other(event)

    def finish(self) -> list[Event]:
        return self._content("", True)


@attrs.frozen
class Redact:
    """``redact``: every match of ``patterns`` in the text becomes ``replacement``, also in
    ``complete.final_response``."""

    patterns: _Patterns
    replacement: str

    def open(self, context: FilterContext) -> FilterState:
        return _RedactState(self)


class _RedactState(_TextFilter):
    __slots__ = ("_filter", "_scanner")

    def __init__(self, f: Redact) -> None:
        super().__init__()
        self._filter = f
        self._scanner = _Scanner(f.patterns)

    def _content(self, delta: str, final: bool) -> list[Event]:
        if not delta and not final:
            return []
        pieces = self._scanner.scan(delta, final)
        if not pieces:
            return []
        repl = self._filter.replacement
        text = "".join(p if isinstance(p, str) else repl for p in pieces)
        return [self._out(text)] if text else []

    def _other(self, event: Event) -> list[Event]:
        if event.kind == "complete" and isinstance(event.fields.get("final_response"), str):
            f = self._filter
            fields = dict(event.fields)
            fields["final_response"] = f.patterns.regex.sub(
                lambda _: f.replacement, fields["final_response"]
            )
            return [Event(event.kind, fields)]
        return [event]


@attrs.frozen
class Block:
    """``block``: a match of ``patterns`` ends the stream with ``error`` {content_filtered};
    the matching text is never passed on."""

    patterns: _Patterns

    def open(self, context: FilterContext) -> FilterState:
        return _BlockState(self)


class _BlockState(_TextFilter):
    __slots__ = ("_blocked", "_filter", "_scanner")

    def __init__(self, f: Block) -> None:
        super().__init__()
        self._filter = f
        self._scanner = _Scanner(f.patterns)
        self._blocked = False

    def _content(self, delta: str, final: bool) -> list[Event]:
        if self._blocked or (not delta and not final):
            return []
        out: list[str] = []
        for piece in self._scanner.scan(delta, final):
            if not isinstance(piece, str):
                self._blocked = True
                before = [self._out("".join(out))] if out else []
                return [*before, _terminal(ErrorCode.CONTENT_FILTERED, "the output was blocked")]
            out.append(piece)
        text = "".join(out)
        return [self._out(text)] if text else []

    def _other(self, event: Event) -> list[Event]:
        if self._blocked:
            return []
        text = event.fields.get("final_response")
        search = self._filter.patterns.regex.search
        if event.kind == "complete" and isinstance(text, str) and search(text):
            self._blocked = True
            return [_terminal(ErrorCode.CONTENT_FILTERED, "the output was blocked")]
        return [event]


@attrs.frozen
class MaxOutputChars:
    """``max_output_chars``: after ``max_chars`` characters of text the stream ends with
    ``error`` {output_limit} (the text up to the limit is passed on)."""

    max_chars: int

    def open(self, context: FilterContext) -> FilterState:
        return _MaxCharsState(self.max_chars)


class _MaxCharsState:
    __slots__ = ("_left", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._left = limit

    def feed(self, event: Event) -> list[Event]:
        if event.kind != "content" or self._left < 0:
            return [] if self._left < 0 else [event]
        delta = str(event.fields.get("delta", ""))
        if len(delta) <= self._left:
            self._left -= len(delta)
            return [event]
        head = delta[: self._left]
        self._left = -1
        message = f"the output passed max_output_chars ({self._limit} characters)"
        out = [Event("content", {**event.fields, "delta": head})] if head else []
        return [*out, _terminal(ErrorCode.OUTPUT_LIMIT, message)]

    def finish(self) -> list[Event]:
        return []


@attrs.frozen
class Buffer:
    """``buffer``: joins ``content`` deltas until ``min_chars`` characters are held or
    ``max_delay`` seconds have passed since the first held one (exactly: a timer fires then)."""

    min_chars: int
    max_delay: float

    def open(self, context: FilterContext) -> FilterState:
        return _BufferState(self, context.clock)


class _BufferState(_TextFilter):
    __slots__ = ("_chars", "_clock", "_filter", "_held", "due")

    def __init__(self, f: Buffer, clock: Callable[[], float]) -> None:
        super().__init__()
        self._filter = f
        self._clock = clock
        self._held: list[str] = []
        self._chars = 0
        self.due = math.inf

    def _content(self, delta: str, final: bool) -> list[Event]:
        if delta:
            if not self._held:
                self.due = self._clock() + self._filter.max_delay
            self._held.append(delta)
            self._chars += len(delta)
        if self._held and (final or self._chars >= self._filter.min_chars):
            return [self._flush()]
        return []

    def _flush(self) -> Event:
        text = "".join(self._held)
        self._held.clear()
        self._chars = 0
        self.due = math.inf
        return self._out(text)

    def tick(self, now: float) -> list[Event]:
        if self._held and now >= self.due:
            return [self._flush()]
        return []


# --- building from the configuration ----------------------------------------------------------

Factory = Callable[[Mapping[str, Any]], OutputFilter]


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _build_one(cfg: FilterConfig, plugins: Mapping[str, Any], where: str) -> OutputFilter:
    """One filter, or ``ValueError`` with the dotted field (relative to ``where``)."""
    kind = cfg.type
    if kind in ("redact", "block"):
        if not cfg.patterns:
            raise _Problem(f"{where}.patterns", f"a {kind} filter needs at least one pattern")
        for i, pattern in enumerate(cfg.patterns):
            try:
                pattern_span(pattern)
            except ValueError as exc:
                raise _Problem(f"{where}.patterns.{i}", str(exc)) from None
        patterns = _Patterns(cfg.patterns)
        return Redact(patterns, cfg.replacement) if kind == "redact" else Block(patterns)
    if kind == "buffer":
        return Buffer(cfg.min_chars, cfg.max_delay_ms / 1000)
    if kind == "max_output_chars":
        return MaxOutputChars(cfg.max_chars)
    ep = plugins.get(kind)
    if ep is None:
        known = ", ".join([*BUILTIN_FILTERS, *sorted(plugins)])
        raise _Problem(
            f"{where}.type",
            f"no filter named {kind!r} (built-in or in the {ENTRY_POINT_GROUP} entry points:"
            f" {known})",
        )
    try:
        factory = ep.load()
        made = factory(dict(cfg.options))
    except (ValueError, TypeError) as exc:
        raise _Problem(f"{where}.options", str(exc)) from None
    except Exception as exc:  # a plugin that cannot even load: said, not a traceback
        raise _Problem(f"{where}.type", f"the entry point {ep.value} failed: {exc!r}") from None
    if not callable(getattr(made, "open", None)):
        raise _Problem(f"{where}.type", f"{ep.value} did not return a filter (no open method)")
    return made  # type: ignore[no-any-return]


class _Problem(Exception):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")


@attrs.frozen
class FilterChain:
    """An agent's configured filters, in order."""

    filters: tuple[OutputFilter, ...]
    names: tuple[str, ...]

    def open(self, context: FilterContext) -> _ChainState:
        return _ChainState([f.open(context) for f in self.filters], self.names, context.stream)

    def rewrite(self, text: str, agent: str = "") -> str:
        """What the chain makes of ``text`` as a whole answer: the text of the ``content`` it
        passes on (a session keeps the assistant's messages so, as its stream showed them)."""
        state = self.open(FilterContext("", agent, lambda: 0.0))
        events = state.feed(Event("content", {"delta": text}))
        events += state.feed(Event("complete", {"final_response": text}))
        return "".join(str(e.fields.get("delta", "")) for e in events if e.kind == "content")

    def wrap(self, body: Body, stream: str, agent: str) -> Body:
        """``body`` with its events passed through a fresh state of this chain."""
        return filtered_body(body, self, stream, agent)


def build_filters(agents: Mapping[str, AgentConfig]) -> dict[str, FilterChain]:
    """The filter chain of every agent that has filters; :class:`ConfigError` listing every
    problem (``agents.NAME.filters.N.field: reason``) otherwise. Loads the ``raafd.filters``
    entry points the configuration names (and only those)."""
    problems: list[str] = []
    chains: dict[str, FilterChain] = {}
    plugins: dict[str, Any] | None = None
    for name, agent in agents.items():
        if not agent.filters:
            continue
        built: list[OutputFilter] = []
        for i, cfg in enumerate(agent.filters):
            if cfg.type not in BUILTIN_FILTERS and plugins is None:
                plugins = _plugins()
            try:
                built.append(_build_one(cfg, plugins or {}, f"agents.{name}.filters.{i}"))
            except _Problem as problem:
                problems.append(str(problem))
        chains[name] = FilterChain(tuple(built), tuple(f.type for f in agent.filters))
    if problems:
        raise ConfigError(problems)
    return chains


# --- running a chain in a stream --------------------------------------------------------------


class _ChainState:
    """A chain's states for one stream: an event goes through each filter in order; at the
    terminal event each state is first finished (what it held goes on through the later
    filters), then fed the terminal event; the first terminal event out ends the chain."""

    __slots__ = ("_names", "_states", "_stream", "_timed", "ended")

    def __init__(self, states: list[FilterState], names: tuple[str, ...], stream: str) -> None:
        self._states = states
        self._names = names
        self._stream = stream
        self._timed = [s for s in states if hasattr(s, "tick")]
        self.ended = False

    @property
    def timed(self) -> bool:
        return bool(self._timed)

    @property
    def due(self) -> float:
        return min((getattr(s, "due", math.inf) for s in self._timed), default=math.inf)

    def feed(self, event: Event) -> list[Event]:
        return self._through(0, [event])

    def tick(self, now: float) -> list[Event]:
        out: list[Event] = []
        for i, state in enumerate(self._states):
            if hasattr(state, "tick") and getattr(state, "due", math.inf) <= now:
                out += self._through(i + 1, list(state.tick(now)))
        return out

    def _through(self, start: int, events: list[Event]) -> list[Event]:
        if self.ended:
            return []
        for state in self._states[start:]:
            out: list[Event] = []
            for event in events:
                if event.kind in TERMINAL_KINDS:
                    out.extend(state.finish())
                    out.extend(state.feed(event))
                    break
                out.extend(state.feed(event))
            events = out
        for i, event in enumerate(events):
            if event.kind in TERMINAL_KINDS:
                self.ended = True
                return events[: i + 1]
        return events


class _FilteredWriter:
    """The :class:`StreamWriter` a filtered body writes through. With a timed filter, the body
    and the timer task take turns through ``_lock`` (one event at a time through the chain and
    into the stream, so order holds)."""

    __slots__ = ("_chain", "_lock", "_out", "_scope")

    def __init__(self, out: StreamWriter, chain: _ChainState) -> None:
        self._out = out
        self._chain = chain
        self._lock: trio.Lock | None = trio.Lock() if chain.timed else None
        self._scope: trio.CancelScope | None = None  # the timer's, while it sleeps

    async def emit(self, kind: str, **fields: Any) -> None:
        if self._chain.ended:  # a filter ended the stream: its scope is cancelled
            await trio.lowlevel.checkpoint()
            return
        lock = self._lock
        if lock is None:
            await self._pass(lambda: self._chain.feed(Event(kind, fields)))
            return
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._pass(lambda: self._chain.feed(Event(kind, fields)))
        finally:
            lock.release()
            if self._scope is not None:
                self._scope.deadline = self._chain.due

    async def wait_ready(self) -> None:
        await self._out.wait_ready()

    def progress(self) -> None:
        self._out.progress()

    async def _pass(self, step: Callable[[], list[Event]]) -> None:
        try:
            events = step()
        except Exception as exc:
            log.error("an output filter failed; its stream ends", exc_info=exc)
            self._chain.ended = True
            await self._out.emit(
                "error", error={"code": ErrorCode.INTERNAL, "message": "internal error"}
            )
            await trio.lowlevel.checkpoint()  # the stream has ended: this raises Cancelled
            return
        for event in events:
            await self._out.emit(event.kind, **event.fields)

    async def run_timer(self) -> None:
        """Pass on what a timed filter releases, at the time it says (``due``)."""
        lock = self._lock
        assert lock is not None
        while True:
            with trio.CancelScope(deadline=self._chain.due) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            async with lock:
                await self._pass(lambda: self._chain.tick(trio.current_time()))


def filtered_body(body: Body, chain: FilterChain, stream: str, agent: str) -> Body:
    """``body`` whose events pass through a fresh state of ``chain`` (see the module
    docstring). The timer task, when the chain has a timed filter, lives in a nursery inside
    the body: the stream's scope owns it, and it ends with the body."""

    async def run(out: StreamWriter) -> None:
        state = chain.open(FilterContext(stream, agent, trio.current_time))
        writer = _FilteredWriter(out, state)
        if not state.timed:
            await body(writer)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run_timer)
            await body(writer)
            nursery.cancel_scope.cancel()

    return run
