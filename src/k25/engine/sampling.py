"""Per-request sampling: parameters, logit processing and token choice for a batch.

Every row of a batch carries its own :class:`SamplingParams`. Rows with a `seed` draw from
their own `torch.Generator`, so a seeded request samples the same tokens whatever else shares
its batch. Logprobs are those of the model's distribution (log-softmax of the raw logits, before
penalties and temperature), as OpenAI-style APIs report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """How one request picks tokens and when it stops (vLLM/OpenAI field names and defaults).

    `temperature=0` is greedy. `top_k <= 0` and `top_p == 1` and `min_p == 0` disable those
    filters. `stop` strings end generation when they appear in the decoded text (they need a
    tokenizer); `stop_token_ids` end it on those ids, in addition to the model's EOS and
    `<|im_end|>` unless `ignore_eos`. `logprobs=n` returns the sampled token's logprob and the
    top-n alternatives per step.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A TokenConstraint (engine/constraints.py): per-request state that masks the next token.
    constraint: Any = field(default=None, repr=False, compare=False)
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 or None, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 or None, got {self.logprobs}")
        if any(not s for s in self.stop_list):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprobs:
    """The chosen token's logprob and the `n` most likely tokens at one step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SampleRow:
    """What the sampler needs about one row besides its logits."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition (prompt + output, CTRL-style divide/multiply), presence and frequency (output only)."""
    if not any(r.params.needs_penalties for r in rows):
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.needs_penalties:
            continue
        out = torch.tensor(list(r.output_ids), dtype=torch.long)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[torch.tensor(list(r.prompt_ids), dtype=torch.long)] = True
            seen[out] = True
            row = logits[i]
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, row)
        if (p.presence_penalty or p.frequency_penalty) and len(out):
            counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p × max prob."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, rows: Sequence[SampleRow], banned: Sequence[Sequence[int]] | None = None
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of `logits` [B, V]; also the logprobs each row asked for.

    `banned[i]` lists ids row i may not produce this step (EOS/stop ids before `min_tokens`).
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} sampling rows")
    logits = logits.float()
    raw = logits
    logits = apply_penalties(logits, rows)
    if banned is not None and any(banned):
        logits = logits.clone()
        for i, ids in enumerate(banned):
            if ids:
                logits[i, list(ids)] = float("-inf")
    tokens: list[int] = []
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    picked: dict[int, int] = {}
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            picked[i] = t
    for i, r in enumerate(rows):
        if i in picked:
            continue
        p = r.params
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        picked[i] = int(torch.multinomial(row.softmax(-1), 1, generator=r.generator))
    tokens = [picked[i] for i in range(len(rows))]
    lps: list[TokenLogprobs | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        logp = raw[want].log_softmax(-1)
        for j, i in enumerate(want):
            n = rows[i].params.logprobs or 0
            top = logp[j].topk(n) if n else None
            lps[i] = TokenLogprobs(
                tokens[i], float(logp[j, tokens[i]]),
                list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else [],
            )
    return tokens, lps


def make_generator(seed: int | None) -> torch.Generator | None:
    """A private generator for a seeded request (None: use torch's global RNG)."""
    return torch.Generator().manual_seed(seed) if seed is not None else None
