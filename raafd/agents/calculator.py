"""A safe arithmetic evaluator for the built-in ``calculator`` tool.

The rule of this module: model-written text is parsed by a small recursive-descent parser into
a tree of a handful of node types and evaluated by walking that tree; nothing is ever handed to
``eval``, ``exec`` or ``ast``. Every way an expression could cost more than microseconds is
bounded before it is computed (length, nesting, exponent, integer size), and every failure, of
any kind, is a :class:`CalculatorError` with a sentence a model can act on.

Arithmetic is Python's: ``+ - * / // % **`` with Python's precedence (``**`` binds tighter than
a unary minus on its left and is right-associative, so ``-2**2 == -4`` and
``2**3**2 == 512``), integers stay exact, ``/`` is true division. Functions: ``sqrt abs round
min max floor ceil log exp sin cos tan``; constants: ``pi e``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Final

from attrs import frozen

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPONENT",
    "MAX_INT_BITS",
    "MAX_LENGTH",
    "CalculatorError",
    "evaluate",
    "format_number",
]

MAX_LENGTH: Final = 1000  # characters of an expression
MAX_DEPTH: Final = 50  # nested parentheses, unary signs, exponents and function calls
MAX_EXPONENT: Final = 10_000  # largest |exponent| of ``**``
MAX_INT_BITS: Final = 12_000  # largest integer (about 3600 digits) of a literal or a result
MAX_ROUND_DIGITS: Final = 100  # largest |ndigits| of round(x, ndigits)

Number = int | float


class CalculatorError(Exception):
    """The expression cannot be evaluated; the message says why (and where, for syntax)."""


# --- tokens -----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\*\*|//|[-+*/%(),])
    """,
    re.VERBOSE | re.ASCII,
)


@frozen
class _Token:
    kind: str  # "number" | "name" | "op" | "end"
    text: str
    pos: int  # 0-based offset in the expression


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            char = text[pos]
            hint = " (use ** for powers)" if char == "^" else ""
            raise CalculatorError(f"unexpected character {char!r} at position {pos + 1}{hint}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


# --- the tree ---------------------------------------------------------------------------------


@frozen
class _Num:
    value: Number


@frozen
class _Const:
    name: str


@frozen
class _Call:
    name: str
    args: tuple[_Node, ...]


@frozen
class _Neg:
    operand: _Node
    negate: bool  # False for a unary plus


@frozen
class _Pow:
    base: _Node
    exponent: _Node


@frozen
class _Chain:
    """A left-associative run of one precedence level, kept flat so that a long sum is a loop
    in :func:`_eval`, not a deep recursion."""

    first: _Node
    rest: tuple[tuple[str, _Node], ...]


_Node = _Num | _Const | _Call | _Neg | _Pow | _Chain

CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise CalculatorError("round(x, ndigits): ndigits must be an integer")
    if abs(ndigits) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round(x, ndigits): |ndigits| must be at most {MAX_ROUND_DIGITS}")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


# name -> (function, fewest arguments, most arguments or None for any number)
FUNCTIONS: Final[dict[str, tuple[Callable[..., Number], int, int | None]]] = {
    "sqrt": (math.sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (lambda *args: min(args), 1, None),
    "max": (lambda *args: max(args), 1, None),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "log": (_log, 1, 2),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
}


# --- the parser -------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over Python's grammar for arithmetic::

    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/" | "//" | "%") unary)*
    unary   := ("+" | "-") unary | power
    power   := atom ("**" unary)?
    atom    := NUMBER | NAME | NAME "(" sum ("," sum)* ")" | "(" sum ")"
    """

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def unexpected(self) -> CalculatorError:
        token = self.token
        if token.kind == "end":
            return CalculatorError("unexpected end of expression")
        return CalculatorError(f"unexpected {token.text!r} at position {token.pos + 1}")

    def expect(self, text: str) -> None:
        if self.token.text != text or self.token.kind != "op":
            token = self.token
            where = "the end" if token.kind == "end" else f"{token.text!r}"
            raise CalculatorError(f"expected {text!r} at position {token.pos + 1}, got {where}")
        self.advance()

    def parse(self) -> _Node:
        node = self.sum()
        if self.token.kind != "end":
            raise self.unexpected()
        return node

    def sum(self) -> _Node:
        first = self.product()
        rest: list[tuple[str, _Node]] = []
        while self.token.kind == "op" and self.token.text in ("+", "-"):
            op = self.advance().text
            rest.append((op, self.product()))
        return _Chain(first, tuple(rest)) if rest else first

    def product(self) -> _Node:
        first = self.unary()
        rest: list[tuple[str, _Node]] = []
        while self.token.kind == "op" and self.token.text in ("*", "/", "//", "%"):
            op = self.advance().text
            rest.append((op, self.unary()))
        return _Chain(first, tuple(rest)) if rest else first

    def nested(self, parse: Callable[[], _Node]) -> _Node:
        """``parse()`` one level deeper: every sign, exponent, parenthesis and call nests."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"the expression is nested more than {MAX_DEPTH} levels deep")
        try:
            return parse()
        finally:
            self.depth -= 1

    def unary(self) -> _Node:
        if self.token.kind == "op" and self.token.text in ("+", "-"):
            negate = self.advance().text == "-"
            return _Neg(self.nested(self.unary), negate)
        return self.power()

    def power(self) -> _Node:
        base = self.atom()
        if self.token.kind == "op" and self.token.text == "**":
            self.advance()
            return _Pow(base, self.nested(self.unary))
        return base

    def atom(self) -> _Node:
        token = self.token
        if token.kind == "number":
            self.advance()
            return _Num(_number(token.text))
        if token.kind == "name":
            self.advance()
            name = token.text
            if self.token.kind == "op" and self.token.text == "(":
                return self.call(name, token.pos)
            if name in CONSTANTS:
                return _Const(name)
            if name in FUNCTIONS:
                raise CalculatorError(f"{name} is a function; call it like {name}(x)")
            raise CalculatorError(f"unknown name {name!r} at position {token.pos + 1}; {_KNOWN}")
        if token.kind == "op" and token.text == "(":
            self.advance()
            node = self.nested(self.sum)
            self.expect(")")
            return node
        raise self.unexpected()

    def call(self, name: str, pos: int) -> _Node:
        if name not in FUNCTIONS:
            what = "a constant" if name in CONSTANTS else "not a known function"
            raise CalculatorError(f"{name!r} at position {pos + 1} is {what}; {_KNOWN}")
        self.expect("(")
        args: list[_Node] = []
        if not (self.token.kind == "op" and self.token.text == ")"):
            args.append(self.nested(self.sum))
        while self.token.kind == "op" and self.token.text == ",":
            self.advance()
            args.append(self.nested(self.sum))
        self.expect(")")
        _, least, most = FUNCTIONS[name]
        if len(args) < least or (most is not None and len(args) > most):
            if most is None:
                wanted = f"{least} or more arguments"
            elif least == most:
                wanted = f"{least} argument" + ("s" if least > 1 else "")
            else:
                wanted = f"{least} to {most} arguments"
            raise CalculatorError(f"{name}() takes {wanted}, got {len(args)}")
        return _Call(name, tuple(args))


_KNOWN = f"known: {', '.join(FUNCTIONS)} (functions), {', '.join(CONSTANTS)} (constants)"


def _number(text: str) -> Number:
    if any(c in text for c in ".eE"):
        value = float(text)
        if not math.isfinite(value):
            raise CalculatorError(f"the number {text[:20]} is too large")
        return value
    return _checked(int(text))


# --- evaluation -------------------------------------------------------------------------------


def _checked(value: object) -> Number:
    """Refuse results the module does not allow: complex, non-finite, too large."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, complex):
            raise CalculatorError("the result is a complex number")
        raise CalculatorError("the result is not a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("the result is too large (out of floating-point range)")
    elif value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"the exponent is too large (|exponent| at most {MAX_EXPONENT})")
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        # The result has at least that many bits; refuse before computing it.
        raise CalculatorError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    return _checked(base**exponent)


def _binary(op: str, left: Number, right: Number) -> Number:
    if op in ("/", "//", "%") and right == 0:
        raise CalculatorError("division by zero")
    if op == "+":
        return _checked(left + right)
    if op == "-":
        return _checked(left - right)
    if op == "*":
        return _checked(left * right)
    if op == "/":
        return _checked(left / right)
    if op == "//":
        return _checked(left // right)
    return _checked(left % right)


def _eval(node: _Node) -> Number:
    if isinstance(node, _Num):
        return node.value
    if isinstance(node, _Const):
        return CONSTANTS[node.name]
    if isinstance(node, _Chain):
        value = _eval(node.first)
        for op, operand in node.rest:
            value = _binary(op, value, _eval(operand))
        return value
    if isinstance(node, _Neg):
        value = _eval(node.operand)
        return -value if node.negate else +value
    if isinstance(node, _Pow):
        return _power(_eval(node.base), _eval(node.exponent))
    function = FUNCTIONS[node.name][0]
    args = [_eval(arg) for arg in node.args]
    try:
        return _checked(function(*args))
    except ValueError as exc:  # math domain errors: sqrt(-1), log(0), ...
        raise CalculatorError(f"{node.name}(): {exc}") from None


def evaluate(expression: str) -> Number:
    """The value of ``expression`` (an ``int`` or a finite ``float``).

    Raises :class:`CalculatorError`, and nothing else, for any expression it refuses."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"the expression is longer than {MAX_LENGTH} characters")
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    try:
        return _eval(_Parser(expression).parse())
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large (out of floating-point range)") from None
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise CalculatorError(f"cannot evaluate: {exc}") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None


def format_number(value: Number) -> str:
    """How a result is shown: integers exactly, floats as Python's shortest round-trip text."""
    return str(value) if isinstance(value, int) else repr(value)
