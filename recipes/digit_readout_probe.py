"""Which part keeps k25-mini's vision tower from being read? A one-digit classification, many ways.

Single digits drawn freely as vision runs 1-4 drew text (``render_text``, in a fixed ``--frame``), through
``preprocess_image``; 10 classes, fresh pictures every step, 200 held-out pictures (``--optimizer``,
``--lr``: AdamW 1e-3 by default).
MODE is ``conv`` (a small conv net on the picture: the baseline, the pixels are readable) or
BODY-READOUT:

- BODY ``patch``: a 14-px patch embedding and a per-patch MLP (no attention between patches);
  ``vit``: a plain pre-norm ViT of the tower's width and depth; ``tower``: k25-mini's MoonViT
  tower + projector (``--pos-std``: its position table's init);
- READOUT ``max`` or ``mean`` over the tokens, or ``attention``: one learned query attending over
  them, which is how a language model has to find the digit among a picture's tokens.
  ``--max-first N`` reads through ``max`` for the first N steps, then through READOUT.

Usage: ``python recipes/digit_readout_probe.py MODE [--steps 300] [--frame 224x112]`` (one thread).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from k25.config import preset
from k25.data.vision import render_text
from k25.media import MediaItem, pack_media, preprocess_image
from k25.model.vision import MoonViT3d, PatchMergerMLP, encode_media
from k25.train.muon import build_optimizer

MODES = ("conv", *(f"{b}-{r}" for b in ("patch", "vit", "tower") for r in ("max", "mean", "attention")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="the model's init (the pictures are always the same)")
    ap.add_argument("--optimizer", choices=("adamw", "muonclip"), default="adamw",
                    help="muonclip: k25 train's optimizer (Muon on the hidden matrices, AdamW on the rest)")
    ap.add_argument("--pos-std", type=float, default=0.02, help="the tower's position-table init std (reference: 1)")
    ap.add_argument("--frame", default="224x112",
                    help="picture size WxH (multiples of 28); the digit is drawn as large as fits")
    ap.add_argument("--max-first", type=int, default=0,
                    help="read with max over the tokens for this many steps, then with MODE's readout "
                         "(does a tower trained through a max-pool leave tokens that attention can find?)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(1)
    frame = tuple(int(v) for v in args.frame.split("x"))
    patches = frame[0] // 14 * (frame[1] // 14)

    def fresh() -> tuple[MediaItem, int]:
        digit = rng.randrange(10)
        return preprocess_image(render_text(rng, str(digit), frame)[0]), digit

    def picture(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
        """The patches put back together: [n, 3, H, W] (all pictures are one size)."""
        pv, grids = pack_media([item for item, _ in batch])
        h, w = int(grids[0, 1]), int(grids[0, 2])
        return pv.view(len(batch), h, w, 3, 14, 14).permute(0, 3, 1, 4, 2, 5).reshape(len(batch), 3, h * 14, w * 14)

    if args.mode == "conv":
        net: nn.Module = nn.Sequential(
            nn.Conv2d(3, 32, 5, 2, 2), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))

        def logits(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
            return net(picture(batch))
    else:
        body, readout = args.mode.split("-")
        vc = preset("k25-mini").vision_config
        dim = vc.text_hidden_size
        parts = nn.ModuleDict()
        if body == "patch":
            parts["patch"] = nn.Sequential(nn.Conv2d(3, dim, 14, 14), nn.GELU(), nn.Conv2d(dim, dim, 1))
        elif body == "vit":  # a plain pre-norm ViT of the tower's width and depth, learned positions
            parts["patch"] = nn.Conv2d(3, vc.vt_hidden_size, 14, 14)
            parts["vit"] = nn.TransformerEncoder(nn.TransformerEncoderLayer(
                vc.vt_hidden_size, vc.vt_num_attention_heads, vc.vt_intermediate_size, dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True), vc.vt_num_hidden_layers)
            parts["out"] = nn.Sequential(nn.LayerNorm(vc.vt_hidden_size), nn.Linear(vc.vt_hidden_size, dim))
        else:
            parts["tower"], parts["projector"] = MoonViT3d(vc), PatchMergerMLP(vc)
            with torch.no_grad():
                parts["tower"].patch_embed.pos_emb.weight.normal_(0, args.pos_std)
        parts["head"] = nn.Linear(dim, 10)
        net = parts
        pos = nn.Parameter(torch.randn(patches, vc.vt_hidden_size) * 0.02)  # learned positions (vit only)
        query = nn.Parameter(torch.randn(dim) * 0.02)
        net.register_parameter("pos", pos)
        net.register_parameter("query", query)

        def tokens_of(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
            """[n, L, dim]: the body's tokens for each picture."""
            if body == "tower":
                pv, grids = pack_media([item for item, _ in batch])
                return torch.stack(encode_media(parts["tower"], parts["projector"], pv, grids))
            x = parts["patch"](picture(batch)).flatten(2).transpose(1, 2)  # [n, patches, C]
            if body == "vit":
                x = parts["out"](parts["vit"](x + pos))
            return x

        def logits(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
            tokens = tokens_of(batch)
            if readout == "max" or step <= args.max_first:
                return parts["head"](tokens.max(1).values)
            if readout == "mean":
                return parts["head"](tokens.mean(1))
            weights = torch.softmax(tokens @ query / tokens.shape[-1] ** 0.5, dim=1)
            return parts["head"]((weights.unsqueeze(-1) * tokens).sum(1))

    if args.optimizer == "muonclip":
        opt: torch.optim.Optimizer = build_optimizer(net, "muonclip", lr=args.lr, weight_decay=0.01, qk_clip_tau=None,
                                                     record_max_logits=False)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    held = [fresh() for _ in range(200)]
    held_y = torch.tensor([y for _, y in held])
    start = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        batch = [fresh() for _ in range(args.batch)]
        loss = F.cross_entropy(logits(batch), torch.tensor([y for _, y in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                acc = (logits(held).argmax(-1) == held_y).float().mean().item()
            print(f"{args.mode} step {step}: train loss {loss.item():.3f}, held-out accuracy {acc:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
