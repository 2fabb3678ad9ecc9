"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Every step spends at most `max_num_batched_tokens`. Running sequences go first (a decoding one
feeds 1 token; one in the middle of a long prompt feeds the next chunk), then waiting ones are
admitted in arrival order while the budget, `max_num_seqs` and free blocks allow (chunked
prefill: a prompt longer than what is left of the budget is split across steps). A newly
admitted prompt first takes whatever full blocks of it the prefix cache holds.

When a running sequence needs a block and none is free, the most recently admitted running
sequence is preempted: its blocks are released and it goes back to the front of the queue to
be recomputed later (often largely from the prefix cache, since its blocks stay cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class Scheduled:
    """One step's work: (sequence, tokens to feed) pairs, and who was preempted to make room."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig) -> None:
        self.blocks = blocks
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        max_len = len(seq) + (seq.params.max_tokens or 0)
        need = self.blocks.blocks_for(max_len)
        if need > len(self.blocks.blocks):
            raise ValueError(
                f"request {seq.request_id}: prompt {len(seq)} + max_tokens {seq.params.max_tokens} tokens need "
                f"{need} cache blocks, the cache has {len(self.blocks.blocks)} (raise num_blocks or lower max_tokens)"
            )
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Scheduled:
        out = Scheduled()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
            while need > self.blocks.num_free:
                victim = self.running[-1]
                if victim.request_id in scheduled:  # never drop work already placed in this step
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # it preempted itself; self.running[i] is now the next one
            if need > self.blocks.num_free:
                break  # everything after it was preempted and it still does not fit: wait a step
            seq.block_table += self.blocks.allocate(max(need, 0))
            out.items.append((seq, n))
            scheduled.add(seq.request_id)
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits: list[int] = []
            if self.config.enable_prefix_caching:
                hits = self.blocks.match_prefix(seq.cache_keys, len(seq) - 1)  # leave one token to compute
            cached = len(hits) * self.blocks.block_size
            n = min(len(seq) - cached, budget)
            need = self.blocks.blocks_for(cached + n) - len(hits)
            revived = sum(1 for b in hits if self.blocks.blocks[b].ref_count == 0)
            if need > self.blocks.num_free - revived:
                break
            self.blocks.acquire(hits)
            seq.block_table = hits + self.blocks.allocate(need)
            seq.block_hashes = [self.blocks.blocks[b].hash for b in hits]
            seq.num_computed = cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(cached, len(seq.prompt_ids))
            seq.status = Status.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            out.items.append((seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    def advance(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` are now in the cache: register its newly full blocks for reuse."""
        seq.num_computed += n
        if not self.config.enable_prefix_caching:
            return
        bs = self.blocks.block_size
        tokens = None
        for j in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tokens if tokens is not None else seq.cache_keys
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(self.blocks.register_full(seq.block_table[j], prev, tokens[j * bs : (j + 1) * bs]))

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
