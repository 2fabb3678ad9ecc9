"""MoonViT-3D + PatchMergerMLP: official tensor layout, parameter counts, and fp32 parity with
transformers' Kimi_K25VisionModel / Kimi_K25MultimodalProjection on tiny random configs.

transformers keeps different names and splits ``wqkv`` into q/k/v with the rows of each head
reordered from interleaved RoPE pairs to rotate-half; ``official_to_transformers`` below does that
conversion from the checkpoint layout (the one our modules use), as transformers' loader does.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from k25.config import preset
from k25.model.vision import (
    MoonViT3d,
    PatchMergerMLP,
    VisionInputError,
    count_parameters,
    encode_media,
    num_media_tokens,
)

TOL = 1e-4


def tiny_config():
    return preset("tiny").vision_config


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere, so a swapped norm or bias cannot hide behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"norm\w*\.weight$", name):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("pos_emb.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.2 * noise if p.ndim == 1 else noise / p[0].numel() ** 0.5)


def official_to_transformers(sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Our (= the checkpoint's) vision-tower names → transformers' Kimi_K25VisionModel names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.blocks\.(\d+)\.(.+)", key)
        if key == "patch_embed.pos_emb.weight":
            out["patch_embed.pos_emb.position_embeddings"] = value
        elif key.startswith("encoder.final_layernorm."):
            out[key.removeprefix("encoder.")] = value
        elif m:
            layer, rest = m.groups()
            pre = f"layers.{layer}."
            if rest.startswith("wqkv."):
                suffix = rest.split(".", 1)[1]
                q, k, v = value.chunk(3, dim=0)
                out[pre + "attn.q_proj." + suffix] = interleaved_to_rotate_half(q, num_heads)
                out[pre + "attn.k_proj." + suffix] = interleaved_to_rotate_half(k, num_heads)
                out[pre + "attn.v_proj." + suffix] = v
            else:
                for ours, theirs in (("norm0.", "norm1."), ("norm1.", "norm2."), ("mlp.fc0.", "mlp.fc1."),
                                     ("mlp.fc1.", "mlp.fc2."), ("wo.", "attn.proj.")):
                    if rest.startswith(ours):
                        out[pre + theirs + rest[len(ours):]] = value
                        break
                else:
                    raise KeyError(key)
        else:
            out[key] = value
    return out


def interleaved_to_rotate_half(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head, rows (2j, 2j+1) → (j, j + hd/2): the complex-pair layout → the rotate-half one."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(rows, *w.shape[1:])


def projector_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rename = {"proj.0.": "in_proj.", "proj.2.": "out_proj."}
    out = {}
    for key, value in sd.items():
        for ours, theirs in rename.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        out[key] = value
    return out


@pytest.fixture(scope="module")
def models():
    return build_pair(tiny_config())


def build_pair(cfg):
    """Our tower/projector with random weights, and transformers' twins loaded from the same tensors."""
    mod = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig

    ours = MoonViT3d(cfg).eval()
    proj = PatchMergerMLP(cfg).eval()
    randomize(ours, 0)
    randomize(proj, 1)

    assert cfg.init_pos_emb_height == cfg.init_pos_emb_width  # transformers assumes a square table
    hf_vc = Kimi_K25VisionConfig(
        patch_size=cfg.patch_size,
        pos_emb_height=cfg.init_pos_emb_height,
        pos_emb_width=cfg.init_pos_emb_width,
        pos_emb_time=cfg.init_pos_emb_time,
        num_attention_heads=cfg.vt_num_attention_heads,
        num_hidden_layers=cfg.vt_num_hidden_layers,
        hidden_size=cfg.vt_hidden_size,
        intermediate_size=cfg.vt_intermediate_size,
        merge_kernel_size=list(cfg.merge_kernel_size),
    )
    hf_vc._attn_implementation = "eager"
    theirs = mod.Kimi_K25VisionModel(hf_vc).eval()
    missing, unexpected = theirs.load_state_dict(
        official_to_transformers(ours.state_dict(), cfg.vt_num_attention_heads), strict=False
    )
    buffers_only = all("time_position" in k or "inv_freq" in k for k in missing)
    assert not unexpected and buffers_only, (missing, unexpected)

    hf_cfg = Kimi_K25Config(
        vision_config=hf_vc.to_dict(),
        text_config={"model_type": "deepseek_v3", "hidden_size": cfg.text_hidden_size},
        projection_hidden_size=cfg.mm_hidden_size, projection_layer_norm_eps=cfg.projector_ln_eps,
    )
    their_proj = mod.Kimi_K25MultimodalProjection(hf_cfg).eval()
    their_proj.load_state_dict(projector_to_transformers(proj.state_dict()), strict=True)
    return ours, proj, theirs, their_proj


CASES = {
    "odd_grid_6x10": [(1, 6, 10)],
    "grid_equals_table_8x8": [(1, 8, 8)],
    "upsampled_grid_12x14": [(1, 12, 14)],
    "two_images_packed": [(1, 6, 10), (1, 4, 4)],
    "video_one_frame": [(1, 6, 8)],
    "video_four_frames": [(4, 6, 8)],
    "video_five_frames_as_two_chunks": [(4, 6, 8), (1, 6, 8)],
    "image_and_chunks_packed": [(1, 4, 6), (4, 6, 4), (2, 2, 2)],
}


def make_pixels(grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.rand(n, 3, 14, 14, generator=g) * 2 - 1


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(models, case):
    ours, proj, theirs, their_proj = models
    grids = CASES[case]
    pixels = make_pixels(grids, seed=len(case))
    grid_t = torch.tensor(grids, dtype=torch.long)
    with torch.no_grad():
        feats = ours.forward_features(pixels, grid_t)
        merged = ours(pixels, grid_t)
        embeds = encode_media(ours, proj, pixels, grid_t)
        if len({t for t, _, _ in grids}) == 1:
            refs = [theirs(pixels, grid_t)]
        else:
            # transformers' merge index cannot pack items with different t: reference each alone.
            sizes = [t * h * w for t, h, w in grids]
            refs = [theirs(p, torch.tensor([g])) for p, g in zip(pixels.split(sizes), grids, strict=True)]
        ref_hidden = torch.cat([r.last_hidden_state for r in refs])
        ref_merged = torch.cat([r.pooler_output for r in refs])
        ref_embeds = their_proj(ref_merged).squeeze(1)

    hidden_delta = (feats - ref_hidden).abs().max().item()
    merged_delta = (torch.cat(merged) - ref_merged).abs().max().item()
    embed_delta = (torch.cat(embeds) - ref_embeds).abs().max().item()
    print(f"{case}: max|Δ| hidden {hidden_delta:.2e} merged {merged_delta:.2e} projected {embed_delta:.2e}")
    assert hidden_delta <= TOL and merged_delta <= TOL and embed_delta <= TOL
    assert [e.shape for e in embeds] == [(num_media_tokens(g), ours.config.text_hidden_size) for g in grids]
    assert [m.shape for m in merged] == [(num_media_tokens(g), 4, ours.config.vt_hidden_size) for g in grids]


def test_parity_at_release_widths():
    """The released widths (1152, 16 heads of 72, 4304, 64×64 table, 7168 out) with 2 of the 27 blocks."""
    cfg = dataclasses.replace(preset("kimi-k2.5").vision_config, vt_num_hidden_layers=2)
    pair = build_pair(cfg)
    test_parity_with_transformers(pair, "image_and_chunks_packed")
    test_parity_with_transformers(pair, "odd_grid_6x10")


def test_items_do_not_see_each_other():
    """Block-diagonal attention: an item's output is the same alone or packed with others."""
    cfg = tiny_config()
    model = MoonViT3d(cfg).eval()
    randomize(model, 3)
    grids = [(1, 4, 6), (4, 2, 4), (1, 6, 2)]
    pixels = make_pixels(grids, seed=5)
    with torch.no_grad():
        packed = model(pixels, torch.tensor(grids))
        alone = [model(p, torch.tensor([g])) for p, g in
                 zip(pixels.split([t * h * w for t, h, w in grids]), grids, strict=True)]
    for a, b in zip(packed, alone, strict=True):
        torch.testing.assert_close(a, b[0], atol=1e-5, rtol=1e-5)


def test_time_embedding_only_for_multi_frame_chunks():
    """A one-frame chunk equals the image path; frames of a multi-frame chunk get distinct offsets."""
    cfg = tiny_config()
    pe = MoonViT3d(cfg).patch_embed.pos_emb
    x = torch.zeros(2 * 4 * 6, cfg.vt_hidden_size)
    single = pe(x[:24], [(1, 4, 6)])
    torch.testing.assert_close(single, pe.spatial(4, 6))
    two = pe(x, [(2, 4, 6)]).view(2, 24, -1)
    torch.testing.assert_close(two[0], pe.spatial(4, 6) + pe.time_weight[0])  # sin(0)=0, cos(0)=1
    torch.testing.assert_close(two[1] - two[0], (pe.time_weight[1] - pe.time_weight[0]).expand(24, -1))


def test_official_tensor_names_and_shapes():
    """The released checkpoint's vision_tower.* / mm_projector.* names (spec §3.6), prefix stripped."""
    cfg = preset("kimi-k2.5").vision_config
    with torch.device("meta"):
        tower, proj = MoonViT3d(cfg), PatchMergerMLP(cfg)
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    expected = {
        "patch_embed.proj.weight": (1152, 3, 14, 14), "patch_embed.proj.bias": (1152,),
        "patch_embed.pos_emb.weight": (64, 64, 1152),
        "encoder.final_layernorm.weight": (1152,), "encoder.final_layernorm.bias": (1152,),
    }
    for n in range(27):
        b = f"encoder.blocks.{n}."
        expected.update({
            b + "wqkv.weight": (3456, 1152), b + "wqkv.bias": (3456,),
            b + "wo.weight": (1152, 1152), b + "wo.bias": (1152,),
            b + "mlp.fc0.weight": (4304, 1152), b + "mlp.fc0.bias": (4304,),
            b + "mlp.fc1.weight": (1152, 4304), b + "mlp.fc1.bias": (1152,),
            b + "norm0.weight": (1152,), b + "norm0.bias": (1152,),
            b + "norm1.weight": (1152,), b + "norm1.bias": (1152,),
        })
    assert shapes == expected
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {
        "pre_norm.weight": (1152,), "pre_norm.bias": (1152,),
        "proj.0.weight": (4608, 4608), "proj.0.bias": (4608,),
        "proj.2.weight": (7168, 4608), "proj.2.bias": (7168,),
    }


def test_parameter_counts_match_release():
    cfg = preset("kimi-k2.5").vision_config
    with torch.device("meta"):
        assert count_parameters(MoonViT3d(cfg)) == 416_866_032
        assert count_parameters(PatchMergerMLP(cfg)) == 54_277_888


def test_meta_build_then_to_empty():
    """Built on meta, moved with to_empty() and loaded: the fixed tables are rebuilt, not garbage."""
    cfg = tiny_config()
    reference = MoonViT3d(cfg)
    with torch.device("meta"):
        model = MoonViT3d(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    grids = [(3, 4, 4)]
    pixels = make_pixels(grids, seed=9)
    with torch.no_grad():
        got, want = model(pixels, torch.tensor(grids)), reference(pixels, torch.tensor(grids))
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize(
    ("grids", "n", "message"),
    [
        ([(1, 4, 5)], 20, "multiples of the merge kernel"),
        ([(5, 2, 2)], 20, "at most init_pos_emb_time=4 frames"),
        ([(1, 4, 4)], 15, "describe 16"),
        ([(0, 4, 4)], 0, "must be positive"),
        ([(1, 514, 2)], 1028, "at most 512 patches per side"),
    ],
)
def test_bad_inputs_name_the_item(grids, n, message):
    model = MoonViT3d(tiny_config())
    with pytest.raises(VisionInputError, match=message):
        model(torch.zeros(n, 3, 14, 14), torch.tensor(grids))
    with pytest.raises(VisionInputError, match=r"\[N, 3, 14, 14\]"):
        model(torch.zeros(4, 3, 16, 16), torch.tensor([(1, 2, 2)]))


def test_bfloat16_tower_tracks_float32():
    """The release runs the tower in BF16: pixel values are cast, RoPE and the tables stay fp32."""
    cfg = tiny_config()
    model = MoonViT3d(cfg).eval()
    proj = PatchMergerMLP(cfg).eval()
    randomize(model, 4)
    randomize(proj, 5)
    grids = [(1, 6, 10), (4, 4, 4)]
    pixels = make_pixels(grids, seed=6)
    with torch.no_grad():
        ref = encode_media(model, proj, pixels, torch.tensor(grids))
        model, proj = model.to(torch.bfloat16), proj.to(torch.bfloat16)
        assert model.encoder.rope_2d.inv_freq.dtype == torch.float32  # fixed tables never rounded
        assert model.patch_embed.pos_emb.time_weight.dtype == torch.float32
        got = encode_media(model, proj, pixels, torch.tensor(grids))
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.bfloat16
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 0.05, rel


def test_num_media_tokens():
    assert num_media_tokens((1, 78, 138)) == 2691
    assert num_media_tokens((4, 48, 86)) == num_media_tokens((1, 48, 86)) == 1032
