"""Small building blocks shared by the dense and MoE layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeepFP32Buffers(nn.Module):
    """A module whose named buffers stay fp32 whatever dtype the model is moved to.

    (The router's correction bias and the RoPE frequencies lose meaning in bf16.)
    """

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {n: getattr(self, n) for n in self.fp32_buffers}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = getattr(self, n)
            if new.dtype != torch.float32:
                if old.is_meta or new.is_meta or old.device != new.device and old.dtype != torch.float32:
                    fixed = torch.empty(new.shape, dtype=torch.float32, device=new.device)
                else:
                    fixed = old.to(device=new.device, dtype=torch.float32)
                setattr(self, n, fixed)
        return self


class RMSNorm(nn.Module):
    """RMSNorm with the variance in fp32: `w * (x * rsqrt(mean(x²) + eps)).to(dtype)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`: the dense layer-0 MLP and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
