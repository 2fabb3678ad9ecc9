"""``k25`` subcommands for the chat format: tokenize, render, parse, vocab train, template write.

The main CLI calls :func:`register`; each handler returns an exit status and prints
``k25: error: ...`` (status 2) for invalid input instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .parsers import parse_ids, parse_output
from .template import TemplateError, render, write_chat_template
from .tokenizer import KimiTokenizer, TokenizerError

EMBEDDED_TOKENIZER = Path(__file__).resolve().parent.parent / "weights" / "k25-mini"


class CliError(Exception):
    """Bad command-line input; printed without a traceback."""


def _read_input(source: str | None) -> str:
    if source in (None, "-"):
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        raise CliError(f"file not found: {path}")
    return path.read_text(encoding="utf-8")


def _tokenizer(directory: str | None) -> KimiTokenizer:
    if directory is None:
        if not (EMBEDDED_TOKENIZER / "tiktoken.model").is_file():
            raise CliError("no tokenizer given and none embedded: pass --tokenizer DIR (with tiktoken.model)")
        directory = str(EMBEDDED_TOKENIZER)
    return KimiTokenizer.from_pretrained(directory)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise CliError(f"ids must be integers: {e}") from None


def _conversation(text: str, source: str) -> dict[str, Any]:
    """Accept ``[messages...]`` or ``{"messages": [...], "tools": [...], "thinking": bool}``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{source}: invalid JSON ({e})") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise CliError(f"{source}: expected a list of messages or an object with a 'messages' list")
    return data


def cmd_tokenize(args: argparse.Namespace) -> int:
    tok = _tokenizer(args.tokenizer)
    if args.decode:
        ids = _parse_ids(args.decode)
        print(tok.decode(ids, skip_special_tokens=args.skip_special))
        return 0
    text = args.text if args.text is not None else _read_input(args.file)
    ids = tok.encode(text, allow_special_tokens=not args.no_special)
    if args.tokens:
        for tid, piece in zip(ids, tok.convert_ids_to_tokens(ids), strict=True):
            print(f"{tid}\t{piece}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    conv = _conversation(_read_input(args.file), args.file or "<stdin>")
    thinking = conv.get("thinking", True) if args.thinking is None else args.thinking
    text = render(
        conv["messages"],
        conv.get("tools"),
        thinking=bool(thinking),
        add_generation_prompt=not args.no_generation_prompt,
        tool_format=args.tool_format,
    )
    if args.ids or args.tokenizer:
        tok = _tokenizer(args.tokenizer)
        ids = tok.encode(text)
        if args.json:
            print(json.dumps({"text": text, "ids": ids}, ensure_ascii=False))
        else:
            print(text)
            print(" ".join(map(str, ids)))
    elif args.json:
        print(json.dumps({"text": text}, ensure_ascii=False))
    else:
        print(text)
    return 0


def cmd_parse(args: argparse.Namespace) -> int:
    raw = _read_input(args.file)
    if args.ids:
        out = parse_ids(_tokenizer(args.tokenizer), _parse_ids(raw), thinking=not args.instant)
    else:
        out = parse_output(raw, thinking=not args.instant)
    message = out.to_message()
    if out.errors:
        message["errors"] = out.errors
    print(json.dumps(message, ensure_ascii=False, indent=2))
    return 0


def cmd_vocab_train(args: argparse.Namespace) -> int:
    from .vocab import train_vocab

    tok = train_vocab(args.corpus, args.size, args.out, min_frequency=args.min_frequency)
    print(
        f"wrote {args.out}/tiktoken.model ({tok.num_base_tokens} ranks) and tokenizer_config.json; "
        f"vocab_size = {tok.vocab_size}"
    )
    return 0


def cmd_template_write(args: argparse.Namespace) -> int:
    print(write_chat_template(args.out))
    return 0


def _guard(fn: Any) -> Any:
    """Turn our input errors into ``k25: error: ...`` with exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CliError, TokenizerError, TemplateError) as e:
            print(f"k25: error: {e}", file=sys.stderr)
            return 2

    return run


def _add_render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", nargs="?", help="conversation JSON (list of messages or {messages, tools, thinking}); - = stdin"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--instant", dest="thinking", action="store_false", default=None, help="thinking=False")
    mode.add_argument("--thinking", dest="thinking", action="store_true", help="thinking=True (default)")
    p.add_argument("--no-generation-prompt", action="store_true", help="do not append the assistant prompt")
    p.add_argument("--tool-format", choices=["typescript", "json"], default="typescript")
    p.add_argument("--tokenizer", help="tokenizer directory; prints the ids too")
    p.add_argument("--ids", action="store_true", help="also print token ids (embedded tokenizer by default)")
    p.add_argument("--json", action="store_true", help="print {text, ids} as JSON")
    p.set_defaults(func=_guard(cmd_render))


def register(subparsers: Any) -> None:
    """Add ``tokenize``, ``render``, ``parse``, ``vocab`` and ``template`` to the ``k25`` CLI."""
    p = subparsers.add_parser("tokenize", help="text -> token ids (or --decode ids -> text)")
    p.add_argument("text", nargs="?", help="text to encode (default: --file or stdin)")
    p.add_argument("--file", help="read the text from a file")
    p.add_argument("--tokenizer", help="directory with tiktoken.model (+ tokenizer_config.json)")
    p.add_argument("--no-special", action="store_true", help="encode special-token strings as plain text")
    p.add_argument("--tokens", action="store_true", help="print one 'id<TAB>token' per line")
    p.add_argument("--decode", metavar="IDS", help="decode these ids instead")
    p.add_argument("--skip-special", action="store_true", help="with --decode: drop special tokens")
    p.set_defaults(func=_guard(cmd_tokenize))

    _add_render_args(subparsers.add_parser("render", help="conversation JSON -> prompt text (and ids)"))

    p = subparsers.add_parser("parse", help="model output -> assistant message JSON")
    p.add_argument("file", nargs="?", help="model output text after the generation prompt; - = stdin")
    p.add_argument("--instant", action="store_true", help="output of an instant-mode prompt (no reasoning)")
    p.add_argument("--ids", action="store_true", help="input is token ids (needs a tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory for --ids")
    p.set_defaults(func=_guard(cmd_parse))

    vocab = subparsers.add_parser("vocab", help="vocabulary tools")
    vsub = vocab.add_subparsers(dest="vocab_command", required=True)
    p = vsub.add_parser("train", help="train a byte-level BPE vocabulary in the Kimi tiktoken layout")
    p.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text file(s)")
    p.add_argument("--size", type=int, required=True, help="number of base ranks (vocab_size = size + 256)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--min-frequency", type=int, default=2)
    p.set_defaults(func=_guard(cmd_vocab_train))

    template = subparsers.add_parser("template", help="chat template tools")
    tsub = template.add_subparsers(dest="template_command", required=True)
    _add_render_args(tsub.add_parser("render", help="same as `k25 render`"))
    p = tsub.add_parser("write", help="write chat_template.jinja into a checkpoint directory")
    p.add_argument("out", help="checkpoint directory")
    p.set_defaults(func=_guard(cmd_template_write))
