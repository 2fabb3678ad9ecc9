"""The copy warm-up data of k25-mini run 2 (phases 5a/5b of the model card), exactly as used.

    python recipes/k25_mini_copy_warmup.py out/mini/corpus.txt out/mini/warmup/copydata.jsonl

6,000 Instant conversations "Repeat exactly: <6-24 items>" -> the items, where an item is a
number of 1-5 digits, a word of the curriculum's text (``k25 data text`` output) or a symbol.
It was written during run 2, when the model turned out unable to copy; the same idea now lives
in the curriculum as the ``copy`` family (``k25 data generate --families copy``,
src/k25/data/copying.py), which the later phases use. This file stays so the shipped weights
can be reproduced byte for byte from their recorded inputs.
"""

from __future__ import annotations

import json
import random
import sys


def main(corpus: str, out: str, n: int = 6000, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(corpus, encoding="utf-8") as f:
        words = [w for w in f.read().split() if w.isalpha() and len(w) < 10][:200000]
    ops = ["*", "+", "-", "=", "(", ")"]
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(n):
            items = []
            for _ in range(rng.randint(6, 24)):
                k = rng.random()
                if k < 0.5:
                    items.append(str(rng.randint(0, 10 ** rng.randint(1, 5))))
                else:
                    items.append(rng.choice(words) if k < 0.85 else rng.choice(ops))
            s = " ".join(items)
            chat = [{"role": "user", "content": f"Repeat exactly: {s}"}, {"role": "assistant", "content": s}]
            f.write(json.dumps({"messages": chat}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
