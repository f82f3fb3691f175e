"""Safe arithmetic for calculator-assisted decoding.

The DPO-ST release evaluates model text with Python ``eval``; dpost never does (nor ``exec``,
``compile`` or ``ast.parse``). ``evaluate`` is a small tokenizer plus recursive-descent parser
over numbers, ``+ - * / // **``, unary signs, parentheses and GSM8K-style decorations (``$5``,
``1,234``, ``50%``, ``.5``). Every failure -- junk, unbalanced parentheses, division by zero,
overflow, over-long or over-deep input -- returns ``None`` and nothing is forced; it never raises.

Floats are used on purpose: the release computed with Python floats, so results (and therefore
the forced tokens) match it.

This module is also the single place that defines the annotation markers per model family.
"""

from __future__ import annotations

import math
import re

# Calculator annotation markers per model family: (open, close). Llama keeps GSM8K's ``<<48/2=24>>``;
# the T5 formatting rewrites it to ``[ 48 / 2 = 24 ]`` (see ``dpost.data.formatting``).
LLAMA_OPEN, LLAMA_CLOSE = "<<", ">>"
T5_OPEN, T5_CLOSE = "[", "]"
MARKERS: dict[str, tuple[str, str]] = {"llama": (LLAMA_OPEN, LLAMA_CLOSE), "t5": (T5_OPEN, T5_CLOSE)}
# The character that triggers evaluation after an opened annotation.
EQUALS = "="

MAX_CHARS = 512  # longer "expressions" are not arithmetic the model meant; refuse them cheaply
MAX_DEPTH = 32  # nesting of parentheses and unary signs
MAX_MAGNITUDE = 1e15  # bound on every literal and intermediate result
MAX_EXPONENT = 64  # bound on |b| in a ** b

_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+\.?[0-9]*|\.[0-9]+)"  # 1,234.5 12 12. 12.5 .5
    r"|(?P<op>\*\*|//|[-+*/()%])"
    r"|(?P<dollar>\$)"
    r")"
)


def markers(family: str) -> tuple[str, str]:
    """(open, close) annotation markers of a model family ("llama" or "t5")."""
    try:
        return MARKERS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(MARKERS)}") from None


class _Reject(Exception):
    """Internal: the text is not a bounded, valid arithmetic expression."""


def _tokenize(text: str) -> list[str | float]:
    tokens: list[str | float] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise _Reject
        pos = m.end()
        if m.group("num") is not None:
            tokens.append(_check(float(m.group("num").replace(",", ""))))
        elif m.group("op") is not None:
            tokens.append(m.group("op"))
        # "$" is decoration ($5 means 5) and is dropped.
    return tokens


def _check(x: float) -> float:
    if not math.isfinite(x) or abs(x) > MAX_MAGNITUDE:
        raise _Reject
    return x


class _Parser:
    """Recursive descent with Python's precedence: ``**`` binds tighter than unary signs
    on its left (``-2**2 == -4``) and is right-associative; ``%`` is postfix ``/100``."""

    def __init__(self, tokens: list[str | float]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> str | float | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str | float | None:
        tok = self.peek()
        self.i += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject

    def parse(self) -> float:
        value = self.expr()
        if self.i != len(self.tokens):
            raise _Reject
        return value

    def expr(self) -> float:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> float:
        value = self.unary()
        while self.peek() in ("*", "/", "//"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = _check(value * rhs)
            elif rhs == 0:
                raise _Reject
            elif op == "/":
                value = _check(value / rhs)
            else:  # floor division: two GSM8K annotations use it (560//10)
                value = _check(value // rhs)
        return value

    def unary(self) -> float:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> float:
        base = self.postfix()
        if self.peek() == "**":
            self.take()
            self.enter()
            exponent = self.unary()
            self.depth -= 1
            if abs(exponent) > MAX_EXPONENT or (base == 0 and exponent < 0):
                raise _Reject
            if base < 0 and exponent != int(exponent):
                raise _Reject  # complex result
            try:
                base = math.pow(base, exponent)
            except (OverflowError, ValueError):
                raise _Reject from None
            _check(base)
        return base

    def postfix(self) -> float:
        value = self.atom()
        while self.peek() == "%":
            self.take()
            value /= 100.0
        return value

    def atom(self) -> float:
        tok = self.take()
        if isinstance(tok, float):
            return tok
        if tok == "(":
            self.enter()
            value = self.expr()
            if self.take() != ")":
                raise _Reject
            self.depth -= 1
            return value
        raise _Reject


def evaluate_number(expr: str) -> float | None:
    """The value of ``expr`` as a float, or None when it is not a valid bounded expression."""
    try:
        if not isinstance(expr, str) or len(expr) > MAX_CHARS:
            return None
        tokens = _tokenize(expr)
        if not tokens:
            return None
        return _Parser(tokens).parse()
    except Exception:  # _Reject, and anything unforeseen: the calculator must never raise
        return None


def format_result(x: float) -> str:
    """The release's formatting: ``int(x)`` when within 1e-4 of it, else ``round(x, 2)``.

    Kept bit-for-bit, including its quirk that 2.99999 prints as "3.0" (int() truncates).
    """
    if abs(int(x) - x) < 1e-4:
        return str(int(x))
    return str(round(x, 2))


def evaluate(expr: str) -> str | None:
    """Evaluate an arithmetic expression written by a model; the text to force, or None.

    >>> evaluate("3/5*90")
    '54'
    >>> evaluate("1/3")
    '0.33'
    >>> evaluate("__import__('os')") is None
    True
    """
    value = evaluate_number(expr)
    if value is None:
        return None
    try:
        return format_result(value)
    except Exception:
        return None
