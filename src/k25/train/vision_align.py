"""Vision alignment: a new tower learns to put on each LM position the embedding of what it shows.

k25-mini's curriculum draws its pictures so that one merged token (a 28-px cell, one LM
position) holds one thing: ``vision_read`` one glyph per cell, ``vision_count`` one shape per
cell of its 4×4 grid. This stage trains the tower and projector alone, against the language
model's frozen input embeddings: the token of a glyph moves onto its character's text token,
the token of a shape onto the sum of its colour's and shape's word vectors (a word's vector is
the mean of its tokens' embeddings), an empty cell onto the word "none". Loss: squared error
relative to the embeddings' mean square, plus cross-entropy over the class vectors (the whole
vocabulary and the 15 shape sums) by sharpened cosine similarity.

Why: trained only through the language model (vision runs 1-4, ``docs/k25-mini.md``), the tower
never learned the glyphs; the model learned the text's length. Once a picture of "75" reaches
the model as the tokens "7" "5" do, reading is the in-context copying it already knows, and the
joint stage (``k25 train sft --model`` this stage's output) only has to connect the two.

The output is the language model's checkpoint with the aligned tower and projector added (a
K2.5 multimodal checkpoint); the language model is unchanged.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..chat.template import write_chat_template
from ..chat.tokenizer import KimiTokenizer
from ..checkpoint import save_model
from ..config import K25Config
from ..data.vision import COLOURS, GRID, SHAPES, record_image_paths, sample_count, sample_read
from ..media import MediaItem, pack_media, preprocess_image
from ..model.vision import encode_media
from .muon import build_optimizer
from .schedule import lr_factor

FAMILIES = {"read": "vision_read", "count": "vision_count"}
SAMPLERS: dict[str, Callable[..., Any]] = {"read": sample_read, "count": sample_count}
TEMPERATURE = 0.05  # the cosine similarities' sharpening in the cross-entropy


class AlignError(ValueError):
    """The alignment cannot be set up: a target that is not one token, two classes that coincide."""


@dataclass
class AlignTargets:
    """The class vectors a tower's tokens are aligned to, and each record's class ids per LM position."""

    tokenizer: KimiTokenizer
    embed: torch.Tensor  # [vocab, hidden], the language model's input embeddings (frozen)
    classes: torch.Tensor  # [vocab + 15 (+1), hidden]: the vocabulary, the shape sums (, "none" if not one token)
    kinds: list[tuple[str, str]]  # (shape, colour) of each shape class
    none_id: int  # the class of an empty cell: the token " none", or the mean of its tokens' embeddings
    unit: torch.Tensor = field(init=False)  # the class vectors normalised (the cross-entropy's cosines)
    scale: torch.Tensor = field(init=False)  # the embeddings' mean square (the squared error's unit)

    def __post_init__(self) -> None:
        self.unit = F.normalize(self.classes, dim=-1)
        self.scale = self.embed.pow(2).mean()

    @classmethod
    def build(cls, embed: torch.Tensor, tokenizer: KimiTokenizer) -> AlignTargets:
        embed = embed.detach().float()

        def word(w: str) -> torch.Tensor:
            return embed[tokenizer.encode(" " + w)].mean(0)

        kinds = [(sh, co) for sh in SHAPES for co in COLOURS]
        extra = [word(co) + word(sh) for sh, co in kinds]
        none = tokenizer.encode(" none")
        if len(none) == 1:  # the token itself (a second, equal class vector would make the two indistinguishable)
            none_id = none[0]
        else:
            none_id = len(embed) + len(extra)
            extra.append(word("none"))
        unit = F.normalize(torch.stack(extra), dim=-1)
        close = (unit @ unit.T - 2 * torch.eye(len(extra))).max()
        if close > 0.999:
            raise AlignError(f"two shape classes have (almost) the same vector (cosine {close:.4f}); the tokenizer "
                             "cannot tell their words apart")
        return cls(tokenizer, embed, torch.cat([embed, torch.stack(extra)]), kinds, none_id)

    def record_ids(self, record: dict[str, Any]) -> torch.Tensor:
        """Class ids in LM-position order: a ``vision_read`` text's characters, a ``vision_count`` grid's cells."""
        family = record.get("family")
        if family == "vision_read":
            ids = []
            for ch in record["answer"]:
                tokens = self.tokenizer.encode(ch)
                if len(tokens) != 1:
                    raise AlignError(f"{record.get('id', '?')}: the character {ch!r} is {len(tokens)} tokens, not one")
                ids.append(tokens[0])
            return torch.tensor(ids)
        if family == "vision_count":
            ids = torch.full((GRID * GRID,), self.none_id)
            for s in record["meta"]["scene"]:
                ids[s["row"] * GRID + s["col"]] = len(self.embed) + self.kinds.index((s["shape"], s["colour"]))
            return ids
        raise AlignError(f"{record.get('id', '?')}: family {family!r} has no alignment targets "
                         f"(known: {', '.join(FAMILIES.values())})")

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sharpened cosine similarity of each token [n, hidden] to every class vector [n, classes]."""
        return F.normalize(tokens, dim=-1) @ self.unit.T / TEMPERATURE

    def loss(self, tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, relative squared error, cross-entropy) of tokens [n, hidden] against class ids [n]."""
        mse = (tokens - self.classes[ids]).pow(2).mean() / self.scale
        ce = F.cross_entropy(self.logits(tokens), ids)
        return mse + ce, mse, ce


Example = tuple[MediaItem, torch.Tensor]


def project(tower: nn.Module, projector: nn.Module, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector's tokens of every picture, concatenated [n, hidden], and their class ids [n]."""
    pixels, grids = pack_media([item for item, _ in batch])
    tokens = torch.cat(encode_media(tower, projector, pixels, grids))  # type: ignore[arg-type]
    ids = torch.cat([ids for _, ids in batch])
    if len(tokens) != len(ids):
        raise AlignError(f"the pictures give {len(tokens)} LM positions but their targets {len(ids)}: a picture is "
                         "not drawn one cell per position")
    return tokens, ids


def read_heldout(path: str | Path, targets: AlignTargets) -> tuple[str, list[Example], set[str]]:
    """A ``k25 data`` held-out file's family (``read``/``count``), pictures with class ids, and split keys."""
    path = Path(path)
    family, out, keys = None, [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        rec = json.loads(line)
        name = next((k for k, v in FAMILIES.items() if v == rec.get("family")), None)
        if name is None or family not in (None, name):
            raise AlignError(f"{path}:{n}: family {rec.get('family')!r}; expected one of "
                             f"{', '.join(FAMILIES.values())}, the same in the whole file")
        images = record_image_paths(rec, path.parent)
        if len(images) != 1:
            raise AlignError(f"{path}:{n}: expected one image, found {len(images)}")
        family = name
        out.append((preprocess_image(images[0]), targets.record_ids(rec)))
        keys.add(rec["meta"]["key"])
    if family is None:
        raise AlignError(f"{path}: no records")
    return family, out, keys


def score(tower: nn.Module, projector: nn.Module, targets: AlignTargets, pictures: Sequence[Example]
          ) -> dict[str, float]:
    """Share of pictures whose every token's nearest class is right (``exact``), and of tokens (``tokens``)."""
    exact = hits = n = 0
    with torch.no_grad():
        for i in range(0, len(pictures), 50):
            chunk = pictures[i:i + 50]
            tokens, ids = project(tower, projector, chunk)
            hit = targets.logits(tokens).argmax(-1) == ids
            for part in hit.split([len(t) for _, t in chunk]):
                exact, hits, n = exact + int(part.all()), hits + int(part.sum()), n + len(part)
    return {"exact": exact / max(len(pictures), 1), "tokens": hits / max(n, 1)}


def align(
    model: nn.Module, targets: AlignTargets, families: Sequence[str], *, steps: int,
    lr: float = 5e-3, warmup: int = 50, batch: int = 32, heldout: dict[str, list[Example]] | None = None,
    avoid: set[str] | frozenset[str] = frozenset(), eval_every: int = 100, seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train ``model``'s tower and projector (MuonClip, warmup then cosine) on fresh pictures.

    Each step draws ``batch`` new pictures, alternating over ``families``; a picture whose split
    key is in ``avoid`` (the held-out ones) is redrawn. Returns the evaluations on ``heldout``
    (also passed to ``log``).
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise AlignError(f"families {list(families)}: choose from {', '.join(FAMILIES)}")
    heldout = heldout or {}
    tower, projector = model.vision_tower, model.mm_projector  # type: ignore[union-attr]
    holder = nn.Module()
    holder.tower, holder.projector = tower, projector
    opt = build_optimizer(holder, "muonclip", lr=lr, weight_decay=0.01, qk_clip_tau=None, record_max_logits=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, "cosine"))
    rng = random.Random(seed)

    def fresh(family: str) -> Example:
        while True:
            sample = SAMPLERS[family](rng, None)  # the world is not used by the vision samplers
            rec = next(iter(sample.records.values()))[0]
            if rec["meta"]["key"] not in avoid:
                image = Image.open(io.BytesIO(next(iter(sample.images.values()))))
                return preprocess_image(image), targets.record_ids(rec)

    history, start = [], time.time()
    tower.train()
    projector.train()
    for step in range(1, steps + 1):
        tokens, ids = project(tower, projector, [fresh(families[i % len(families)]) for i in range(batch)])
        loss, mse, ce = targets.loss(tokens, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            row: dict[str, Any] = {"step": step, "mse": mse.item(), "ce": ce.item(), "seconds": time.time() - start}
            for family, pictures in heldout.items():
                row.update({f"{family}_{k}": v for k, v in score(tower, projector, targets, pictures).items()})
            history.append(row)
            log(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return history


def run(model_dir: str, out: str, families: Sequence[str], *, heldout: Sequence[str] = (),
        vision: str = "k25-mini", steps: int = 1500, lr: float = 5e-3, warmup: int = 50, batch: int = 32,
        eval_every: int = 100, seed: int = 0, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``k25 train vision-align``: graft a new tower of preset ``vision`` onto ``model_dir``, align it, save to ``out``.

    ``heldout``: ``k25 data`` held-out files (``vision_read``/``vision_count``); their family is
    read from the records.
    """
    from .trainer import graft_vision  # the trainer imports the whole training stack

    ckpt = K25Config.from_json_file(model_dir)
    if ckpt.vision_config is not None:
        raise AlignError(f"{model_dir} already has a vision tower; align a new one on its text-only checkpoint")
    torch.manual_seed(seed)
    model, config = graft_vision(model_dir, ckpt, vision, seed)
    tokenizer = KimiTokenizer.from_pretrained(model_dir)
    config.media_placeholder_token_id = tokenizer.token_to_id("<|media_pad|>")  # as the trainer sets it
    targets = AlignTargets.build(model.language_model.model.embed_tokens.weight, tokenizer)  # type: ignore[union-attr]
    held: dict[str, list[Example]] = {}
    avoid: set[str] = set()
    for path in heldout:
        family, pictures, keys = read_heldout(path, targets)
        held[family] = held.get(family, []) + pictures
        avoid |= keys
    history = align(model, targets, families, steps=steps, lr=lr, warmup=warmup, batch=batch,
                    heldout=held, avoid=avoid, eval_every=eval_every, seed=seed, log=log)
    save_model(model, config, out, dtype=torch.float32)
    tokenizer.save_pretrained(out)
    write_chat_template(out)
    Path(out, "vision_align.json").write_text(json.dumps({"families": list(families), "steps": steps, "lr": lr,
                                                          "history": history}, indent=1))
    return history
