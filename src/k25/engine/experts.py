"""Routed-expert kernels for serving: touch only the selected experts, optionally in INT4.

The model's :class:`k25.model.moe.Experts` is the reference (grouped matmul over all experts,
or the dense loop). The engine swaps in one of these modules, which take the same call
`(x [N, H], idx [N, k], weights [N, k], impl)` and return the same sum:

* :class:`FusedExperts`: fp32/bf16 weights with gate and up fused into one `[E, 2I, H]`
  matrix; for each expert some token selected, one matmul for gate+up and one for down. At
  batch 1 that is 2·k matmuls reading exactly the k selected experts.
* :class:`Int4Experts`: the released `pack-quantized` INT4 format (symmetric, group 32) kept
  at 4 bits in memory. On CPU it runs torch's int4 weight-only kernel
  (`_weight_int4pack_mm_for_cpu`, bf16 activations; the kernel's `(q - 8)·scale + zero`
  with zero = 0 is exactly the format's `q·scale`); elsewhere, or with `kernel="dequant"`, it
  dequantises only the selected experts' weights just before their matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.int4 import PACK, pack_int4, quantize_int4, unpack_int4
from ..model.moe import Experts, MoE

GROUP = 32


def _combine(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
             expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_k weights·expert(idx, x) for x [N, H], calling `expert(e, rows)` once per selected expert.

    Rows are grouped by expert with a sort and put back with a gather (no index_add_/scatter:
    those are slow on CPU); at batch 1 the k selected experts are simply run and summed.
    """
    n, k = idx.shape
    if n == 1:
        out = None
        for j, e in enumerate(idx[0].tolist()):
            y = expert(e, x).float() * weights[0, j]
            out = y if out is None else out + y
        return out.to(x.dtype)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat)
    xs = x[order // k]
    ys = torch.empty(n * k, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for e, c in zip(counts.nonzero().flatten().tolist(), counts[counts > 0].tolist(), strict=True):
        ys[start : start + c] = expert(e, xs[start : start + c]).float()
        start += c
    ys = ys * weights.reshape(-1)[order, None].float()
    return ys[order.argsort()].view(n, k, -1).sum(1).to(x.dtype)


class FusedExperts(nn.Module):
    """Stacked experts with gate|up fused ([E, 2I, H]) and a loop over the selected experts only."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.n_experts, two_i, _ = gate_up.shape
        self.inter = two_i // 2
        self.register_buffer("gate_up", gate_up, persistent=False)
        self.register_buffer("down", down, persistent=False)

    @classmethod
    def from_experts(cls, experts: Experts) -> FusedExperts:
        with torch.no_grad():
            gate_up = torch.cat([experts.gate_proj, experts.up_proj], dim=1).contiguous()
            return cls(gate_up, experts.down_proj.detach().contiguous())

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        return _combine(x, idx, weights, self._expert)

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(xs, self.gate_up[e]).split(self.inter, dim=-1)
        return F.linear(F.silu(g) * u, self.down[e])


def int4_kernel_available() -> bool:
    """True when torch has the CPU int4 weight-only matmul this module uses."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Experts(nn.Module):
    """Routed experts stored as INT4 (group 32, symmetric), computed without a full-precision copy.

    Holds, per expert, gate|up fused `[2I, H]` and down `[H, I]`:

    * `kernel="cpu-int4"`: torch's CPU int4pack layout (uint8 `[N, K/2]`) plus bf16
      scale/zero pairs `[K/32, N, 2]` (zero = 0): 0.625 bytes per weight;
    * `kernel="dequant"`: the checkpoint's own int32 `weight_packed` `[N, K/8]` plus bf16
      `weight_scale` `[N, K/32]` (0.5625 bytes per weight); the selected experts are unpacked
      and scaled right before their matmul.
    """

    def __init__(
        self, packed_gate_up: torch.Tensor, scale_gate_up: torch.Tensor, packed_down: torch.Tensor,
        scale_down: torch.Tensor, hidden: int, inter: int, kernel: str | None = None,
    ) -> None:
        """Arguments in the official format, stacked over experts: packed int32 [E, N, K/8], scales [E, N, K/32]."""
        super().__init__()
        kernel = kernel or ("cpu-int4" if int4_kernel_available() else "dequant")
        if kernel not in ("cpu-int4", "dequant"):
            raise ValueError(f"INT4 kernel {kernel!r}: expected 'cpu-int4' or 'dequant'")
        if kernel == "cpu-int4" and not int4_kernel_available():
            raise RuntimeError("this torch build has no _weight_int4pack_mm_for_cpu; use kernel='dequant'")
        for name, t in (("packed_gate_up", packed_gate_up), ("packed_down", packed_down)):
            if t.dtype != torch.int32 or t.dim() != 3:
                raise ValueError(f"{name} must be int32 [E, N, K/8], got {t.dtype} {tuple(t.shape)}")
        if hidden % GROUP or inter % GROUP:
            raise ValueError(f"hidden ({hidden}) and moe_intermediate_size ({inter}) must be multiples of {GROUP}")
        self.kernel = kernel
        self.hidden, self.inter = hidden, inter
        self.n_experts = packed_gate_up.shape[0]
        if kernel == "dequant":
            self.register_buffer("w_gate_up", packed_gate_up.contiguous(), persistent=False)
            self.register_buffer("s_gate_up", scale_gate_up.to(torch.bfloat16).contiguous(), persistent=False)
            self.register_buffer("w_down", packed_down.contiguous(), persistent=False)
            self.register_buffer("s_down", scale_down.to(torch.bfloat16).contiguous(), persistent=False)
        else:
            w1, s1 = zip(*(_to_cpu_int4(packed_gate_up[e], scale_gate_up[e], hidden) for e in range(self.n_experts)),
                         strict=True)
            w2, s2 = zip(*(_to_cpu_int4(packed_down[e], scale_down[e], inter) for e in range(self.n_experts)),
                         strict=True)
            self.register_buffer("w_gate_up", torch.stack(w1), persistent=False)
            self.register_buffer("s_gate_up", torch.stack(s1), persistent=False)
            self.register_buffer("w_down", torch.stack(w2), persistent=False)
            self.register_buffer("s_down", torch.stack(s2), persistent=False)

    @classmethod
    def from_experts(cls, experts: Experts, kernel: str | None = None) -> Int4Experts:
        """Quantise full-precision experts (symmetric min-max, group 32, bf16 scales), as `k25 quantize` does."""
        with torch.no_grad():
            e = experts.n_experts
            gate_up = torch.cat([experts.gate_proj, experts.up_proj], dim=1)
            p1, s1 = zip(*(_quantize(gate_up[i]) for i in range(e)), strict=True)
            p2, s2 = zip(*(_quantize(experts.down_proj[i]) for i in range(e)), strict=True)
            return cls(torch.stack(p1), torch.stack(s1), torch.stack(p2), torch.stack(s2),
                       experts.gate_proj.shape[2], experts.gate_proj.shape[1], kernel)

    def nbytes(self) -> int:
        """Bytes of expert weights held in memory."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _linear(self, x: torch.Tensor, which: str, e: int) -> torch.Tensor:
        w, s = getattr(self, "w_" + which)[e], getattr(self, "s_" + which)[e]
        if self.kernel == "cpu-int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, GROUP, s)
        in_f = w.shape[1] * PACK
        q = unpack_int4(w, in_f).view(w.shape[0], -1, GROUP).to(x.dtype)
        return F.linear(x, (q * s.to(x.dtype)[..., None]).view(w.shape[0], in_f))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        return _combine(x, idx, weights, self._expert)

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        g, u = self._linear(xs, "gate_up", e).float().split(self.inter, dim=-1)
        return self._linear((F.silu(g) * u).to(xs.dtype), "down", e)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_int4(w, GROUP, scale_dtype=torch.bfloat16)
    return pack_int4(q), scale


def _to_cpu_int4(packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official int32 nibbles (stored as q + 8) → the CPU kernel's uint8 layout and [K/32, N, 2] scale/zero."""
    u = unpack_int4(packed, in_features).to(torch.int32) + 8
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
    s = scale.to(torch.bfloat16).T
    return w, torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def install_experts(model: nn.Module, mode: str = "fused", kernel: str | None = None) -> int:
    """Replace every MoE's routed experts by the engine's kernels; returns how many were replaced.

    `mode`: "fused" (full precision, selected experts only), "int4" (quantise now, keep packed),
    or "reference" (leave the model's own grouped experts). Already-installed modules are kept.
    """
    if mode not in ("fused", "int4", "reference"):
        raise ValueError(f"experts mode {mode!r}: expected 'fused', 'int4' or 'reference'")
    n = 0
    for m in model.modules():
        if isinstance(m, MoE) and isinstance(m.experts, Experts) and mode != "reference":
            m.experts = FusedExperts.from_experts(m.experts) if mode == "fused" else Int4Experts.from_experts(
                m.experts, kernel)
            n += 1
    return n
