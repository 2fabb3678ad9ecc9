"""Print max |Δ| of k25's logits against transformers 5.23 for the parity cases of the test suite.

The tests assert ≤ 1e-4; this prints the measured values (fp32, tiny random checkpoints in the
official layouts, loaded from the same files by both):

    python benchmarks/parity_report.py [--init 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import k25
from k25.testing import hf_k25_config, tiny_config, write_random_checkpoint


def rope(beta_fast: float) -> dict:
    return {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": beta_fast,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a - b).abs().max().item():.2e}"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", type=float, default=0.1, help="initializer_range of the random weights")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    gen = torch.Generator().manual_seed(0)
    for beta in (32.0, 1.0):
        path = root / f"k2-{beta}"
        write_random_checkpoint(path, tiny_config(text_only=True, rope_scaling=rope(beta),
                                                  initializer_range=args.init), seed=1)
        ours = k25.load(path, dtype=torch.float32)
        ref = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        ids = torch.randint(0, 500, (2, 150), generator=gen)
        pos = torch.arange(1500, 1650)[None].expand(2, -1)
        plain = diff(ours(ids), ref(input_ids=ids).logits)
        far = diff(ours(ids, position_ids=pos), ref(input_ids=ids, position_ids=pos).logits)
        print(f"K2 layout / DeepseekV3ForCausalLM, beta_fast={beta:g}: 150 tokens {plain}, positions 1500-1649 "
              f"{far}  (|logits| ≤ {ours(ids).abs().max().item():.1f})")
    path = root / "k25"
    write_random_checkpoint(path, tiny_config(rope_scaling=rope(32.0), initializer_range=args.init), seed=2)
    ours = k25.load(path, dtype=torch.float32)
    ref = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        str(path), config=hf_k25_config(path), dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (3, 90), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :40] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = (ours(ids, attention_mask=mask, position_ids=pos)
              - ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[mask.bool()].abs().max().item()
    print(f"K2.5 layout / Kimi_K25ForConditionalGeneration, text: {diff(ours(ids), ref(input_ids=ids).logits)}, "
          f"left-padded batch (real tokens): {padded:.2e}")
    pad = ours.k25_config.media_placeholder_token_id
    for grids in ([(1, 6, 10)], [(1, 6, 10), (1, 4, 4)], [(1, 12, 14)]):
        n_tok = sum(h * w // 4 for _, h, w in grids)
        ids = torch.cat([torch.randint(0, 250, (5,), generator=gen), torch.full((n_tok,), pad),
                         torch.randint(0, 250, (4,), generator=gen)])[None]
        px = torch.randn(sum(t * h * w for t, h, w in grids), 3, 14, 14, generator=gen)
        g = torch.tensor(grids)
        got = ours(ids, pixel_values=px, grid_thws=g)
        print(f"  with images {grids}: {diff(got, ref(input_ids=ids, pixel_values=px, image_grid_thw=g).logits)}")


if __name__ == "__main__":
    main()
