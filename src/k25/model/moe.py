"""Mixture of experts: sigmoid router with a selection-only bias, routed experts, shared expert.

Routed expert weights are stacked per projection ([E, out, in], the checkpoint's per-expert
``weight`` matrices one after another), so all selected experts of a batch run as one grouped
matmul. The checkpoint layer maps ``experts.E.gate_proj.weight`` ↔ ``experts.gate_proj[E]``.

Two ways to run the routed experts, chosen by ``MoE.impl``:

* ``grouped``: sort the (token, expert) pairs by expert and run ``F.grouped_mm`` — no Python
  loop over tokens or experts;
* ``dense``: the plain reference — every expert on every token, masked combine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .layers import KeepFP32Buffers, SwiGLU

ExpertsImpl = Literal["grouped", "dense"]


class Router(KeepFP32Buffers):
    """DeepSeek-V3 `noaux_tc` routing: sigmoid scores in fp32; the correction bias picks, never weighs."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] → (combine weights [N, k] fp32, expert ids [N, k], scores [N, E] fp32)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // self.n_group, dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, idx, scores


class Experts(nn.Module):
    """The routed SwiGLU experts, stacked: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        # Training only: a transform of the weights before use (quantization-aware training sets
        # a fake INT4 round trip here); None at inference.
        self.weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) as the forward pass uses them."""
        ws = (self.gate_proj, self.up_proj, self.down_proj)
        if self.weight_transform is None:
            return ws
        return tuple(self.weight_transform(w) for w in ws)  # type: ignore[return-value]

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, impl: ExpertsImpl = "grouped"
    ) -> torch.Tensor:
        """x [N, H], idx/weights [N, k] → Σ_k weights·expert_idx(x), [N, H] in x's dtype."""
        if impl == "dense":
            return self._dense(x, idx, weights)
        n, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        offsets = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)
        xs = x[token]
        w_gate, w_up, w_down = self.weights()
        gate = F.grouped_mm(xs, w_gate.transpose(1, 2), offs=offsets)
        up = F.grouped_mm(xs, w_up.transpose(1, 2), offs=offsets)
        ys = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)
        ys = ys.float() * weights.reshape(-1)[order, None]
        return torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, ys).to(x.dtype)

    def _dense(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference: run every expert on every token; weight by the routing (zero if unselected)."""
        combine = torch.zeros(x.shape[0], self.n_experts, dtype=torch.float32, device=x.device)
        combine.scatter_add_(1, idx, weights.float())
        out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
        w_gate, w_up, w_down = self.weights()
        for e in range(self.n_experts):
            h = F.silu(x @ w_gate[e].T) * (x @ w_up[e].T)
            out += (h @ w_down[e].T).float() * combine[:, e : e + 1]
        return out.to(x.dtype)


class MoE(nn.Module):
    """Routed experts plus the always-on shared expert (names as in the checkpoint)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.impl: ExpertsImpl = "grouped"
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (idx, scores) for balancing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat)
        if self.training:
            self.last_routing = (idx, scores)
        out = self.experts(flat, idx, weights, self.impl).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
