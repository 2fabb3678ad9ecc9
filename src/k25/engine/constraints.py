"""Constrained decoding: a per-request mask of the tokens that keep the output valid.

`JsonConstraint` compiles a JSON schema (or "any JSON object") with llguidance — a well-kept
grammar engine built for this — against the Kimi tokenizer's tiktoken vocabulary. The engine
asks it for the allowed tokens before sampling and feeds it the sampled token after; once the
JSON is complete only the end token (`<|im_end|>`) is allowed, so generation stops there.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np
import torch


class TokenConstraint(Protocol):
    """What the engine needs from a constraint (one object per request; it keeps state)."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: the tokens that may come next."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        ...


_TOKENIZERS: dict[int, Any] = {}


def _ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a KimiTokenizer (built once per tokenizer; ~1 s for the full vocab)."""
    key = id(tokenizer)
    if key not in _TOKENIZERS:
        from llguidance.tiktoken import lltokenizer_from_encoding

        _TOKENIZERS[key] = lltokenizer_from_encoding(
            tokenizer.model, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.im_end_id
        )
    return _TOKENIZERS[key]


class BannedTokens:
    """Never produce these ids (e.g. the tool-call section tokens under `tool_choice: "none"`)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = sorted(set(token_ids))

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[[t for t in self.token_ids if 0 <= t < vocab_size]] = False
        return mask

    def accept(self, token_id: int) -> None:
        """Stateless: nothing to advance."""


class ConstraintError(ValueError):
    """The schema cannot be compiled; the message says why."""


class JsonConstraint:
    """Output must be one JSON value matching `schema` (None: any JSON object), then `<|im_end|>`."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any] | None = None) -> None:
        from llguidance import LLMatcher

        self.schema = schema if schema is not None else {"type": "object"}
        # Compact separators (no free whitespace between tokens): what models are trained to write.
        spec = {**self.schema, "x-guidance": {"whitespace_flexible": False, **self.schema.get("x-guidance", {})}}
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(spec))
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        self.matcher = LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"invalid JSON schema: {self.matcher.get_error()}")

    def allowed(self, vocab_size: int) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.from_numpy(bits[:vocab_size].astype(bool))
        if mask.numel() < vocab_size:
            mask = torch.cat([mask, torch.zeros(vocab_size - mask.numel(), dtype=torch.bool)])
        return mask

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(int(token_id))

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
