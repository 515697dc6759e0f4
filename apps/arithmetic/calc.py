"""A safe evaluator of arithmetic expressions: numbers, + - * /, parentheses; nothing else.

The expression variant's code node: the LLM writes an expression for the word problem and
this computes it exactly (fractions, so 7 / 2 * 2 is 7), with a parser, never `eval`. Text
around the expression (an "Expression:" label, "= 14" after it, a code fence) is ignored;
anything that is not arithmetic gives no answer and an error saying why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

MAX_LENGTH = 200
"""Longest expression evaluated: a word problem never needs more."""
MAX_DEPTH = 20
"""Deepest nesting of parentheses and signs accepted."""

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(.))")
_ALLOWED_RUN = re.compile(r"[0-9.+\-*/() ]+")
_SYMBOLS = {"×": "*", "x": "*", "X": "*", "÷": "/", "−": "-", "–": "-"}


class ExpressionError(ValueError):
    """The text is not an arithmetic expression this parser accepts."""


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for number, other in _TOKEN.findall(text):
        if number:
            tokens.append(number)
        elif other.strip():
            if other not in "+-*/()":
                raise ExpressionError(f"unexpected character {other!r}")
            tokens.append(other)
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := ('+'|'-') factor | number | '(' expr ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("the expression ends too early")
        self.position += 1
        return token

    def expression(self, depth: int = 0) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            if self.take() == "+":
                value += self.term(depth)
            else:
                value -= self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            operator = self.take()
            right = self.factor(depth)
            if operator == "*":
                value *= right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value /= right
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
        token = self.take()
        if token in ("+", "-"):
            value = self.factor(depth + 1)
            return value if token == "+" else -value
        if token == "(":
            value = self.expression(depth + 1)
            if self.take() != ")":
                raise ExpressionError("a '(' is not closed")
            return value
        if token in "*/)":
            raise ExpressionError(f"unexpected {token!r}")
        return Fraction(token)


def evaluate_expression(text: str) -> Fraction:
    """The exact value of an arithmetic expression; ExpressionError if it is anything else."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters")
    parser = _Parser(_tokens(text))
    if not parser.tokens:
        raise ExpressionError("no expression")
    value = parser.expression()
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after the expression")
    return value


def find_expression(text: str) -> str:
    """The expression in an LLM's reply: the longest run of arithmetic characters holding a
    digit, before any '=' ('Expression: (12 + 7) - 5 = 14' -> '(12 + 7) - 5'); thousands
    commas and ×, ÷, x between numbers read as arithmetic."""
    line = text.replace("`", " ")
    line = re.sub(r"(?<=\d),(?=\d{3}\b)", "", line)
    for symbol, operator in _SYMBOLS.items():
        line = re.sub(rf"(?<=[\d)\s]){re.escape(symbol)}(?=[\s\d(])", operator, line)
    before = line.split("=")[0]
    runs = _runs(before) or _runs(line)
    if not runs:
        raise ExpressionError("no arithmetic in the reply")
    return max(runs, key=len)


def _runs(text: str) -> list[str]:
    """The runs of arithmetic characters of a text that hold a digit."""
    return [run.strip(" .") for run in _ALLOWED_RUN.findall(text) if re.search(r"\d", run)]


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def evaluate(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The code node: {'expression': the LLM's reply} -> {'answer': its value, or None, and
    'error': why there is none}."""
    try:
        value = evaluate_expression(find_expression(str(inputs.get("expression") or "")))
    except ExpressionError as error:
        return {"answer": None, "error": str(error)}
    return {"answer": _number(value), "error": None}
