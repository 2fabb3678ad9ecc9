"""`k25 quantize` (checkpoint → INT4 pack-quantized routed experts) and `k25 chat` (talk to a model)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def cmd_quantize(args: argparse.Namespace) -> int:
    """Rewrite a checkpoint with the routed experts in the released INT4 format (group 32, symmetric)."""
    from ..checkpoint import load_model
    from ..checkpoint.io import CheckpointError
    from ..config import K25Config
    from .loading import is_int4_checkpoint

    src, dst = Path(args.src), Path(args.dst)
    config = K25Config.from_json_file(src)
    if is_int4_checkpoint(config):
        raise CheckpointError(f"{src}: already an INT4 pack-quantized checkpoint")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty")
    from ..checkpoint import save_model

    model = load_model(src, dtype=args.dtype)
    save_model(model, config, dst, int4_experts=True, dtype=args.dtype)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    before, after = _dir_bytes(src), _dir_bytes(dst)
    print(f"wrote {dst}: routed experts INT4 (pack-quantized, group 32, symmetric)\n"
          f"weights {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB ({before / max(after, 1):.2f}x smaller)")
    return 0


def chat_model(model: str | None) -> str:
    """What ``k25 chat`` loads: the given directory or preset, else the shipped k25-mini (a clear exit if absent)."""
    if model is not None:
        return model
    from ..weights import MissingWeightsError, default_model_dir

    try:
        return str(default_model_dir())
    except MissingWeightsError as e:
        raise SystemExit(f"k25 chat: {e}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal chat: each line you type is a user turn; the reply is parsed (reasoning shown dimmed)."""
    from .llm import LLM
    from .sampling import SamplingParams

    model = chat_model(args.model)
    llm = LLM(model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed)
    if llm.tokenizer is None:
        raise SystemExit(f"k25 chat: {model} has no tokenizer (tiktoken.model); pass --tokenizer DIR")
    thinking = not args.instant
    temperature = args.temperature if args.temperature is not None else (1.0 if thinking else 0.6)
    params = SamplingParams(temperature=temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.message] if args.message is not None else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            user = turns.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                return 0
            if user.strip() in ("/exit", "/quit"):
                return 0
        messages.append({"role": "user", "content": user})
        ids, _ = llm.chat_prompt(messages, thinking=thinking)
        out = None
        for out in llm.stream(ids, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        reply = llm.parse(out, thinking) if out is not None else {"role": "assistant", "content": ""}
        reply.pop("finish_reason", None)
        messages.append(reply)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="convert a checkpoint's routed experts to INT4 pack-quantized")
    p.add_argument("src", help="checkpoint directory (full-precision experts)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", default=None, help="dtype of the non-expert tensors (default: the config's)")
    p.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser("chat", help="chat with a checkpoint (default: k25-mini) in the terminal")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory (with tiktoken.model) or preset name with --tokenizer "
                        "(default: the built-in k25-mini)")
    p.add_argument("--tokenizer", default=None, help="directory with tiktoken.model (default: the checkpoint's)")
    p.add_argument("--instant", action="store_true", help="Instant mode (no reasoning)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--message", default=None, help="send one message and exit (default: read lines from stdin)")
    p.add_argument("--temperature", type=float, default=None, help="default 1.0 (thinking) / 0.6 (instant)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_chat)
