"""Write the arithmetic app's dataset: seeded grade-school word problems with exact answers.

    python apps/arithmetic/generate.py            # data.jsonl beside this file, 120 rows, seed 0
    python apps/arithmetic/generate.py --rows 40 --seed 3 --out /tmp/more.jsonl

Each row is {"id", "question", "answer", "expression", "steps"}: the question a person reads,
its exact integer answer, an arithmetic expression that computes it (for few-shot examples
and for checking) and how many operations it takes (1 to 3). Problems come from a dozen
shapes (shopping, sharing, rates, change, groups of groups, ...) with names, objects and
numbers drawn from the seed, so the same (rows, seed) always writes the same file, and every
division comes out even.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

NAMES = (
    "Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Lucas", "Chloe", "Diego",
    "Fatima", "Noah", "Mei", "Samuel", "Zoe", "Ivan",
)  # fmt: skip
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells")
DEFAULT_ROWS = 120
DEFAULT_OUT = Path(__file__).resolve().parent / "data.jsonl"

Problem = tuple[str, str]
"""A question and the expression that answers it."""


def _add_then_remove(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 60), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    question = (
        f"{name} has {a} {item}. {name} gets {b} more and then gives {c} away. "
        f"How many {item} does {name} have now?"
    )
    return question, f"{a} + {b} - {c}"


def _groups(rng: random.Random) -> Problem:
    item = rng.choice(ITEMS)
    per, boxes = rng.randint(3, 12), rng.randint(2, 15)
    question = f"A box holds {per} {item}. How many {item} are in {boxes} boxes?"
    return question, f"{per} * {boxes}"


def _share(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    children, each = rng.randint(2, 9), rng.randint(2, 12)
    question = (
        f"{name} shares {children * each} {item} equally among {children} friends. "
        f"How many {item} does each friend get?"
    )
    return question, f"{children * each} / {children}"


def _shopping(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    shirt, hat = rng.randint(8, 30), rng.randint(3, 15)
    shirts, hats = rng.randint(1, 4), rng.randint(1, 4)
    question = (
        f"A shirt costs ${shirt} and a hat costs ${hat}. {name} buys {shirts} shirts and "
        f"{hats} hats. How many dollars does {name} spend?"
    )
    return question, f"{shirts} * {shirt} + {hats} * {hat}"


def _change(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    price, count = rng.randint(2, 9), rng.randint(2, 6)
    paid = rng.choice([n for n in (20, 50, 100) if n > price * count])
    question = (
        f"{name} buys {count} notebooks at ${price} each and pays with a ${paid} bill. "
        f"How many dollars of change does {name} get?"
    )
    return question, f"{paid} - {count} * {price}"


def _rate(rng: random.Random) -> Problem:
    first, hours1 = rng.randint(30, 90), rng.randint(1, 4)
    second, hours2 = rng.randint(20, 80), rng.randint(1, 3)
    question = (
        f"A train travels at {first} km per hour for {hours1} hours, then at {second} km per "
        f"hour for {hours2} hours. How many kilometres does it travel in all?"
    )
    return question, f"{first} * {hours1} + {second} * {hours2}"


def _double_what_is_left(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(20, 80)
    lost = rng.randint(1, start - 5)
    question = (
        f"{name} had {start} {item}, lost {lost} of them, and then doubled what was left. "
        f"How many {item} does {name} have?"
    )
    return question, f"({start} - {lost}) * 2"


def _pages(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(5, 25), rng.randint(2, 7)
    left = rng.randint(10, 120)
    question = (
        f"{name} reads {per_day} pages a day for {days} days and still has {left} pages to "
        f"go. How many pages does the book have?"
    )
    return question, f"{per_day} * {days} + {left}"


def _teams(rng: random.Random) -> Problem:
    teams, size = rng.randint(2, 8), rng.randint(3, 11)
    extra = rng.randint(1, 9)
    question = (
        f"A school makes {teams} teams of {size} players, and {extra} more children come to "
        f"watch. How many children are there in all?"
    )
    return question, f"{teams} * {size} + {extra}"


def _savings(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(3, 20), rng.randint(2, 10)
    spent = rng.randint(1, weekly * weeks - 1)
    question = (
        f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a "
        f"game. How many dollars does {name} have left?"
    )
    return question, f"{weekly} * {weeks} - {spent}"


def _split_bill(rng: random.Random) -> Problem:
    friends, each = rng.randint(2, 6), rng.randint(4, 20)
    tip = rng.randint(1, 5) * friends
    question = (
        f"{friends} friends eat a meal that costs ${friends * each} and leave a ${tip} tip. "
        f"They split the total equally. How many dollars does each friend pay?"
    )
    return question, f"({friends * each} + {tip}) / {friends}"


def _rows_of_seats(rng: random.Random) -> Problem:
    rows, seats = rng.randint(4, 20), rng.randint(5, 15)
    taken = rng.randint(1, rows * seats - 1)
    question = (
        f"A hall has {rows} rows of {seats} seats, and {taken} seats are taken. "
        f"How many seats are free?"
    )
    return question, f"{rows} * {seats} - {taken}"


SHAPES: tuple[Callable[[random.Random], Problem], ...] = (
    _add_then_remove, _groups, _share, _shopping, _change, _rate, _double_what_is_left,
    _pages, _teams, _savings, _split_bill, _rows_of_seats,
)  # fmt: skip


def _value(expression: str) -> Fraction:
    """The exact value of the generator's own expressions (integers, + - * /, parentheses)."""
    tokens = expression.replace("(", " ( ").replace(")", " ) ").split()

    def parse(position: int) -> tuple[Fraction, int]:
        value, position = term(position)
        while position < len(tokens) and tokens[position] in "+-":
            operator = tokens[position]
            right, position = term(position + 1)
            value = value + right if operator == "+" else value - right
        return value, position

    def term(position: int) -> tuple[Fraction, int]:
        value, position = atom(position)
        while position < len(tokens) and tokens[position] in "*/":
            operator = tokens[position]
            right, position = atom(position + 1)
            value = value * right if operator == "*" else value / right
        return value, position

    def atom(position: int) -> tuple[Fraction, int]:
        if tokens[position] == "(":
            value, position = parse(position + 1)
            return value, position + 1
        return Fraction(tokens[position]), position + 1

    return parse(0)[0]


def generate(rows: int, seed: int) -> list[dict[str, object]]:
    """`rows` problems from `seed`: the same arguments always give the same rows."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    seen: set[str] = set()
    for index in range(rows):
        question, expression = rng.choice(SHAPES)(rng)
        while question in seen:  # every question once
            question, expression = rng.choice(SHAPES)(rng)
        seen.add(question)
        value = _value(expression)
        if value.denominator != 1 or value < 0:
            raise AssertionError(f"row {index}: {expression} = {value}, not a whole number")
        steps = sum(expression.count(op) for op in "+-*/")
        out.append(
            {
                "id": f"ar-s{seed}-{index:04d}",
                "question": question,
                "answer": int(value),
                "expression": expression,
                "steps": steps,
            }
        )
    return out


def write(path: Path, rows: int, seed: int) -> Path:
    """Write the rows as JSONL to path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in generate(rows, seed)))
    return path


def main() -> None:
    """The command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="problems to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSONL file")
    args = parser.parse_args()
    write(args.out, args.rows, args.seed)


if __name__ == "__main__":
    main()
