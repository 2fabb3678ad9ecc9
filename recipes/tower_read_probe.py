"""How fast can k25-mini's vision tower learn to read on its own, and at which learning rate?

Trains a fresh k25-mini tower + projector with a small readout (one cross-attention over the
projector's tokens, one query per character slot; or, with ``--readout decoder``, a 2-layer
autoregressive decoder that reads left to right as a language model does; AdamW) on freshly
rendered ``vision_read`` pictures (a new batch every step, held-out texts skipped), and prints the
held-out exact-match and per-character accuracy every 100 steps. No language model is involved, so this measures the
tower alone: the readout is thrown away. Usage:

    python recipes/tower_read_probe.py [--steps 800] [--lr 1e-3] [--warmup 0] [--layers 2] [--width 128]
        [--pos-std 0.02] [--readout slots|decoder] [--optimizer adamw|muonclip] [--save DIR]

``--warmup N`` ramps the rate linearly over N steps and then decays it along a cosine to 10%;
without it the rate is constant.

Held-out pictures come from ``out/mini/vdata/vision_read/heldout.jsonl`` (``--heldout``).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from k25.checkpoint import build_model, save_model
from k25.config import preset
from k25.data.vision import record_image_paths, sample_read
from k25.media import MediaItem, pack_media, preprocess_image
from k25.model.vision import MoonViT3d, PatchMergerMLP, encode_media
from k25.train.muon import build_optimizer
from k25.train.schedule import lr_factor

CHARS = "#0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # '#' pads the slots
SLOTS = 6


def encode(image: str | Image.Image, text: str) -> tuple[MediaItem, torch.Tensor]:
    ids = [CHARS.index(c) for c in text[:SLOTS]]
    return preprocess_image(image), torch.tensor(ids + [0] * (SLOTS - len(ids)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save", default=None, metavar="DIR",
                    help="write the trained tower and projector as a K2.5 checkpoint (k25-mini's shape, its "
                         "language model random) that `k25 train --vision-init DIR` takes")
    ap.add_argument("--optimizer", choices=("adamw", "muonclip"), default="adamw",
                    help="muonclip: k25 train's optimizer (Muon on the hidden matrices, AdamW on the rest)")
    ap.add_argument("--warmup", type=int, default=0, help="linear warmup steps, then cosine to 10%% (0: constant)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--pos-std", type=float, default=0.02, help="position-table init std (the reference: 1)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--readout", choices=("slots", "decoder"), default="slots",
                    help="slots: one cross-attention, one query per character; decoder: a 2-layer "
                         "autoregressive decoder over the projector's tokens (reads left to right, as a "
                         "language model does)")
    ap.add_argument("--heldout", default="out/mini/vdata/vision_read/heldout.jsonl")
    ap.add_argument("--max-chars", type=int, default=SLOTS,
                    help="only texts this short (1: single digits and letters, a 1-glyph classification)")
    ap.add_argument("--new-renderings", action="store_true",
                    help="train on the held-out texts too (in other renderings): held-out then measures "
                         "reading new pictures of known texts, which --max-chars 1 needs (10 digits)")
    args = ap.parse_args()
    torch.manual_seed(0)

    held, held_texts = [], set()
    for line in Path(args.heldout).read_text().splitlines():
        r = json.loads(line)
        held_texts.add(r["answer"].lower())
        if len(held) < 300 and len(r["answer"]) <= args.max_chars:
            held.append(encode(record_image_paths(r, Path(args.heldout).parent)[0], r["answer"]))
    rng = random.Random(1)

    def fresh() -> tuple[MediaItem, torch.Tensor]:
        while True:
            sample = sample_read(rng, None)  # type: ignore[arg-type]  # the world is not used by vision samplers
            rec = next(iter(sample.records.values()))[0]
            known = args.new_renderings or rec["answer"].lower() not in held_texts
            if known and len(rec["answer"]) <= args.max_chars:
                return encode(Image.open(io.BytesIO(next(iter(sample.images.values())))), rec["answer"])

    vc = preset("k25-mini").vision_config
    vc.vt_num_hidden_layers, vc.vt_hidden_size, vc.mm_hidden_size = args.layers, args.width, args.width
    vc.vt_intermediate_size, vc.vt_num_attention_heads = 2 * args.width, max(2, args.width // 64)
    tower, projector = MoonViT3d(vc), PatchMergerMLP(vc)
    with torch.no_grad():
        tower.patch_embed.pos_emb.weight.normal_(0, args.pos_std)
    dim = vc.text_hidden_size
    queries = nn.Parameter(torch.randn(SLOTS, dim) * 0.02)
    attend, head = nn.MultiheadAttention(dim, 4, batch_first=True), nn.Linear(dim, len(CHARS))
    embed = nn.Embedding(len(CHARS) + 1, dim)  # the last id starts the text
    slot_pos = nn.Parameter(torch.randn(SLOTS, dim) * 0.02)
    layer = nn.TransformerDecoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
    decoder = nn.TransformerDecoder(layer, 2)
    readout = ([queries, *attend.parameters()] if args.readout == "slots"
               else [*embed.parameters(), slot_pos, *decoder.parameters()])
    params = [*tower.parameters(), *projector.parameters(), *readout, *head.parameters()]
    if args.optimizer == "muonclip":
        holder = nn.Module()
        holder.tower, holder.projector, holder.head = tower, projector, head
        holder.readout = nn.ParameterList(readout)
        opt: torch.optim.Optimizer = build_optimizer(holder, "muonclip", lr=args.lr, weight_decay=0.01,
                                                     qk_clip_tau=None, record_max_logits=False)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    kind = "cosine" if args.warmup else "constant"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, args.steps, args.warmup, kind))

    def picture_tokens(batch: list[tuple[MediaItem, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, L, d] tokens, zero-padded to the widest picture, and the [n, L] padding mask (True: pad)."""
        pixels, grids = pack_media([item for item, _ in batch])
        items = encode_media(tower, projector, pixels, grids)
        tokens = nn.utils.rnn.pad_sequence(items, batch_first=True)
        lengths = torch.tensor([len(t) for t in items])
        return tokens, torch.arange(tokens.shape[1]) >= lengths[:, None]

    def decode(tokens: torch.Tensor, pad: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(prev.shape[1])
        return head(decoder(embed(prev) + slot_pos[: prev.shape[1]], tokens, tgt_mask=mask, tgt_is_causal=True,
                            memory_key_padding_mask=pad))

    def logits(batch: list[tuple[MediaItem, torch.Tensor]], target: torch.Tensor | None = None) -> torch.Tensor:
        """Training logits (the decoder reads the true previous characters, ``target``)."""
        tokens, pad = picture_tokens(batch)
        if args.readout == "slots":
            return head(attend(queries.expand(len(batch), -1, -1), tokens, tokens, key_padding_mask=pad)[0])
        assert target is not None, "the decoder readout trains on the true previous characters"
        start = torch.full((len(batch), 1), len(CHARS))
        return decode(tokens, pad, torch.cat([start, target[:, :-1]], dim=1))

    def predict(batch: list[tuple[MediaItem, torch.Tensor]]) -> torch.Tensor:
        """Greedy character ids [batch, SLOTS]."""
        if args.readout == "slots":
            return logits(batch).argmax(-1)
        tokens, pad = picture_tokens(batch)
        prev = torch.full((len(batch), 1), len(CHARS))
        for _ in range(SLOTS):
            prev = torch.cat([prev, decode(tokens, pad, prev)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return prev[:, 1:]

    start = time.time()
    for step in range(1, args.steps + 1):
        batch = [fresh() for _ in range(args.batch)]
        target = torch.stack([y for _, y in batch])
        loss = F.cross_entropy(logits(batch, target).reshape(-1, len(CHARS)), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            exact = per_char = 0.0
            with torch.no_grad():
                for i in range(0, len(held), 50):
                    chunk = held[i:i + 50]
                    target = torch.stack([y for _, y in chunk])
                    hit = predict(chunk) == target
                    exact += hit.all(-1).sum().item()
                    per_char += hit.float().mean(-1).sum().item()
            print(f"step {step}: train loss {loss.item():.3f}, held-out exact {exact / len(held):.3f}, "
                  f"per slot {per_char / len(held):.3f} ({time.time() - start:.0f} s)", flush=True)
    if args.save:
        config = preset("k25-mini")
        config.vision_config = vc
        model = build_model(config, dtype=torch.float32, vision=True)
        model.vision_tower.load_state_dict(tower.state_dict())
        model.mm_projector.load_state_dict(projector.state_dict())
        print(f"wrote {save_model(model, config, args.save, dtype=torch.float32)}")


if __name__ == "__main__":
    main()
