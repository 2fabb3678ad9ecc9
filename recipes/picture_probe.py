"""Does a multimodal checkpoint read its pictures? Held-out answer loss with each record's own picture
vs another record's picture (the next record's), 32 records per visual family.

Equal losses mean the language model ignores the tower's tokens. Usage:
    python recipes/picture_probe.py CHECKPOINT_DIR [VISION_DATA_DIR (default out/mini/vdata)]
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from k25.data.vision import VISION_FAMILIES
from k25.train.trainer import TrainConfig, Trainer


def image_parts(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for m in record["messages"] if m["role"] == "user" and isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image_url"]


def held_out_loss(checkpoint: str, path: Path) -> float:
    cfg = TrainConfig(out=tempfile.mkdtemp(), data=[str(path)], eval_data=[str(path)], task="sft", model=checkpoint,
                      seq_len=1024, batch_size=4, eval_batches=8, progress=False)
    return Trainer(cfg).evaluate()


def main(checkpoint: str, data: Path) -> None:
    for family in VISION_FAMILIES:
        with open(data / family / "heldout.jsonl") as f:
            own = [json.loads(line) for line in f][:32]
        other = copy.deepcopy(own)
        urls = [image_parts(r)[0]["image_url"]["url"] for r in own]
        for rec, url in zip(other, urls[1:] + urls[:1], strict=True):
            image_parts(rec)[0]["image_url"]["url"] = url
        losses = {}
        for name, records in (("own", own), ("other", other)):
            path = data / family / f"_probe_{name}.jsonl"  # beside the images its relative URLs point at
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            try:
                losses[name] = round(held_out_loss(checkpoint, path), 4)
            finally:
                path.unlink()
        print(family, losses, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "out/mini/vdata"))
