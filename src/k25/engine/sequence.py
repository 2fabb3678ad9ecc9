"""One request's state inside the engine: its tokens, its blocks, how much is computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler sees it.

    `num_computed` tokens have their latent rows in the cache; the next forward feeds tokens
    `[num_computed, len(token_ids))`. A preempted sequence drops its blocks and recomputes
    (its prefix may still come back from the prefix cache).
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full, registered blocks
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    eos_ids: frozenset[int] = frozenset()
    decoder: object | None = None  # incremental detokenizer (StreamDecoder) when stop strings are used
    # Media (images, video chunks): one embedding row per media placeholder in the prompt, in order,
    # computed once by the vision tower; `media_keys` stands in for the placeholders when hashing blocks.
    media_embeds: torch.Tensor | None = None
    media_positions: list[int] = field(default_factory=list)
    media_keys: list[int] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cache_keys(self) -> list[int]:
        """The ids prefix caching hashes: token ids, with each media placeholder replaced by a key
        derived from that item's content, so the same prompt with another image never hits."""
        return self.token_ids if self.media_keys is None else self.media_keys + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to feed before the next one can be sampled."""
        return len(self) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]
