"""Numerical parity of the text model with the transformers reference, loaded from the same files.

Checkpoints are written by k25 in the official layouts (K2.5: `language_model.model...`,
K2: `model...`) and read by both implementations: ours via `k25.load`, transformers via
`DeepseekV3ForCausalLM.from_pretrained` / `Kimi_K25ForConditionalGeneration.from_pretrained`.
That also proves our saved checkpoints load in transformers.
"""

from __future__ import annotations

import pytest
import torch

import k25
from k25.testing import hf_k25_config, tiny_config, write_random_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is the parity peer (test extra)")

TOL = 1e-4
# Weights ~5x the default init: attention is sharp enough that a wrong RoPE pairing or YaRN range
# shows as a gross error (checked by mutating the code), while fp32 error stays ~4e-6.
INIT = 0.1


def _rope(beta_fast: float) -> dict:
    return {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": beta_fast,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def _ids(b: int, t: int, seed: int, vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[32.0, 1.0], ids=["beta_fast32", "beta_fast1"])
def k2_pair(request, tmp_path_factory):
    """(ours, transformers DeepseekV3ForCausalLM) from one K2-layout checkpoint."""
    path = tmp_path_factory.mktemp("k2")
    cfg = tiny_config(text_only=True, rope_scaling=_rope(request.param), max_position_embeddings=2048,
                      initializer_range=INIT)
    write_random_checkpoint(path, cfg, seed=1)
    ours = k25.load(path, dtype=torch.float32)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, ref


@pytest.fixture(scope="module")
def k25_pair(tmp_path_factory):
    """(ours, transformers Kimi_K25ForConditionalGeneration) from one K2.5-layout checkpoint."""
    path = tmp_path_factory.mktemp("k25")
    cfg = tiny_config(rope_scaling=_rope(32.0), max_position_embeddings=2048, initializer_range=INIT)
    write_random_checkpoint(path, cfg, seed=2, max_shard_bytes=300_000)  # several shards + index
    ours = k25.load(path, dtype=torch.float32)
    ref = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        str(path), config=hf_k25_config(path), dtype=torch.float32
    ).eval()
    return ours, ref


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_k2_layout_logits_match(k2_pair):
    ours, ref = k2_pair
    ids = _ids(2, 48, seed=3)
    assert _max_diff(ours(ids), ref(input_ids=ids).logits) <= TOL


@torch.no_grad()
def test_k2_layout_yarn_positions_beyond_original_context(k2_pair):
    """Positions far past original_max_position_embeddings=64 (YaRN-scaled frequencies matter)."""
    ours, ref = k2_pair
    ids = _ids(1, 40, seed=4)
    pos = torch.arange(1500, 1540)[None]
    assert _max_diff(ours(ids, position_ids=pos), ref(input_ids=ids, position_ids=pos).logits) <= TOL
    # and a sequence longer than the original context, from position 0
    ids = _ids(1, 150, seed=5)
    assert _max_diff(ours(ids), ref(input_ids=ids).logits) <= TOL


@torch.no_grad()
def test_k25_layout_text_path_matches(k25_pair):
    ours, ref = k25_pair
    assert isinstance(ours, k25.K25ForConditionalGeneration)
    ids = _ids(2, 90, seed=6)
    assert _max_diff(ours(ids), ref(input_ids=ids).logits) <= TOL


@torch.no_grad()
def test_k25_layout_left_padded_batch(k25_pair):
    ours, ref = k25_pair
    ids = _ids(3, 30, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :19] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = ours(ids, attention_mask=mask, position_ids=pos)
    b = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert _max_diff(a[real], b[real]) <= TOL
    # each padded row equals the same row run alone without padding
    for row in (1, 2):
        start = int((mask[row] == 0).sum())
        alone = ours(ids[row : row + 1, start:])
        assert _max_diff(alone[0], a[row, start:]) <= TOL


@torch.no_grad()
def test_experts_shared_between_tokens_and_group_routing(tmp_path):
    """Top-3 of 8 experts over many tokens (every expert serves several), with DeepSeek group routing."""
    cfg = tiny_config(text_only=True, num_experts_per_tok=3, n_group=4, topk_group=2, initializer_range=INIT)
    write_random_checkpoint(tmp_path, cfg, seed=8)
    ours = k25.load(tmp_path, dtype=torch.float32)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = _ids(4, 64, seed=9)
    moe = ours.model.layers[1].mlp
    h = ours.model.embed_tokens(ids).reshape(-1, cfg.text_config.hidden_size)
    _, idx, _ = moe.gate(h)
    counts = torch.bincount(idx.flatten(), minlength=8)
    assert (counts > 1).sum() >= 4  # experts really are shared between tokens
    assert _max_diff(ours(ids), ref(input_ids=ids).logits) <= TOL


@torch.no_grad()
def test_fast_paths_match_reference_paths_on_the_same_checkpoint(k25_pair):
    ours, _ = k25_pair
    lm = ours.language_model
    ids = _ids(2, 33, seed=10)
    base = lm(ids)
    lm.set_impl(attention="absorbed", experts="dense")
    try:
        assert _max_diff(lm(ids), base) <= 1e-5
    finally:
        lm.set_impl(attention="naive", experts="grouped")
