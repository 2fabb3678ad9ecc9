"""End-to-end parity with images: pixels → MoonViT-3D → projector → scattered into the text stream → logits.

One K2.5-layout checkpoint (vision tensors in the official `wqkv`/`norm0`/`fc0`/`proj.0` names) is
read by k25 and by transformers' `Kimi_K25ForConditionalGeneration` (whose loader converts the
official vision layout itself); both get the same ids, pixel values and grids.
"""

from __future__ import annotations

import pytest
import torch

import k25
from k25.checkpoint import build_model, save_model
from k25.model.vision import num_media_tokens
from k25.testing import hf_k25_config, randomize_router_bias, tiny_config

transformers = pytest.importorskip("transformers", reason="transformers is the parity peer (test extra)")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("k25mm")
    cfg = tiny_config(initializer_range=0.1)
    model = build_model(cfg, dtype=torch.float32, seed=4)
    randomize_router_bias(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every vision/projector tensor random, so a swapped norm or bias shows
        for name, p in model.named_parameters():
            if name.startswith(("vision_tower.", "mm_projector.")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if name.endswith("norm0.weight") else 0.0))
    save_model(model, cfg, path)
    ours = k25.load(path, dtype=torch.float32)
    ref = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        str(path), config=hf_k25_config(path), dtype=torch.float32
    ).eval()
    return cfg, ours, ref


def _prompt(cfg, grids, seed):
    """Text, then each image's placeholder run (one id per merged token), then text."""
    gen = torch.Generator().manual_seed(seed)
    pad = cfg.media_placeholder_token_id
    parts = [torch.randint(0, 500, (5,), generator=gen)]
    for g in grids:
        parts += [torch.full((num_media_tokens(g),), pad), torch.randint(0, 500, (3,), generator=gen)]
    return torch.cat(parts)[None]


@pytest.mark.parametrize(
    "grids",
    [[(1, 6, 10)], [(1, 6, 10), (1, 4, 4)], [(1, 8, 8)], [(1, 12, 14)]],
    ids=["odd-grid", "two-images", "table-size", "larger-than-table"],
)
@torch.no_grad()
def test_logits_with_images_match_transformers(pair, grids):
    cfg, ours, ref = pair
    ids = _prompt(cfg, grids, seed=len(grids))
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, 3, 14, 14, generator=torch.Generator().manual_seed(7))
    grid_t = torch.tensor(grids)
    a = ours(ids, pixel_values=pixels, grid_thws=grid_t)
    b = ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_t).logits
    assert (a - b).abs().max().item() <= 1e-4
    # the image really changes the answer (the scatter is not a no-op)
    other = ours(ids, pixel_values=torch.randn_like(pixels), grid_thws=grid_t)
    assert (other - a).abs().max().item() > 1e-2


def test_placeholder_count_must_match_the_media(pair):
    cfg, ours, _ = pair
    ids = _prompt(cfg, [(1, 4, 4)], seed=1)[:, :-4]  # drops one placeholder and the text after it
    with pytest.raises(ValueError, match=r"3 media placeholder tokens .* give 4 embeddings"):
        ours(ids, pixel_values=torch.randn(16, 3, 14, 14), grid_thws=[[1, 4, 4]])
    with pytest.raises(ValueError, match="no media were given"):
        ours(_prompt(cfg, [(1, 4, 4)], seed=1))
