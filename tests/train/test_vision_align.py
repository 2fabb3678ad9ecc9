"""`k25 train vision-align`: targets per LM position, the loss falls, the output is a multimodal checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from k25.checkpoint import load_model
from k25.cli import main
from k25.config import K25Config
from k25.data import generate, read_jsonl, write
from k25.data.vision import GRID
from k25.testing import tiny_config, write_random_checkpoint
from k25.train.data import byte_tokenizer
from k25.train.trainer import graft_vision
from k25.train.vision_align import AlignError, AlignTargets, align, project, read_heldout


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vision-data")
    write(generate(seed=5, n_per_family=4, n_heldout=6, families=["vision_read", "vision_count"]), out)
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A tiny text-only checkpoint with the byte tokenizer."""
    d = tmp_path_factory.mktemp("lm")
    write_random_checkpoint(d, tiny_config(text_only=True))
    byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def targets(lm) -> AlignTargets:
    model = load_model(lm, dtype=torch.float32)
    from k25.chat.tokenizer import KimiTokenizer

    return AlignTargets.build(model.model.embed_tokens.weight, KimiTokenizer.from_pretrained(lm))


def test_targets_follow_the_drawing(root, targets):
    tok = targets.tokenizer
    read = next(r for r in read_jsonl(root / "vision_read" / "train.jsonl"))
    assert targets.record_ids(read).tolist() == [tok.encode(c)[0] for c in read["answer"]]
    count = next(r for r in read_jsonl(root / "vision_count" / "train.jsonl"))
    ids = targets.record_ids(count)
    assert len(ids) == GRID * GRID
    scene = {s["row"] * GRID + s["col"]: (s["shape"], s["colour"]) for s in count["meta"]["scene"]}
    for cell, i in enumerate(ids.tolist()):
        if cell in scene:
            assert targets.kinds[i - len(targets.embed)] == scene[cell]
        else:
            assert i == targets.none_id
    # the byte tokenizer splits " none": its class is the mean of its bytes' embeddings, after the shapes
    assert targets.none_id == len(targets.embed) + len(targets.kinds) == len(targets.classes) - 1
    want = targets.embed[tok.encode(" none")].mean(0)
    assert torch.allclose(targets.classes[targets.none_id], want)


def test_bad_targets_are_named(targets):
    with pytest.raises(AlignError, match=r"r1: the character 'é' is 2 tokens"):
        targets.record_ids({"id": "r1", "family": "vision_read", "answer": "é"})
    with pytest.raises(AlignError, match="family 'vision_chart' has no alignment targets"):
        targets.record_ids({"id": "r2", "family": "vision_chart", "answer": "3"})


def test_alignment_lowers_the_held_out_loss(root, lm, targets):
    model, _ = graft_vision(str(lm), K25Config.from_json_file(lm), "tiny", seed=0)
    family, held, keys = read_heldout(root / "vision_count" / "heldout.jsonl", targets)
    assert family == "count" and len(held) == 6 and len(keys) == 6

    def held_loss() -> float:
        with torch.no_grad():
            return targets.loss(*project(model.vision_tower, model.mm_projector, held))[0].item()

    text_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    before = held_loss()
    history = align(model, targets, ["read", "count"], steps=30, batch=8, warmup=3, heldout={"count": held},
                    avoid=keys, eval_every=15, log=lambda _: None)
    assert [h["step"] for h in history] == [15, 30]
    assert 0 <= history[-1]["count_tokens"] <= 1
    assert held_loss() < 0.8 * before
    for k, v in model.language_model.state_dict().items():  # the language model is not touched
        assert torch.equal(v, text_before[k]), k


def test_cli_writes_a_multimodal_checkpoint(root, lm, tmp_path, capsys):
    out = tmp_path / "aligned"
    argv = ["train", "vision-align", "--model", str(lm), "--out", str(out), "--vision", "tiny", "--steps", "4",
            "--batch-size", "4", "--eval-every", "2", "--heldout", str(root / "vision_read" / "heldout.jsonl")]
    assert main(argv) == 0
    model = load_model(out, dtype=torch.float32)
    assert model.vision_tower is not None and (out / "tiktoken.model").is_file()
    assert (out / "chat_template.jinja").is_file()
    source = load_model(lm, dtype=torch.float32).state_dict()
    for k, v in model.language_model.state_dict().items():
        assert torch.equal(v, source[k]), k
    log = json.loads((out / "vision_align.json").read_text())
    assert [h["step"] for h in log["history"]] == [2, 4] and "read_exact" in log["history"][0]
    # a checkpoint that already has a tower, and a family without targets, are refused by name
    assert main(["train", "vision-align", "--model", str(out), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "already has a vision tower" in capsys.readouterr().err
    assert main(["train", "vision-align", "--model", str(lm), "--out", str(tmp_path / "y"), "--families", "chart",
                 "--vision", "tiny", "--steps", "1"]) == 2
    assert "choose from read, count" in capsys.readouterr().err
