"""Rotary position embedding for MLA: YaRN-scaled frequencies, interleaved (GPT-J) pairs.

Kimi K2/K2.5 rotate only the `qk_rope_head_dim` slice of each query and the shared key, and
pair dimensions as (0,1), (2,3), ... (the DeepSeek layout; vLLM ``is_neox_style=False``).
Outputs keep that interleaved layout, so cached rotated keys are in checkpoint order.
"""

from __future__ import annotations

import math

import torch

from ..config import TextConfig, yarn_mscale
from .layers import KeepFP32Buffers


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """YaRN inverse frequencies: extrapolate high-frequency pairs, interpolate low ones, ramp between.

    The ramp runs over pair indices [low, high], where `low`/`high` are the pair indices whose
    wavelength completes `beta_fast`/`beta_slow` rotations in the original context.
    """
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a single-slot ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def rope_parameters(config: TextConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, cos/sin multiplier) for a text config; the multiplier is 1.0 for every Kimi model."""
    dim = config.qk_rope_head_dim
    rs = config.rope_scaling or {}
    if config.rope_type != "yarn":
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
    factor = float(rs["factor"])
    inv_freq = yarn_inv_freq(
        dim,
        config.rope_theta,
        factor,
        int(rs["original_max_position_embeddings"]),
        float(rs.get("beta_fast") or 32.0),
        float(rs.get("beta_slow") or 1.0),
        bool(rs.get("truncate", True)),
    )
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, float(rs["mscale"])) / yarn_mscale(factor, float(rs["mscale_all_dim"]))
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(KeepFP32Buffers):
    """Computes (cos, sin) of shape [..., rope_dim/2] for integer positions, in fp32."""

    fp32_buffers = ("inv_freq",)

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset(self) -> None:
        """Recompute the frequencies (after the model was built on the meta device)."""
        self.inv_freq = rope_parameters(self.config)[0].to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` [..., T, rope_dim] by angles given as cos/sin [..., T, rope_dim/2].

    Computed in fp32 and returned in `x`'s dtype; the output stays interleaved.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
