"""Serving expert kernels against the references: the model's experts, and dequantise-then-matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k25.checkpoint.int4 import dequantize_int4, pack_int4, quantize_int4
from k25.engine.experts import FusedExperts, Int4Experts, install_experts, int4_kernel_available
from k25.model.moe import Experts
from k25.testing import tiny_config

KERNELS = ["dequant"] + (["cpu-int4"] if int4_kernel_available() else [])


@pytest.fixture(scope="module")
def experts() -> Experts:
    cfg = tiny_config(hidden_size=64, moe_intermediate_size=64, n_routed_experts=8).text_config
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ex


def _routing(n: int, k: int = 3, e: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    return x, idx, torch.rand(n, k, generator=g)


@pytest.mark.parametrize("n", [1, 2, 37])
def test_fused_experts_match_reference(experts, n):
    x, idx, w = _routing(n)
    fused = FusedExperts.from_experts(experts)
    with torch.no_grad():
        ref = experts(x, idx, w, "dense")
        assert torch.allclose(fused(x, idx, w), ref, atol=1e-5)
        assert torch.allclose(experts(x, idx, w, "grouped"), ref, atol=1e-5)


def _int4_reference(experts: Experts, x, idx, w) -> torch.Tensor:
    """Quantise each expert as the checkpoint does, dequantise it, and run plain matmuls."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j, e in enumerate(idx[i].tolist()):
            mats = []
            for t in (experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e]):
                q, s = quantize_int4(t.detach(), 32)
                mats.append(dequantize_int4(pack_int4(q), s, tuple(t.shape), torch.float32))
            h = F.silu(x[i] @ mats[0].T) * (x[i] @ mats[1].T)
            out[i] += w[i, j] * (h @ mats[2].T)
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 9])
def test_int4_experts_match_dequantize_then_matmul(experts, kernel, n):
    x, idx, w = _routing(n, seed=n)
    int4 = Int4Experts.from_experts(experts, kernel=kernel)
    with torch.no_grad():
        ref = _int4_reference(experts, x, idx, w)
        got = int4(x, idx, w)
        full = experts(x, idx, w, "dense")
    # dequant runs fp32 end to end; the CPU int4 kernel takes bf16 activations
    tol = 1e-5 if kernel == "dequant" else 2e-2 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    assert (got - full).norm() < 0.25 * full.norm()  # 4-bit weights: close to, not equal to, full precision


@pytest.mark.parametrize("kernel", KERNELS)
def test_int4_experts_stay_packed(experts, kernel):
    int4 = Int4Experts.from_experts(experts, kernel=kernel)
    fp32 = sum(p.numel() * 4 for p in experts.parameters())
    assert int4.nbytes() * 6 <= fp32
    assert all(not b.is_floating_point() or b.dtype == torch.bfloat16 for b in int4.buffers())


def test_int4_from_official_tensors_and_errors(experts):
    gate_up = torch.cat([experts.gate_proj, experts.up_proj], dim=1).detach()
    packed, scales = zip(*(quantize_int4(gate_up[e], 32) for e in range(8)), strict=True)
    dpacked, dscales = zip(*(quantize_int4(experts.down_proj[e].detach(), 32) for e in range(8)), strict=True)
    mod = Int4Experts(torch.stack([pack_int4(q) for q in packed]), torch.stack(scales),
                      torch.stack([pack_int4(q) for q in dpacked]), torch.stack(dscales), 64, 64, kernel="dequant")
    x, idx, w = _routing(4)
    with torch.no_grad():
        assert torch.allclose(mod(x, idx, w), Int4Experts.from_experts(experts, "dequant")(x, idx, w))
    with pytest.raises(ValueError, match="int32"):
        Int4Experts(gate_up, torch.stack(scales), gate_up, torch.stack(scales), 64, 64)
    with pytest.raises(ValueError, match="kernel"):
        Int4Experts.from_experts(experts, kernel="magic")


def test_install_experts_swaps_every_moe_layer():
    from k25.checkpoint import build_model

    model = build_model(tiny_config(), dtype=torch.float32, vision=False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        ref = model(ids)
        assert install_experts(model, "fused") == 2
        assert torch.allclose(model(ids), ref, atol=1e-5)
    with pytest.raises(ValueError, match="experts mode"):
        install_experts(model, "fast")
