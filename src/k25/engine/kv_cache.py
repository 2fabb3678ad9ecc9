"""The engine's paged latent KV cache: a block pool, block tables and prefix caching.

MLA caches one `kv_lora_rank + qk_rope_head_dim` row per token per layer (the normalised latent
and the rotated shared key), so a cache "block" is `block_size` such rows in every layer, stored
side by side in one pool tensor `[layers, num_blocks * block_size, R + Dr]` (a 576-wide single
"head" for K2.5, as vLLM treats MLA). A sequence owns a list of block ids (its block table);
token `i` of a sequence lives at slot `table[i // block_size] * block_size + i % block_size`.

Prefix caching: a full block is identified by the hash of its tokens chained with the hash of
the block before it, so equal hashes mean equal prefixes (the tokens are compared too, to be
safe from collisions). Freed blocks keep their hash and contents until they are reused, so a
later request with the same prefix finds them (least recently freed are reused first).

:class:`PagedLatentView` is what the model sees for one forward: an object satisfying
:class:`k25.model.cache.LatentCache` that writes the new rows into their slots and returns each
row's whole context gathered from the pool (left-padded to a common length; the engine passes
the matching attention mask).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class CacheFullError(RuntimeError):
    """No free block is left (the scheduler preempts before this can happen)."""


def chain_hash(prev: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full block given the hash of the block before it (None for the first block)."""
    return hash((prev, tuple(tokens)))


class Block:
    __slots__ = ("id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int) -> None:
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] = ()


class BlockManager:
    """Allocates blocks to sequences, shares full blocks by chained hash, and frees them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        if not self.free:
            raise CacheFullError("the latent KV cache has no free block")
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.by_hash.get(block.hash) == bid:
            del self.by_hash[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return bid

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Ids of cached blocks holding the longest full-block prefix of `token_ids` (≤ max_tokens)."""
        out: list[int] = []
        prev: int | None = None
        bs = self.block_size
        for start in range(0, max_tokens - bs + 1, bs):
            tokens = tuple(token_ids[start : start + bs])
            h = chain_hash(prev, tokens)
            bid = self.by_hash.get(h)
            if bid is None or self.blocks[bid].tokens != tokens:
                break
            out.append(bid)
            prev = h
        return out

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (reviving them from the free list if needed)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                self.free.pop(bid)
            block.ref_count += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise CacheFullError(f"need {n} blocks, {len(self.free)} free")
        return [self._take_free() for _ in range(n)]

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block; unreferenced blocks go back to the free list (contents kept)."""
        for bid in reversed(block_ids):  # the tail first, so a prefix outlives its continuations
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {bid} released more often than acquired")
            if block.ref_count == 0:
                self.free[bid] = None

    def register_full(self, block_id: int, prev_hash: int | None, tokens: Sequence[int]) -> int:
        """Record a block whose rows are all computed, so later prompts can reuse it; returns its hash."""
        tokens = tuple(tokens)
        h = chain_hash(prev_hash, tokens)
        block = self.blocks[block_id]
        block.hash, block.tokens = h, tokens
        self.by_hash.setdefault(h, block_id)
        return h


class LatentPool:
    """Storage for every block of every layer: `[layers, num_blocks * block_size, R + Dr]`."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        # one extra row after the blocks: a scratch slot that padding positions write to and read from
        self.scratch = num_blocks * block_size
        self.rows = torch.zeros(num_layers, num_blocks * block_size + 1, kv_lora_rank + rope_dim, dtype=dtype,
                                device=device)

    @property
    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) × dtype size × layers."""
        layers, _, width = self.rows.shape
        return layers * width * self.rows.element_size()

    def nbytes(self) -> int:
        """Bytes held: `bytes_per_token` × (num_blocks × block_size + 1 scratch row)."""
        return self.rows.numel() * self.rows.element_size()


def slots_of(block_table: Sequence[int], start: int, stop: int, block_size: int) -> list[int]:
    """Pool slots of a sequence's tokens [start, stop)."""
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, stop)]


class PagedLatentView:
    """One forward's window onto the pool (satisfies `LatentCache`).

    Row b has `past_slots[b]` already cached (right-aligned in a common length `past`) and writes
    its `T` new rows to `new_slots[b]` (right-aligned too). Padding positions use the pool's
    scratch slot and must be masked by the caller. `update` returns `[B, past + T, ...]`: the
    gathered context then the new rows.
    """

    def __init__(self, pool: LatentPool, past_slots: torch.Tensor, new_slots: torch.Tensor) -> None:
        if past_slots.dim() != 2 or new_slots.dim() != 2 or past_slots.shape[0] != new_slots.shape[0]:
            raise ValueError(f"slot tables must be [B, S] and [B, T], got {tuple(past_slots.shape)}, "
                             f"{tuple(new_slots.shape)}")
        self.pool = pool
        self.past_slots = past_slots
        self.new_slots = new_slots
        self._flat_new = new_slots.reshape(-1)

    def get_seq_length(self) -> int:
        return self.past_slots.shape[1]

    def update(
        self, layer_idx: int, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.pool.rows[layer_idx]
        new = torch.cat([latent, k_rope], dim=-1)
        b, t, w = new.shape
        if (b, t) != tuple(self.new_slots.shape):
            raise ValueError(f"forward of shape {(b, t)} does not match the scheduled slots "
                             f"{tuple(self.new_slots.shape)}")
        rows.index_copy_(0, self._flat_new, new.reshape(b * t, w).to(rows.dtype))
        if self.past_slots.shape[1]:
            past = rows[self.past_slots].to(new.dtype)
            full = torch.cat([past, new], dim=1)
        else:
            full = new
        return full.split([self.pool.kv_lora_rank, self.pool.rope_dim], dim=-1)
