"""Training K25ForConditionalGeneration on image records: inference's expansion, per-row media, the tower learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from k25.chat.template import render
from k25.checkpoint import build_model, load_model
from k25.cli import main
from k25.data import generate, prompt_messages, read_jsonl, record_image_paths, resolve_image_urls, write
from k25.media import preprocess_image
from k25.model.multimodal import K25ForConditionalGeneration
from k25.model.transformer import K25ForCausalLM
from k25.server.media_input import expand_placeholders
from k25.testing import tiny_config, write_random_checkpoint
from k25.train.data import ConcatDataset, SFTDataset, byte_tokenizer, curriculum_example, read_chat_examples
from k25.train.muon import split_params
from k25.train.trainer import TrainConfig, Trainer, TrainError, read_metrics


def _torchrun(args: list[str], timeout: int = 300) -> None:
    """``k25`` under torchrun with 2 CPU (gloo) ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "k25.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]

SMALL = {"num_hidden_layers": 2, "n_routed_experts": 4}
PAD = "<|media_pad|>"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vision-data")
    write(generate(seed=3, n_per_family=10, families=["vision", "arith_think"], corpus_size=40), out)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tok"))


def _records(root: Path, family: str, split: str = "train") -> list[dict]:
    return list(read_jsonl(root / family / f"{split}.jsonl"))


def _files(root: Path, *families: str) -> list[str]:
    return [str(root / f / "train.jsonl") for f in families]


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory) -> Path:
    """`k25 train sft` on image records and arithmetic: a tiny multimodal model, 6 packed steps."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "sft", *_files(root, "vision_count", "vision_read", "vision_chart", "arith_think"),
            "--out", str(out), "--model", "tiny", "--tokenizer", "bytes", "--pack", "--seq-len", "384",
            "--batch-size", "2", "--steps", "6", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "0",
            "--no-progress"]
    for key, value in SMALL.items():
        argv += ["--override", f"{key}={value}"]
    assert main(argv) == 0
    return out


def test_image_records_are_tokenized_as_the_server_tokenizes_the_prompt(root, tok):
    rec = _records(root, "vision_count")[0]
    pad = tok.token_to_id(PAD)
    ex = curriculum_example(rec, tok, base_dir=root / "vision_count")
    (path,) = record_image_paths(rec, root / "vision_count")
    item = preprocess_image(path)
    prompt = render(prompt_messages(rec), None, thinking=rec["mode"] == "thinking", add_generation_prompt=True)
    served = expand_placeholders(tok.encode(prompt), [item], pad)  # what k25 serve feeds the engine
    assert ex.ids[: len(served)] == served and not any(ex.mask[: len(served)])
    assert ex.ids.count(pad) == item.num_tokens == 16 and len(ex.media) == 1  # 112 px: 8 × 8 patches
    assert ex.media[0].start == served.index(pad) and ex.media[0].tokens == item.num_tokens
    assert any(ex.mask)  # the answer is trained
    pre = curriculum_example(rec, tok, loss_on_prompts=True, base_dir=root / "vision_count")
    assert pre.ids == ex.ids and [not m for m in pre.mask] == [t == pad for t in pre.ids]  # all but the image


def test_sft_rows_carry_their_own_images(root, tok):
    pad = tok.token_to_id(PAD)
    files = _files(root, "vision_count", "vision_read", "arith_think")
    packed = SFTDataset.from_jsonl(files, tok, seq_len=384, pack=True)
    assert packed.multimodal
    n_images = []
    for i in range(len(packed)):
        ids, targets, mask, pixels, grids = packed.item(i)
        positions = int((ids == pad).sum())
        assert positions == int((grids[:, 1] * grids[:, 2] // 4).sum())  # every placeholder gets a feature
        assert pixels.shape == (int(grids.prod(dim=1).sum()), 3, 14, 14)
        assert not bool(mask[targets == pad].any())
        n_images.append(len(grids))
    assert max(n_images) >= 2 and sum(n_images) == 20  # packed rows hold several images, each exactly once
    ids, _, _, pixels, grids = packed.batch(range(4), seed=0)
    assert int((ids == pad).sum()) == int((grids[:, 1] * grids[:, 2] // 4).sum()) and len(pixels) == grids.prod(1).sum()
    # A row that would cut an image ends before it instead.
    ex = read_chat_examples(files[:1], tok)[0]
    cut = SFTDataset([ex], seq_len=ex.media[0].start + 5, pad_id=tok.pad_id)
    ids, targets, mask, pixels, grids = cut.item(0)
    assert len(grids) == 0 and len(pixels) == 0 and int((ids == pad).sum()) == 0
    assert ids[: ex.media[0].start].tolist() == ex.ids[: ex.media[0].start]
    # Text-only data keeps its 3-tuples.
    assert len(SFTDataset.from_jsonl(files[2:], tok, seq_len=384).item(0)) == 3


def test_the_image_changes_the_logits_and_the_gradient_reaches_the_tower(root, tok):
    config = tiny_config(**SMALL)
    model = build_model(config, seed=0, dtype=torch.float32)
    assert isinstance(model, K25ForConditionalGeneration)
    ds = SFTDataset.from_jsonl(_files(root, "vision_count"), tok, seq_len=384)
    ids, targets, mask, pixels, grids = ds.batch([0, 1], seed=0, shuffle=False)
    logits = model(ids, pixel_values=pixels, grid_thws=grids)
    swapped = torch.cat([pixels[len(pixels) // 2:], pixels[: len(pixels) // 2]])  # each row sees the other's image
    other = model(ids, pixel_values=swapped, grid_thws=grids)
    first = int((ids[0] == config.media_placeholder_token_id).nonzero()[0])
    assert torch.allclose(logits[0, :first], other[0, :first], atol=1e-6)  # causal: nothing before the image changes
    assert (logits[0, first:] - other[0, first:]).abs().max() > 1e-4
    loss = (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * mask.flatten()).sum()
    loss.backward()
    for name in ("vision_tower.patch_embed.proj.weight", "vision_tower.encoder.blocks.0.wqkv.weight",
                 "vision_tower.encoder.blocks.1.mlp.fc1.weight", "mm_projector.proj.2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_muon_takes_the_towers_matrices_and_adamw_the_rest():
    model = build_model(tiny_config(), seed=0, dtype=torch.float32)
    muon, adamw = (dict(group) for group in split_params(model))
    vision = [n for n in [*muon, *adamw] if n.startswith(("vision_tower.", "mm_projector."))]
    for n in vision:
        p = model.get_parameter(n)
        # 2-D weights are hidden matrices (Muon); the conv patch embedding is the tower's input layer and the
        # position table an embedding, so AdamW takes them with the norms and biases, as for the text model.
        expected = p.ndim == 2 and "pos_emb" not in n
        assert (n in muon) == expected, n
    assert "vision_tower.patch_embed.proj.weight" in adamw and "mm_projector.proj.0.weight" in muon


def test_sft_trains_the_vision_tower_and_saves_the_k25_layout(trained):
    losses = [r["loss"] for r in read_metrics(trained)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    ckpt = trained / "checkpoints" / "step-00000006"
    names = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"vision_tower.patch_embed.proj.weight", "vision_tower.encoder.blocks.1.wqkv.weight",
            "mm_projector.proj.2.weight", "language_model.model.embed_tokens.weight"} <= set(names)
    model = load_model(ckpt, dtype=torch.float32)
    assert isinstance(model, K25ForConditionalGeneration)
    assert model.k25_config.media_placeholder_token_id == 256 + 21  # the byte tokenizer's <|media_pad|>
    init = build_model(model.k25_config, seed=0, dtype=torch.float32)  # the run's starting point (seed 0)
    for name in ("vision_tower.encoder.blocks.0.wqkv.weight", "vision_tower.patch_embed.proj.weight",
                 "mm_projector.proj.0.weight"):
        assert not torch.equal(model.get_parameter(name), init.get_parameter(name)), name  # it trained


def test_trained_checkpoint_answers_through_k25_evals_engine_path(trained, root):
    from k25.eval import EngineGenerator, evaluate

    ckpt = trained / "checkpoints" / "step-00000006"
    gen = EngineGenerator(ckpt, max_tokens=1, concurrency=2)
    report = evaluate(gen, root, families=["vision_chart", "arith_think"], limit=1)
    assert report["families"]["vision_chart"]["n"] == 1 and report["families"]["arith_think"]["n"] == 1
    # The engine's first token (image embeddings scattered by the engine) is the model's own argmax.
    rec = _records(root, "vision_count", "heldout")[0]
    messages = resolve_image_urls(prompt_messages(rec), root / "vision_count")
    prompt = render(messages, None, thinking=rec["mode"] == "thinking", add_generation_prompt=True)
    (path,) = record_image_paths(rec, root / "vision_count")
    out = gen.generate([prompt], images=[[path]])[0]
    model = load_model(ckpt, dtype=torch.float32)
    item = preprocess_image(path)
    ids = expand_placeholders(gen.tokenizer.encode(prompt), [item], model.k25_config.media_placeholder_token_id)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pixel_values=item.pixel_values, grid_thws=[item.grid_thw])
    best = int(logits[0, -1].argmax())
    assert out.prompt_tokens == len(ids)
    assert out.text == ("" if best in gen.stop_ids else gen.tokenizer.decode([best]))


def test_pretraining_mixes_image_rows_into_the_text_stream(tmp_path, root):
    cfg = TrainConfig(out=str(tmp_path), data=_files(root, "vision_read", "arith_think"), task="pretrain",
                      model="tiny", tokenizer="bytes", overrides=dict(SMALL), seq_len=256, batch_size=4, steps=2,
                      warmup_steps=1, eval_every=2, eval_batches=1, eval_fraction=0.2, progress=False)
    trainer = Trainer(cfg)
    assert trainer.vision and isinstance(trainer.train_set, ConcatDataset)
    samples = [trainer.train_set.item(i) for i in range(len(trainer.train_set))]
    with_images = [s for s in samples if len(s[4])]
    assert with_images and len(with_images) < len(samples) and all(len(s) == 5 for s in samples)
    summary = trainer.run()
    assert summary["step"] == 2 and summary["eval_loss"] is not None


def test_the_vision_tower_trains_only_when_the_data_or_the_flag_asks(tmp_path, root):
    base = dict(model="tiny", tokenizer="bytes", overrides=dict(SMALL), seq_len=384, batch_size=2, steps=1,
                progress=False, task="sft")
    text = Trainer(TrainConfig(out=str(tmp_path / "text"), data=_files(root, "arith_think"), **base))
    assert isinstance(text.model, K25ForCausalLM) and text.config.vision_config is None
    forced = Trainer(TrainConfig(out=str(tmp_path / "on"), data=_files(root, "arith_think"), vision="on", **base))
    assert isinstance(forced.model, K25ForConditionalGeneration)
    with pytest.raises(TrainError, match="vision is off"):
        Trainer(TrainConfig(out=str(tmp_path / "off"), data=_files(root, "vision_read"), vision="off", **base))
    text_only = tmp_path / "k2"
    write_random_checkpoint(text_only, tiny_config(text_only=True), tokenizer=byte_tokenizer(tmp_path / "tok"))
    with pytest.raises(TrainError, match="no vision tower"):
        Trainer(TrainConfig(out=str(tmp_path / "k2run"), data=_files(root, "vision_read"),
                            **{**base, "model": str(text_only), "overrides": {}}))


MM_ARGS = ["--model", "tiny", "--tokenizer", "bytes", "--seq-len", "320", "--batch-size", "1", "--lr", "1e-2",
           "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1", "--no-progress", "--ns-dtype", "float32",
           "--override", "num_hidden_layers=2", "--override", "n_routed_experts=4"]


def test_killed_multimodal_run_resumes_with_its_vision_tower(tmp_path, root):
    args = ["train", "sft", *_files(root, "vision_read", "arith_think"), *MM_ARGS, "--steps", "4", "--save-every", "2"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "--stop-after", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]
    a = load_model(tmp_path / "full" / "checkpoints" / "step-00000004").state_dict()
    b = load_model(tmp_path / "cut" / "checkpoints" / "step-00000004").state_dict()
    assert any(k.startswith("vision_tower.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_ranks_train_the_tower_as_one_process(tmp_path, root):
    """A rank whose micro-batch has no image still joins the tower's all-reduce (zeros), as one process would."""
    args = ["train", "sft", *_files(root, "vision_read", "arith_think"), *MM_ARGS, "--steps", "4"]
    assert main([*args, "--out", str(tmp_path / "single"), "--grad-accum", "2"]) == 0
    # some step gives one rank (micro-batch) an image and the other none
    probe = Trainer(TrainConfig(out=str(tmp_path / "probe"), data=_files(root, "vision_read", "arith_think"),
                                task="sft", model="tiny", tokenizer="bytes", overrides=dict(SMALL), seq_len=320,
                                batch_size=1, grad_accum=2, progress=False))
    assert any(sorted(len(mb[4]) > 0 for mb in probe.micro_batches(step)) == [False, True] for step in range(4))
    _torchrun([*args, "--out", str(tmp_path / "multi")])
    single, multi = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
    for a, b in zip(multi, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    wa = load_model(tmp_path / "multi" / "checkpoints" / "step-00000004").state_dict()
    wb = load_model(tmp_path / "single" / "checkpoints" / "step-00000004").state_dict()
    for n, x in wa.items():
        torch.testing.assert_close(x, wb[n], rtol=1e-4, atol=2e-6, msg=n)


def test_plain_conversations_with_images_train_too(tmp_path, root, tok):
    rec = _records(root, "vision_chart")[0]
    (path,) = record_image_paths(rec, root / "vision_chart")
    conv = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "chart.png"}},
                                                      {"type": "text", "text": "Which bar is the tallest?"}]},
                         {"role": "assistant", "content": rec["messages"][-1]["content"]}]}
    (tmp_path / "chart.png").write_bytes(Path(path).read_bytes())
    (tmp_path / "chats.jsonl").write_text(json.dumps(conv) + "\n")
    (ex,) = read_chat_examples([tmp_path / "chats.jsonl"], tok, thinking=False)
    pad = tok.token_to_id(PAD)
    assert len(ex.media) == 1 and ex.ids.count(pad) == 16 and ex.ids[ex.media[0].start] == pad  # 112 px
    assert not any(m for t, m in zip(ex.ids, ex.mask, strict=True) if t == pad) and any(ex.mask)


def test_vision_init_grafts_a_new_tower_onto_a_text_checkpoint(root, tmp_path):
    """A text-only checkpoint + ``--vision-init``: the language model keeps its weights, the tower trains."""
    text_dir = tmp_path / "text"
    config = tiny_config(**SMALL)
    config.vision_config = None  # as `k25 train` writes a text model: K2.5 layout, no tower
    write_random_checkpoint(text_dir, config, seed=5)
    text = load_model(text_dir, dtype=torch.float32)
    files = _files(root, "vision_count", "arith_think")
    base = dict(out=str(tmp_path / "run"), data=files, task="sft", model=str(text_dir), tokenizer="bytes", pack=True,
                seq_len=384, batch_size=2, steps=1, lr=1e-2, warmup_steps=1, eval_every=0, progress=False)
    with pytest.raises(TrainError, match="no vision tower .* --vision-init PRESET"):
        Trainer(TrainConfig(**base))
    with pytest.raises(TrainError, match="vision_init 'nope': expected a preset name .* or a checkpoint directory"):
        Trainer(TrainConfig(**base, vision_init="nope"))
    with pytest.raises(TrainError, match="that checkpoint has no vision tower"):
        Trainer(TrainConfig(**base, vision_init=str(text_dir)))
    with pytest.raises(TrainError, match="'tiny' is a preset"):
        Trainer(TrainConfig(**dict(base, model="tiny"), vision_init="tiny"))
    with pytest.raises(TrainError, match="the data has no images"):
        Trainer(TrainConfig(**dict(base, data=_files(root, "arith_think")), vision_init="tiny"))
    trainer = Trainer(TrainConfig(**base, vision_init="tiny"))
    model = trainer.model
    assert isinstance(model, K25ForConditionalGeneration)
    assert model.k25_config.vision_config.text_hidden_size == config.text_config.hidden_size
    for (name, p), q in zip(model.language_model.state_dict().items(), text.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    tower = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("vision_tower.")}
    trainer.run()
    saved = load_model(tmp_path / "run" / "checkpoints" / "step-00000001", dtype=torch.float32)
    assert isinstance(saved, K25ForConditionalGeneration)
    moved = [n for n, p in saved.named_parameters() if n in tower and not torch.equal(p, tower[n])]
    assert moved, "the grafted tower did not train"


def test_freeze_text_trains_the_tower_and_leaves_the_language_model_exactly(root, tmp_path):
    """``--freeze text``: tower and projector move; LM weights and router biases (no bias update, no QK-Clip) do not."""
    text_dir = tmp_path / "text"
    config = tiny_config(**SMALL)
    config.vision_config = None
    write_random_checkpoint(text_dir, config, seed=6)
    text = load_model(text_dir, dtype=torch.float32)
    base = dict(out=str(tmp_path / "run"), data=_files(root, "vision_count", "vision_read"), task="sft",
                model=str(text_dir), tokenizer="bytes", pack=True, seq_len=384, batch_size=2, steps=3, lr=1e-2,
                warmup_steps=1, eval_every=0, progress=False, vision_init="tiny", qk_clip_tau=1e-3,
                bias_update_rate=0.1)
    with pytest.raises(TrainError, match="freeze 'all': expected one of 'none', 'text', 'text\\+vision'"):
        Trainer(TrainConfig(**base, freeze="all"))
    with pytest.raises(TrainError, match="freeze text trains only the vision side"):
        Trainer(TrainConfig(**dict(base, model="tiny", vision_init=None, data=_files(root, "arith_think")),
                            freeze="text"))
    trainer = Trainer(TrainConfig(**base, freeze="text"))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vision_tower.", "mm_projector.")) for n in trainable)
    tower = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in trainable}
    trainer.run()
    saved = load_model(tmp_path / "run" / "checkpoints" / "step-00000003", dtype=torch.float32)
    for (name, p), q in zip(saved.language_model.state_dict().items(), text.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} changed although the language model is frozen"
    assert all(not torch.equal(p, tower[n]) for n, p in saved.named_parameters() if n in tower and p.ndim == 2)
    # the same run unfrozen does move the language model (τ and the bias rate above would act on it)
    trainer = Trainer(TrainConfig(**dict(base, out=str(tmp_path / "open"))))
    trainer.run()
    opened = load_model(tmp_path / "open" / "checkpoints" / "step-00000003", dtype=torch.float32)
    assert any(not torch.equal(p, q) for p, q in
               zip(opened.language_model.state_dict().values(), text.state_dict().values(), strict=True))


def test_a_tower_trained_beside_a_smaller_model_joins_a_text_checkpoint(root, tmp_path):
    """K2.5's stages: ViT beside a small decoder, ``--vision-init CKPT``, then the projector alone (``text+vision``)."""
    text_dir, donor_dir = tmp_path / "text", tmp_path / "vit"
    config = tiny_config(**SMALL)
    config.vision_config = None
    write_random_checkpoint(text_dir, config, seed=7)
    donor_config = tiny_config(num_hidden_layers=1, n_routed_experts=4)  # the same width, a smaller decoder
    write_random_checkpoint(donor_dir, donor_config, seed=8)
    donor, text = load_model(donor_dir, dtype=torch.float32), load_model(text_dir, dtype=torch.float32)
    base = dict(out=str(tmp_path / "run"), data=_files(root, "vision_count"), task="sft", model=str(text_dir),
                tokenizer="bytes", pack=True, seq_len=384, batch_size=2, steps=2, lr=1e-2, warmup_steps=1,
                eval_every=0, progress=False, vision_init=str(donor_dir))
    narrow = tmp_path / "narrow"
    narrow_config = tiny_config(num_hidden_layers=1, n_routed_experts=4)
    narrow_config.text_config.hidden_size = narrow_config.vision_config.text_hidden_size = 32
    write_random_checkpoint(narrow, narrow_config, seed=9)
    with pytest.raises(TrainError, match=r"writes 32-wide embeddings \(mm_projector.proj.2.weight .* hidden_size 64"):
        Trainer(TrainConfig(**dict(base, vision_init=str(narrow))))
    trainer = Trainer(TrainConfig(**base, freeze="text+vision"))
    for part in ("vision_tower", "mm_projector"):
        for (name, p), q in zip(getattr(trainer.model, part).state_dict().items(),
                                getattr(donor, part).state_dict().values(), strict=True):
            assert torch.equal(p, q), f"{part}.{name} is not the donor's"
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mm_projector.") for n in trainable)
    trainer.run()
    # a multimodal checkpoint's own tower: replaced by a trained one, never by a new one
    multi_dir = tmp_path / "multi"
    write_random_checkpoint(multi_dir, tiny_config(**SMALL), seed=10)
    with pytest.raises(TrainError, match="would replace .* trained tower with a new one"):
        Trainer(TrainConfig(**dict(base, model=str(multi_dir), vision_init="tiny", out=str(tmp_path / "m1"))))
    swapped = Trainer(TrainConfig(**dict(base, model=str(multi_dir), out=str(tmp_path / "m2")))).model
    assert torch.equal(swapped.vision_tower.patch_embed.proj.weight, donor.vision_tower.patch_embed.proj.weight)
    multi = load_model(multi_dir, dtype=torch.float32)
    assert torch.equal(swapped.language_model.lm_head.weight, multi.language_model.lm_head.weight)
    saved = load_model(tmp_path / "run" / "checkpoints" / "step-00000002", dtype=torch.float32)
    for (name, p), q in zip(saved.language_model.state_dict().items(), text.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} changed although the language model is frozen"
    for (name, p), q in zip(saved.vision_tower.state_dict().items(), donor.vision_tower.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), f"vision_tower.{name} changed although the tower is frozen"
    assert not torch.equal(saved.mm_projector.proj[0].weight, donor.mm_projector.proj[0].weight)


def test_vision_lr_gives_the_tower_and_projector_their_own_rate(root, tmp_path):
    """``--vision-lr``: tower and projector params sit in groups at that rate, the schedule scales both alike."""
    base = dict(out=str(tmp_path / "run"), data=_files(root, "vision_count", "arith_think"), task="sft", model="tiny",
                overrides=SMALL, tokenizer="bytes", pack=True, seq_len=384, batch_size=2, steps=2, lr=1e-2,
                warmup_steps=2, eval_every=0, progress=False)
    with pytest.raises(TrainError, match="vision_lr 0.001: this run trains no vision tower"):
        Trainer(TrainConfig(**dict(base, data=_files(root, "arith_think")), vision_lr=1e-3))
    with pytest.raises(TrainError, match="vision_lr -1.0: must be >= 0"):
        Trainer(TrainConfig(**base, vision_lr=-1.0))
    trainer = Trainer(TrainConfig(**base, vision_lr=1e-3))
    groups = trainer.optimizer.param_groups
    assert {g["use_muon"] for g in groups} == {True, False} and len(groups) == 6  # (LM, tower, projector) × 2
    for g in groups:
        vision = {n.startswith(("vision_tower.", "mm_projector.")) for n in g["names"]}
        assert len(vision) == 1, "a group mixes tower and language-model parameters"
        assert g["initial_lr"] == (1e-3 if vision.pop() else 1e-2)
    named = {n for g in groups for n in g["names"]}
    assert named == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.run()
    assert len({round(g["lr"] / g["initial_lr"], 6) for g in groups}) == 1, "the schedule scaled the rates apart"
