"""The calculator tool: + − × ÷ and parentheses over integers and decimals, exactly.

Its own recursive-descent parser over a bounded input (never Python's `eval`), exact rational
arithmetic (`fractions.Fraction`), and a bounded result: whatever it is given, it returns a string —
the value, or a line starting with "error:" that says what was wrong. A bad call is answered, never
raised, so a model's malformed call becomes a tool turn it can read and the reply goes on.

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := ("+" | "-") factor | number | "(" expression ")"
    number     := digits ["." digits] | "." digits

"×", "·" and "x" read as "*", "÷" and ":" as "/", "−" and "–" as "-"; spaces are ignored. A comma is
refused rather than guessed at (a decimal comma in Portuguese, a thousands separator in English).
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_INPUT = 200  # characters of an expression
MAX_DEPTH = 32  # nested parentheses and signs
MAX_DIGITS = 40  # digits of a result's integer part (and of any intermediate value)
DECIMALS = 10  # a non-integral result is rounded to this many decimal places

_SYMBOLS = {"×": "*", "·": "*", "x": "*", "X": "*", "÷": "/", ":": "/", "−": "-", "–": "-"}
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")


class CalculatorError(ValueError):
    """What was wrong with an expression (one line)."""


def calculate(expression: str) -> str:
    """The value of `expression` as text ("936", "-12.5", "0.3333333333"), or "error: ..."."""
    try:
        return format_value(evaluate(expression))
    except CalculatorError as e:
        return f"error: {e}"


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression`; CalculatorError when it is not one this calculator reads."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be text")
    if len(expression) > MAX_INPUT:
        raise CalculatorError(f"the expression is {len(expression)} characters; at most {MAX_INPUT}")
    tokens = _tokens(expression)
    if not tokens:
        raise CalculatorError("empty expression; give one such as 347+589")
    parser = _Parser(tokens)
    value = parser.expression(0)
    if parser.i != len(tokens):
        raise CalculatorError(f"unexpected {tokens[parser.i]!r} after a complete expression")
    return value


def format_value(value: Fraction) -> str:
    """An integer as it is; anything else rounded half-even to DECIMALS places, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(value * 10 ** DECIMALS)
    sign, digits = ("-" if scaled < 0 else ""), str(abs(scaled)).rjust(DECIMALS + 1, "0")
    whole, frac = digits[:-DECIMALS], digits[-DECIMALS:].rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def _tokens(text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        ch = _SYMBOLS.get(text[i], text[i])
        if ch.isspace():
            i += 1
        elif ch in "+-*/()":
            out.append(ch)
            i += 1
        elif ch == ",":
            raise CalculatorError(f"a comma at position {i}; write decimals with '.' and numbers without separators")
        elif m := _NUMBER.match(text, i):
            out.append(m.group())
            i = m.end()
        else:
            raise CalculatorError(f"unknown character {text[i]!r} at position {i}; use digits, + - * / and parentheses")
    return out


def _checked(value: Fraction) -> Fraction:
    if abs(value.numerator) > 10 ** MAX_DIGITS * value.denominator or value.denominator > 10 ** MAX_DIGITS:
        raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
    return value


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalculatorError("the expression ends too early")
        self.i += 1
        return token

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op, right = self.take(), self.term(depth)
            value = _checked(value + right if op == "+" else value - right)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, right = self.take(), self.factor(depth)
            if op == "/" and right == 0:
                raise CalculatorError("division by zero")
            value = _checked(value * right if op == "*" else value / right)
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise CalculatorError(f"more than {MAX_DEPTH} nested parentheses or signs")
        token = self.take()
        if token in ("+", "-"):
            value = self.factor(depth + 1)
            return value if token == "+" else -value
        if token == "(":
            value = self.expression(depth + 1)
            if self.peek() != ")":
                raise CalculatorError("a parenthesis is not closed")
            self.take()
            return value
        if token in ("*", "/", ")"):
            raise CalculatorError(f"unexpected {token!r}; a number or '(' was expected")
        if len(token.split(".")[0]) > MAX_DIGITS:
            raise CalculatorError(f"a number has more than {MAX_DIGITS} digits")
        return Fraction(token)
