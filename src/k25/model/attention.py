"""Multi-head Latent Attention (MLA), with the naive (expanded) and the absorbed formulation.

Per layer (bias-free):

* query: ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` → per head ``q_nope | q_rope``;
* ``kv_a_proj_with_mqa(x)`` → ``latent | k_rope`` (one rope key shared by all heads);
* ``kv_b_proj(kv_a_layernorm(latent))`` → per head ``k_nope | v``.

Both paths cache only ``kv_a_layernorm(latent)`` and the rotated ``k_rope``.

* ``naive``: expand the cached latent through ``kv_b_proj`` into full keys/values, then SDPA.
  The reference path; also the efficient one for long prefills.
* ``absorbed``: fold ``kv_b_proj``'s key half into the query and its value half into the
  output, so attention runs directly over the latent (multi-query, head dim
  ``kv_lora_rank + qk_rope_head_dim``). The decode path of the real engines.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .cache import LatentCache
from .layers import RMSNorm
from .rope import apply_rope

AttentionImpl = Literal["naive", "absorbed"]

# The latent norms are built without an explicit eps in the official remote code and in
# transformers, i.e. eps=1e-6 (vLLM/SGLang use rms_norm_eps=1e-5); we follow the official code.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.softmax_scale = config.softmax_scale()
        self.impl: AttentionImpl = "naive"
        # QK-Clip (train/muon.py) sets this; the forward then keeps the running per-head max of the
        # scaled pre-softmax logits over attended positions in `max_logits` [nH] fp32 (outputs unchanged).
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None
        h = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, H]; cos/sin [B, T, Dr/2]; mask bool [B, 1, T, S] (True = attend) or None = causal."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.num_heads, self.qk_head_dim).transpose(1, 2)  # [B, nH, T, Dq]
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None])

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope(k_rope, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(self.layer_idx, latent, k_rope)

        if self.impl == "absorbed":
            out = self._absorbed(q_nope, q_rope, latent, k_rope, mask)
        else:
            out = self._naive(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_head_dim))

    def _naive(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self._sdpa(q, k, v, mask)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = _per_head(q_nope, w_uk)  # [B, nH, T, R]: the key up-projection folded into q
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]  # [B, 1, S, R + Dr], shared by all heads
        b, nh, t, _ = q.shape
        if t == 1 and not self.record_max_logits:
            # Decode: one query per head over one shared key, so fold the heads into the query axis
            # (plain attention; SDPA's GQA path copies the key per head and is far slower on CPU).
            o = F.scaled_dot_product_attention(q.view(b, 1, nh, -1), k, latent[:, None], attn_mask=mask,
                                               scale=self.softmax_scale)
            o_latent = o.view(b, nh, 1, -1)
        else:
            o_latent = self._sdpa(q, k, latent[:, None], mask)  # [B, nH, T, R]
        return _per_head(o_latent, w_uv.transpose(1, 2))  # value up-projection folded into the output

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        if self.record_max_logits:
            self._record_max_logits(q, k, mask)
        if mask is None:
            causal = q.shape[-2] > 1
            if causal and q.shape[-2] != k.shape[-2]:
                raise ValueError("a causal forward over a non-empty cache needs an explicit mask")
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
            )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
        )

    @torch.no_grad()
    def _record_max_logits(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Fold this forward's per-head max of `scale·q·k` over attended (q, k) pairs into `max_logits`.

        Same q/k as SDPA sees, so naive and absorbed paths record the same value; the running max
        spans micro-batches until the optimizer resets it (None).
        """
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale  # [B, nH, T, S]
        t, s = logits.shape[-2:]
        if mask is None:
            if t > 1:  # causal over an empty cache (see _sdpa)
                allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
                logits = logits.masked_fill(~allowed, float("-inf"))
        elif mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:  # additive float mask, as SDPA takes it
            logits = logits + mask.float()
        head_max = logits.amax(dim=(0, 2, 3))
        self.max_logits = head_max if self.max_logits is None else torch.maximum(self.max_logits, head_max)


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, nH, T, D] @ w [nH, D, E] per head as one bmm over [nH, B·T, D] (a broadcast matmul
    would copy w once per batch row)."""
    b, nh, t, d = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(nh, b * t, d), w)
    return out.view(nh, b, t, -1).transpose(0, 1)
