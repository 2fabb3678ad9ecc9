"""The MuonClip evidence (docs/muonclip.md), small enough for a 2-core CPU.

    python -m k25.train.experiments logits     --out runs/exp-logits     # (a) max logit: Muon / MuonClip / AdamW
    python -m k25.train.experiments efficiency --out runs/exp-efficiency  # (b) tokens to a validation loss
    python -m k25.train.experiments step-cost                            # MuonClip vs AdamW step time

Data: the running Python's standard-library sources, byte-level (the model's 512-entry vocabulary
is the byte tokenizer's), with the last 5% of the stream held out. The model is K2.5-shaped
(MLA with q/kv LoRA and decoupled RoPE, sigmoid-routed experts + shared expert, YaRN), shrunk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from .plots import plot_runs
from .trainer import read_metrics

# A K2.5-shaped model around 2M parameters (0.9M active): every architectural feature kept.
MODEL = {
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
}


def make_corpus(path: Path, max_bytes: int = 3_000_000) -> dict[str, Any]:
    """Concatenate the stdlib's ``*.py`` files (sorted) up to ``max_bytes``; returns size and sha256."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for p in sorted(stdlib.rglob("*.py")):
        if "test" in p.parts or "site-packages" in p.parts:
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    data = "".join(parts).encode()[:max_bytes].decode("utf-8", errors="ignore")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    return {"bytes": len(data.encode()), "sha256": hashlib.sha256(data.encode()).hexdigest(), "source": str(stdlib)}


def train_command(out: Path, corpus: Path, **kw: Any) -> list[str]:
    """The ``k25 train pretrain`` command line of one run (what docs/muonclip.md lists)."""
    opts: dict[str, Any] = dict(seq_len=128, batch_size=8, eval_fraction=0.05, eval_batches=8, seed=0)
    opts.update(kw)
    cmd = ["k25", "train", "pretrain", str(corpus), "--out", str(out), "--no-progress"]
    for key, value in MODEL.items():
        cmd += ["--override", f"{key}={value}"]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", "none" if value is None else str(value)]
    return cmd


def run_all(commands: dict[str, list[str]], jobs: int = 2) -> None:
    """Run the commands, ``jobs`` at a time, each on one thread (on a shared 2-core CPU, 2 threads per
    process oversubscribe and run several times slower). A finished run resumes at its end, so re-running is cheap."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pending = list(commands.items())
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            argv = [sys.executable, "-m", "k25.cli", *cmd[1:]]
            out = Path(cmd[cmd.index("--out") + 1])
            log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115
            running.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode:
                    raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see its .log file")
                print(f"finished {name}", flush=True)


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    tail = records[-max(1, len(records) // 10):]
    return {
        "peak_max_logit": max(r["max_logit"] for r in records),
        "final_max_logit": records[-1]["max_logit"],
        "train_loss_last10pct": statistics.fmean(r["loss"] for r in tail),
        "final_eval_loss": records[-1].get("eval_loss"),
        "clipped_head_steps": sum(r["clipped_heads"] for r in records),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
    }


def logits_experiment(out: Path, steps: int = 400, lr: float = 3e-2, tau: float = 30.0, jobs: int = 2,
                      include: tuple[str, ...] = ("muon", "muonclip", "adamw")) -> dict[str, Any]:
    """(a) High lr, no weight decay, no warmup, no grad clip: the settings where logits grow (spec §7.3)."""
    corpus = out / "corpus.txt"
    info = make_corpus(corpus)
    common = dict(steps=steps, lr=lr, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=0.0,
                  eval_every=max(1, steps // 10))
    runs = {
        "muon": dict(optimizer="muonclip", qk_clip_tau=None),
        "muonclip": dict(optimizer="muonclip", qk_clip_tau=tau),
        "adamw": dict(optimizer="adamw", qk_clip_tau=None),
    }
    commands = {n: train_command(out / n, corpus, **common, **kw) for n, kw in runs.items() if n in include}
    run_all(commands, jobs)
    summary: dict[str, Any] = {"corpus": info, "model": MODEL, "tau": tau,
                               "commands": {n: " ".join(c) for n, c in commands.items()}, "runs": {}}
    for name in commands:
        summary["runs"][name] = _summary(read_metrics(out / name))
    labels = {"muon": "Muon (no clip)", "muonclip": f"MuonClip (τ={tau:g})", "adamw": "AdamW"}
    names = list(commands)
    plot_runs([out / n for n in names], "max_logit", out / "max_logit.png", labels=[labels[n] for n in names],
              title=f"max attention logit (lr {lr:g}, wd 0, no warmup)", log_y=True,
              hline=tau if "muonclip" in names else None)
    plot_runs([out / n for n in names], "loss", out / "loss.png", labels=[labels[n] for n in names],
              title="training loss")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def tokens_to_reach(records: list[dict[str, Any]], target: float) -> float | None:
    """Tokens at which the eval-loss curve first reaches ``target`` (linear between evaluations)."""
    evals = [(r["tokens"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    prev = None
    for tokens, loss in evals:
        if loss <= target:
            if prev is None:
                return float(tokens)
            (t0, l0) = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def efficiency_experiment(out: Path, steps: int = 300, muon_lrs: tuple[float, ...] = (2e-3, 5e-3, 1e-2),
                          adamw_lrs: tuple[float, ...] = (2e-3, 5e-3, 1e-2), jobs: int = 2) -> dict[str, Any]:
    """(b) Muon vs AdamW on the same data and schedule, each at its best lr of a small sweep.

    Same everything else (warmup 5%, cosine to 10%, wd 0.1, clip 1.0, τ 100). The token-efficiency
    ratio is tokens(AdamW to reach its best final eval loss) / tokens(Muon to reach the same loss).
    """
    corpus = out / "corpus.txt"
    info = make_corpus(corpus)
    common = dict(steps=steps, weight_decay=0.1, warmup_steps=max(1, steps // 20), schedule="cosine",
                  grad_clip=1.0, eval_every=max(1, steps // 20), qk_clip_tau=100.0)
    commands = {f"{opt}-lr{lr:g}": train_command(out / f"{opt}-lr{lr:g}", corpus, optimizer=opt, lr=lr, **common)
                for opt, lrs in (("muonclip", muon_lrs), ("adamw", adamw_lrs)) for lr in lrs}
    run_all(commands, jobs)
    summary: dict[str, Any] = {"corpus": info, "model": MODEL,
                               "commands": {n: " ".join(c) for n, c in commands.items()}, "runs": {}}
    best: dict[str, tuple[float, str]] = {}
    for name in commands:
        records = read_metrics(out / name)
        final = records[-1]["eval_loss"]
        summary["runs"][name] = {"final_eval_loss": final, "tokens": records[-1]["tokens"],
                                 "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records)}
        opt = name.split("-lr")[0]
        if opt not in best or final < best[opt][0]:
            best[opt] = (final, name)
    target = best["adamw"][0]
    t_muon = tokens_to_reach(read_metrics(out / best["muonclip"][1]), target)
    t_adamw = tokens_to_reach(read_metrics(out / best["adamw"][1]), target)
    summary["best"] = {k: {"run": v[1], "final_eval_loss": v[0]} for k, v in best.items()}
    summary["target_eval_loss"] = target
    summary["tokens_to_target"] = {"muonclip": t_muon, "adamw": t_adamw}
    summary["token_efficiency_adamw_over_muon"] = (t_adamw / t_muon) if t_muon and t_adamw else None
    names = [best["muonclip"][1], best["adamw"][1]]
    plot_runs([out / n for n in names], "eval_loss", out / "eval_loss.png", labels=names,
              title="held-out loss, best lr of each optimizer")
    plot_runs([out / n for n in commands], "eval_loss", out / "sweep.png", labels=list(commands),
              title="held-out loss, lr sweep")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def step_cost(preset_name: str = "bench", batch: int = 1, seq_len: int = 256, repeats: int = 3,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cost of a MuonClip step against an AdamW step, from measured parts.

    Forward+backward time does not depend on the optimizer; the optimizer step does not depend on
    the batch. Both are timed (median of ``repeats`` after a warm-up) on the same model, and the
    full-step ratio ``(fb + opt_muon) / (fb + opt_adamw)`` is reported at the measured batch and,
    scaling fb linearly in tokens, the tokens per step from which it is at most 1.3.
    """
    from ..checkpoint import build_model
    from ..config import preset
    from .muon import build_optimizer

    config = preset(preset_name)
    config.vision_config = None
    if overrides:
        config = config.replace_text(**overrides)
    model = build_model(config, dtype=torch.float32, seed=0, vision=False).train()
    ids = torch.randint(0, config.text_config.vocab_size - 300, (batch, seq_len + 1),
                        generator=torch.Generator().manual_seed(0))

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()

    def timed(fn: Any) -> float:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            fn()
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result: dict[str, Any] = {"preset": preset_name, "overrides": overrides or {}, "batch": batch, "seq_len": seq_len,
                              "threads": torch.get_num_threads(),
                              "parameters": sum(p.numel() for p in model.parameters())}
    result["forward_backward_s"] = fb = timed(fwd_bwd)
    fwd_bwd()  # gradients for the optimizer timings
    for name, kw in (("adamw", {}), ("muonclip", {}), ("muonclip_ns_fp32", {"ns_dtype": torch.float32})):
        opt = build_optimizer(model, "adamw" if name == "adamw" else "muonclip", lr=1e-12, weight_decay=0.0,
                              qk_clip_tau=100.0, **kw)
        result[f"optimizer_{name}_s"] = timed(opt.step)
        del opt
    tokens = batch * seq_len
    t_adam = result["optimizer_adamw_s"]
    for name in ("muonclip", "muonclip_ns_fp32"):
        t_muon = result[f"optimizer_{name}_s"]
        result[f"step_ratio_{name}_at_this_batch"] = (fb + t_muon) / (fb + t_adam)
        # (T·fb/tokens + t_muon) <= 1.3·(T·fb/tokens + t_adam)  ⇔  T >= (t_muon - 1.3·t_adam)·tokens / (0.3·fb)
        result[f"tokens_per_step_for_ratio_1.3_{name}"] = max(0.0, (t_muon - 1.3 * t_adam) * tokens / (0.3 * fb))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k25.train.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("logits")
    p.add_argument("--out", type=Path, default=Path("runs/exp-logits"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--tau", type=float, default=30.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", nargs="+", default=["muon", "muonclip", "adamw"], choices=["muon", "muonclip", "adamw"])
    p = sub.add_parser("efficiency")
    p.add_argument("--out", type=Path, default=Path("runs/exp-efficiency"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[2e-3, 5e-3, 1e-2])
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[2e-3, 5e-3, 1e-2])
    p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("step-cost")
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (memory)")
    args = parser.parse_args(argv)
    if args.which == "logits":
        summary = logits_experiment(args.out, args.steps, args.lr, args.tau, args.jobs, tuple(args.only))
    elif args.which == "efficiency":
        summary = efficiency_experiment(args.out, args.steps, tuple(args.muon_lrs), tuple(args.adamw_lrs), args.jobs)
    else:
        summary = step_cost(args.preset, args.batch, args.seq_len, args.repeats,
                            {"num_hidden_layers": args.layers} if args.layers else None)
    print(json.dumps(summary, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
