"""The K2.5 text model: decoder layers and the causal LM head (DeepSeek-V3 architecture).

Module names mirror the checkpoint (`model.embed_tokens`, `model.layers.N.self_attn.q_a_proj`,
`model.layers.N.mlp.gate`, `lm_head`, ...); only the routed experts are stacked (see moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .attention import AttentionImpl, MLAttention
from .cache import LatentCache
from .layers import RMSNorm, SwiGLU
from .moe import ExpertsImpl, MoE, Router
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: `h = x + Attn(norm(x)); out = h + MLP(norm(h))`."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        self.mlp: nn.Module = (
            MoE(config) if config.is_moe_layer(layer_idx) else SwiGLU(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class K25TextModel(nn.Module):
    """Embedding → decoder layers → final norm (the checkpoint's `model.` prefix)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm.

        `attention_mask` [B, S] marks real (1) and padding (0) tokens over cache + input;
        `position_ids` [B, T] default to `past + arange(T)`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            vocab = self.config.vocab_size
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
                raise ValueError(f"token id {bad} is outside the vocabulary (vocab_size={vocab})")
            inputs_embeds = self.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=inputs_embeds.device).expand(b, t)
        mask = build_attention_mask(attention_mask, b, t, past, inputs_embeds.device)
        cos, sin = self.rotary_emb(position_ids)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)


def build_attention_mask(
    attention_mask: torch.Tensor | None, b: int, t: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask (True = attend): causal over the sequence, padding keys removed.

    None when plain causal attention over an empty cache suffices. Padding queries may attend to
    themselves so no row is empty (their outputs are never used, but must stay finite).
    """
    s = past + t
    if attention_mask is None and past == 0:
        return None
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(b, 1, t, s)
    if attention_mask is not None:
        if attention_mask.shape != (b, s):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, s)} (batch, cached + new)"
            )
        keys = attention_mask.to(torch.bool)[:, None, None, :]
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


class K25ForCausalLM(nn.Module):
    """The text model plus its untied `lm_head`; returns logits (fp32 upcast left to the caller)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = K25TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or the last `logits_to_keep` positions)."""
        h = self.model(
            input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
            attention_mask=attention_mask, cache=cache,
        )
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def set_impl(self, attention: AttentionImpl | None = None, experts: ExpertsImpl | None = None) -> None:
        """The one switch between reference and fast paths (see attention.py and moe.py)."""
        if attention not in (None, "naive", "absorbed"):
            raise ValueError(f"attention impl {attention!r}: expected 'naive' or 'absorbed'")
        if experts not in (None, "grouped", "dense"):
            raise ValueError(f"experts impl {experts!r}: expected 'grouped' or 'dense'")
        for m in self.modules():
            if attention and isinstance(m, MLAttention):
                m.impl = attention
            if experts and isinstance(m, MoE):
                m.impl = experts

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init as DeepSeek/HF do: normal(0, initializer_range) weights, unit norms, zero bias."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Router):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                m.e_score_correction_bias.zero_()
        for name, p in self.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
