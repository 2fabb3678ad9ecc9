"""Arithmetic and small word problems with their worked steps, all computed from sampled numbers.

A :class:`Problem` carries the question, the step-by-step reasoning (one computed equation per
step), the exact answer, and one calculator expression that gives the same answer; the
generators check the two agree, so a wrong step cannot reach the data.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from .tools import calculate, format_number


@dataclass
class Problem:
    """One task. ``key`` identifies it for the train/held-out split (same key, same split)."""

    key: str
    question: str
    steps: list[str]
    answer: str
    final: str
    expression: str
    kind: str
    numbers: list[int] = field(default_factory=list)

    def reasoning(self) -> str:
        """The thinking text: the steps, then the result."""
        return "\n".join([*self.steps, f"So the answer is {self.answer}."])


# ---------------------------------------------------------------------------------------------
# Expressions: a random tree, rendered with the fewest parentheses, solved node by node.

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_NAMES = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}


@dataclass
class _Node:
    value: int
    op: str | None = None
    left: _Node | None = None
    right: _Node | None = None


def _combine(rng: random.Random, left: _Node, right: _Node, ops: str) -> _Node:
    op = rng.choice(ops)
    if op == "-" and left.value < right.value:
        left, right = right, left
    if op == "/":
        if right.value == 0 or left.value % right.value or right.value == 1:
            op = "*" if left.value * right.value < 10**7 else "+"
        else:
            return _Node(left.value // right.value, op, left, right)
    value = {"+": left.value + right.value, "-": left.value - right.value, "*": left.value * right.value}[op]
    return _Node(value, op, left, right)


def _render(node: _Node, parent: str | None = None, right_side: bool = False) -> str:
    if node.op is None:
        return str(node.value)
    text = f"{_render(node.left, node.op)} {node.op} {_render(node.right, node.op, True)}"  # type: ignore[arg-type]
    if parent is not None:
        p, c = _PREC[parent], _PREC[node.op]
        if c < p or (c == p and right_side and not (parent == node.op and parent in "+*")):
            return f"({text})"
    return text


def _steps(node: _Node, out: list[str]) -> None:
    if node.op is None:
        return
    _steps(node.left, out)  # type: ignore[arg-type]
    _steps(node.right, out)  # type: ignore[arg-type]
    out.append(f"{node.left.value} {node.op} {node.right.value} = {node.value}")  # type: ignore[union-attr]


def expression_problem(rng: random.Random, big: bool = False) -> Problem:
    """``What is 37 + 48 * 2?`` with 1-3 operations; ``big`` uses 3-4 digit numbers (calculator work)."""
    n_ops = rng.randint(1, 3)
    lo, hi = (100, 9999) if big else (2, 99)
    nodes = [_Node(rng.randint(lo, hi)) for _ in range(n_ops + 1)]
    while len(nodes) > 1:
        i = rng.randrange(len(nodes) - 1)
        right = nodes[i + 1]
        if rng.random() < 0.25 and right.op is None and not big:
            right = _Node(rng.randint(2, 12))  # small divisors make exact division possible
        nodes[i : i + 2] = [_combine(rng, nodes[i], right, "+-*/" if not big else "+-*")]
    root = nodes[0]
    expr = _render(root)
    lines: list[str] = []
    _steps(root, lines)
    steps = [f"Compute {expr}."]
    steps += [f"Step {i + 1}: {line}." for i, line in enumerate(lines)]
    answer = str(root.value)
    phrasing = rng.choice(("What is {e}?", "Calculate {e}.", "Compute {e}.", "What does {e} equal?"))
    return Problem(
        key=f"expr:{expr}",
        question=phrasing.format(e=expr),
        steps=steps,
        answer=answer,
        final=f"{expr} = {answer}",
        expression=expr,
        kind="expression",
    )


# ---------------------------------------------------------------------------------------------
# Word problems: each template samples numbers and states each step as an equation.

_PEOPLE = ("Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mo", "Nia")
_ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cards", "shells", "coins", "stamps", "beads")


def _scale(rng: random.Random, lo: int, hi: int, big: bool) -> int:
    return rng.randint(lo * 37, hi * 41) if big else rng.randint(lo, hi)


def _buy_and_give(rng: random.Random, big: bool) -> Problem:
    who, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
    a, bags, per = _scale(rng, 5, 40, big), rng.randint(2, 9), _scale(rng, 3, 15, big)
    got = bags * per
    give = rng.randint(1, a + got - 1)
    left = a + got - give
    return Problem(
        key=f"buy:{who}:{item}:{a}:{bags}:{per}:{give}",
        question=(
            f"{who} has {a} {item}. {who} buys {bags} bags with {per} {item} in each bag, "
            f"then gives away {give} {item}. How many {item} does {who} have now?"
        ),
        steps=[
            f"{who} starts with {a} {item}.",
            f"The bags hold {bags} * {per} = {got} {item}.",
            f"After buying: {a} + {got} = {a + got}.",
            f"After giving away {give}: {a + got} - {give} = {left}.",
        ],
        answer=str(left),
        final=f"{who} has {left} {item} now.",
        expression=f"{a} + {bags} * {per} - {give}",
        kind="word:buy",
    )


def _shopping(rng: random.Random, big: bool) -> Problem:
    who = rng.choice(_PEOPLE)
    n1, p1 = rng.randint(2, 9), _scale(rng, 2, 20, big)
    n2, p2 = rng.randint(2, 9), _scale(rng, 2, 20, big)
    cost = n1 * p1 + n2 * p2
    paid = (cost // 50 + 1) * 50 if not big else (cost // 1000 + 1) * 1000
    change = paid - cost
    return Problem(
        key=f"shop:{who}:{n1}:{p1}:{n2}:{p2}:{paid}",
        question=(
            f"{who} buys {n1} notebooks at {p1} dollars each and {n2} pens at {p2} dollars each, "
            f"and pays with {paid} dollars. How much change does {who} get?"
        ),
        steps=[
            f"Notebooks: {n1} * {p1} = {n1 * p1} dollars.",
            f"Pens: {n2} * {p2} = {n2 * p2} dollars.",
            f"Total: {n1 * p1} + {n2 * p2} = {cost} dollars.",
            f"Change: {paid} - {cost} = {change} dollars.",
        ],
        answer=str(change),
        final=f"{who} gets {change} dollars in change.",
        expression=f"{paid} - ({n1} * {p1} + {n2} * {p2})",
        kind="word:shopping",
    )


def _travel(rng: random.Random, big: bool) -> Problem:
    speed, h1 = _scale(rng, 30, 120, big), rng.randint(2, 8)
    h2 = rng.randint(1, 5)
    d1, d2 = speed * h1, speed * h2
    vehicle = rng.choice(("train", "bus", "truck", "ferry"))
    return Problem(
        key=f"travel:{vehicle}:{speed}:{h1}:{h2}",
        question=(
            f"A {vehicle} travels at {speed} km per hour. It drives for {h1} hours, stops, and then drives "
            f"{h2} more hours at the same speed. How far does it travel in total?"
        ),
        steps=[
            f"First part: {speed} * {h1} = {d1} km.",
            f"Second part: {speed} * {h2} = {d2} km.",
            f"Total: {d1} + {d2} = {d1 + d2} km.",
        ],
        answer=str(d1 + d2),
        final=f"The {vehicle} travels {d1 + d2} km.",
        expression=f"{speed} * ({h1} + {h2})",
        kind="word:travel",
    )


def _sharing(rng: random.Random, big: bool) -> Problem:
    who, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
    friends = rng.randint(2, 12)
    each = _scale(rng, 2, 25, big)
    extra = rng.randint(1, 20)
    total = friends * each + extra
    return Problem(
        key=f"share:{who}:{item}:{friends}:{each}:{extra}",
        question=(
            f"{who} has {total} {item} and keeps {extra} of them. The rest are shared equally among "
            f"{friends} friends. How many {item} does each friend get?"
        ),
        steps=[
            f"{item.capitalize()} to share: {total} - {extra} = {total - extra}.",
            f"Each friend gets {total - extra} / {friends} = {each}.",
        ],
        answer=str(each),
        final=f"Each friend gets {each} {item}.",
        expression=f"({total} - {extra}) / {friends}",
        kind="word:sharing",
    )


def _ages(rng: random.Random, big: bool) -> Problem:
    a, b = rng.choice(_PEOPLE), rng.choice(_PEOPLE)
    if a == b:
        b = _PEOPLE[(_PEOPLE.index(a) + 1) % len(_PEOPLE)]
    age = rng.randint(4, 40)
    diff = rng.randint(2, 30)
    years = rng.randint(2, 20)
    total = (age + diff + years) + (age + years)
    return Problem(
        key=f"ages:{a}:{b}:{age}:{diff}:{years}",
        question=(
            f"{a} is {age} years old. {b} is {diff} years older than {a}. "
            f"What will their ages add up to in {years} years?"
        ),
        steps=[
            f"{b} is {age} + {diff} = {age + diff} now.",
            f"In {years} years {a} will be {age} + {years} = {age + years}.",
            f"In {years} years {b} will be {age + diff} + {years} = {age + diff + years}.",
            f"Sum: {age + years} + {age + diff + years} = {total}.",
        ],
        answer=str(total),
        final=f"Their ages will add up to {total}.",
        expression=f"({age} + {years}) + ({age} + {diff} + {years})",
        kind="word:ages",
    )


def _rectangle(rng: random.Random, big: bool) -> Problem:
    w, h = _scale(rng, 2, 30, big), _scale(rng, 2, 30, big)
    thing = rng.choice(("garden", "room", "field", "yard", "table top"))
    per, area = 2 * (w + h), w * h
    ask_area = rng.random() < 0.5
    if ask_area:
        steps = [f"Area = width * length = {w} * {h} = {area} square metres."]
        q, ans, expr = "What is its area in square metres?", area, f"{w} * {h}"
        final = f"The area is {area} square metres."
    else:
        steps = [f"Width + length = {w} + {h} = {w + h}.", f"Perimeter = 2 * {w + h} = {per} metres."]
        q, ans, expr = "What is its perimeter in metres?", per, f"2 * ({w} + {h})"
        final = f"The perimeter is {per} metres."
    return Problem(
        key=f"rect:{thing}:{w}:{h}:{'area' if ask_area else 'perimeter'}",
        question=f"A rectangular {thing} is {w} metres wide and {h} metres long. {q}",
        steps=steps,
        answer=str(ans),
        final=final,
        expression=expr,
        kind="word:rectangle",
    )


def _minutes(rng: random.Random, big: bool) -> Problem:
    who = rng.choice(_PEOPLE)
    days, per_day = rng.randint(2, 7), _scale(rng, 10, 90, big)
    weeks = rng.randint(2, 6)
    week_total = days * per_day
    total = week_total * weeks
    return Problem(
        key=f"minutes:{who}:{days}:{per_day}:{weeks}",
        question=(
            f"{who} practises piano for {per_day} minutes a day, {days} days a week. "
            f"How many minutes does {who} practise in {weeks} weeks?"
        ),
        steps=[
            f"One week: {days} * {per_day} = {week_total} minutes.",
            f"{weeks} weeks: {week_total} * {weeks} = {total} minutes.",
        ],
        answer=str(total),
        final=f"In {weeks} weeks, {who} practises {total} minutes.",
        expression=f"{days} * {per_day} * {weeks}",
        kind="word:minutes",
    )


WORD_TEMPLATES: tuple[Callable[[random.Random, bool], Problem], ...] = (
    _buy_and_give, _shopping, _travel, _sharing, _ages, _rectangle, _minutes,
)


def sample_problem(rng: random.Random, big: bool = False) -> Problem:
    """An expression (40%) or a word problem (60%); ``big`` makes numbers worth a calculator."""
    problem = expression_problem(rng, big) if rng.random() < 0.4 else rng.choice(WORD_TEMPLATES)(rng, big)
    check = calculate(problem.expression)
    if check != problem.answer:  # the steps and the one-line expression must agree
        raise AssertionError(f"{problem.key}: steps give {problem.answer}, {problem.expression} gives {check}")
    return problem


def exact(value: int | Fraction) -> str:
    """Format an exact value the way the calculator does."""
    return format_number(Fraction(value))
