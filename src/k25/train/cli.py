"""`k25 train pretrain|sft|plot`: the training pipeline from the command line (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as JSON when it is JSON (numbers, null, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected key=value")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _tau(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "inf") else float(text)


def _add_run_args(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("data", nargs="+", help=".txt / .jsonl {text} files, or k25 data records (chats trained "
                   "whole, with their special tokens)" if task == "pretrain"
                   else ".jsonl files of {messages, tools?} conversations or k25 data records")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, metrics.jsonl); resumes if present")
    p.add_argument("--model", default="tiny", help="preset name or checkpoint directory (default: tiny)")
    p.add_argument("--override", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="text_config field of a preset, e.g. num_hidden_layers=2 (repeatable)")
    p.add_argument("--tokenizer", default=None, help="'bytes' or a directory with tiktoken.model "
                   "(default: the model directory's, else bytes)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--optimizer", choices=["muonclip", "adamw"], default="muonclip")
    p.add_argument("--ns-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="Newton–Schulz precision (bfloat16 as torch.optim.Muon)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--decay-fraction", type=float, default=0.2, help="WSD: fraction of steps spent decaying")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--qk-clip-tau", type=_tau, default=100.0, help="QK-Clip threshold τ ('none': off)")
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="MoE correction-bias step (0: off)")
    p.add_argument("--seq-aux-alpha", type=float, default=0.0, help="sequence-wise balance loss weight")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one process; torchrun for several)")
    p.add_argument("--qat", choices=["none", "int4"], default="none",
                   help="quantization-aware training: fake INT4 (group 32, symmetric, STE) on the routed experts")
    p.add_argument("--vision", choices=["auto", "on", "off"], default="auto",
                   help="train the vision tower too (K2.5 layout checkpoints): auto = when the data has images")
    p.add_argument("--vision-init", metavar="PRESET|CHECKPOINT", default=None,
                   help="--model is a text-only checkpoint: add a new vision tower and projector of PRESET's shape, "
                   "or the trained ones of a multimodal CHECKPOINT (a tower trained beside a smaller model)")
    p.add_argument("--freeze", choices=["none", "text", "text+vision"], default="none",
                   help="text: train only the vision tower and projector; text+vision: only the projector. The "
                   "language model (weights, router biases) stays exactly as loaded, so text answers do not change")
    p.add_argument("--vision-lr", type=float, default=None,
                   help="peak learning rate of the vision tower and projector (default: --lr); a new tower "
                   "learns at lower rates than a language model tolerates")
    p.add_argument("--parallel", choices=["ddp", "fsdp", "ep"], default="ddp",
                   help="under torchrun: replicated data parallel, FSDP2-sharded parameters and optimizer state, "
                   "or data parallel with the routed experts split over the ranks (expert parallel, all-to-all)")
    p.add_argument("--eval-data", nargs="*", default=[], help="held-out files (default: split off the data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    if task == "sft":
        p.add_argument("--instant", action="store_true", help="render conversations in Instant mode "
                       "(k25 data records always use their own mode)")
        p.add_argument("--pack", action="store_true", help="several conversations per sequence (no padding waste)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def cmd_run(args: argparse.Namespace) -> int:
    from .data import DataError
    from .trainer import TrainConfig, TrainError, train

    cfg = TrainConfig(
        out=args.out, data=args.data, task=args.task, model=args.model, overrides=dict(args.override),
        tokenizer=args.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, optimizer=args.optimizer, ns_dtype=args.ns_dtype, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, schedule=args.schedule, min_lr_ratio=args.min_lr_ratio,
        decay_fraction=args.decay_fraction, grad_clip=args.grad_clip, qk_clip_tau=args.qk_clip_tau,
        bias_update_rate=args.bias_update_rate, seq_aux_alpha=args.seq_aux_alpha, amp=args.amp, parallel=args.parallel,
        device=args.device, qat=args.qat, pack=getattr(args, "pack", False), vision=args.vision,
        vision_init=args.vision_init, freeze=args.freeze, vision_lr=args.vision_lr,
        eval_data=args.eval_data, eval_fraction=args.eval_fraction,
        eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, thinking=not getattr(args, "instant", False), progress=not args.no_progress,
        stop_after=args.stop_after,
    )
    import torch.distributed as dist

    finished = False
    try:
        summary = train(cfg)
        finished = True
    except (TrainError, DataError) as e:
        print(f"k25 train: error: {e}", file=sys.stderr)
        return 2
    finally:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            # under torchrun: a process that exits with gloo's threads still alive can abort
            # ("terminate called without an active exception"), failing a run that finished; the
            # barrier (only after a run that finished everywhere: a failed rank would leave the
            # others waiting) keeps one rank from tearing down while another still writes
            if finished:
                dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_runs
    from .trainer import TrainError

    try:
        path = plot_runs(args.runs, args.metric, args.out, labels=args.label or None, log_y=args.log_y,
                         hline=args.hline, chain=args.chain, smooth=args.smooth)
    except TrainError as e:
        print(f"k25 train plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_vision_align(args: argparse.Namespace) -> int:
    from .data import DataError
    from .trainer import TrainError
    from .vision_align import AlignError, run

    try:
        run(args.model, args.out, [f.strip() for f in args.families.split(",") if f.strip()],
            heldout=args.heldout, vision=args.vision, steps=args.steps, lr=args.lr, warmup=args.warmup_steps,
            batch=args.batch_size, eval_every=args.eval_every, seed=args.seed)
    except (AlignError, TrainError, DataError, OSError) as e:
        print(f"k25 train vision-align: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `k25 train pretrain|sft|vision-align|plot`."""
    train = subparsers.add_parser("train", help="pretrain or fine-tune with MuonClip; plot metrics")
    sub = train.add_subparsers(dest="train_command", required=True)
    for task, help_text in (("pretrain", "next-token pretraining on packed sequences"),
                            ("sft", "supervised fine-tuning on chat conversations (loss on assistant tokens)")):
        p = sub.add_parser(task, help=help_text)
        _add_run_args(p, task)
        p.set_defaults(func=cmd_run, task=task)
    p = sub.add_parser("vision-align", help="give a text-only checkpoint a new vision tower trained to put on each "
                       "LM position the embedding of what it shows (the stage before joint training)")
    p.add_argument("--model", required=True, help="text-only checkpoint directory (its embeddings stay frozen)")
    p.add_argument("--out", required=True, help="where to write the checkpoint with the aligned tower")
    p.add_argument("--families", default="read,count", help="read, count, or both (default)")
    p.add_argument("--heldout", nargs="*", default=[], metavar="FILE",
                   help="k25 data heldout.jsonl files of vision_read / vision_count: scored every --eval-every "
                        "steps, and their texts and scenes never drawn for training")
    p.add_argument("--vision", default="k25-mini", help="preset whose tower shape to use (default: k25-mini)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=5e-3, help="MuonClip peak rate (default 5e-3)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="new pictures per step")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_vision_align)
    p = sub.add_parser("plot", help="plot a metric of one or more runs (metrics.jsonl) against tokens")
    p.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    p.add_argument("--metric", default="loss", help="loss, eval_loss, max_logit, grad_norm, lr, ... (default: loss)")
    p.add_argument("--label", action="append", help="legend label per run (default: directory names)")
    p.add_argument("--log-y", action="store_true")
    p.add_argument("--hline", type=float, default=None, help="draw a reference level, e.g. the QK-Clip τ")
    p.add_argument("--chain", action="store_true",
                   help="the runs are consecutive phases: each starts on the x axis where the previous ended")
    p.add_argument("--smooth", type=int, default=1, metavar="N", help="plot the mean of the last N values")
    p.add_argument("-o", "--out", default="metrics.png", type=Path)
    p.set_defaults(func=cmd_plot)
