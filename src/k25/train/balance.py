"""MoE load balancing as DeepSeek-V3/K2 train: the auxiliary-loss-free bias update (+ optional seq-wise loss).

The router's ``e_score_correction_bias`` only picks experts (moe.py), so nudging it moves load
without touching the combine weights or the loss: after each optimizer step every expert's bias
moves by ``rate`` towards balance, ``b_i += rate·sign(mean_load − load_i)`` (DeepSeek-V3 §2.1.2;
Moonlight used rate 1e-3). The load is counted over all micro-batches (and ranks) of the step.
The small sequence-wise auxiliary loss of DeepSeek-V3 is available with ``alpha > 0``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class ExpertLoad:
    """Accumulates tokens routed to each expert, per MoE layer, across a step's micro-batches."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self.counts = [torch.zeros(m.gate.n_experts, dtype=torch.float64) for m in self.layers]

    def collect(self) -> None:
        """Add the routing of the forward just run (``MoE.last_routing``, set in training mode)."""
        for moe, count in zip(self.layers, self.counts, strict=True):
            if moe.last_routing is None:
                raise RuntimeError("MoE.last_routing is empty: run the forward in training mode before collect()")
            idx = moe.last_routing[0]
            count += torch.bincount(idx.reshape(-1).cpu(), minlength=count.numel()).double()
            moe.last_routing = None

    @torch.no_grad()
    def update_bias(self, rate: float) -> float:
        """Apply the bias update, reset the counts; returns the worst layer's max-load/mean-load ratio."""
        worst = 1.0
        if not self.layers:
            return worst
        stacked = torch.stack(self.counts)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        for moe, load in zip(self.layers, stacked, strict=True):
            mean = load.mean()
            if mean > 0:
                worst = max(worst, float(load.max() / mean))
                if rate:
                    bias = moe.gate.e_score_correction_bias
                    bias.add_(torch.sign(mean - load).to(bias.device, bias.dtype), alpha=rate)
        for count in self.counts:
            count.zero_()
        return worst


def sequence_aux_loss(model: nn.Module, batch: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``α Σ_i f_i P_i`` averaged over sequences and MoE layers.

    ``f_i = E/(K·T)·#(tokens of the sequence routed to i)``, ``P_i`` the mean over the sequence
    of the normalised affinities ``s_i / Σ_j s_j``. Uses the routing of the forward just run.
    """
    layers = moe_layers(model)
    total = torch.zeros(())
    for moe in layers:
        if moe.last_routing is None:
            raise RuntimeError("sequence_aux_loss needs MoE.last_routing (a training-mode forward)")
        idx, scores = moe.last_routing
        e, k = scores.shape[-1], idx.shape[-1]
        scores = scores.view(batch, -1, e)
        t = scores.shape[1]
        counts = torch.zeros(batch, e, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, idx.view(batch, -1), torch.ones_like(idx.view(batch, -1), dtype=scores.dtype))
        f = counts * e / (k * t)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        total = total + (f * p).sum(-1).mean()
    return alpha * total / max(1, len(layers))
