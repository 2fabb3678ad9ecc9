"""The `k25` command line: `k25 info`, `k25 init`, `k25 generate`, plus the subsystems' commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Subsystems that add their own subcommands through `register(subparsers)`.
SUBCOMMAND_MODULES = (
    "k25.chat.cli", "k25.train.cli", "k25.engine.cli", "k25.agents.cli", "k25.data.cli", "k25.server.cli",
    "k25.eval.cli",
)


def _load_config(model: str):
    from .config import K25Config, preset

    if Path(model).exists():
        return K25Config.from_json_file(model)
    return preset(model)


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .info import model_report, report_rows

    config = _load_config(args.model)
    report = model_report(config)
    table = Table(title=f"k25 info: {args.model}", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in report_rows(args.model, config, report):
        table.add_row(Text(label), Text(value))  # plain text: values contain brackets
    Console(width=max(Console().width, 120)).print(table)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a randomly initialised checkpoint of a preset (for tests, demos and benchmarks)."""
    from .checkpoint import build_model, save_model
    from .config import preset

    config = preset(args.preset)
    if args.text_only:
        config.vision_config = None
    model = build_model(config, seed=args.seed, dtype=args.dtype)
    tokenizer = None
    if config.text_config.vocab_size == 512:  # 256 byte tokens + the 256 Kimi specials: a byte tokenizer fits
        import tempfile

        from .testing import byte_tokenizer

        tokenizer = byte_tokenizer(tempfile.mkdtemp())
    path = save_model(model, config, args.out, int4_experts=args.int4, tokenizer=tokenizer)
    print(f"wrote random {args.preset} checkpoint to {path}" + (" (with a byte-level tokenizer)" if tokenizer else ""))
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"--prompt-ids: expected integers separated by spaces or commas, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import build_model, load_model
    from .checkpoint.model_io import text_model
    from .engine import generate

    if Path(args.model).exists():
        model = text_model(load_model(args.model, dtype=args.dtype, vision=False))
        source = f"checkpoint {args.model}"
    else:
        model = text_model(build_model(_load_config(args.model), seed=args.seed, dtype=args.dtype, vision=False))
        source = f"random {args.model} model (seed {args.seed})"
    ids = _parse_ids(args.prompt_ids)
    if not ids:
        raise SystemExit("--prompt-ids: give at least one token id")
    out = generate(
        model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        eos_token_id=model.config.eos_token_id,
    )
    print(f"{source}\nprompt ids:    {ids}\ngenerated ids: {out[0].tolist()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k25", description="Kimi K2.5 in Python: model, formats, tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter, weight-byte and KV-cache accounting for a preset or checkpoint")
    p.add_argument("model", nargs="?", default="kimi-k2.5", help="preset name or checkpoint directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("preset")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: the preset's)")
    p.add_argument("--text-only", action="store_true", help="K2 layout: no vision tower, no language_model. prefix")
    p.add_argument("--int4", action="store_true", help="store routed experts as INT4 pack-quantized")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="continue token ids with a checkpoint or a random preset model")
    p.add_argument("model", help="checkpoint directory or preset name")
    p.add_argument("--prompt-ids", required=True, help="token ids, e.g. '1 2 3'")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_generate)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError) as e:
        print(f"k25: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
