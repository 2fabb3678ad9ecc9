"""Expert parallelism (`--parallel ep`): 2 gloo processes, each with half the routed experts == 1 process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import k25
import k25.train.trainer as trainer_mod
from k25.checkpoint import build_model
from k25.cli import main
from k25.model.moe import Experts
from k25.testing import tiny_config
from k25.train.expert_parallel import ExpertParallelExperts, expert_shard, local_state_dict, shard_experts
from k25.train.trainer import TrainConfig, Trainer, TrainError, read_metrics

ARGS = ["train", "pretrain", "--override", "num_hidden_layers=2", "--override", "n_routed_experts=4",
        "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "3",
        "--eval-batches", "1", "--no-progress", "--qk-clip-tau", "0.05", "--ns-dtype", "float32"]
KEYS = ("loss", "grad_norm", "max_logit", "lr", "update_rms", "load_max_over_mean", "eval_loss", "clipped_heads",
        "tokens")
CKPT = Path("checkpoints") / "step-00000003"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 60 kB of real Python source from the standard library (offline, deterministic)."""
    import json

    src = Path(json.__file__).parent
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(p.read_text() for p in sorted(src.glob("*.py")))[:60000])
    return path


def _args(corpus: Path, *extra: str) -> list[str]:
    return [*ARGS[:2], str(corpus), *ARGS[2:], *extra]


def _torchrun(args: list[str], *, module: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """2 CPU ranks under torchrun (generous timeout: the machine may be busy with other jobs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *(["-m", "k25.cli"] if module else []), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (they run in sessions of their own) on SIGTERM
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _curve(path: Path) -> list[tuple]:
    return [tuple(r.get(k) for k in KEYS) for r in read_metrics(path)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus) -> Path:
    """The reference: one process, all experts, twice the gradient accumulation (the same global batch)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main([*_args(corpus, "--grad-accum", "2"), "--out", str(out)]) == 0
    return out


EP_ARGS = ("--parallel", "ep", "--save-every", "1", "--keep-checkpoints", "5")


@pytest.fixture(scope="module")
def ep_dirs(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """2 gloo ranks with 2 of the 4 experts each, a checkpoint after every step: (a copy of the finished
    run to compare against, the run directory itself, which the resume test rolls back)."""
    out = tmp_path_factory.mktemp("ep") / "run"
    proc = _torchrun([*_args(corpus, *EP_ARGS), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = out.with_name("reference")
    shutil.copytree(out, ref)
    return ref, out


@pytest.fixture(scope="module")
def ep_run(ep_dirs) -> Path:
    return ep_dirs[0]


def test_expert_parallel_training_equals_single_process(ep_run, single_run):
    """Losses, grad norms, max logits, clipped heads, update RMS, expert load, final weights, optimizer state."""
    multi, single = read_metrics(ep_run), read_metrics(single_run)
    assert len(multi) == len(single) == 3
    assert any(r["clipped_heads"] for r in single)
    for a, b in zip(multi, single, strict=True):
        assert a["tokens"] == b["tokens"] and a["clipped_heads"] == b["clipped_heads"]
        for k in ("loss", "grad_norm", "max_logit", "eval_loss", "update_rms", "load_max_over_mean"):
            if b.get(k) is not None:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    # the checkpoint is the single-process format: whole expert stacks, gathered on rank 0
    wa, wb = k25.load(ep_run / CKPT).state_dict(), k25.load(single_run / CKPT).state_dict()
    assert wa.keys() == wb.keys()
    for n, x in wa.items():
        torch.testing.assert_close(x, wb[n], rtol=1e-4, atol=2e-6, msg=n)
    oa = torch.load(ep_run / CKPT / "optimizer.pt", weights_only=False)
    ob = torch.load(single_run / CKPT / "optimizer.pt", weights_only=False)
    assert oa["state"].keys() == ob["state"].keys()
    for i, st in ob["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(oa["state"][i][key], v, rtol=1e-4, atol=1e-6, msg=f"{i} {key}")


def test_expert_parallel_run_killed_and_resumed_reproduces_the_curve(corpus, ep_dirs):
    """Roll the finished run back to what a kill during step 3 leaves on disk: the complete step-1
    checkpoint as ``latest``, metrics of steps 1–3 and a half-written ``step-2.tmp``. The same command
    resumes and reproduces the uninterrupted run: every logged number and the final weights and
    optimizer state, bit for bit."""
    ep_run, cut = ep_dirs
    for step in (2, 3):
        shutil.rmtree(cut / "checkpoints" / f"step-0000000{step}")
    (cut / "checkpoints" / "latest").write_text("step-00000001")
    (cut / "checkpoints" / "step-00000002.tmp").mkdir()
    resumed = _torchrun([*_args(corpus, *EP_ARGS), "--out", str(cut)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(read_metrics(cut)) == 3
    assert _curve(cut) == _curve(ep_run)
    wa, wb = k25.load(ep_run / CKPT).state_dict(), k25.load(cut / CKPT).state_dict()
    for n, x in wa.items():
        assert torch.equal(x, wb[n]), n
    oa = torch.load(ep_run / CKPT / "optimizer.pt", weights_only=False)
    ob = torch.load(cut / CKPT / "optimizer.pt", weights_only=False)
    assert oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for key, v in st.items():
            assert torch.equal(v, ob["state"][i][key]), (i, key)


def test_expert_count_not_divisible_by_ranks_is_refused(tmp_path, corpus, monkeypatch):
    """Rank 0 of 2 (pretended: the check runs before any collective) with 3 experts: a TrainError naming both."""
    monkeypatch.setattr(trainer_mod, "_world", lambda: (0, 2))
    monkeypatch.setattr(Trainer, "_barrier", lambda self: None)
    cfg = TrainConfig(out=str(tmp_path), data=[str(corpus)], seq_len=32, batch_size=2, progress=False,
                      overrides={"num_hidden_layers": 2, "n_routed_experts": 3}, parallel="ep")
    with pytest.raises(TrainError, match=r"--parallel ep: expert parallelism needs n_routed_experts divisible "
                                         r"by the number of ranks: 3 experts over 2 ranks"):
        Trainer(cfg)


# ---- the module on its own -----------------------------------------------------------------------

DISPATCH_SCRIPT = textwrap.dedent('''
    """Each rank: its own tokens; EP experts (half each) vs the full Experts; the second case routes every
    token to rank 0's experts, so rank 1 receives no rows at all (and must still take part in backward)."""
    import torch, torch.distributed as dist
    from k25.model.moe import Experts
    from k25.testing import tiny_config
    from k25.train.expert_parallel import ExpertParallelExperts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    full = Experts(tiny_config().text_config)
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ep = ExpertParallelExperts(full, rank, 2)
    e = full.n_experts
    for case in ("random", "rank0-only"):
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(5 + 3 * rank, full.gate_proj.shape[-1], generator=g, requires_grad=True)
        high = e if case == "random" else e // 2
        idx = torch.stack([torch.randperm(high, generator=g)[:2] for _ in range(x.shape[0])])
        w = torch.rand(idx.shape, generator=g, requires_grad=True)
        full.zero_grad(); ep.zero_grad()
        ref = full(x, idx, w)
        (ref * torch.arange(ref.numel()).view_as(ref).sin()).sum().backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        out = ep(x, idx, w)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)
        for name in ("gate_proj", "up_proj", "down_proj"):
            whole = getattr(full, name).grad.clone()
            dist.all_reduce(whole)  # every rank's tokens contribute to every expert
            mine = whole[ep.start : ep.start + ep.n_local]
            torch.testing.assert_close(getattr(ep, name).grad, mine, rtol=1e-5, atol=1e-6, msg=name)
    print(f"rank {rank} ok")
    dist.destroy_process_group()  # exiting with gloo's threads alive can abort ("terminate called ...")
''')


def test_dispatch_and_combine_match_the_full_experts(tmp_path):
    """Forward, input and routing-weight gradients equal the full Experts; expert gradients are the sum
    over every rank's tokens; a rank that receives no rows still runs its half of the collectives."""
    script = tmp_path / "dispatch.py"
    script.write_text(DISPATCH_SCRIPT)
    proc = _torchrun([str(script)], module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


def test_shard_experts_slices_and_refuses_an_uneven_split():
    """No process group needed: the slice of rank 1 of 2, state-dict slicing, and the divisibility check."""
    model = build_model(tiny_config(n_routed_experts=4), dtype=torch.float32, seed=0, vision=False)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    for m in model.modules():
        if isinstance(m, Experts):
            m.weight_transform = torch.neg  # QAT's fake quantization travels with the slice
    with pytest.raises(ValueError, match="4 experts over 3 ranks"):
        shard_experts(model, 0, 3)
    assert not any(isinstance(m, ExpertParallelExperts) for m in model.modules())  # left untouched
    assert shard_experts(model, 1, 2) == sum(isinstance(m, Experts) for m in model.modules())
    assert all(m.weight_transform is torch.neg for m in model.modules() if isinstance(m, ExpertParallelExperts))
    sliced = model.state_dict()
    name = next(k for k in sliced if k.endswith("experts.gate_proj"))
    assert torch.equal(sliced[name], full[name][2:4])
    assert expert_shard(dict(model.named_parameters())[name]).start == 2
    assert not any(expert_shard(p) for n, p in model.named_parameters() if ".experts." not in n)
    model.load_state_dict(local_state_dict(model, full))  # a full checkpoint loads into the slice
    assert torch.equal(model.state_dict()[name], full[name][2:4])
