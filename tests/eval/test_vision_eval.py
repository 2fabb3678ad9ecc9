"""`k25 eval` on the visual families: images go with the prompt, the oracle scores 100%, a blind model is refused."""

from __future__ import annotations

import pytest

from k25.chat.template import render
from k25.cli import main
from k25.data import VISION_FAMILIES, generate, prompt_messages, write
from k25.eval import EvalError, ReplayModel, evaluate
from k25.eval.model import EngineGenerator
from k25.testing import byte_tokenizer, tiny_config, write_random_checkpoint


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    cur = generate(seed=1, n_per_family=3, n_heldout=5, families=["vision"], corpus_size=40)
    root = tmp_path_factory.mktemp("vision")
    write(cur, root)
    return root, [r for by_split in cur.records.values() for recs in by_split.values() for r in recs]


def test_oracle_scores_every_visual_family_perfectly(curriculum):
    root, records = curriculum
    oracle = ReplayModel(records)
    report = evaluate(oracle, root)
    assert list(report["families"]) == list(VISION_FAMILIES)
    for fam, m in report["families"].items():
        assert m["n"] == 5 and m["accuracy"] == 1.0, fam
    assert oracle.mismatches == [] and oracle.unknown == []
    assert {row["task"] for row in report["thinking_vs_instant"]} <= set(VISION_FAMILIES)
    # Prompts are told apart by their picture: many share one question.
    rec = next(r for r in records if r["split"] == "heldout")
    text = render(prompt_messages(rec), None, thinking=rec["mode"] == "thinking")
    other = ReplayModel(records)
    other.generate([text], images=[["elsewhere/another-picture.png"]])
    assert other.unknown == [text]


def test_a_checkpoint_without_a_vision_tower_is_refused(curriculum, tmp_path, capsys):
    root, _ = curriculum
    ckpt = tmp_path / "k2"
    write_random_checkpoint(ckpt, tiny_config(text_only=True), tokenizer=byte_tokenizer(tmp_path / "tok"))
    with pytest.raises(EvalError, match="no vision tower"):
        EngineGenerator(ckpt, max_tokens=2).vision_model()
    assert main(["eval", str(ckpt), "--data", str(root), "--limit", "1", "--quiet"]) == 2
    assert "no vision tower" in capsys.readouterr().err
