"""The serving engine: requests in, tokens out, many requests sharing each forward.

`LLMEngine.step()` asks the scheduler what to run, runs it, samples, and reports. One step may
hold several forwards: all sequences that feed a single token (decodes) go through one batched
forward with the absorbed attention; each prompt chunk goes through its own forward with the
naive (expanded) attention, which is the efficient form for many query tokens. Both read and
write the same paged latent pool through a :class:`PagedLatentView`, so the model itself knows
nothing of blocks, batching or requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.attention import MLAttention
from ..model.transformer import K25ForCausalLM
from .experts import install_experts
from .kv_cache import BlockManager, LatentPool, PagedLatentView
from .sampling import SampleRow, SamplingParams, TokenLogprobs, make_generator, sample
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, Status


@dataclass
class EngineConfig:
    """Engine sizing and kernel choices.

    The cache holds `num_blocks × block_size` tokens over all requests (default: enough for
    `cache_tokens`). `experts`: "fused" (selected experts only, full precision), "int4"
    (quantise routed experts to INT4 and keep them packed) or "reference" (the model's own).
    """

    block_size: int = 16
    num_blocks: int | None = None
    cache_tokens: int = 32768
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    decode_attention: str = "absorbed"
    prefill_attention: str = "naive"
    experts: str = "fused"
    cache_dtype: torch.dtype | None = None

    def blocks(self) -> int:
        return self.num_blocks if self.num_blocks is not None else -(-self.cache_tokens // self.block_size)


@dataclass
class RequestOutput:
    """A request's state after a step: every token so far, the ones new in this step, and why it ended."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    new_ids: list[int]
    text: str
    new_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_preemptions: int = 0


class LLMEngine:
    """Continuous-batching generation over a paged latent cache.

    `tokenizer` (optional, a :class:`k25.chat.KimiTokenizer`) enables stop strings and text
    output, and adds `<|im_end|>` to the stop ids. The engine installs its expert kernels into
    `model` (same weights; see experts.py).
    """

    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None, tokenizer: Any = None) -> None:
        self.config = config or EngineConfig()
        self.model = _text_model(model).eval()
        self.tokenizer = tokenizer
        text = self.model.config
        dtype = self.config.cache_dtype or next(self.model.parameters()).dtype
        install_experts(self.model, self.config.experts)
        self.attention = [m for m in self.model.modules() if isinstance(m, MLAttention)]
        for name in (self.config.decode_attention, self.config.prefill_attention):
            if name not in ("naive", "absorbed"):
                raise ValueError(f"attention impl {name!r}: expected 'naive' or 'absorbed'")
        self.blocks = BlockManager(self.config.blocks(), self.config.block_size)
        self.pool = LatentPool(text.num_hidden_layers, self.config.blocks(), self.config.block_size,
                               text.kv_lora_rank, text.qk_rope_head_dim, dtype=dtype)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(
            self.config.max_num_seqs, self.config.max_num_batched_tokens, self.config.enable_prefix_caching))
        self.max_model_len = text.max_position_embeddings
        eos = text.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        if tokenizer is not None:
            self.eos_ids |= {tokenizer.im_end_id}
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.stats = {"steps": 0, "forwards": 0, "prompt_tokens": 0, "decode_tokens": 0}

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self, prompt_ids: Iterable[int], params: SamplingParams | None = None, request_id: str | None = None,
        media_embeds: torch.Tensor | None = None, media_token_id: int | None = None,
    ) -> str:
        """Queue a request. With media, the prompt holds one `media_token_id` per row of
        `media_embeds` [M, hidden] (the vision tower's output, in order); those rows replace the
        placeholders' embeddings whenever the prompt is (re)computed."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token id")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (vocab_size={vocab})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_position_embeddings={self.max_model_len}")
        if params.stop_list and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (pass tokenizer= or use stop_token_ids)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, arrival=next(self._arrivals))
        if media_embeds is not None:
            _attach_media(seq, media_embeds, media_token_id, self.model.config.hidden_size)
        seq.generator = make_generator(params.seed)
        seq.eos_ids = frozenset() if params.ignore_eos else self.eos_ids
        seq.stop_ids = frozenset(params.stop_token_ids or [])
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.stream_decoder()
        if params.max_tokens == 0:
            seq.status, seq.finish_reason, seq.num_cached_tokens = Status.FINISHED, "length", 0
        else:
            self.scheduler.add(seq)
        self.sequences[request_id] = seq
        return request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are freed at once. False if it was unknown or already done."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def output(self, request_id: str, new_ids: list[int] | None = None, new_text: str = "") -> RequestOutput:
        seq = self.sequences[request_id]
        return RequestOutput(
            seq.request_id, list(seq.prompt_ids), list(seq.output_ids), new_ids or [], seq.text, new_text,
            seq.is_finished, seq.finish_reason, seq.stop_reason, seq.num_cached_tokens or 0, list(seq.logprobs),
            seq.num_preemptions,
        )

    def release(self, request_id: str) -> None:
        """Forget a finished request (its outputs were collected)."""
        seq = self.sequences.get(request_id)
        if seq is not None and seq.is_finished:
            del self.sequences[request_id]

    # ---- stepping ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; report the requests that produced a token or finished."""
        work = self.scheduler.schedule()
        if not work.items:
            if self.scheduler.running or self.scheduler.waiting:
                raise RuntimeError("the scheduler could not place any request (cache too small for one block?)")
            return []
        self.stats["steps"] += 1
        decodes = [s for s, n in work.items if n == 1]
        chunks = [(s, n) for s, n in work.items if n > 1]
        ready: list[tuple[Sequence, torch.Tensor]] = []
        if decodes:
            logits = self._forward_decode(decodes)
            ready += [(s, logits[i]) for i, s in enumerate(decodes) if s.num_pending == 0]
        for group in _pack(chunks):
            logits = self._forward_prefill(group)
            ready += [(s, logits[i]) for i, (s, _) in enumerate(group) if s.num_pending == 0]
        return self._sample(ready)

    def _set_attention(self, impl: str) -> None:
        for m in self.attention:
            m.impl = impl

    def _slots(self, seq: Sequence, start: int, stop: int) -> torch.Tensor:
        bs = self.blocks.block_size
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return (table[:, None] * bs + torch.arange(bs)).flatten()[start:stop]

    def _forward_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each of `seqs`: a batched forward, contexts left-padded to a common length."""
        lens = [s.num_computed for s in seqs]
        past = max(lens)
        b = len(seqs)
        past_slots = torch.zeros(b, past, dtype=torch.long)
        new_slots = torch.empty(b, 1, dtype=torch.long)
        mask = torch.ones(b, past + 1, dtype=torch.long) if any(c != past for c in lens) else None
        for i, (s, c) in enumerate(zip(seqs, lens, strict=True)):
            slots = self._slots(s, 0, c + 1)
            past_slots[i, past - c :] = slots[:c]
            new_slots[i, 0] = slots[c]
            if mask is not None:
                mask[i, : past - c] = 0
        ids = torch.tensor([[s.token_at(c)] for s, c in zip(seqs, lens, strict=True)])
        pos = torch.tensor([[c] for c in lens])
        self._set_attention(self.config.decode_attention)
        logits = self.model(ids, position_ids=pos, attention_mask=mask,
                            cache=PagedLatentView(self.pool, past_slots, new_slots))
        self.stats["forwards"] += 1
        self.stats["decode_tokens"] += b
        for s in seqs:
            self.scheduler.advance(s, 1)
        return logits[:, -1]

    def _forward_prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Prompt chunks of several sequences in one forward (weights read once); last-position logits [B, V].

        Row i is laid out right-aligned: keys `[pad][cached c_i][pad][new n_i]` over `max c + max n`
        columns, queries `[pad][new n_i]`; the attention mask hides the padding, which reads and
        writes the pool's scratch slot. A single chunk needs no padding and no mask.
        """
        past = max(s.num_computed for s, _ in chunks)
        t = max(n for _, n in chunks)
        b = len(chunks)
        scratch = self.pool.scratch
        past_slots = torch.full((b, past), scratch, dtype=torch.long)
        new_slots = torch.full((b, t), scratch, dtype=torch.long)
        ids = torch.zeros(b, t, dtype=torch.long)
        pos = torch.zeros(b, t, dtype=torch.long)
        mask = torch.zeros(b, past + t, dtype=torch.long)
        for i, (seq, n) in enumerate(chunks):
            c = seq.num_computed
            slots = self._slots(seq, 0, c + n)
            past_slots[i, past - c :] = slots[:c]
            new_slots[i, t - n :] = slots[c:]
            ids[i, t - n :] = torch.tensor(seq.token_ids[c : c + n])
            pos[i, t - n :] = torch.arange(c, c + n)
            mask[i, past - c : past] = 1
            mask[i, past + t - n :] = 1
        self._set_attention(self.config.prefill_attention)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        if any(seq.media_embeds is not None for seq, _ in chunks):
            inputs = {"inputs_embeds": self._embed_with_media(ids, chunks, t)}
        logits = self.model(**inputs, position_ids=pos, attention_mask=None if bool(mask.all()) else mask,
                            cache=PagedLatentView(self.pool, past_slots, new_slots), logits_to_keep=1)
        self.stats["forwards"] += 1
        for seq, n in chunks:
            self.stats["prompt_tokens"] += n
            self.scheduler.advance(seq, n)
        return logits[:, -1]

    def _embed_with_media(self, ids: torch.Tensor, chunks: list[tuple[Sequence, int]], t: int) -> torch.Tensor:
        """Token embeddings of a prefill batch with the media rows scattered into their positions."""
        emb = self.model.model.embed_tokens(ids)
        for i, (seq, n) in enumerate(chunks):
            if seq.media_embeds is None:
                continue
            c = seq.num_computed
            for k, p in enumerate(seq.media_positions):
                if c <= p < c + n:
                    emb[i, t - n + (p - c)] = seq.media_embeds[k].to(emb.dtype)
        return emb

    def _sample(self, ready: list[tuple[Sequence, torch.Tensor]]) -> list[RequestOutput]:
        if not ready:
            return []
        seqs = [s for s, _ in ready]
        rows = [SampleRow(s.params, s.prompt_ids, s.output_ids, s.generator) for s in seqs]
        banned = [sorted(s.eos_ids | s.stop_ids) if len(s.output_ids) < s.params.min_tokens else [] for s in seqs]
        logits = torch.stack([lg for _, lg in ready])
        for i, seq in enumerate(seqs):  # constrained decoding: only grammar-valid tokens remain
            if seq.params.constraint is not None:
                logits[i].masked_fill_(~seq.params.constraint.allowed(logits.shape[-1]), float("-inf"))
        tokens, lps = sample(logits, rows, banned)
        outs = []
        for seq, tok, lp in zip(seqs, tokens, lps, strict=True):
            if seq.params.constraint is not None:
                seq.params.constraint.accept(tok)
            seq.output_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            new_text = self._check_stop(seq, tok)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            outs.append(self.output(seq.request_id, [tok], new_text))
        return outs

    def _check_stop(self, seq: Sequence, tok: int) -> str:
        """Set `finish_reason` when `tok` ends the request; return the text it adds."""
        p = seq.params
        if tok in seq.eos_ids or tok in seq.stop_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = None if tok in seq.eos_ids and tok not in seq.stop_ids else tok
            return ""
        new_text = ""
        if seq.decoder is not None:
            new_text = seq.decoder.push(tok)
            if p.stop_list and new_text:
                before = len(seq.text)
                seq.text += new_text
                window = max(len(s) for s in p.stop_list) + len(new_text)
                start = max(0, len(seq.text) - window)
                hits = [(seq.text.find(s, start), s) for s in p.stop_list]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    seq.text = seq.text[: i + len(s) if p.include_stop_str_in_output else i]
                    seq.finish_reason, seq.stop_reason = "stop", s
                    return seq.text[before:]
            else:
                seq.text += new_text
        if p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
        return new_text

    # ---- convenience -------------------------------------------------------------------------

    def run(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
            request_kwargs: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Generate for all `prompts` to completion (continuous batching); outputs in prompt order.

        `request_kwargs`: per prompt, more arguments for :meth:`add_request` (e.g. media embeddings).
        """
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        extra = list(request_kwargs) if request_kwargs is not None else [{}] * len(prompts)
        if len(extra) != len(prompts):
            raise ValueError(f"{len(extra)} request_kwargs for {len(prompts)} prompts")
        ids = [self.add_request(p, sp, **kw) for p, sp, kw in zip(prompts, plist, extra, strict=True)]
        while self.has_unfinished():
            self.step()
        outs = [self.output(i) for i in ids]
        for i in ids:
            self.release(i)
        return outs

    def cache_usage(self) -> dict[str, int]:
        return {"blocks": len(self.blocks.blocks), "free_blocks": self.blocks.num_free,
                "bytes": self.pool.nbytes(), "bytes_per_token": self.pool.bytes_per_token}


def _pack(chunks: list[tuple[Sequence, int]], waste: float = 1.5) -> list[list[tuple[Sequence, int]]]:
    """Group prompt chunks into forwards, longest first, while padding stays under `waste`× the real tokens."""
    groups: list[list[tuple[Sequence, int]]] = []
    for item in sorted(chunks, key=lambda sn: -sn[1]):
        g = groups[-1] if groups else None
        if g is not None:
            real = sum(n for _, n in g) + item[1]
            padded = (len(g) + 1) * g[0][1] + (len(g) + 1) * max(s.num_computed for s, _ in [*g, item])
            if padded <= waste * (real + sum(s.num_computed for s, _ in [*g, item])):
                g.append(item)
                continue
        groups.append([item])
    return groups


def _text_model(model: torch.nn.Module) -> K25ForCausalLM:
    if isinstance(model, K25ForCausalLM):
        return model
    inner = getattr(model, "language_model", None)
    if isinstance(inner, K25ForCausalLM):
        return inner
    raise TypeError(f"expected a K25ForCausalLM or K25ForConditionalGeneration, got {type(model).__name__}")


def _attach_media(seq: Sequence, embeds: torch.Tensor, token_id: int | None, hidden: int) -> None:
    """Check media rows against the prompt's placeholders and derive their prefix-cache keys."""
    import hashlib

    if token_id is None:
        raise ValueError("media_embeds need media_token_id (the <|media_pad|> id the prompt uses)")
    positions = [i for i, t in enumerate(seq.prompt_ids) if t == token_id]
    if embeds.dim() != 2 or embeds.shape[1] != hidden:
        raise ValueError(f"media_embeds must be [n, hidden_size={hidden}], got {tuple(embeds.shape)}")
    if embeds.shape[0] != len(positions):
        raise ValueError(f"the prompt holds {len(positions)} media placeholder tokens (id {token_id}) "
                         f"but media_embeds has {embeds.shape[0]} rows")
    digest = hashlib.blake2b(embeds.detach().float().contiguous().numpy().tobytes(), digest_size=8).digest()
    base = int.from_bytes(digest, "little") >> 2
    keys = list(seq.prompt_ids)
    for k, p in enumerate(positions):  # negative: never equal to a real token id
        keys[p] = -1 - ((base + k) % (1 << 62))
    seq.media_embeds, seq.media_positions, seq.media_keys = embeds.detach(), positions, keys
