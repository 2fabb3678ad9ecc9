"""Kimi K2.5 tokenizer: tiktoken BPE with the Kimi special-token layout (spec §4).

The same class serves the real 163,840-entry vocabulary and the small vocabularies we
train ourselves (``k25.chat.vocab``): a vocabulary is a ``tiktoken.model`` file of N base
ranks, followed by 256 reserved special ids N..N+255 whose names come from the Hugging
Face ``tokenizer_config.json`` (``added_tokens_decoder``) or from the Kimi layout.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
NUM_RESERVED_SPECIAL_TOKENS = 256

# The split pattern of the official tokenizer; ``&&`` is class intersection (tiktoken's Rust
# regex understands it; the Python ``regex`` module needs the ``(?V1)`` flag).
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# tiktoken panics on very long inputs; the official tokenizer cuts the text into pieces of at
# most this many characters, and further so no run of (non-)whitespace exceeds the second limit.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Named special tokens as offsets from the number of base tokens (id 163584 + offset in the
# real vocabulary), with the ``special`` flag of the release's tokenizer_config.json.
NAMED_SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False),
    15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    18: ("<|media_begin|>", True),
    19: ("<|media_content|>", True),
    20: ("<|media_end|>", True),
    21: ("<|media_pad|>", True),
    22: ("<think>", False),
    23: ("</think>", False),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}

ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
    "<|media_begin|>",
    "<|media_content|>",
    "<|media_end|>",
    "<|media_pad|>",
]


class TokenizerError(ValueError):
    """A vocabulary file, tokenizer config or token id is invalid."""


def reserved_token_name(token_id: int) -> str:
    """Name of an unnamed reserved special id, as the official tokenizer spells it."""
    return f"<|reserved_token_{token_id}|>"


def default_special_tokens(num_base_tokens: int) -> dict[int, tuple[str, bool]]:
    """The full Kimi layout (id -> (name, special flag)) for a vocabulary of ``num_base_tokens`` ranks."""
    out: dict[int, tuple[str, bool]] = {}
    for offset in range(NUM_RESERVED_SPECIAL_TOKENS):
        tid = num_base_tokens + offset
        out[tid] = NAMED_SPECIAL_TOKENS.get(offset, (reserved_token_name(tid), True))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used for Hugging Face token strings)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a ``tiktoken.model`` file (``base64(token) rank`` per line) with line-numbered errors.

    Ranks must be exactly 0..N-1 (the special ids are placed right after them) and every
    single byte must be a token, or tiktoken cannot encode arbitrary text.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"vocabulary file not found: {path}")
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {raw!r:.80}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError) as e:
                raise TokenizerError(f"{path}:{lineno}: token is not valid base64 ({e})") from None
            try:
                rank = int(parts[1])
            except ValueError:
                raise TokenizerError(
                    f"{path}:{lineno}: rank {parts[1].decode(errors='replace')!r} is not an integer"
                ) from None
            if rank < 0:
                raise TokenizerError(f"{path}:{lineno}: negative rank {rank}")
            if token in ranks:
                raise TokenizerError(f"{path}:{lineno}: token {token!r} already has rank {ranks[token]}")
            if rank in seen:
                raise TokenizerError(f"{path}:{lineno}: rank {rank} already used on line {seen[rank]}")
            ranks[token] = rank
            seen[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: empty vocabulary")
    n = len(ranks)
    if max(seen) != n - 1:
        missing = next(r for r in range(n) if r not in seen)
        raise TokenizerError(f"{path}: ranks must be 0..{n - 1} without gaps; rank {missing} is missing")
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    if absent:
        raise TokenizerError(
            f"{path}: single-byte token {bytes([absent[0]])!r} is missing ({len(absent)} bytes absent)"
        )
    return ranks


def write_tiktoken_ranks(ranks: Mapping[bytes, int], path: str | os.PathLike[str]) -> Path:
    """Write ranks in the ``tiktoken.model`` format, sorted by rank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return path


def iter_encode_pieces(text: str) -> Iterator[str]:
    """Split text as the official tokenizer does before calling tiktoken.

    Windows of at most ``MAX_ENCODE_CHARS`` characters; inside each, a cut wherever a run of
    whitespace or of non-whitespace reaches ``MAX_RUN_CHARS`` characters (the cut lands at the
    start of the next chunk of the run). An empty text yields one empty piece.
    """
    if not text:
        yield ""
        return
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start : start + MAX_ENCODE_CHARS]
        piece_start = 0
        for run in _RUNS.finditer(window):
            a, b = run.span()
            for cut in range(a + MAX_RUN_CHARS, b, MAX_RUN_CHARS):
                yield window[piece_start:cut]
                piece_start = cut
        yield window[piece_start:]


# Maximal runs of whitespace / non-whitespace; ``\s`` in ``re`` is exactly ``str.isspace``.
_RUNS = re.compile(r"\s+|\S+")


@dataclass(frozen=True)
class SpecialToken:
    """One entry of the reserved range: id, name, and whether ``skip_special_tokens`` drops it."""

    id: int
    content: str
    special: bool


class KimiTokenizer:
    """tiktoken BPE + the 256 Kimi reserved ids; reads and writes the release's file layout."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str],
        special_tokens: Mapping[int, tuple[str, bool]] | None = None,
        *,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        pad_token: str = "[PAD]",
        unk_token: str = "[UNK]",
        model_max_length: int | None = None,
    ) -> None:
        """Load ``vocab_file``; ``special_tokens`` (id -> (name, special)) overrides the default layout."""
        self.vocab_file = Path(vocab_file)
        ranks = load_tiktoken_ranks(self.vocab_file)
        self.num_base_tokens = len(ranks)
        layout = default_special_tokens(self.num_base_tokens)
        lo, hi = self.num_base_tokens, self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS
        for tid, (name, special) in (special_tokens or {}).items():
            if not lo <= tid < hi:
                raise TokenizerError(
                    f"special token {name!r} has id {tid}, outside the reserved range {lo}..{hi - 1} "
                    f"of a vocabulary with {self.num_base_tokens} base tokens"
                )
            layout[tid] = (name, bool(special))
        names: dict[str, int] = {}
        for tid, (name, _) in layout.items():
            if name in names:
                raise TokenizerError(f"special token name {name!r} is used by ids {names[name]} and {tid}")
            names[name] = tid
        self._special = {tid: SpecialToken(tid, name, special) for tid, (name, special) in layout.items()}
        self.special_tokens: dict[str, int] = names
        self.model = tiktoken.Encoding(
            name=self.vocab_file.name,
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=names,
        )
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_id = self._named(bos_token)
        self.eos_id = self._named(eos_token)
        self.pad_id = self._named(pad_token)
        self.unk_id = self._named(unk_token)
        self.im_end_id = self._named("<|im_end|>")
        self._skip_ids = frozenset(t.id for t in self._special.values() if t.special)

    # -- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> KimiTokenizer:
        """Load ``tiktoken.model`` and, when present, ``tokenizer_config.json`` from a checkpoint dir."""
        directory = Path(directory)
        vocab = directory / VOCAB_FILE
        if not vocab.is_file():
            raise TokenizerError(f"{directory}: no {VOCAB_FILE} in this directory")
        cfg_path = directory / CONFIG_FILE
        if not cfg_path.is_file():
            return cls(vocab)
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{cfg_path}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path}: top level must be an object")
        special: dict[int, tuple[str, bool]] = {}
        decoder = cfg.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder must be an object")
        for key, entry in decoder.items():
            where = f"{cfg_path}: added_tokens_decoder[{key!r}]"
            try:
                tid = int(key)
            except ValueError:
                raise TokenizerError(f"{where}: key is not an integer id") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise TokenizerError(f"{where}: expected an object with a string 'content'")
            special[tid] = (entry["content"], bool(entry.get("special", True)))

        def token_name(key: str, default: str) -> str:
            value = cfg.get(key, default)
            if isinstance(value, dict):  # AddedToken serialisation
                value = value.get("content", default)
            if not isinstance(value, str):
                raise TokenizerError(f"{cfg_path}: {key} must be a string, got {value!r}")
            return value

        max_len = cfg.get("model_max_length")
        return cls(
            vocab,
            special,
            bos_token=token_name("bos_token", "[BOS]"),
            eos_token=token_name("eos_token", "[EOS]"),
            pad_token=token_name("pad_token", "[PAD]"),
            unk_token=token_name("unk_token", "[UNK]"),
            model_max_length=max_len if isinstance(max_len, int) else None,
        )

    def tokenizer_config(self) -> dict:
        """The Hugging Face ``tokenizer_config.json`` contents of the release, for this vocabulary."""
        decoder = {
            str(t.id): {
                "content": t.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t.special,
            }
            for t in sorted(self._special.values(), key=lambda t: t.id)
        }
        cfg: dict = {
            "added_tokens_decoder": decoder,
            "additional_special_tokens": [n for n in ADDITIONAL_SPECIAL_TOKENS if n in self.special_tokens],
            "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "extra_special_tokens": {},
            "pad_token": self.pad_token,
            "tokenizer_class": "TikTokenTokenizer",
            "unk_token": self.unk_token,
        }
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        return cfg

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write ``tiktoken.model`` and ``tokenizer_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = write_tiktoken_ranks(self.model._mergeable_ranks, directory / VOCAB_FILE)
        cfg = directory / CONFIG_FILE
        text = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        cfg.write_text(text, encoding="utf-8")
        return [vocab, cfg]

    # -- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Base ranks plus the 256 reserved ids (163,840 for the real model)."""
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    def __len__(self) -> int:
        return self.vocab_size

    def _named(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"special token {name!r} is not in this vocabulary's reserved range") from None

    def token_to_id(self, token: str) -> int:
        """Id of a special-token name (e.g. ``<|im_end|>``)."""
        return self._named(token)

    def special_token(self, token_id: int) -> SpecialToken | None:
        """The reserved-range entry for ``token_id``, or None for a base token."""
        self._check_id(token_id)
        return self._special.get(token_id)

    def is_special(self, token_id: int) -> bool:
        """True when ``skip_special_tokens`` would drop this id (tool-call and think tokens survive)."""
        self._check_id(token_id)
        return token_id in self._skip_ids

    def _check_id(self, token_id: int) -> None:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise TokenizerError(f"token id must be an int, got {token_id!r}")
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range 0..{self.vocab_size - 1}")

    # -- encode / decode --------------------------------------------------------------
    def encode(self, text: str, allow_special_tokens: bool = True) -> list[int]:
        """Encode text; special-token strings in it become special ids unless ``allow_special_tokens=False``.

        Long inputs are cut as the official tokenizer does (see ``iter_encode_pieces``), so ids match it.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in iter_encode_pieces(text):
            if allow_special_tokens:
                ids.extend(self.model.encode(piece, allowed_special="all"))
            else:
                ids.extend(self.model.encode(piece, disallowed_special=()))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ids (special ids as their names); raises naming the first invalid id."""
        ids = list(ids)
        for tid in ids:
            self._check_id(tid)
        return self.model.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text (invalid UTF-8 replaced); ``skip_special_tokens`` drops ids flagged special."""
        ids = list(ids)
        for tid in ids:
            self._check_id(tid)
        if skip_special_tokens:
            ids = [t for t in ids if t not in self._skip_ids]
        return self.model.decode(ids, errors="replace")

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Hugging Face token strings (GPT-2 byte-to-unicode form; special tokens by name)."""
        out = []
        for tid in ids:
            self._check_id(tid)
            sp = self._special.get(tid)
            if sp is not None:
                out.append(sp.content)
            else:
                out.append("".join(BYTE_ENCODER[b] for b in self.model.decode_single_token_bytes(tid)))
        return out

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Inverse of ``convert_ids_to_tokens``; raises naming a token that is not in the vocabulary."""
        out = []
        for tok in tokens:
            if tok in self.special_tokens:
                out.append(self.special_tokens[tok])
                continue
            try:
                raw = bytes(BYTE_DECODER[c] for c in tok)
                out.append(self.model._mergeable_ranks[raw])
            except KeyError:
                raise TokenizerError(f"token {tok!r} is not in the vocabulary") from None
        return out

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = True,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render with :func:`k25.chat.template.render` (as the release's tokenizer does) and encode."""
        from .template import render

        text = render(messages, tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental detokenizer for token-by-token output."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns ids into text deltas one at a time, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending = b""

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete (possibly empty)."""
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        self._pending += self.tokenizer.decode_bytes([token_id])
        text, self._pending = _split_utf8(self._pending)
        return text

    def flush(self) -> str:
        """Text of any bytes still held back (invalid sequences replaced)."""
        out = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return out


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the longest prefix that does not end inside a UTF-8 sequence."""
    cut = len(data)
    # Look back at most 3 bytes for the lead byte of an unfinished sequence.
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte
            continue
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if need > back:
                cut = len(data) - back
        break
    return data[:cut].decode("utf-8", errors="replace"), data[cut:]
