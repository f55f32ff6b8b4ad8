"""The import layering of raafd: no import cycles, and no layer importing a higher one.

Read from the source (every ``import raafd...`` and ``from raafd... import`` in ``raafd/``),
not by importing it. A *unit* is a subpackage (``raafd/streams/``) or a top-level module
(``raafd/timers.py``). The layers, lowest first, each importing only its own layer and lower:

0. ``protocol``: wire types, commands and codes (pure);
1. ``core``, ``timers``, ``auth``, ``security``: the feed and other primitives, no transport, no
   provider (``security`` builds on ``auth``, never the reverse);
2. ``streams``, ``agents``, ``providers``, ``store``, ``chat``, ``jobs``, ``bus``: what
   raafd runs and keeps;
3. ``gateway``, ``http``, ``net``, ``admin``, ``client``, ``sdnotify``: transports and the
   outside world;
4. ``daemon``: the composition root (nothing imports it);
5. ``cli``.

``config``, ``errors``, ``logging`` and ``metrics`` are leaves: any unit may import them, and
they import only each other and ``protocol``. The package itself (``raafd/__init__.py``, for
``__version__`` and the public API, imported lazily) is left out. Within one layer units may
import each other, but never both ways round.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "raafd"

LAYERS: dict[str, int] = {
    "protocol": 0,
    **dict.fromkeys(["core", "timers", "auth", "security"], 1),
    **dict.fromkeys(["streams", "agents", "providers", "store", "chat", "jobs", "bus"], 2),
    **dict.fromkeys(["gateway", "http", "net", "admin", "client", "sdnotify"], 3),
    "daemon": 4,
    "cli": 5,
}
LEAVES = frozenset({"config", "errors", "logging", "metrics"})

# Imports that break the rules today, as (importing module, imported unit) → why; each to be
# removed with the change that makes it unnecessary. None now: the HTTP adapters and the gateway
# get narrow contexts (raafd.http.context, the gateway's command table), never the Daemon.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


@attrs.frozen
class Import:
    importer: str  # module name
    target: str  # module name (a submodule when one is named, else the package)
    line: int
    top_level: bool  # at module level and not under `if TYPE_CHECKING:` (runs at import)

    def __str__(self) -> str:
        path = _modules()[self.importer].relative_to(ROOT)
        return f"{path}:{self.line} imports {self.target}"


@functools.cache
def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def unit(module: str) -> str | None:
    """``raafd.streams.manager`` → ``streams``; the package itself → None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements_in(node: ast.AST) -> Iterator[ast.stmt]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.stmt):
            yield child
        elif isinstance(child, ast.excepthandler | ast.match_case):
            yield from child.body


def _imports_in(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def targets(node: ast.Import | ast.ImportFrom) -> Iterator[str]:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            return
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield sub if sub in modules else base

    def walk(nodes: list[ast.stmt], top_level: bool) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in targets(node):
                    if target == "raafd" or target.startswith("raafd."):
                        yield Import(module, target, node.lineno, top_level)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.body, False)
                yield from walk(node.orelse, top_level)
            else:
                in_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                yield from walk(list(_statements_in(node)), top_level and not in_function)

    yield from walk(ast.parse(path.read_text(), str(path)).body, True)


def all_imports() -> list[Import]:
    modules = _modules()
    return [imp for name, path in modules.items() for imp in _imports_in(name, path, modules)]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _violation(imp: Import) -> str | None:
    """Why ``imp`` breaks the layering, or None."""
    src, dst = unit(imp.importer), unit(imp.target)
    if src is None or dst is None or src == dst or dst in LEAVES:
        return None
    if src in LEAVES:
        return None if dst == "protocol" else f"the leaf {src} imports {dst}"
    for name in (src, dst):
        if name not in LAYERS:
            return f"{name} has no layer: add it to LAYERS in tests/test_layering.py"
    if LAYERS[dst] > LAYERS[src]:
        return f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
    return None


def test_no_import_cycle_between_modules() -> None:
    """What runs at import time (module level, outside ``TYPE_CHECKING``), with the implicit
    import of a package's ``__init__`` by whoever imports one of its modules from outside."""
    graph: dict[str, set[str]] = {}
    for imp in all_imports():
        if not imp.top_level:
            continue
        edges = graph.setdefault(imp.importer, set())
        edges.add(imp.target)
        parts = imp.target.split(".")
        for n in range(2, len(parts)):
            parent = ".".join(parts[:n])
            if not imp.importer.startswith(parent + ".") and imp.importer != parent:
                edges.add(parent)
    assert _cycles(graph) == []


def test_no_cycle_between_units() -> None:
    """Every import counts here, those for types only and those inside functions included:
    a cycle between two units is one design, split in two places."""
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for imp in all_imports():
        src, dst = unit(imp.importer), unit(imp.target)
        if src is None or dst is None or src == dst or src in LEAVES or dst in LEAVES:
            continue  # a leaf imports only leaves and protocol (checked below), never back up
        if (imp.importer, dst) in KNOWN_EXCEPTIONS:
            continue
        graph.setdefault(src, set()).add(dst)
        where.setdefault((src, dst), imp)
    cycles = _cycles(graph)
    assert cycles == [], [
        [str(where[(a, b)]) for a in cycle for b in cycle if (a, b) in where] for cycle in cycles
    ]


def test_no_layer_imports_a_higher_one() -> None:
    problems = []
    for imp in all_imports():
        why = _violation(imp)
        if why is not None and (imp.importer, unit(imp.target)) not in KNOWN_EXCEPTIONS:
            problems.append(f"{imp}: {why}")
    assert problems == []


def test_every_known_exception_is_still_needed() -> None:
    """Remove an entry of KNOWN_EXCEPTIONS once its import is gone."""
    seen = {(imp.importer, unit(imp.target)) for imp in all_imports() if _violation(imp)}
    assert set(KNOWN_EXCEPTIONS) <= seen, set(KNOWN_EXCEPTIONS) - seen


def test_the_python_client_needs_only_the_protocol_and_the_errors() -> None:
    """``raafd.client`` is what applications embed: nothing of the server comes with it."""
    used = {unit(imp.target) for imp in all_imports() if unit(imp.importer) == "client"}
    assert used <= {"client", "protocol", "errors"}


def test_the_checks_see_what_they_should() -> None:
    """The parser finds imports for types only, lazy ones, and a known violation."""
    found = {(imp.importer, imp.target, imp.top_level) for imp in all_imports()}
    assert ("raafd.daemon", "raafd.streams", True) in found
    assert ("raafd.agents.base", "raafd.streams.body", False) in found  # TYPE_CHECKING
    assert ("raafd.cli", "raafd.daemon", False) in found  # inside a function
    assert _violation(Import("raafd.core.feed", "raafd.gateway.frames", 1, True))
    assert _violation(Import("raafd.config", "raafd.agents.tools", 1, False))
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_raafd_imports_nothing_else() -> None:
    """The public API in ``raafd/__init__.py`` is imported lazily: ``import raafd`` stays
    cheap and can never be part of a cycle."""
    script = "import sys, raafd; print(sorted(m for m in sys.modules if m.startswith('raafd.')))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
