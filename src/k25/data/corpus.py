"""A small generated world: fictional towns described by short documents, and a search over them.

The facts are invented (names built from syllables) so a model cannot know them: it has to call
``search`` to answer, which is what the tool-use, agent and swarm families teach. The same corpus
is written next to the data (``corpus.jsonl`` and ``corpus/*.txt``) so the agents runtime and
``k25 eval`` search exactly the documents the curriculum was generated from; the search results
in the data come from the runtime's own search over those files.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_ENDINGS = ("holm", "ford", "wick", "dale", "mere", "stead", "by", "ton", "haven", "moor", "field", "gate")
_FIRST_NAMES = (
    "Ada", "Bram", "Cora", "Dag", "Edda", "Finn", "Greta", "Hugo", "Ida", "Jonas", "Kaja", "Lars", "Mina",
    "Nils", "Olga", "Per", "Rosa", "Sven", "Tilda", "Ulf", "Vera", "Wim", "Yara", "Zeno",
)
_SURNAME_ENDINGS = ("sen", "berg", "lund", "strom", "dahl", "vik", "gren", "mark")
_REGIONS = ("North Valley", "East Bay", "High Plains", "Lake District", "South Hills", "West Marsh", "Pine Ridge")
_PRODUCTS = (
    "glass", "cheese", "wool", "timber", "salt", "honey", "pottery", "rope", "apples", "paper", "copper",
    "linen", "boats", "candles", "barley",
)
_RIVERS = ("Alder", "Brook", "Cinder", "Dove", "Elm", "Fenn", "Gale", "Heron", "Isle", "Juniper", "Kestrel")
# The attributes a question can ask about: attribute -> (question phrasings, query keywords).
ATTRIBUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "founded": (("In what year was {town} founded?", "When was {town} founded?"), "founded"),
    "population": (("How many people live in {town}?", "What is the population of {town}?"), "population"),
    "mayor": (("Who is the mayor of {town}?", "Who leads {town} as mayor?"), "mayor"),
    "product": (("What is {town} known for making?", "What does {town} produce?"), "known for"),
    "river": (("Which river flows through {town}?", "What river runs through {town}?"), "river"),
}


@dataclass(frozen=True)
class Town:
    """One document's facts."""

    id: str
    name: str
    region: str
    founded: int
    population: int
    mayor: str
    product: str
    river: str

    def text(self) -> str:
        """The document: short plain sentences, one fact each."""
        return (
            f"{self.name} is a town in the {self.region}. It was founded in {self.founded}. "
            f"The population of {self.name} is {self.population}. The mayor is {self.mayor}. "
            f"{self.name} is known for its {self.product}. The {self.river} River flows through the town."
        )

    def fact(self, attribute: str) -> str:
        """A fact as the short answer string."""
        return str(getattr(self, attribute))

    def doc(self) -> dict[str, str]:
        """The corpus record written to ``corpus.jsonl``."""
        return {"id": self.id, "title": self.name, "text": self.text()}


def _town_name(rng: random.Random) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2))]
    return ("".join(parts) + rng.choice(_ENDINGS)).capitalize()


def _usable_name(name: str) -> bool:
    return 5 <= len(name) <= 14


def invent_town_name(rng: random.Random, taken: frozenset[str]) -> str:
    """A name the town-name generator could have made but that is none of ``taken`` (no town's)."""
    for _ in range(1000):
        name = _town_name(rng)
        if _usable_name(name) and name not in taken:
            return name
    raise ValueError(f"could not invent a town name outside the {len(taken)} taken ones")


def _surname(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_SURNAME_ENDINGS)).capitalize()


def build_towns(seed: int, size: int) -> list[Town]:
    """``size`` towns with unique names, deterministic from ``seed``."""
    if size < 8:
        raise ValueError(f"corpus size must be at least 8 towns, got {size}")
    rng = random.Random(f"k25-corpus:{seed}")
    names: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(names) < size:
        attempts += 1
        if attempts > size * 200:
            raise ValueError(f"could not make {size} distinct town names; use a smaller corpus")
        name = _town_name(rng)
        if name not in seen and _usable_name(name):
            seen.add(name)
            names.append(name)
    towns = []
    for i, name in enumerate(names):
        towns.append(
            Town(
                id=f"doc-{i:04d}",
                name=name,
                region=rng.choice(_REGIONS),
                founded=rng.randint(1200, 1950),
                population=rng.randint(800, 250_000),
                mayor=f"{rng.choice(_FIRST_NAMES)} {_surname(rng)}",
                product=rng.choice(_PRODUCTS),
                river=rng.choice(_RIVERS),
            )
        )
    return towns


class Corpus:
    """The towns, and the runtime's own BM25 search (``k25.agents.builtin.DocumentSearch``) over them."""

    def __init__(self, towns: list[Town]) -> None:
        self.towns = towns
        self.by_name = {t.name: t for t in towns}
        self.by_doc = {self.doc_id(t): t for t in towns}  # what a search hit's doc_id names
        self._search: Any = None

    @classmethod
    def build(cls, seed: int, size: int = 500) -> Corpus:
        """The corpus for ``seed`` (what ``k25 data generate --corpus-size`` writes)."""
        return cls(build_towns(seed, size))

    @staticmethod
    def doc_id(town: Town) -> str:
        """The id search reports for a town's document (its file name in ``corpus/``)."""
        return f"{town.id}.txt"

    def searcher(self) -> Any:
        """The runtime's DocumentSearch over these documents (built once; it keeps the texts in memory)."""
        if self._search is None:
            from ..agents.builtin import DocumentSearch

            with tempfile.TemporaryDirectory(prefix="k25-corpus-") as tmp:
                self._write_texts(Path(tmp))
                self._search = DocumentSearch(tmp)
        return self._search

    def search_tool(self, query: str, k: int) -> str:
        """The search tool's result text exactly as the runtime formats it (JSON list, or ``Error: ...``)."""
        from ..agents.tools import ToolError, format_result

        try:
            return format_result(self.searcher().search(query, k))
        except ToolError as e:
            return f"Error: {e}"

    def _write_texts(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for t in self.towns:
            (directory / self.doc_id(t)).write_text(f"{t.name}\n\n{t.text()}\n", encoding="utf-8")

    def write(self, directory: str | Path) -> Path:
        """``corpus.jsonl`` plus one ``corpus/<id>.txt`` per document (title line, then text)."""
        out = Path(directory)
        (out / "corpus").mkdir(parents=True, exist_ok=True)
        with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
            for t in self.towns:
                f.write(json.dumps({**t.doc(), "facts": asdict(t)}, ensure_ascii=False) + "\n")
        self._write_texts(out / "corpus")
        return out / "corpus.jsonl"
