"""Expert parallelism for training: each rank holds ``E/world`` routed experts; tokens travel by all-to-all.

The layout of DeepSpeed-MoE and Megatron with the expert-parallel group equal to the data-parallel
ranks: the batch is split over ranks as in data parallelism, the router, attention, shared experts
and dense layers are replicated (their gradients summed over ranks), and the routed experts'
stacked ``[E, out, in]`` weights are split along the expert dimension, rank ``r`` owning experts
``[r·E/w, (r+1)·E/w)``. In each MoE layer:

1. every rank sorts its (token, expert) pairs by expert, so the pairs bound for each rank are
   contiguous, and the per-expert counts are exchanged (one small all-to-all);
2. the token rows go to their expert's owner (all-to-all with those split sizes), are regrouped by
   local expert and run through the same grouped matmul as :class:`k25.model.moe.Experts`;
3. the outputs go back by the reverse all-to-all and are weighted and summed exactly as the model does.

The all-to-all is differentiable (its backward is the reverse all-to-all), so an expert's gradient
arrives complete from every rank's tokens: expert parameters are *not* all-reduced. They carry an
:class:`ExpertShard` attribute that the trainer (gradient sum, gradient norm), :class:`MuonClip`
(local Newton–Schulz, update statistics summed over ranks) and checkpoints (gather to rank 0 in the
single-process format, slice on resume) look at. The model code knows nothing of this: the
``MoE.experts`` module is swapped for :class:`ExpertParallelExperts` at setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, MoE

SHARD_ATTR = "k25_expert_shard"


@dataclass(frozen=True)
class ExpertShard:
    """Where a rank's slice of an expert stack lies: rows ``[start, start + size)`` of ``n_experts``."""

    start: int
    size: int
    n_experts: int
    group: Any = None  # the expert-parallel process group (None: the default group)


def expert_shard(p: torch.Tensor) -> ExpertShard | None:
    """The shard description of an expert-parallel parameter, None for a replicated one."""
    return getattr(p, SHARD_ATTR, None)


def is_expert_parallel(p: torch.Tensor) -> bool:
    """True for a parameter that holds only this rank's experts (its gradient is complete locally)."""
    return expert_shard(p) is not None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> torch.Tensor:
    """Differentiable all-to-all of rows: ``in_splits[r]`` rows of ``x`` go to rank r, ``out_splits[r]`` come back."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(Experts):
    """This rank's slice of a layer's routed experts, with all-to-all token dispatch and combine.

    A drop-in for :class:`Experts` (same forward signature, same parameter names, so optimizer
    routing and QAT's ``weight_transform`` apply unchanged); ``n_experts`` stays the global count.
    """

    def __init__(self, experts: Experts, rank: int, world: int, group: Any = None) -> None:
        nn.Module.__init__(self)
        e = experts.n_experts
        if e % world:
            raise ValueError(f"expert parallelism needs n_routed_experts divisible by the number of ranks: "
                             f"{e} experts over {world} ranks")
        self.n_experts, self.n_local, self.world, self.group = e, e // world, world, group
        self.start = rank * self.n_local
        shard = ExpertShard(self.start, self.n_local, e, group)
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            p = nn.Parameter(full.detach()[self.start : self.start + self.n_local].clone(),
                             requires_grad=full.requires_grad)
            setattr(p, SHARD_ATTR, shard)
            setattr(self, name, p)
        self.weight_transform = experts.weight_transform

    def extra_repr(self) -> str:
        return f"experts {self.start}..{self.start + self.n_local - 1} of {self.n_experts}"

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, impl: str = "grouped"
    ) -> torch.Tensor:
        """x [N, H], idx/weights [N, k] → Σ_k weights·expert_idx(x), [N, H]; a collective over the group."""
        if impl != "grouped":
            raise ValueError(f"expert parallelism runs the grouped experts path, not {impl!r}")
        n, k = idx.shape
        world, n_local = self.world, self.n_local
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # pairs sorted by expert: each destination rank's rows are contiguous
        token = order // k
        counts = torch.bincount(flat, minlength=self.n_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [source rank, local expert] flattened
        recv_counts = recv_counts.view(world, n_local)
        send_splits = counts.view(world, n_local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x[token], recv_splits, send_splits, self.group)
        # rows arrive grouped by source rank, then by local expert; regroup by local expert (stable: by source)
        local_expert = torch.repeat_interleave(
            torch.arange(n_local, device=x.device).repeat(world), recv_counts.flatten())
        perm = local_expert.argsort(stable=True)
        ys = self._run_local(received[perm], recv_counts.sum(0).cumsum(0).to(torch.int32))
        returned = all_to_all(ys[perm.argsort()], send_splits, recv_splits, self.group)
        out = returned.float() * weights.reshape(-1)[order, None]
        return torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, out).to(x.dtype)

    def _run_local(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The model's grouped SwiGLU over rows sorted by local expert (``offsets``: cumulative counts)."""
        w_gate, w_up, w_down = self.weights()
        if xs.shape[0] == 0:
            # No rows for any local expert: grouped_mm's backward rejects empty inputs, but the graph must
            # still reach the weights (zero gradients) and the dispatch all-to-all (its backward is a collective).
            zero = (w_gate.sum() + w_up.sum() + w_down.sum() + xs.sum()) * 0
            return xs.new_zeros((0, w_down.shape[1])) + zero.to(xs.dtype)
        gate = F.grouped_mm(xs, w_gate.transpose(1, 2), offs=offsets)
        up = F.grouped_mm(xs, w_up.transpose(1, 2), offs=offsets)
        return F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)


def shard_experts(model: nn.Module, rank: int, world: int, group: Any = None) -> int:
    """Swap every MoE's routed experts for this rank's expert-parallel slice; returns the layers swapped.

    Checks every layer before changing any, so a bad expert count leaves the model untouched.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, Experts)]
    for m in layers:
        if m.experts.n_experts % world:
            raise ValueError(f"expert parallelism needs n_routed_experts divisible by the number of ranks: "
                             f"{m.experts.n_experts} experts over {world} ranks")
    for m in layers:
        m.experts = ExpertParallelExperts(m.experts, rank, world, group)
    return len(layers)


# ---- checkpoints: gather to the single-process format, slice on resume -----------------------------


def _gather_rows(local: torch.Tensor, shard: ExpertShard) -> torch.Tensor | None:
    """Concatenate every rank's slice along dim 0 on the group's first rank (others get None)."""
    group_rank = dist.get_rank(shard.group)
    dst = dist.get_global_rank(shard.group, 0) if shard.group is not None else 0
    world = dist.get_world_size(shard.group)
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(world)] if group_rank == 0 else None
    dist.gather(local, parts, dst=dst, group=shard.group)
    return torch.cat(parts).cpu() if parts is not None else None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict with whole expert stacks, on the first rank (None elsewhere); a collective."""
    local = model.state_dict(keep_vars=True)
    full: dict[str, torch.Tensor] = {}
    for name, t in local.items():
        shard = expert_shard(t)
        if shard is None:
            full[name] = t.detach().cpu()
        else:
            gathered = _gather_rows(t, shard)
            if gathered is not None:
                full[name] = gathered
    return full if (dist.get_rank() == 0) else None


def local_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full (single-process) state dict cut down to this rank's experts, for ``load_state_dict``."""
    out = dict(full)
    for name, t in model.state_dict(keep_vars=True).items():
        shard = expert_shard(t)
        if shard is not None:
            whole = full[name]
            if whole.shape[0] != shard.n_experts:
                raise ValueError(f"{name}: checkpoint has {whole.shape[0]} experts, the model {shard.n_experts}")
            out[name] = whole[shard.start : shard.start + shard.size]
    return out


def _expert_params(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, ExpertShard]]:
    """Optimizer state-dict index → (parameter, shard), for the expert-parallel parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: (p, s) for i, p in enumerate(params) if (s := expert_shard(p)) is not None}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with expert states (momentum, Adam moments) gathered whole; a collective.

    The result has the single-process layout; the first rank gets it, the others None.
    """
    sd = optimizer.state_dict()
    state = {i: dict(s) for i, s in sd["state"].items()}  # copies: state_dict() shares the live per-param dicts
    for i, (p, shard) in _expert_params(optimizer).items():
        for key in sorted(state.get(i, {})):  # the same order on every rank: each gather is a collective
            value = state[i][key]
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                state[i][key] = _gather_rows(value, shard)
    if dist.get_rank() != 0:
        return None
    return {**sd, "state": state}


def local_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict cut down to this rank's experts, for ``optimizer.load_state_dict``."""
    state = {i: dict(s) for i, s in full["state"].items()}
    for i, (p, shard) in _expert_params(optimizer).items():
        for key, value in state.get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == (shard.n_experts, *p.shape[1:]):
                state[i][key] = value[shard.start : shard.start + shard.size].clone()
    return {**full, "state": state}
