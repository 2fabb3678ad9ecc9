"""``k25 data``: generate the curriculum, check it, export its text for a vocabulary, show a record.

The main CLI calls :func:`register`; bad input prints ``k25: error: ...`` (status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .generate import (
    ALL_FAMILIES,
    FAMILIES,
    FAMILY_DESCRIPTIONS,
    FAMILY_GROUPS,
    DataError,
    corpus_names,
    generate,
    write,
)
from .records import check_record, plain_text, read_jsonl, training_segments
from .text import TextSourceError
from .vision import check_images


def _families(text: str | None) -> list[str] | None:
    return None if not text else [f.strip() for f in text.split(",") if f.strip()]


def cmd_generate(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.tokenizer:
        from ..chat.tokenizer import KimiTokenizer

        tokenizer = KimiTokenizer.from_pretrained(args.tokenizer)
    avoid = corpus_names(args.avoid_names_of) if args.avoid_names_of else ()
    cur = generate(args.seed, args.n_per_family, args.n_heldout, _families(args.families), args.corpus_size, avoid)
    stats = write(cur, args.out, tokenizer)
    print(f"wrote {args.out} (seed {args.seed}, {stats['corpus_documents']} corpus documents)")
    header = f"{'family':<14}{'train':>8}{'heldout':>9}{'tool calls':>12}{'recoveries':>12}{'chars':>12}"
    if tokenizer is not None:
        header += f"{'tokens':>12}{'targets':>12}"
    print(header)
    for fam, by_split in stats["families"].items():
        tr, ho = by_split["train"], by_split["heldout"]
        row = (
            f"{fam:<14}{tr['records']:>8}{ho['records']:>9}{tr['tool_calls'] + ho['tool_calls']:>12}"
            f"{tr['recoveries'] + ho['recoveries']:>12}{tr['chars'] + ho['chars']:>12}"
        )
        if tokenizer is not None:
            row += f"{tr['tokens'] + ho['tokens']:>12}{tr['target_tokens'] + ho['target_tokens']:>12}"
        print(row)
    return 0


def _files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*/*.jsonl"))
    if not files:
        raise DataError(f"{directory}: no FAMILY/SPLIT.jsonl files (run `k25 data generate` first)")
    return files


def cmd_check(args: argparse.Namespace) -> int:
    """Validate every record (and its images) and that no task key is in both splits of a family."""
    directory = Path(args.dir)
    problems: list[str] = []
    keys: dict[tuple[str, str], set[str]] = {}
    total = 0
    for path in _files(directory):
        for rec in read_jsonl(path):
            total += 1
            problems += check_record(rec)
            problems += check_images(rec, path.parent)
            keys.setdefault((rec["family"], rec["split"]), set()).add(str((rec.get("meta") or {}).get("key")))
    for fam in ALL_FAMILIES:
        train, held = keys.get((fam, "train"), set()), keys.get((fam, "heldout"), set())
        if train & held:
            problems.append(f"{fam}: {len(train & held)} tasks in both splits, e.g. {sorted(train & held)[0]!r}")
    for p in problems[:50]:
        print(p)
    print(f"checked {total} records: {len(problems)} problems")
    return 1 if problems else 0


def cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    for i, rec in enumerate(read_jsonl(path)):
        if i != args.index:
            continue
        if args.json:
            print(json.dumps(rec, ensure_ascii=False, indent=2))
            return 0
        print(f"# {rec['id']}  mode={rec['mode']}  answer={rec.get('answer')!r}")
        for text, target in training_segments(rec):
            print(f"\x1b[1m{text}\x1b[0m" if target and args.color else text, end="")
        print()
        return 0
    raise DataError(f"{path}: no record at index {args.index}")


def cmd_text(args: argparse.Namespace) -> int:
    """Write the training text of a split, special tokens removed: the corpus for ``k25 vocab train``."""
    n = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for path in _files(Path(args.dir)):
            if path.stem != args.split:
                continue
            for rec in read_jsonl(path):
                f.write(plain_text(rec) + "\n\n")
                n += 1
    print(f"wrote {n} records to {args.out}")
    return 0


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (DataError, TextSourceError, ValueError, OSError) as e:
            print(f"k25: error: {e}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    """Add ``k25 data generate|check|text|show``."""
    data = subparsers.add_parser("data", help="the synthetic training curriculum (generate, check, show)")
    sub = data.add_subparsers(dest="data_command", required=True)

    width = max(map(len, FAMILY_DESCRIPTIONS)) + 2
    listing = "\n".join(f"  {f:<{width}}{d}" for f, d in FAMILY_DESCRIPTIONS.items())
    p = sub.add_parser(
        "generate",
        help="write FAMILY/{train,heldout}.jsonl, the corpus, tools.json and stats.json",
        description=f"Families:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-family", type=int, default=1000, help="train records per family (default 1000)")
    p.add_argument("--n-heldout", type=int, default=None, help="held-out records per family (default 10%%, >= 1)")
    p.add_argument("--corpus-size", type=int, default=500, help="generated towns in the search corpus")
    p.add_argument("--families", default=None,
                   help=f"comma-separated families or groups ({', '.join(FAMILY_GROUPS)}; default: "
                        f"{','.join(FAMILIES)}); known: {','.join(ALL_FAMILIES)}")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory: also count tokens in stats")
    p.add_argument("--avoid-names-of", metavar="DIR", default=None,
                   help="a `k25 data generate` directory: drop the records that name any town of its corpus "
                        "(training data with new names that cannot touch DIR's held-out towns)")
    p.set_defaults(func=_guard(cmd_generate))

    p = sub.add_parser("check", help="validate a generated directory (parsers, schemas, split disjointness)")
    p.add_argument("dir")
    p.set_defaults(func=_guard(cmd_check))

    p = sub.add_parser("text", help="write a split's text without special tokens (a corpus for k25 vocab train)")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="output text file")
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    p.set_defaults(func=_guard(cmd_text))

    p = sub.add_parser("show", help="print one record as its training text")
    p.add_argument("file", help="a FAMILY/SPLIT.jsonl file")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the record itself")
    p.add_argument("--color", action="store_true", help="bold the loss targets")
    p.set_defaults(func=_guard(cmd_show))
