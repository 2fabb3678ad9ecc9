"""Which part keeps k25-mini's vision tower from reading? A one-digit classification, four ways.

Single rendered digits from the ``vision_read`` sampler (the same pixels the tower gets after
``preprocess_image``), 10 classes, fresh pictures every step, 200 held-out pictures, AdamW 1e-3:

- ``conv``: a small conv net on the reassembled picture (the baseline: the pixels are readable);
- ``patch``: the tower's view without the tower: a 14-px patch embedding, a per-patch MLP, max-pool;
- ``tower-max``: k25-mini's MoonViT tower + projector, max over its tokens;
- ``tower-attention``: the same tower, one learned query attending over its tokens (how a language
  model has to find the digit among the picture's tokens).

Usage: ``python recipes/digit_readout_probe.py MODE [--steps 300]`` (one thread is enough).
"""

from __future__ import annotations

import argparse
import io
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from k25.config import preset
from k25.data.vision import sample_read
from k25.media import MediaItem, pack_media, preprocess_image
from k25.model.vision import MoonViT3d, PatchMergerMLP, encode_media

MODES = ("conv", "patch", "tower-max", "tower-attention")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(1)

    def fresh() -> tuple[MediaItem, int]:
        while True:
            sample = sample_read(rng, None)  # type: ignore[arg-type]  # vision samplers use no world
            answer = next(iter(sample.records.values()))[0]["answer"]
            if len(answer) == 1 and answer.isdigit():
                return preprocess_image(Image.open(io.BytesIO(next(iter(sample.images.values()))))), int(answer)

    def picture(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
        """The patches put back together: [n, 3, H, W] (all pictures are 224×112)."""
        pv, grids = pack_media([item for item, _ in batch])
        h, w = int(grids[0, 1]), int(grids[0, 2])
        return pv.view(len(batch), h, w, 3, 14, 14).permute(0, 3, 1, 4, 2, 5).reshape(len(batch), 3, h * 14, w * 14)

    if args.mode == "conv":
        net: nn.Module = nn.Sequential(
            nn.Conv2d(3, 32, 5, 2, 2), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))

        def logits(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
            return net(picture(batch))
    elif args.mode == "patch":
        net = nn.Sequential(nn.Conv2d(3, 128, 14, 14), nn.GELU(), nn.Conv2d(128, 128, 1), nn.GELU(),
                            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, 10))

        def logits(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
            return net(picture(batch))
    else:
        vc = preset("k25-mini").vision_config
        tower, projector = MoonViT3d(vc), PatchMergerMLP(vc)
        with torch.no_grad():
            tower.patch_embed.pos_emb.weight.normal_(0, 0.02)
        head = nn.Linear(vc.text_hidden_size, 10)
        query = nn.Parameter(torch.randn(vc.text_hidden_size) * 0.02)
        net = nn.ModuleList([tower, projector, head])
        net.register_parameter("query", query)

        def logits(batch: list[tuple[MediaItem, int]]) -> torch.Tensor:
            pv, grids = pack_media([item for item, _ in batch])
            tokens = torch.stack(encode_media(tower, projector, pv, grids))  # [n, 32, d]
            if args.mode == "tower-max":
                return head(tokens.max(1).values)
            weights = torch.softmax(tokens @ query / tokens.shape[-1] ** 0.5, dim=1)
            return head((weights.unsqueeze(-1) * tokens).sum(1))

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    held = [fresh() for _ in range(200)]
    held_y = torch.tensor([y for _, y in held])
    start = time.time()
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
