"""The training pipeline: schedule, data, SFT masking, balance, checkpoints, exact resume, CLI, plots."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import k25
from k25.chat.template import render, render_assistant_output
from k25.checkpoint import build_model
from k25.cli import main
from k25.model.moe import MoE
from k25.testing import tiny_config
from k25.train.balance import ExpertLoad, sequence_aux_loss
from k25.train.data import DataError, PackedDataset, SFTDataset, byte_tokenizer, encode_conversation
from k25.train.schedule import lr_factor
from k25.train.trainer import TrainConfig, Trainer, TrainError, read_metrics, train

SMALL = {"num_hidden_layers": 2, "n_routed_experts": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 60 kB of real Python source from the standard library (offline, deterministic)."""
    import json as json_mod

    src = Path(json_mod.__file__).parent
    text = "".join(p.read_text() for p in sorted(src.glob("*.py")))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text[:60000])
    return path


def _cfg(tmp: Path, corpus: Path, **kw) -> TrainConfig:
    base = dict(out=str(tmp), data=[str(corpus)], overrides=dict(SMALL), seq_len=32, batch_size=4, steps=6,
                lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


KEYS = ("loss", "grad_norm", "max_logit", "lr", "update_rms", "load_max_over_mean", "eval_loss")


def _curve(path: Path) -> list[tuple]:
    return [tuple(r.get(k) for k in KEYS) for r in read_metrics(path)]


# ---- schedule ----------------------------------------------------------------------------------


def test_schedules():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == pytest.approx(1.0)
    assert lr_factor(9, 10, 4, min_ratio=0.1) == pytest.approx(0.1)
    wsd = [lr_factor(s, 100, 5, "wsd", min_ratio=0.0, decay_fraction=0.2) for s in range(100)]
    assert all(f == 1.0 for f in wsd[5:80]) and wsd[99] == pytest.approx(0.0) and wsd[90] < 1.0
    assert lr_factor(50, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(5, 10, 0, "linear")


# ---- data ----------------------------------------------------------------------------------------


def test_packed_windows_and_deterministic_order():
    ds = PackedDataset(torch.arange(101).numpy(), seq_len=10)
    assert len(ds) == 10
    x, y, m = ds.item(3)
    assert x.tolist() == list(range(30, 40)) and y.tolist() == list(range(31, 41)) and m.all()
    a = ds.batch(range(0, 10), seed=1)[0]
    assert sorted(a[:, 0].tolist()) == list(range(0, 100, 10))  # an epoch is a permutation
    assert torch.equal(a, ds.batch(range(0, 10), seed=1)[0])
    assert not torch.equal(a, ds.batch(range(10, 20), seed=1)[0])  # a new epoch, a new order
    with pytest.raises(DataError, match="too few"):
        PackedDataset(torch.arange(5).numpy(), seq_len=10)


def test_sft_loss_mask_covers_exactly_the_assistant_output(tmp_path):
    tok = byte_tokenizer(tmp_path / "tok")
    reply = {"role": "assistant", "reasoning_content": "think", "content": "Paris."}
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Capital of France?"}, reply]}
    ex = encode_conversation(conv, tok)
    trained = [t for t, m in zip(ex.ids, ex.mask, strict=True) if m]
    assert tok.decode(trained) == render_assistant_output(reply) + "<|im_end|>"
    assert tok.decode(ex.ids) == render(conv["messages"][:2]) + render_assistant_output(reply) + "<|im_end|>"
    # history turns are context; a tool-use chain's earlier assistant turns are generated, so trained
    call = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    conv2 = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "bye"},
                          {"role": "assistant", "reasoning_content": "r1", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "functions.f:0", "content": "42"},
                          {"role": "assistant", "reasoning_content": "r2", "content": "ciao"}]}
    ex2 = encode_conversation(conv2, tok)
    text = tok.decode([t for t, m in zip(ex2.ids, ex2.mask, strict=True) if m])
    assert text == ("r1</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
                    "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
                    "r2</think>ciao<|im_end|>")
    ds = SFTDataset([ex2], seq_len=len(ex2.ids) + 5, pad_id=tok.pad_id)
    x, y, m = ds.item(0)
    assert y[m].tolist() == [t for t, mm in zip(ex2.ids[1:], ex2.mask[1:], strict=True) if mm]
    assert (x[len(ex2.ids):] == tok.pad_id).all() and not m[len(ex2.ids) - 1:].any()


def test_sft_data_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{oops\n')
    tok = byte_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        SFTDataset.from_jsonl([p], tok, 64)
    p.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: the conversation has no assistant turn"):
        SFTDataset.from_jsonl([p], tok, 64)


# ---- MoE balance ---------------------------------------------------------------------------------


def test_bias_update_moves_towards_balance():
    model = build_model(tiny_config(), dtype=torch.float32, vision=False).train()
    load = ExpertLoad(model)
    model(torch.randint(0, 500, (2, 16)))
    load.collect()
    counts = [c.clone() for c in load.counts]
    assert all(int(c.sum()) == 2 * 16 * 2 for c in counts)  # tokens × top-k
    ratio = load.update_bias(0.01)
    assert ratio == pytest.approx(max(float(c.max() / c.mean()) for c in counts))
    for moe, c in zip(load.layers, counts, strict=True):
        expected = 0.01 * torch.sign(c.mean() - c)
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected.float())


def test_sequence_aux_loss_reaches_the_router():
    model = build_model(tiny_config(), dtype=torch.float32, vision=False).train()
    model(torch.randint(0, 500, (2, 16)))
    loss = sequence_aux_loss(model, 2, alpha=0.01)
    assert loss.item() > 0
    loss.backward()
    routers = [m.gate.weight for m in model.modules() if isinstance(m, MoE)]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


# ---- training, checkpoints, resume ---------------------------------------------------------------


def test_pretrain_learns_and_writes_a_loadable_checkpoint(tmp_path, corpus):
    summary = train(_cfg(tmp_path, corpus, steps=12, lr=1e-2, eval_every=12))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert all(r["update_rms"] == pytest.approx(0.2, rel=0.25) for r in records)
    assert records[-1]["tokens"] == 12 * 4 * 32
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "tiktoken.model").is_file()
    model = k25.load(ckpt)  # the official layout, loadable like any release checkpoint
    assert type(model).__name__ == "K25ForCausalLM" and model.config.num_hidden_layers == 2
    assert k25.load(ckpt).config.eos_token_id == 256 + 2  # <|im_end|> of the byte tokenizer
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert any(b.abs().sum() > 0 for b in biases)  # the balance update reached the checkpoint


def test_killed_run_resumes_and_reproduces_the_curve_exactly(tmp_path, corpus):
    full = _cfg(tmp_path / "full", corpus, save_every=2, grad_accum=2)
    train(full)
    interrupted = _cfg(tmp_path / "cut", corpus, save_every=2, grad_accum=2, stop_after=5)
    train(interrupted)  # "killed" after step 5: the last complete checkpoint is step 4
    assert len(read_metrics(tmp_path / "cut")) == 5
    # a kill while writing the next checkpoint leaves a partial .tmp directory: ignored
    (tmp_path / "cut" / "checkpoints" / "step-00000006.tmp").mkdir()
    resumed = _cfg(tmp_path / "cut", corpus, save_every=2, grad_accum=2)
    train(resumed)
    assert _curve(tmp_path / "cut") == _curve(tmp_path / "full")
    a = k25.load(tmp_path / "full" / "checkpoints" / "step-00000006")
    b = k25.load(tmp_path / "cut" / "checkpoints" / "step-00000006")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), n
    opt_a = torch.load(tmp_path / "full" / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=False)
    opt_b = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=False)
    for k, st in opt_a["state"].items():
        for name, v in st.items():
            assert torch.equal(v, opt_b["state"][k][name]), (k, name)


def test_resume_refuses_changed_settings(tmp_path, corpus):
    train(_cfg(tmp_path, corpus, steps=2))
    with pytest.raises(TrainError, match=r"settings changed \(lr: checkpoint 0.003 vs now 0.001\)"):
        train(_cfg(tmp_path, corpus, steps=2, lr=1e-3))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus):
    """Same global batch, split in two micro-batches: same loss and (fp32 Newton–Schulz) same weights."""
    big = Trainer(_cfg(tmp_path / "a", corpus, batch_size=4, grad_accum=1, ns_dtype="float32"))
    small = Trainer(_cfg(tmp_path / "b", corpus, batch_size=2, grad_accum=2, ns_dtype="float32"))
    for _ in range(2):
        ra, rb = big.train_step(), small.train_step()
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for (n, p), q in zip(big.model.named_parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-6, msg=n)


def test_sft_trains_on_chat_data_from_a_checkpoint(tmp_path, corpus):
    base = train(_cfg(tmp_path / "base", corpus, steps=2))["checkpoint"]
    convs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "reasoning_content": "add", "content": f"{2 * i}."}]}
             for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    cfg = TrainConfig(out=str(tmp_path / "sft"), data=[str(data)], task="sft", model=base, seq_len=96,
                      batch_size=4, steps=4, lr=3e-3, warmup_steps=1, eval_every=4, eval_fraction=0.2,
                      progress=False)
    summary = train(cfg)
    records = read_metrics(tmp_path / "sft")
    assert len(records) == 4 and math.isfinite(records[-1]["eval_loss"])
    assert records[-1]["loss"] < records[0]["loss"]
    # only assistant tokens count: 4 conversations per step, each with a short answer
    assert records[0]["tokens"] < 4 * 40
    assert k25.load(summary["checkpoint"]).config.vocab_size == 512


def test_cli_pretrain_and_plot(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    rc = main(["train", "pretrain", str(corpus), "--out", str(out), "--override", "num_hidden_layers=1",
               "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "2", "--no-progress",
               "--qk-clip-tau", "none"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2
    assert json.loads((out / "train_config.json").read_text())["qk_clip_tau"] is None
    rc = main(["train", "plot", str(out), "--metric", "loss", "-o", str(tmp_path / "loss.png")])
    assert rc == 0 and (tmp_path / "loss.png").stat().st_size > 1000
    assert main(["train", "plot", str(out), "--metric", "nope", "-o", str(tmp_path / "x.png")]) == 2
    assert "no records with metric 'nope'" in capsys.readouterr().err


def test_chained_phases_continue_on_the_token_axis_and_smooth(tmp_path, capsys):
    from k25.train.plots import metric_series

    for name, losses in (("a", [4.0, 2.0, 0.0]), ("b", [1.0, 3.0])):
        (tmp_path / name).mkdir()
        rows = [{"step": i + 1, "loss": v, "tokens": 100 * (i + 1)} for i, v in enumerate(losses)]
        rows.append({"step": len(losses), "eval_loss": 9.0, "tokens": 100 * len(losses)})
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [tmp_path / "a", tmp_path / "b"]
    (_, xa, _), (start_b, xb, _) = metric_series(runs, "loss")
    assert xa == [100, 200, 300] and start_b == 0 and xb == [100, 200]
    (_, xa, ya), (start_b, xb, yb) = metric_series(runs, "loss", chain=True, smooth=2)
    assert start_b == 300 and xb == [400, 500]
    assert ya == [4.0, 3.0, 1.0] and yb == [1.0, 2.0]
    rc = main(["train", "plot", *map(str, runs), "--chain", "--smooth", "2", "-o", str(tmp_path / "p.png")])
    assert rc == 0 and (tmp_path / "p.png").stat().st_size > 1000
    assert main(["train", "plot", str(runs[0]), "--smooth", "0", "-o", str(tmp_path / "q.png")]) == 2
    assert "smooth must be >= 1, got 0" in capsys.readouterr().err


def test_cli_reports_bad_data(tmp_path, capsys):
    rc = main(["train", "pretrain", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "missing.txt: no such data file" in capsys.readouterr().err


# ---- more than one process -----------------------------------------------------------------------


def _torchrun(args: list[str], timeout: int = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "k25.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]


GLOO_ARGS = ["train", "pretrain", "--override", "num_hidden_layers=2", "--override", "n_routed_experts=4",
             "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "3",
             "--eval-batches", "1", "--no-progress", "--qk-clip-tau", "0.05", "--ns-dtype", "float32"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, corpus) -> Path:
    """The reference for the 2-process runs: one process, twice the gradient accumulation."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main([*GLOO_ARGS[:2], str(corpus), *GLOO_ARGS[2:], "--out", str(out), "--grad-accum", "2"]) == 0
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_single_process_training(tmp_path, corpus, single_process_run, parallel):
    """torchrun, 2 CPU ranks (gloo), replicated or FSDP2-sharded == 1 process with twice the accumulation.

    Covers Muon on sharded parameters (gathered matrices, expert stacks orthogonalised in place) and
    QK-Clip on sharded q/kv weights with the maxima all-reduced across ranks.
    """
    args = [*GLOO_ARGS[:2], str(corpus), *GLOO_ARGS[2:]]
    _torchrun([*args, "--out", str(tmp_path / "multi"), "--parallel", parallel])
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(single_process_run)
    assert len(multi) == len(single) == 3
    assert any(r["clipped_heads"] for r in single)
    for a, b in zip(multi, single, strict=True):
        assert a["tokens"] == b["tokens"] and a["clipped_heads"] == b["clipped_heads"]
        for k in ("loss", "grad_norm", "max_logit", "eval_loss", "update_rms"):
            if b.get(k) is not None:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    wa = k25.load(tmp_path / "multi" / "checkpoints" / "step-00000003").state_dict()
    wb = k25.load(single_process_run / "checkpoints" / "step-00000003").state_dict()
    for n, x in wa.items():
        torch.testing.assert_close(x, wb[n], rtol=1e-4, atol=2e-6, msg=n)


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_reproduces_the_curve(tmp_path, corpus):
    args = [*GLOO_ARGS[:2], str(corpus), *GLOO_ARGS[2:], "--steps", "4", "--save-every", "2", "--parallel", "fsdp"]
    _torchrun([*args, "--out", str(tmp_path / "full")])
    _torchrun([*args, "--out", str(tmp_path / "cut"), "--stop-after", "3"])
    _torchrun([*args, "--out", str(tmp_path / "cut")])
    assert _curve(tmp_path / "cut") == _curve(tmp_path / "full")


def test_bf16_autocast_step(tmp_path, corpus):
    """Mixed precision on CPU: bf16 autocast forward, fp32 master weights and optimizer."""
    trainer = Trainer(_cfg(tmp_path, corpus, amp="bf16"))
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and record["loss"] == pytest.approx(math.log(512), rel=0.1)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())

