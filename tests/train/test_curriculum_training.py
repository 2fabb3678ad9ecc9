"""Training k25-mini's way: curriculum records in their own mode, packed SFT, INT4 quantization-aware training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from k25.checkpoint import build_model, load_model, save_model
from k25.checkpoint.int4 import dequantize_int4, fake_quantize_int4, pack_int4, quantize_int4
from k25.checkpoint.model_io import text_model
from k25.data import generate, training_text, write
from k25.model.moe import Experts
from k25.testing import tiny_config
from k25.train.data import (
    PackedSFTDataset,
    SFTDataset,
    byte_tokenizer,
    curriculum_example,
    read_chat_examples,
    read_pretrain_tokens,
)
from k25.train.trainer import TrainConfig, Trainer, TrainError, read_metrics


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curriculum")
    write(generate(seed=3, n_per_family=12, families=["arith_think", "arith_instant", "tool_calc", "simple_text"],
                   corpus_size=40), out)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tok"))


def _records(curriculum: Path, family: str) -> list[dict]:
    return [json.loads(line) for line in (curriculum / family / "train.jsonl").read_text().splitlines()]


# ---- fake INT4 -----------------------------------------------------------------------------------


def test_fake_int4_is_the_exported_round_trip_with_a_straight_through_gradient():
    w = torch.randn(3, 16, 64, requires_grad=True)
    fq = fake_quantize_int4(w)
    for e in range(3):
        q, scale = quantize_int4(w[e].detach())
        assert torch.equal(fq[e].detach(), dequantize_int4(pack_int4(q), scale, (16, 64), torch.float32))
    assert not torch.equal(fq.detach(), w.detach())  # it does quantize
    (fq * torch.arange(fq.numel()).view_as(fq)).sum().backward()
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=torch.float32).view_as(w))  # identity gradient


def test_qat_model_equals_its_int4_export(tmp_path):
    """A QAT model's forward is exactly what the exported pack-quantized checkpoint computes."""
    config = tiny_config(text_only=True)
    model = build_model(config, dtype=torch.float32, seed=0, vision=False)
    ids = torch.randint(0, 256, (2, 12))
    plain = model(ids)
    for m in model.modules():
        if isinstance(m, Experts):
            m.weight_transform = fake_quantize_int4
    with torch.no_grad():
        qat = model(ids)
    assert (qat - plain).abs().max() > 1e-4  # the fake quantization changes the result
    save_model(model, config, tmp_path / "int4", int4_experts=True)
    exported = text_model(load_model(tmp_path / "int4", dtype=torch.float32, vision=False))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), qat, atol=1e-5, rtol=1e-5)


def test_qat_training_runs_and_rejects_a_bad_setting(tmp_path, curriculum):
    base = dict(data=[str(curriculum / "arith_think" / "train.jsonl")], task="sft", model="tiny",
                overrides={"num_hidden_layers": 2, "n_routed_experts": 4}, tokenizer="bytes", seq_len=512,
                batch_size=2, steps=2, warmup_steps=1, eval_every=0, progress=False, pack=True)
    summary = Trainer(TrainConfig(out=str(tmp_path / "qat"), qat="int4", **base)).run()
    assert summary["step"] == 2 and summary["loss"] > 0
    with pytest.raises(TrainError, match="qat 'int8'"):
        Trainer(TrainConfig(out=str(tmp_path / "bad"), qat="int8", **base))
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="device 'cuda': torch sees no CUDA"):
            Trainer(TrainConfig(out=str(tmp_path / "gpu"), device="cuda", **base))
    with pytest.raises(TrainError, match="device 'warp'"):
        Trainer(TrainConfig(out=str(tmp_path / "warp"), device="warp", **base))


# ---- curriculum records ----------------------------------------------------------------------------


def test_curriculum_example_tokens_and_targets(curriculum, tok):
    records = _records(curriculum, "tool_calc")
    failed = next(r for r in records if r["meta"]["failed_turns"])
    ex = curriculum_example(failed, tok)
    assert tok.decode(ex.ids) == training_text(failed)
    targets = tok.decode([t for t, m in zip(ex.ids, ex.mask, strict=True) if m])
    final = failed["messages"][-1]["content"]
    assert final in targets
    bad_turn = failed["messages"][failed["meta"]["failed_turns"][0]]
    bad_args = bad_turn["tool_calls"][0]["function"]["arguments"]
    assert bad_args not in targets  # the failing call is context, never a target
    assert bad_args in tok.decode(ex.ids)
    assert curriculum_example(failed, tok, loss_on_prompts=True).mask == [True] * len(ex.ids)

    instant = next(r for r in _records(curriculum, "arith_instant"))
    ex = curriculum_example(instant, tok)
    assert "<think></think>" in tok.decode(ex.ids)  # its own mode, whatever the run's --instant says
    think = next(r for r in _records(curriculum, "arith_think"))
    targets = tok.decode([t for t, m in zip(*(lambda e: (e.ids, e.mask))(curriculum_example(think, tok)), strict=True)
                          if m])
    assert think["messages"][-1]["reasoning_content"] in targets

    prose = _records(curriculum, "simple_text")[0]
    ex = curriculum_example(prose, tok)
    assert all(ex.mask) and ex.ids[-1] == tok.eos_id and tok.decode(ex.ids[:-1]) == prose["text"]


def test_packed_sft_keeps_every_conversation_whole(curriculum, tok):
    files = [curriculum / f / "train.jsonl" for f in ("arith_think", "arith_instant", "tool_calc", "simple_text")]
    examples = read_chat_examples(files, tok)
    seq_len = 1024
    packed = SFTDataset.from_jsonl(files, tok, seq_len, pack=True)
    assert isinstance(packed, PackedSFTDataset)
    assert len(packed) < len(examples)
    fitting = [e for e in examples if len(e.ids) <= seq_len + 1]
    rows = [r.ids for r in packed.examples]
    assert all(len(r) <= seq_len + 1 for r in rows if len(r) <= seq_len + 1)
    # every conversation that fits a row appears whole, as a contiguous run of one row
    for e in fitting:
        assert any(_contains(r, e.ids) for r in rows)
    assert sum(len(r) for r in rows) == sum(len(e.ids) for e in examples)
    assert Counter(sum(r.mask) for r in packed.examples).total() == len(packed)
    ids, targets, mask = packed.item(0)
    assert ids.shape == targets.shape == mask.shape == (seq_len,)
    assert torch.equal(ids[1:], targets[:-1])
    train, held = packed.split(0.25)
    assert len(train.conversations) + len(held.conversations) == len(examples)


def _contains(row: list[int], part: list[int]) -> bool:
    n = len(part)
    return any(row[i : i + n] == part for i in range(len(row) - n + 1))


def test_pretraining_reads_curriculum_records_with_their_special_tokens(curriculum, tok):
    stream = read_pretrain_tokens([curriculum / "tool_calc" / "train.jsonl"], tok).tolist()
    assert tok.token_to_id("<|im_assistant|>") in stream and tok.token_to_id("<|tool_calls_section_begin|>") in stream
    n_records = len(_records(curriculum, "tool_calc"))
    assert stream.count(tok.eos_id) == n_records  # one document boundary per record


def test_sft_on_curriculum_learns(tmp_path, curriculum):
    files = [str(curriculum / f / "train.jsonl") for f in ("arith_think", "tool_calc")]
    cfg = TrainConfig(out=str(tmp_path), data=files, task="sft", model="tiny", tokenizer="bytes", pack=True,
                      overrides={"num_hidden_layers": 2, "n_routed_experts": 4}, seq_len=512, batch_size=2,
                      steps=8, lr=1e-2, warmup_steps=1, eval_every=0, progress=False)
    Trainer(cfg).run()
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0]
