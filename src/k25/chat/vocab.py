"""Train a small byte-level BPE vocabulary (for k25-mini) and write it in the Kimi layout.

Training uses the Hugging Face ``tokenizers`` library with the official split pattern as its
pre-tokenizer, so merges never cross the boundaries tiktoken will see at encode time. The
result is a ``tiktoken.model`` (256 single bytes at ranks 0..255, then one rank per merge in
training order) plus a ``tokenizer_config.json`` with the same special-token names as the
release, so :class:`k25.chat.tokenizer.KimiTokenizer` loads it unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .tokenizer import (
    BYTE_DECODER,
    PAT_STR,
    KimiTokenizer,
    TokenizerError,
    write_tiktoken_ranks,
)


def _hf_bytes(token: str) -> bytes:
    """Bytes of a byte-level token string produced by ``tokenizers``."""
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"trained token {token!r} has a character outside the byte alphabet: {e}") from None


def train_bpe_ranks(texts: Iterable[str], size: int, *, min_frequency: int = 2) -> dict[bytes, int]:
    """Learn ``size`` base ranks (256 bytes + merges) from ``texts``.

    Fewer ranks come back when the corpus has no more pairs to merge at ``min_frequency``.
    """
    if size < 256:
        raise TokenizerError(f"vocabulary size {size} is below 256: every single byte needs a rank")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    # The merges are stored in priority order; each creates the token of the next rank, which is
    # exactly tiktoken's rule (merge the adjacent pair whose concatenation has the lowest rank).
    state = json.loads(tok.to_str())["model"]
    for merge in state["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = _hf_bytes(left) + _hf_bytes(right)
        if token not in ranks:
            ranks[token] = len(ranks)
        if len(ranks) >= size:
            break
    return ranks


def _read_corpus(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Yield the corpus in line batches (keeps memory flat for large files)."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise TokenizerError(f"corpus file not found: {path}")
        batch: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                batch.append(line)
                if len(batch) >= 1000:
                    yield "".join(batch)
                    batch = []
        if batch:
            yield "".join(batch)


def train_vocab(
    corpus: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    size: int,
    out_dir: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
) -> KimiTokenizer:
    """Train on corpus file(s) and write ``tiktoken.model`` + ``tokenizer_config.json`` into ``out_dir``.

    ``size`` counts base ranks; the model's ``vocab_size`` is ``size + 256`` (the reserved ids).
    """
    paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    ranks = train_bpe_ranks(_read_corpus(paths), size, min_frequency=min_frequency)
    out = Path(out_dir)
    write_tiktoken_ranks(ranks, out / "tiktoken.model")
    tokenizer = KimiTokenizer(out / "tiktoken.model")
    tokenizer.save_pretrained(out)
    return tokenizer
