"""``k25 eval MODEL_DIR --data DIR``: a checkpoint on the held-out split of the synthetic curriculum.

The main CLI calls :func:`register`; bad input prints ``k25: error: ...`` (status 2). The data
directory and family names are checked before the model is loaded, so a typo fails at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.generate import ALL_FAMILIES
from ..data.vision import has_images
from .model import EvalError


def _families(text: str | None) -> list[str] | None:
    return None if not text else [f.strip() for f in text.split(",") if f.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .harness import Settings, evaluate, load_records, prepare_tools
    from .model import EngineGenerator
    from .report import markdown, print_report
    from .tools import ToolKit

    if args.max_tokens < 1 or args.max_steps < 1 or args.concurrency < 1:
        raise EvalError("--max-tokens, --max-steps and --concurrency must be at least 1")
    families = _families(args.families)
    records = [r for recs in load_records(args.data, families, args.split, args.limit).values() for r in recs]
    kit = ToolKit(args.data)
    prepare_tools(kit, records)  # bad data fails here, before the model loads
    err = Console(stderr=True)
    with err.status(f"loading {args.model_dir}"):
        generator = EngineGenerator(args.model_dir, max_tokens=args.max_tokens, experts=args.experts,
                                    concurrency=args.concurrency, tokenizer=args.tokenizer, dtype=args.dtype,
                                    tool_grammar=args.tool_grammar)
        if any(has_images(r) for r in records):
            generator.vision_model()  # fails now, with a clear message, on a checkpoint without a vision tower
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=err, disable=args.quiet) as bar:
        task = bar.add_task("", total=len(records))
        correct = [0, 0]

        def advance(res: Any) -> None:
            if res.correct is not None:
                correct[0] += bool(res.correct)
                correct[1] += 1
            bar.update(task, advance=1, description=f"{correct[0]}/{correct[1]} correct")

        report = evaluate(generator, args.data, families, args.limit, args.split,
                          Settings(max_steps=args.max_steps, concurrency=args.concurrency), on_result=advance, kit=kit)
    report["info"].update(model=str(args.model_dir), max_tokens=args.max_tokens, experts=args.experts,
                          tool_grammar=args.tool_grammar)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        err.print(f"wrote {args.json}", highlight=False)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report), encoding="utf-8")
        err.print(f"wrote {args.markdown}", highlight=False)
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (EvalError, OSError) as e:
            print(f"k25: error: {e}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    """Add ``k25 eval``."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on the held-out curriculum (accuracy, tool-call validity, thinking vs instant)",
        description="Run MODEL_DIR (greedy, in-process) on the held-out records of a `k25 data generate` directory: "
                    "tool calls are executed with the runtime's own tools and the swarm's orchestrator, answers "
                    "scored per family; the prose families get a teacher-forced loss.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (with tiktoken.model)")
    p.add_argument("--data", required=True, help="a `k25 data generate` output directory")
    p.add_argument("--families", default=None, help=f"comma-separated subset of: {','.join(ALL_FAMILIES)} "
                                                     "(default: every family the directory has)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of each family")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--max-tokens", type=int, default=512, help="token limit of each assistant turn (default 512)")
    p.add_argument("--max-steps", type=int, default=12, help="model turns per conversation before it is stopped")
    p.add_argument("--experts", choices=("auto", "fused", "int4"), default="auto",
                   help="routed-expert kernels (auto: INT4 checkpoints stay INT4, others fused)")
    p.add_argument("--concurrency", type=int, default=16, help="conversations in flight (the engine's batch)")
    p.add_argument("--tokenizer", default=None, help="directory with tiktoken.model (default: MODEL_DIR)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--tool-grammar", action="store_true",
                   help="hold tool calls to the declared tools and schemas, as `k25 serve` does by default "
                   "(default here: off, so validity measures the model alone)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the whole report, every record included")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="write the tables as Markdown (model card)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard(cmd_eval))
