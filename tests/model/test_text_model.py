"""The text model's parts against plain restatements of the spec, and fast paths against references."""

from __future__ import annotations

import math

import pytest
import torch

from k25.checkpoint import build_model
from k25.config import preset
from k25.engine import generate
from k25.model.cache import DynamicLatentCache
from k25.model.layers import RMSNorm
from k25.model.moe import MoE
from k25.model.rope import apply_rope, rope_parameters, yarn_inv_freq
from k25.testing import randomize_router_bias, tiny_config


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_config(), dtype=torch.float32, seed=0, vision=False)
    randomize_router_bias(m)
    return m.eval()


def _ids(b, t, seed=0):
    return torch.randint(0, 500, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- RoPE / YaRN ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta_fast", "low", "high"), [(32.0, 8, 20), (1.0, 19, 20)])
def test_yarn_correction_range_matches_spec(beta_fast, low, high):
    """K2.5 (β_fast=32): ramp over pairs 8..20; K2 (β_fast=1): 19..20 (spec §1.4)."""
    inv = yarn_inv_freq(64, 50000.0, 64.0, 4096, beta_fast, 1.0)
    extra = 1.0 / 50000.0 ** (torch.arange(0, 64, 2) / 64)
    assert torch.allclose(inv[: low + 1], extra[: low + 1])  # ramp weight 0 at `low`: pure extrapolation
    assert torch.allclose(inv[high:], extra[high:] / 64.0)
    mid = slice(low + 1, high)
    assert ((inv[mid] < extra[mid]) & (inv[mid] > extra[mid] / 64.0)).all()
    j = low + 1  # linear blend with weight (j - low) / (high - low) on the interpolated frequency
    w = (j - low) / (high - low)
    assert inv[j].item() == pytest.approx((extra[j] * (1 - w) + extra[j] / 64.0 * w).item(), rel=1e-6)


def test_kimi_cos_sin_multiplier_is_one():
    _, factor = rope_parameters(preset("kimi-k2.5").text_config)
    assert factor == 1.0


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(3, 8)
    angle = torch.rand(3, 4) * 6
    out = apply_rope(x, angle.cos(), angle.sin())
    for i in range(4):
        a, b = x[:, 2 * i], x[:, 2 * i + 1]
        c, s = angle[:, i].cos(), angle[:, i].sin()
        assert torch.allclose(out[:, 2 * i], a * c - b * s, atol=1e-6)
        assert torch.allclose(out[:, 2 * i + 1], b * c + a * s, atol=1e-6)


def test_rmsnorm_variance_in_fp32():
    norm = RMSNorm(16, eps=1e-5)
    x = (torch.randn(4, 16) * 300).to(torch.bfloat16)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


# ---- MoE ---------------------------------------------------------------------------------------


def test_router_bias_selects_but_does_not_weigh():
    cfg = tiny_config().text_config
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(5, cfg.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[6] = 10.0  # forces expert 6 into every top-k
    weights, idx, scores = moe.gate(x)
    assert (idx == 6).any(-1).all()
    plain = torch.sigmoid(x.float() @ moe.gate.weight.float().T)
    chosen = plain.gather(1, idx)
    expected = chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(scores, plain)


def test_router_bias_stays_fp32_in_bf16_model():
    m = build_model(tiny_config(), dtype=torch.bfloat16, vision=False)
    biases = [b for n, b in m.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32


def test_grouped_experts_match_dense_reference(model):
    moe = model.model.layers[1].mlp
    x = torch.randn(37, model.config.hidden_size)
    weights, idx, _ = moe.gate(x)
    grouped = moe.experts(x, idx, weights, "grouped")
    dense = moe.experts(x, idx, weights, "dense")
    assert torch.allclose(grouped, dense, atol=1e-5)
    # and a per-token loop restating the formula
    for n in range(0, 37, 9):
        y = sum(
            weights[n, k] * (
                torch.nn.functional.silu(x[n] @ moe.experts.gate_proj[e].T) * (x[n] @ moe.experts.up_proj[e].T)
            ) @ moe.experts.down_proj[e].T
            for k, e in enumerate(idx[n].tolist())
        )
        assert torch.allclose(grouped[n], y, atol=1e-5)


def test_moe_backward_through_grouped_path(model):
    moe = MoE(tiny_config().text_config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.train()
    x = torch.randn(2, 9, moe.gate.weight.shape[1], requires_grad=True)
    moe(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert moe.experts.gate_proj.grad.abs().sum() > 0 and moe.gate.weight.grad.abs().sum() > 0


# ---- attention / cache / generation --------------------------------------------------------------------


@torch.no_grad()
def test_absorbed_attention_matches_naive_with_cache(model):
    ids = _ids(2, 20, seed=1)
    full = model(ids)
    for impl in ("naive", "absorbed"):
        model.set_impl(attention=impl)
        cache = DynamicLatentCache(model.config.num_hidden_layers)
        first = model(ids[:, :12], cache=cache)
        rest = [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
        got = torch.cat([first, *rest], dim=1)
        assert (got - full).abs().max() <= 1e-5, impl
    model.set_impl(attention="naive")


def test_cache_bytes_per_token_equal_the_formula(model):
    cfg = model.config
    cache = DynamicLatentCache(cfg.num_hidden_layers)
    with torch.no_grad():
        model(_ids(3, 10), cache=cache)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32
    assert cache.nbytes() == 3 * 10 * per_token


@torch.no_grad()
def test_greedy_generation_equals_argmax_of_full_forwards(model):
    ids = _ids(1, 7, seed=2)
    out = generate(model, ids, max_new_tokens=10)
    seq = ids
    for _ in range(10):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq[:, 7:])


@torch.no_grad()
def test_left_padded_batch_generation_equals_single_rows(model):
    a, b = _ids(1, 9, seed=3), _ids(1, 4, seed=4)
    pad = torch.full((1, 5), model.config.pad_token_id)
    batch = torch.cat([a, torch.cat([pad, b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = generate(model, batch, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(out[0], generate(model, a, max_new_tokens=6)[0])
    assert torch.equal(out[1], generate(model, b, max_new_tokens=6)[0])


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed(model):
    ids = _ids(1, 5, seed=5)
    one = generate(model, ids, 8, temperature=1.0, top_k=20, seed=11)
    two = generate(model, ids, 8, temperature=1.0, top_k=20, seed=11)
    assert torch.equal(one, two)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), expected \(1, 2\)"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention impl 'flash'"):
        model.set_impl(attention="flash")


def test_meta_build_costs_no_memory():
    m = build_model(preset("kimi-k2.5"), device="meta")
    n = sum(math.prod(p.shape) for p in m.parameters())
    assert n > 1.0e12 and all(p.is_meta for p in m.parameters())
