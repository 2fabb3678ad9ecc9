"""The ``copy`` families: repeat a string of numbers, words and symbols exactly (Instant).

Every tool family needs in-context copying: the numbers of a question go into the calculator's
expression, a tool's result goes into the answer. A small model does not learn that from the
tool families alone within a CPU budget: k25-mini run 1 wrote well-formed calls with invented
digits after 3.3M tokens, and it failed a plain repeat-the-sequence probe (0% next-token accuracy
on the second copy of 40 random tokens). A direct copying task gives the skill a strong signal
of its own (a 2-layer K2.5-shaped model learns it in ~100 steps), the way synthetic
"induction" warm-up data is used for small models.

The names must include invented ones. With town names from the training pool only, k25-mini run 3
learned to copy those 450 names and not names in general: after its copy phase the held-out copy
loss was 2.27 with held-out town names and 0.36 with the same records' names swapped for training
towns. Search and agent questions about a held-out town need exactly that general copy, so a
share of the items are fresh names from the town-name generator that belong to no town at all.

``copy_quoted`` repeats the items as a JSON list of strings. A word after a space and the same word
after a quote are different tokens for the first piece (``" P" "omoor"`` in a question,
``"P" "omoor"`` in ``{"query": "Pomoor founded"}``), and a tool call's arguments are always of the
second kind. Plain copying never crosses that boundary, and k25-mini run 3c's search misses are
mostly exactly that: the town's name in its query with the first letter wrong (``Pomoor`` →
``Domoor``, ``Kofield`` → ``Hofield``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from .conversation import Chat, record
from .corpus import invent_town_name
from .families import Sample, World

_PROMPTS = (
    "Repeat exactly: {s}",
    "Copy this text exactly: {s}",
    "Write back exactly what follows: {s}",
    "Say this again, word for word: {s}",
)
_WORDS = (
    "river", "stone", "market", "blue", "seven", "north", "lamp", "garden", "quiet", "window", "bread",
    "silver", "cloud", "harbour", "tower", "apple", "winter", "road", "paper", "green", "field", "bridge",
    "calculator", "search", "python", "result", "answer", "total", "price", "metres", "minutes", "dollars",
)
_SYMBOLS = ("*", "+", "-", "=", "(", ")", "/", ",", ".", ":")
_QUOTED_PROMPTS = (
    "Write these as a JSON list of strings: {s}",
    "Put each item in quotes, as a JSON list: {s}",
    "Quote every item, in a JSON list: {s}",
)


def _item(rng: random.Random, towns: list[str], taken: frozenset[str]) -> str:
    k = rng.random()
    if k < 0.45:
        return str(rng.randrange(10 ** rng.randint(1, 6)))
    if k < 0.6:
        return rng.choice(_WORDS)
    if k < 0.7:
        return rng.choice(towns)
    if k < 0.85:
        return invent_town_name(rng, taken)
    return rng.choice(_SYMBOLS)


def _copy_sample(rng: random.Random, world: World, family: str, prompts: tuple[str, ...], low: int, high: int,
                 render: Callable[[list[str]], str]) -> Sample:
    """``low``-``high`` items, given space-separated in one of ``prompts``, answered as ``render(items)``.

    Town names come from the split's own pool, so a held-out town's name never shows up in training;
    invented names are no town's name.
    """
    split, towns = world.draw_towns(rng, 3)
    names = [t.name for t in towns]
    items = [_item(rng, names, world.town_names) for _ in range(rng.randint(low, high))]
    text, answer = " ".join(items), render(items)
    chat = Chat(None, thinking=False)
    chat.user(rng.choice(prompts).format(s=text))
    chat.answer("", answer)
    key = f"{family}:{text}"
    rec = record(family, chat, answer, "text", key, towns=sorted(set(names) & set(items)))
    return Sample(key, {family: [rec]}, split=split)


def sample_copy(rng: random.Random, world: World) -> Sample:
    """6-24 items (numbers up to 6 digits, words, town names, invented names, symbols), repeated verbatim."""
    return _copy_sample(rng, world, "copy", _PROMPTS, 6, 24, " ".join)


def sample_copy_quoted(rng: random.Random, world: World) -> Sample:
    """3-12 items of ``copy``'s kinds, given space-separated and answered as a JSON list of strings."""
    return _copy_sample(rng, world, "copy_quoted", _QUOTED_PROMPTS, 3, 12, json.dumps)
