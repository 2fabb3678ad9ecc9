"""MuonClip: Muon for hidden matrices, AdamW for the rest, and MLA-aware QK-Clip (spec training.md §1–§4).

One ``torch.optim.Optimizer`` holds both kinds of parameter group (``use_muon`` True/False) so
the trainer, the LR schedule and checkpoints see a single optimizer and a single state dict.

* Muon groups: Nesterov momentum (the EMA form of ``torch.optim.Muon``), quintic Newton–Schulz
  orthogonalisation in bf16, update scaled by ``0.2·sqrt(max(n, m))`` so its RMS matches
  AdamW's (Moonlight eq. 4), decoupled weight decay with the unadjusted lr. ``torch.optim.Muon``
  does exactly this for one 2-D matrix at a time; we need the same maths batched over the
  stacked ``[E, out, in]`` routed experts (each expert its own matrix), so the update is written
  here and tested equal to ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` on 2-D params.
* AdamW groups: ``torch.optim.adam.adam`` with decoupled weight decay (foreach), i.e. AdamW.
* QK-Clip (K2 report Algorithm 1): attention layers record their per-head max logit during the
  forward (``MLAttention.record_max_logits``); after the step every head with ``S > τ`` gets
  ``γ = τ/S``: ``√γ`` on its no-RoPE query rows and its key rows in ``kv_b_proj``, ``γ`` on its
  RoPE query rows; the shared RoPE key (``kv_a_proj_with_mqa``) is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adam import adam as adam_functional

from ..model.attention import MLAttention
from .expert_parallel import is_expert_parallel

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic; the same as torch.optim.Muon's
RMS_MATCH = 0.2  # AdamW's typical update RMS (Moonlight §2.1)


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximate ``U Vᵀ`` of ``g``'s SVD (singular values pushed into about [0.7, 1.2]).

    Batched over leading dims: a ``[E, n, m]`` stack orthogonalises each ``[n, m]`` slice on its
    own. Works on the smaller Gram matrix (transposes tall matrices) after dividing by the
    Frobenius norm, which bounds the spectral norm by 1. Returns ``dtype``.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    if not 0 < steps < 100:
        raise ValueError(f"newton_schulz steps must be in 1..99, got {steps}")
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    x = x.reshape(shape)
    return x.mT if tall else x


def muon_lr_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """``0.2·sqrt(max(n, m))`` for one ``[n, m]`` matrix (the last two dims): RMS-matched to AdamW."""
    n, m = shape[-2], shape[-1]
    return RMS_MATCH * math.sqrt(max(n, m))


@dataclass
class ClipStats:
    """What the last QK-Clip saw: per-layer per-head max logits (pre-clip) and the heads it scaled."""

    max_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # layer_idx -> [nH] fp32
    clipped: dict[int, list[int]] = field(default_factory=dict)  # layer_idx -> head indices

    @property
    def max_logit(self) -> float:
        """The largest per-head max logit over all layers (nan when nothing was recorded)."""
        if not self.max_logits:
            return float("nan")
        return max(float(v.max()) for v in self.max_logits.values())

    @property
    def num_clipped(self) -> int:
        return sum(len(v) for v in self.clipped.values())

    @property
    def num_heads(self) -> int:
        return sum(v.numel() for v in self.max_logits.values())


def _scale_rows(weight: torch.Tensor, factor: torch.Tensor) -> None:
    """``weight[r] *= factor[r]`` in place, for a plain tensor or an FSDP2 row-sharded DTensor."""
    if isinstance(weight, DTensor):
        if any(not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)) for pl in weight.placements):
            # k25's FSDP2 shards dim 0; a column-sharded q/kv weight would need a gather first.
            raise ValueError(f"QK-Clip on a DTensor needs row (Shard(0)) or replicated placement, "
                             f"got {weight.placements}")
        factor = distribute_tensor(factor.view(-1, 1).to(weight.dtype), weight.device_mesh, weight.placements,
                                   src_data_rank=None)
        weight.mul_(factor)
    else:
        weight.mul_(factor.view(-1, 1).to(weight.dtype))


@torch.no_grad()
def qk_clip_layer(attn: MLAttention, max_logits: torch.Tensor, tau: float, alpha: float = 0.5) -> list[int]:
    """Rescale one MLA layer's heads whose max logit exceeds ``tau``; returns the clipped heads.

    The logit is ``q_nopeᵀk_nope + q_ropeᵀk_rope``; ``γ^α`` on q_nope rows and ``γ^(1-α)`` on
    k_nope rows scale the first term by γ, ``γ`` on q_rope rows (k_rope shared, untouched)
    scales the second. Unclipped heads are multiplied by exactly 1.0, so stay bit-identical.
    """
    if max_logits.shape != (attn.num_heads,):
        raise ValueError(f"layer {attn.layer_idx}: max_logits has shape {tuple(max_logits.shape)}, "
                         f"expected ({attn.num_heads},) (one per head)")
    if not torch.isfinite(max_logits).all():
        raise FloatingPointError(f"layer {attn.layer_idx}: non-finite max attention logit {max_logits.tolist()}")
    over = max_logits > tau
    if not bool(over.any()):
        return []
    gamma = torch.where(over, tau / max_logits, torch.ones_like(max_logits)).float()
    g_q = gamma.sqrt() if alpha == 0.5 else gamma.pow(alpha)
    g_k = gamma.sqrt() if alpha == 0.5 else gamma.pow(1 - alpha)
    dn, dr, dv = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    ones = torch.ones(attn.num_heads, 1)
    q_rows = torch.cat([g_q[:, None] * ones.expand(-1, dn), gamma[:, None] * ones.expand(-1, dr)], dim=1)
    kv_rows = torch.cat([g_k[:, None] * ones.expand(-1, dn), ones.expand(-1, dv)], dim=1)
    q_weight = attn.q_proj.weight if attn.q_lora_rank is None else attn.q_b_proj.weight
    _scale_rows(q_weight, q_rows.flatten())  # per head: nope rows × γ^α, rope rows × γ
    _scale_rows(attn.kv_b_proj.weight, kv_rows.flatten())  # per head: k_nope rows × γ^(1-α), v rows × 1
    return over.nonzero().flatten().tolist()


def attention_layers(model: nn.Module) -> list[MLAttention]:
    """Every MLA module of a model (text model or the multimodal wrapper)."""
    return [m for m in model.modules() if isinstance(m, MLAttention)]


def set_max_logit_recording(model: nn.Module, enabled: bool) -> None:
    """Switch per-head max-logit recording on/off for all attention layers; clears what was recorded."""
    for attn in attention_layers(model):
        attn.record_max_logits = enabled
        attn.max_logits = None


def _is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Hidden matrices (and stacked expert matrices) → Muon; embeddings, head, norms, biases → AdamW."""
    lowered = name.lower()
    if any(k in lowered for k in ("embed", "lm_head", "pos_emb")):
        return False
    if p.ndim == 2:
        return True
    return p.ndim == 3 and ".experts." in name


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon params, AdamW params) by the routing of spec §8.3; the router weight is 2-D so Muon."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if _is_muon_param(name, p) else adamw).append((name, p))
    return muon, adamw


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW parameter groups in one optimizer, with QK-Clip after each step.

    Groups carry ``use_muon``. Muon groups: ``lr``, ``weight_decay``, ``momentum``,
    ``nesterov``, ``ns_steps``. AdamW groups: ``lr``, ``weight_decay``, ``betas``, ``eps``.
    ``attention`` lists the MLA layers to clip (``qk_clip_tau=None`` records and reports the max
    logits without clipping). Under replicated data parallelism ``distribute_ns`` divides the
    Newton–Schulz work over the ranks; expert-parallel slices (each rank's own experts) are
    orthogonalised where they lie. Use :func:`build_optimizer` to route a model's parameters.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        attention: Iterable[MLAttention] = (),
        qk_clip_tau: float | None = 100.0,
        qk_clip_alpha: float = 0.5,
        distribute_ns: bool = True,
    ) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"MuonClip: lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"MuonClip: momentum must be in [0, 1), got {momentum}")
        if qk_clip_tau is not None and qk_clip_tau <= 0:
            raise ValueError(f"MuonClip: qk_clip_tau must be positive (or None to disable), got {qk_clip_tau}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, use_muon=False)
        super().__init__(list(params), defaults)
        for i, group in enumerate(self.param_groups):
            if group["lr"] < 0:
                raise ValueError(f"MuonClip: param group {i} ({group.get('names', ['?'])[0]}, ...): lr must be >= 0, "
                                 f"got {group['lr']}")
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim not in (2, 3):
                        raise ValueError(f"param group {i}: Muon needs 2-D matrices or [E, n, m] stacks, "
                                         f"got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype
        self.distribute_ns = distribute_ns
        self.attention = list(attention)
        self.qk_clip_tau = qk_clip_tau
        self.qk_clip_alpha = qk_clip_alpha
        self.last_clip = ClipStats()
        self.last_update_rms: float = float("nan")
        self._sharded_stats = torch.zeros(2, dtype=torch.float64)
        for attn in self.attention:
            attn.record_max_logits = True

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon/AdamW step, then QK-Clip on the max logits recorded since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sq_sum, count = 0.0, 0
        self._sharded_stats = torch.zeros(2, dtype=torch.float64)
        for group in self.param_groups:
            if group["use_muon"]:
                s, n = self._muon_group(group)
                sq_sum, count = sq_sum + s, count + n
            else:
                self._adamw_group(group)
        if self._sharded_stats[1] > 0:
            dist.all_reduce(self._sharded_stats)
            sq_sum, count = sq_sum + float(self._sharded_stats[0]), count + int(self._sharded_stats[1])
        self.last_update_rms = math.sqrt(sq_sum / count) if count else float("nan")
        self.clip()
        return loss

    def _muon_group(self, group: dict[str, Any]) -> tuple[float, int]:
        """Update one Muon group; returns (Σ u², numel) of the scaled updates ``u = 0.2·sqrt(max(n,m))·NS``,
        whose RMS should read about 0.2 (AdamW's), the Moonlight check."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MuonClip: sparse gradients are not supported")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            pending.append((p, p.grad.lerp(buf, mu) if group["nesterov"] else buf))
        orthos = self._orthogonalise_all([u for _, u in pending], group["ns_steps"],
                                         local=[is_expert_parallel(p) for p, _ in pending])
        sq_sum, count = 0.0, 0
        for (p, _), ortho in zip(pending, orthos, strict=True):
            scale = muon_lr_scale(p.shape)
            if isinstance(ortho, tuple):  # (update, True): this rank's experts only, statistic summed over ranks
                ortho = ortho[0]
                mine = ortho.to_local() if isinstance(ortho, DTensor) else ortho
                s = float(mine.float().pow(2).sum()) * scale**2
                self._sharded_stats += torch.tensor([s, mine.numel()], dtype=torch.float64)
            else:
                full = ortho.full_tensor() if isinstance(ortho, DTensor) else ortho
                sq_sum += float(full.float().pow(2).sum()) * scale**2
                count += ortho.numel()
            p.mul_(1 - lr * wd)
            p.add_(ortho.to(p.dtype), alpha=-lr * scale)
        return sq_sum, count

    def _orthogonalise_all(self, updates: list[torch.Tensor], steps: int, local: list[bool] | None = None) -> list[Any]:
        """Newton–Schulz of every update. Replicated data parallel (``distribute_ns``): each matrix is
        orthogonalised by one owner rank (largest first, to the least-loaded rank) and broadcast, so
        the work is divided by the world size and the result is the single-process one bit for bit.

        ``local[i]`` marks an expert-parallel slice (this rank's experts, different on every rank):
        orthogonalised here, per expert, and returned as ``(update, True)`` like a sharded expert stack.
        """
        local = local if local is not None else [False] * len(updates)
        replicated = [i for i, u in enumerate(updates) if not isinstance(u, DTensor) and not local[i]]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        owners: dict[int, int] = {}
        if self.distribute_ns and world > 1 and replicated:
            load = [0] * world
            for i in sorted(replicated, key=lambda i: -updates[i].numel()):
                owners[i] = min(range(world), key=load.__getitem__)
                load[owners[i]] += updates[i].numel()
        rank = dist.get_rank() if owners else 0
        out: list[Any] = []
        for i, u in enumerate(updates):
            if isinstance(u, DTensor):
                ortho, is_local = self._orthogonalise_sharded(u, steps)
                out.append((ortho, True) if is_local else ortho)
            elif local[i]:
                out.append((newton_schulz(u, steps, dtype=self.ns_dtype), True))
            elif i in owners and owners[i] != rank:
                out.append(torch.empty(u.shape, dtype=self.ns_dtype, device=u.device))
            else:  # contiguous: a tall matrix comes back as a transposed view, and broadcast sends raw memory
                out.append(newton_schulz(u, steps, dtype=self.ns_dtype).contiguous())
        if owners:
            works = [dist.broadcast(out[i], src=owners[i], async_op=True) for i in sorted(owners)]
            for w in works:
                w.wait()
        return out

    def _orthogonalise_sharded(self, update: DTensor, steps: int) -> tuple[DTensor, bool]:
        """Newton–Schulz of an FSDP2-sharded update; returns (update with the same placements, local?).

        A stack of expert matrices sharded along the expert dim is orthogonalised where it lies
        (each rank holds whole matrices: no communication). Any other matrix is gathered in full
        (Moonlight's distributed Muon: gather the momentum, NS, keep the local part), so the result
        equals single-process Muon.
        """
        placements = update.placements
        if update.ndim == 3 and all(pl.is_shard() and pl.dim == 0 for pl in placements):
            local = newton_schulz(update.to_local(), steps, dtype=self.ns_dtype)
            return DTensor.from_local(local, update.device_mesh, placements, shape=update.shape,
                                      stride=update.stride()), True
        full = newton_schulz(update.full_tensor(), steps, dtype=self.ns_dtype)
        return distribute_tensor(full, update.device_mesh, placements, src_data_rank=None), False

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, decoupled_weight_decay=True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )

    @torch.no_grad()
    def clip(self) -> ClipStats:
        """QK-Clip every registered layer from its recorded max logits, then reset the records.

        Under torch.distributed the per-head maxima are all-reduced (MAX) first, so every rank
        clips the same heads by the same γ and replicas stay identical.
        """
        stats = ClipStats()
        recorded = [(a, a.max_logits) for a in self.attention if a.max_logits is not None]
        if recorded:
            stacked = torch.stack([m for _, m in recorded])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
            for (attn, _), logits in zip(recorded, stacked, strict=True):
                stats.max_logits[attn.layer_idx] = logits
                if self.qk_clip_tau is not None:
                    heads = qk_clip_layer(attn, logits, self.qk_clip_tau, self.qk_clip_alpha)
                    if heads:
                        stats.clipped[attn.layer_idx] = heads
        for attn in self.attention:
            attn.max_logits = None
        self.last_clip = stats
        return stats


def build_optimizer(
    model: nn.Module,
    name: str = "muonclip",
    *,
    lr: float = 2e-4,
    weight_decay: float = 0.1,
    qk_clip_tau: float | None = 100.0,
    record_max_logits: bool = True,
    prefix_lr: dict[str, float] | None = None,
    **kwargs: Any,
) -> MuonClip:
    """The optimizer for a K2.5 model: ``muonclip`` (Muon + AdamW routing, QK-Clip) or ``adamw``.

    ``adamw`` puts every parameter in AdamW groups of the same class, so logging, max-logit
    recording (and, if ``qk_clip_tau`` is set, clipping) are identical between the two; both
    share lr and weight decay (the Moonlight convention that RMS matching makes possible).
    ``prefix_lr`` gives the parameters under a name prefix their own groups and learning rate
    (a new vision tower learns at a lower rate than a language model tolerates).
    """
    muon, adamw = split_params(model)
    if name == "adamw":
        adamw, muon = muon + adamw, []
    elif name != "muonclip":
        raise ValueError(f"unknown optimizer {name!r}; expected 'muonclip' or 'adamw'")
    rates = dict(prefix_lr or {})
    groups: list[dict[str, Any]] = []
    for use_muon, params in ((True, muon), (False, adamw)):
        for prefix in [None, *rates]:
            mine = [(n, p) for n, p in params
                    if (n.startswith(prefix) if prefix else not n.startswith(tuple(rates)))]
            if mine:
                group = {"params": [p for _, p in mine], "use_muon": use_muon, "names": [n for n, _ in mine]}
                if prefix:
                    group["lr"] = rates[prefix]
                groups.append(group)
    attention = attention_layers(model) if (record_max_logits or qk_clip_tau is not None) else []
    return MuonClip(groups, lr=lr, weight_decay=weight_decay, attention=attention, qk_clip_tau=qk_clip_tau,
                    **kwargs)


def iter_muon_params(optimizer: MuonClip) -> Iterator[torch.Tensor]:
    """The parameters a MuonClip updates with Muon (for tests and logging)."""
    for group in optimizer.param_groups:
        if group["use_muon"]:
            yield from group["params"]
