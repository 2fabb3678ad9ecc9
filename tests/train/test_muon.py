"""MuonClip: Newton–Schulz, the RMS-matched Muon update, expert slices, AdamW routing, QK-Clip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from k25.checkpoint import build_model
from k25.model.attention import MLAttention
from k25.testing import tiny_config
from k25.train.muon import (
    MuonClip,
    attention_layers,
    build_optimizer,
    muon_lr_scale,
    newton_schulz,
    qk_clip_layer,
    set_max_logit_recording,
    split_params,
)


def _gaussian_cond(n: int, m: int, cond: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, min(n, m), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(m, min(n, m), generator=gen))
    s = torch.linspace(1.0, 1.0 / cond, min(n, m))
    return (u * s) @ v.T


@pytest.mark.parametrize(("n", "m"), [(128, 64), (64, 128), (512, 128)])
def test_newton_schulz_is_close_to_orthogonal(n, m):
    """Well-conditioned inputs: singular values of NS5 land in about [0.68, 1.15] (spec §8.2)."""
    g = _gaussian_cond(n, m, cond=5.0)
    out = newton_schulz(g, dtype=torch.float32)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.2
    # and the directions are g's: U Vᵀ of g, up to the singular-value spread
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (out * (u @ vh)).sum() / (out.norm() * (u @ vh).norm())
    assert cos > 0.98


def test_newton_schulz_batches_slices_independently():
    g = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(1))
    batched = newton_schulz(g)
    for e in range(5):
        torch.testing.assert_close(batched[e], newton_schulz(g[e]), rtol=0, atol=0)


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(7))


def _one_param_step(p0: torch.Tensor, grads: list[torch.Tensor], **kw) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = MuonClip([{"params": [p], "use_muon": True}], qk_clip_tau=None, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_muon_step_matches_torch_optim_muon():
    """Same maths as torch.optim.Muon(adjust_lr_fn='match_rms_adamw'), to bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(48, 32, generator=gen)
    grads = [torch.randn(48, 32, generator=gen) for _ in range(3)]
    ours = _one_param_step(p0, grads, lr=0.01, weight_decay=0.1)
    p = torch.nn.Parameter(p0.clone())
    ref = torch.optim.Muon([p], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for g in grads:
        p.grad = g.clone()
        ref.step()
    delta_ours, delta_ref = ours - p0, p.detach() - p0
    assert (delta_ours - delta_ref).norm() / delta_ref.norm() < 2e-2


def test_update_rms_matches_formula():
    """ΔW = -lr·0.2·sqrt(max(n,m))·NS(g) exactly (wd 0, first step), so RMS(ΔW) ≈ 0.2·lr."""
    gen = torch.Generator().manual_seed(3)
    for n, m in [(256, 64), (64, 96)]:
        p0 = torch.randn(n, m, generator=gen)
        g = torch.randn(n, m, generator=gen)
        lr = 1e-2
        new = _one_param_step(p0, [g], lr=lr, weight_decay=0.0, nesterov=False)
        delta = new - p0
        # first step: EMA buffer = (1-μ)g, whose NS equals NS(g) up to eps
        expected = -lr * muon_lr_scale((n, m)) * newton_schulz((1 - 0.95) * g).float()
        torch.testing.assert_close(delta, expected, rtol=1e-3, atol=1e-6)  # p0 + Δ - p0 rounding
        rms = delta.pow(2).mean().sqrt().item()
        assert rms == pytest.approx(0.2 * lr, rel=0.2)
        assert muon_lr_scale((n, m)) == pytest.approx(0.2 * math.sqrt(max(n, m)))


def test_weight_decay_is_decoupled_and_uses_the_unadjusted_lr():
    p0 = torch.randn(16, 8)
    new = _one_param_step(p0, [torch.zeros(16, 8)], lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(new, p0 * (1 - 0.1 * 0.5))


def test_expert_stack_is_orthogonalised_per_expert():
    """A [E, I, H] stack steps exactly like E separate [I, H] matrices."""
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(4, 12, 20, generator=gen)
    grads = [torch.randn(4, 12, 20, generator=gen) for _ in range(2)]
    stacked = _one_param_step(p0, grads, lr=0.02, weight_decay=0.1)
    for e in range(4):
        single = _one_param_step(p0[e], [g[e] for g in grads], lr=0.02, weight_decay=0.1)
        torch.testing.assert_close(stacked[e], single, rtol=0, atol=0)


def test_parameter_routing():
    model = build_model(tiny_config(), dtype=torch.float32, vision=False)
    muon, adamw = split_params(model)
    muon_names = {n for n, _ in muon}
    adamw_names = {n for n, _ in adamw}
    assert "model.embed_tokens.weight" in adamw_names and "lm_head.weight" in adamw_names
    assert all(p.ndim == 1 for n, p in adamw if n not in ("model.embed_tokens.weight", "lm_head.weight"))
    assert "model.layers.1.mlp.experts.gate_proj" in muon_names
    assert "model.layers.0.self_attn.kv_b_proj.weight" in muon_names
    assert "model.layers.1.mlp.gate.weight" in muon_names
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    opt = build_optimizer(model, "adamw", qk_clip_tau=None)
    assert [g["use_muon"] for g in opt.param_groups] == [False]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgd")


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D matrices"):
        MuonClip([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])


def test_adamw_groups_are_torch_adamw():
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(10)
    grads = [torch.randn(10, generator=gen) for _ in range(3)]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours = MuonClip([{"params": [a], "use_muon": False}], lr=1e-2, weight_decay=0.1, qk_clip_tau=None)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# ---- max-logit recording and QK-Clip ------------------------------------------------------------


@pytest.fixture()
def model():
    m = build_model(tiny_config(), dtype=torch.float32, seed=0, vision=False)
    return m.train()


def _batch(b=2, t=24, seed=0):
    return torch.randint(0, 500, (b, t), generator=torch.Generator().manual_seed(seed))


def test_recording_does_not_change_outputs_and_paths_agree(model):
    ids = _batch()
    with torch.no_grad():
        ref = model(ids)
        set_max_logit_recording(model, True)
        out = model(ids)
        naive = [a.max_logits.clone() for a in attention_layers(model)]
        set_max_logit_recording(model, True)
        model.set_impl(attention="absorbed")
        absorbed_out = model(ids)
        absorbed = [a.max_logits.clone() for a in attention_layers(model)]
        model.set_impl(attention="naive")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(absorbed_out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(naive, absorbed, strict=True):
        assert a.shape == (model.config.num_attention_heads,)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_recorded_max_is_over_attended_positions_only(model, monkeypatch):
    """Brute force over (i, j ≤ i) of scale·q_i·k_j per head, also with a padding mask."""
    attn = attention_layers(model)[0]
    seen = {}
    orig = MLAttention._sdpa

    def spy(self, q, k, v, mask):
        if self is attn:
            seen["q"], seen["k"], seen["mask"] = q.detach(), k.detach(), mask
        return orig(self, q, k, v, mask)

    monkeypatch.setattr(MLAttention, "_sdpa", spy)
    ids = _batch(2, 12, seed=2)
    att_mask = torch.ones(2, 12, dtype=torch.long)
    att_mask[1, :4] = 0  # left padding in the second row
    for mask in (None, att_mask):
        set_max_logit_recording(model, True)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        q, k = seen["q"], seen["k"]
        expected = torch.full((attn.num_heads,), -math.inf)
        for b in range(2):
            for i in range(12):
                for j in range(12):
                    allowed = j <= i if mask is None else bool(seen["mask"][b, 0, i, j])
                    if allowed:
                        expected = torch.maximum(expected, (q[b, :, i] * k[b, :, j]).sum(-1) * attn.softmax_scale)
        torch.testing.assert_close(attn.max_logits, expected, rtol=1e-5, atol=1e-5)


def _blow_up_head(model, layer: int, head: int, factor: float) -> None:
    attn = attention_layers(model)[layer]
    with torch.no_grad():
        q = attn.q_b_proj.weight.view(attn.num_heads, attn.qk_head_dim, -1)
        q[head] *= factor
        kv = attn.kv_b_proj.weight.view(attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, -1)
        kv[head, : attn.qk_nope_head_dim] *= factor


def _max_logits(model, ids) -> list[torch.Tensor]:
    set_max_logit_recording(model, True)
    with torch.no_grad():
        model(ids)
    out = [a.max_logits.clone() for a in attention_layers(model)]
    set_max_logit_recording(model, False)
    return out


def test_qk_clip_caps_the_clipped_head_and_leaves_others_bit_identical(model):
    _blow_up_head(model, layer=1, head=2, factor=12.0)
    ids = _batch()
    before = _max_logits(model, ids)
    tau = 0.5 * float(before[1][2])
    assert tau > max(float(x.max()) for i, x in enumerate(before) if i != 1)  # only that head is over τ
    assert float(before[1].max()) == float(before[1][2])
    state = copy.deepcopy(model.state_dict())
    # lr 0: the step changes nothing, so the clip alone is measured
    opt = build_optimizer(model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau)
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    assert opt.last_clip.clipped == {1: [2]}
    after = _max_logits(model, ids)
    assert float(after[1][2]) <= tau * (1 + 1e-5)
    assert float(after[1][2]) == pytest.approx(tau, rel=1e-4)
    attn = attention_layers(model)[1]
    h, dq = attn.num_heads, attn.qk_head_dim
    dn, dv = attn.qk_nope_head_dim, attn.v_head_dim
    new = model.state_dict()
    gamma = tau / float(before[1][2])
    for name, value in state.items():
        if name == "model.layers.1.self_attn.q_b_proj.weight":
            old_q, new_q = value.view(h, dq, -1), new[name].view(h, dq, -1)
            keep = [i for i in range(h) if i != 2]
            assert torch.equal(old_q[keep], new_q[keep])
            torch.testing.assert_close(new_q[2, :dn], old_q[2, :dn] * math.sqrt(gamma))
            torch.testing.assert_close(new_q[2, dn:], old_q[2, dn:] * gamma)
        elif name == "model.layers.1.self_attn.kv_b_proj.weight":
            old_kv, new_kv = value.view(h, dn + dv, -1), new[name].view(h, dn + dv, -1)
            keep = [i for i in range(h) if i != 2]
            assert torch.equal(old_kv[keep], new_kv[keep])
            torch.testing.assert_close(new_kv[2, :dn], old_kv[2, :dn] * math.sqrt(gamma))
            assert torch.equal(old_kv[2, dn:], new_kv[2, dn:])  # values untouched
        else:  # includes kv_a_proj_with_mqa: the shared RoPE key is never touched
            assert torch.equal(value, new[name]), name
    assert torch.equal(after[0], before[0])  # earlier layers see the same inputs and weights
    assert torch.equal(after[1][[0, 1, 3]], before[1][[0, 1, 3]])  # the other heads of the clipped layer


def test_qk_clip_after_a_real_step_only_touches_clipped_rows(model):
    """Same step with and without clip: identical except the clipped head's q/k rows."""
    _blow_up_head(model, layer=0, head=1, factor=10.0)
    ids = _batch(seed=3)
    twin = copy.deepcopy(model)
    tau = 0.5 * float(_max_logits(model, ids)[0][1])
    results = []
    for m, t in ((model, tau), (twin, None)):
        opt = build_optimizer(m, lr=1e-3, weight_decay=0.1, qk_clip_tau=t)
        m(ids).float().logsumexp(-1).mean().backward()
        opt.step()
        results.append((opt.last_clip, m.state_dict()))
    (clip, clipped), (noclip, plain) = results
    assert clip.clipped == {0: [1]} and noclip.clipped == {}
    assert noclip.max_logit == pytest.approx(clip.max_logit)
    differing = {n for n in clipped if not torch.equal(clipped[n], plain[n])}
    assert differing == {"model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"}
    attn = attention_layers(model)[0]
    q_c = clipped["model.layers.0.self_attn.q_b_proj.weight"].view(attn.num_heads, attn.qk_head_dim, -1)
    q_p = plain["model.layers.0.self_attn.q_b_proj.weight"].view(attn.num_heads, attn.qk_head_dim, -1)
    assert torch.equal(q_c[[0, 2, 3]], q_p[[0, 2, 3]])


def test_qk_clip_without_q_lora_scales_q_proj():
    cfg = tiny_config(q_lora_rank=None)
    model = build_model(cfg, dtype=torch.float32, vision=False)
    attn = attention_layers(model)[0]
    old = attn.q_proj.weight.detach().clone().view(attn.num_heads, attn.qk_head_dim, -1)
    heads = qk_clip_layer(attn, torch.tensor([1.0, 400.0, 2.0, 3.0]), tau=100.0)
    assert heads == [1]
    new = attn.q_proj.weight.view(attn.num_heads, attn.qk_head_dim, -1)
    dn = attn.qk_nope_head_dim
    torch.testing.assert_close(new[1, :dn], old[1, :dn] * 0.5)
    torch.testing.assert_close(new[1, dn:], old[1, dn:] * 0.25)
    assert torch.equal(new[0], old[0])


def test_qk_clip_rejects_non_finite_logits(model):
    attn = attention_layers(model)[0]
    with pytest.raises(FloatingPointError, match="layer 0"):
        qk_clip_layer(attn, torch.tensor([1.0, float("nan"), 2.0, 3.0]), tau=10.0)


def test_max_logit_accumulates_over_micro_batches_and_resets(model):
    opt = build_optimizer(model, lr=0.0, qk_clip_tau=None)
    a, b = _batch(seed=4), _batch(seed=5)
    per = [_max_logits(model, x) for x in (a, b)]
    set_max_logit_recording(model, True)
    with torch.no_grad():
        model(a)
        model(b)
    stats = opt.clip()
    for layer, logits in stats.max_logits.items():
        torch.testing.assert_close(logits, torch.maximum(per[0][layer], per[1][layer]))
    assert all(x.max_logits is None for x in attention_layers(model))


def test_state_dict_round_trip_continues_identically(model):
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, lr=1e-2, qk_clip_tau=None)
    ids = [_batch(seed=s) for s in range(3)]

    def step(m, o, x):
        o.zero_grad()
        m(x).float().logsumexp(-1).mean().backward()
        o.step()

    step(model, opt, ids[0])
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, lr=1e-2, qk_clip_tau=None)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x in ids[1:]:
        step(model, opt, x)
        step(twin, opt2, x)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
