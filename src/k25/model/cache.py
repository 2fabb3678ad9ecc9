"""The cache interface the model writes its latent KV into.

MLA caches, per layer and token, only the normalised latent (`kv_lora_rank` values) and the
rotated shared key (`qk_rope_head_dim` values). The model calls :meth:`LatentCache.update`
and attends over what it returns; the engine supplies its own paged implementation of the
same protocol. :class:`DynamicLatentCache` is the plain contiguous one used by `generate`.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LatentCache(Protocol):
    """What MLA needs from a KV cache."""

    def update(
        self, layer_idx: int, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's latent [B, T, R] and rotated key [B, T, Dr]; return all so far [B, S, ...]."""
        ...

    def get_seq_length(self) -> int:
        """Tokens already cached (before the current forward)."""
        ...


class DynamicLatentCache:
    """Contiguous per-layer latent cache that grows by concatenation (batch-synchronous)."""

    def __init__(self, num_layers: int) -> None:
        self.latent: list[torch.Tensor | None] = [None] * num_layers
        self.k_rope: list[torch.Tensor | None] = [None] * num_layers

    def update(
        self, layer_idx: int, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent[layer_idx] is None:
            self.latent[layer_idx], self.k_rope[layer_idx] = latent, k_rope
        else:
            self.latent[layer_idx] = torch.cat([self.latent[layer_idx], latent], dim=1)
            self.k_rope[layer_idx] = torch.cat([self.k_rope[layer_idx], k_rope], dim=1)
        return self.latent[layer_idx], self.k_rope[layer_idx]

    def get_seq_length(self) -> int:
        first = self.latent[0]
        return 0 if first is None else first.shape[1]

    def nbytes(self) -> int:
        """Bytes held: exactly (kv_lora_rank + qk_rope_head_dim) × dtype size per token per layer."""
        return sum(t.numel() * t.element_size() for t in self.latent + self.k_rope if t is not None)
