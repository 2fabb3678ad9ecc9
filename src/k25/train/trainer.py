"""The pretraining / SFT loop: read top to bottom in one sitting (nanoGPT style).

One optimizer step = ``grad_accum`` micro-batches on each of ``world`` ranks. The loss is the sum
of token losses over the whole global batch divided by its number of target tokens, so the
gradient (summed over micro-batches and all-reduced over ranks) is the same whatever the split.
Under torchrun the parameters are replicated (``ddp``), FSDP2-sharded (``fsdp``), or replicated
except the routed experts, which are split over the ranks (``ep``, see ``expert_parallel.py``).
After ``optimizer.step()`` (Muon/AdamW + QK-Clip) the MoE correction biases move towards balance.

Checkpoints (``out/checkpoints/step-N``) are complete k25 checkpoint directories (config.json,
safetensors under the official names, tokenizer, chat template) plus ``optimizer.pt`` and
``trainer_state.json``; each is written under a temporary name and renamed into place, and
``checkpoints/latest`` is replaced atomically, so a run killed at any moment resumes from the last
complete checkpoint. Data order is a pure function of (seed, sample index) and the lr a pure
function of the step, so the resumed run reproduces the uninterrupted run's losses exactly.

When the data shows images (or ``vision="on"``) the whole K25ForConditionalGeneration trains: the
batches carry ``pixel_values``/``grid_thws``, the vision tower and projector get gradients and Muon
(their 2-D weights; the conv patch embedding and position table go to AdamW, as the token
embedding does), and checkpoints are in the K2.5 layout with ``vision_tower.``/``mm_projector.``.
Text-only data trains the text model alone, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..chat.template import write_chat_template
from ..chat.tokenizer import KimiTokenizer
from ..checkpoint import build_model, load_model, save_model
from ..checkpoint.int4 import fake_quantize_int4
from ..checkpoint.model_io import text_model
from ..config import PRESETS, K25Config, preset
from ..model.moe import Experts
from .balance import ExpertLoad, sequence_aux_loss
from .data import (
    ChatExample,
    ConcatDataset,
    Dataset,
    PackedDataset,
    PackedSFTDataset,
    SFTDataset,
    data_has_images,
    load_tokenizer,
    read_pretrain_tokens,
)
from .expert_parallel import (
    full_optimizer_state,
    full_state_dict,
    is_expert_parallel,
    local_optimizer_state,
    local_state_dict,
    shard_experts,
)
from .muon import MuonClip, attention_layers, build_optimizer
from .schedule import lr_factor

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PARALLEL = ("ddp", "fsdp", "ep")
# what --freeze leaves trainable: the prefixes of the parameters that still get gradients
FREEZE = {"none": None, "text": ("vision_tower.", "mm_projector."), "text+vision": ("mm_projector.",)}


class TrainError(ValueError):
    """A training option or resume state is inconsistent; the message names it."""


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``out/train_config.json`` and checked on resume."""

    out: str
    data: list[str]
    task: str = "pretrain"  # pretrain | sft
    model: str = "tiny"  # preset name or checkpoint directory
    overrides: dict[str, Any] = field(default_factory=dict)  # text_config fields for a preset
    tokenizer: str | None = None  # "bytes" or a directory; default: the model dir's, else bytes
    seq_len: int = 128
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1
    steps: int = 100
    optimizer: str = "muonclip"  # muonclip | adamw
    # Newton–Schulz precision: bfloat16 (as the references; also ~2× faster than fp32 on an avx512_bf16 CPU,
    # BENCHMARKS.md "k25-mini, run 2") | float32
    ns_dtype: str = "bfloat16"
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | wsd | constant
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    grad_clip: float = 1.0  # 0 disables
    qk_clip_tau: float | None = 100.0  # None disables clipping (max logits are still logged)
    bias_update_rate: float = 1e-3
    seq_aux_alpha: float = 0.0
    amp: str = "none"  # none | bf16 (autocast)
    device: str = "cpu"  # cpu | cuda (one process; the result is the same run, up to float rounding)
    qat: str = "none"  # none | int4: fake INT4 (group 32, symmetric, straight-through) on the routed experts
    pack: bool = False  # SFT: several conversations per sequence instead of one padded each
    vision: str = "auto"  # auto: train the vision tower when the data has images | on | off
    # the checkpoint gets a vision tower: a new one of this preset's shape (text-only checkpoints), or the
    # trained tower and projector of this multimodal checkpoint (K2.5's ViT-training stage, then the
    # projector-only stage), which replace any it has
    vision_init: str | None = None
    # none | text: only the vision tower and projector train (the language model stays as is) |
    # text+vision: only the projector trains (K2.5's projector-only stage)
    freeze: str = "none"
    vision_lr: float | None = None  # the tower and projector's own peak lr (None: lr); the schedule scales both
    # with several processes: ddp (replicated, grads all-reduced) | fsdp (FSDP2 sharded) | ep (ddp, with the
    # routed experts split over the ranks and tokens sent to them by all-to-all)
    parallel: str = "ddp"
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.05
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    seed: int = 0
    thinking: bool = True
    progress: bool = True
    stop_after: int | None = None  # stop after this step without a final save (simulates a kill)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("progress", "stop_after", "eval_every", "save_every", "keep_checkpoints", "device")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched with WORLD_SIZE > 1.

    gloo on CPU. With CUDA: NCCL for CUDA tensors and gloo for the small CPU ones (expert-load counts,
    update statistics), and each rank on its own GPU (``LOCAL_RANK``), which ``--device cuda`` then means.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return _world()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def graft_vision(model_dir: str, ckpt: K25Config, source: str, seed: int = 0) -> tuple[nn.Module, K25Config]:
    """A checkpoint's language model plus a vision tower and projector (``vision_init``).

    A preset name gives a freshly initialised tower of that preset's shape whose projector
    writes into the checkpoint's text width (a late-fusion start, where K2.5 fused from the
    start). A multimodal checkpoint gives its trained tower and projector, as K2.5 joined a
    ViT trained beside a smaller language model to K2 (then trained the projector alone);
    they replace the checkpoint's own tower and projector if it has them. The language model
    keeps the checkpoint's weights either way.
    """
    donor = None
    if Path(source).is_dir():
        donor_config = K25Config.from_json_file(source)
        if donor_config.vision_config is None:
            raise TrainError(f"vision_init {source!r}: that checkpoint has no vision tower")
        vision = donor_config.vision_config
        if vision.text_hidden_size != ckpt.text_config.hidden_size:
            raise TrainError(
                f"vision_init {source!r}: its projector writes {vision.text_hidden_size}-wide embeddings "
                f"(mm_projector.proj.2.weight [{vision.text_hidden_size}, ...]) but {model_dir!r} has "
                f"hidden_size {ckpt.text_config.hidden_size}")
        donor = load_model(source, dtype=torch.float32, vision=True)
    elif source in PRESETS:
        vision = preset(source).vision_config
        if vision is None:
            raise TrainError(f"vision_init {source!r}: that preset has no vision tower")
    else:
        raise TrainError(f"vision_init {source!r}: expected a preset name ({', '.join(PRESETS)}) or a "
                         "checkpoint directory with a vision tower")
    text = ckpt.text_config
    vision.text_hidden_size = text.hidden_size
    config = K25Config(text_config=text, vision_config=vision, bos_token_id=text.bos_token_id,
                       eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    if not ckpt.text_only:
        config.media_placeholder_token_id = ckpt.media_placeholder_token_id
    model = build_model(config, dtype=torch.float32, seed=seed, vision=True)
    text_model(model).load_state_dict(load_model(model_dir, dtype=torch.float32, vision=False).state_dict())
    if donor is not None:
        model.vision_tower.load_state_dict(donor.vision_tower.state_dict())
        model.mm_projector.load_state_dict(donor.mm_projector.state_dict())
    return model, config


class Trainer:
    """Builds model, tokenizer, data and optimizer from a :class:`TrainConfig`, then :meth:`run`."""

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.task not in ("pretrain", "sft"):
            raise TrainError(f"task {cfg.task!r}: expected 'pretrain' or 'sft'")
        if cfg.ns_dtype not in NS_DTYPES:
            raise TrainError(f"ns_dtype {cfg.ns_dtype!r}: expected one of {', '.join(NS_DTYPES)}")
        if cfg.parallel not in PARALLEL:
            raise TrainError(f"parallel {cfg.parallel!r}: expected one of {', '.join(PARALLEL)}")
        if cfg.amp not in ("none", "bf16"):
            raise TrainError(f"amp {cfg.amp!r}: expected 'none' or 'bf16'")
        if cfg.qat not in ("none", "int4"):
            raise TrainError(f"qat {cfg.qat!r}: expected 'none' or 'int4'")
        if cfg.vision not in ("auto", "on", "off"):
            raise TrainError(f"vision {cfg.vision!r}: expected 'auto', 'on' or 'off'")
        if cfg.freeze not in FREEZE:
            raise TrainError(f"freeze {cfg.freeze!r}: expected one of {', '.join(map(repr, FREEZE))}")
        try:
            self.device = torch.device(cfg.device)
        except RuntimeError as e:
            raise TrainError(f"device {cfg.device!r}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"device {cfg.device!r}: torch sees no CUDA device")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(cfg, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        self.cfg = cfg
        self.rank, self.world = _world()
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.vision = self._use_vision()
        if cfg.vision_lr is not None and (cfg.vision_lr < 0 or not self.vision):
            raise TrainError(f"vision_lr {cfg.vision_lr}: " + ("must be >= 0" if cfg.vision_lr < 0 else
                             "this run trains no vision tower (no image data, or vision is off)"))
        if self.vision and self.world > 1 and cfg.parallel == "fsdp":
            raise TrainError("FSDP does not shard the vision tower yet (a rank without images would skip its "
                             "gradient collective); train multimodal models with --parallel ddp")
        self.model, self.config = self._build_model()
        self.model.to(self.device)
        if cfg.freeze != "none":
            self._freeze()
        if cfg.qat == "int4":
            self.set_qat(True)
        self.tokenizer = self._build_tokenizer()
        self.train_set, self.eval_set = self._build_data()
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp"
        self.ep = self.world > 1 and cfg.parallel == "ep"
        if self.fsdp:
            self._shard_model()
        if self.ep:
            self._shard_experts()
        # a frozen language model is not clipped either: QK-Clip would rescale its attention weights
        self.optimizer: MuonClip = build_optimizer(
            self.model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            qk_clip_tau=None if cfg.freeze != "none" else cfg.qk_clip_tau,
            ns_dtype=NS_DTYPES[cfg.ns_dtype],
            prefix_lr=dict.fromkeys(FREEZE["text"], cfg.vision_lr) if cfg.vision_lr is not None else None,
        )
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self.load = ExpertLoad(self.model)
        self.step = 0
        self.tokens_seen = 0

    # ---- setup ------------------------------------------------------------------------------

    def _use_vision(self) -> bool:
        """Whether the vision tower trains: ``on``/``off``, or (``auto``) whether any data file shows an image."""
        cfg = self.cfg
        images = data_has_images([*cfg.data, *cfg.eval_data])
        if cfg.vision == "off" and images:
            raise TrainError("the data has image records but vision is off; drop them or use --vision auto")
        return cfg.vision == "on" or (cfg.vision == "auto" and images)

    def _build_model(self) -> tuple[nn.Module, K25Config]:
        cfg = self.cfg
        ckpt_config = K25Config.from_json_file(cfg.model) if Path(cfg.model).is_dir() else None
        if cfg.vision_init is not None:
            if ckpt_config is None:
                raise TrainError(f"vision_init adds a vision tower to a checkpoint, but {cfg.model!r} is a preset")
            if ckpt_config.vision_config is not None and not Path(cfg.vision_init).is_dir():
                raise TrainError(f"vision_init {cfg.vision_init!r} would replace {cfg.model!r}'s trained tower with "
                                 "a new one; give a checkpoint whose tower should replace it, or no vision_init")
            if not self.vision:
                raise TrainError("vision_init adds a vision tower to train, but the data has no images (or vision "
                                 "is off); add image records or --vision on")
        model = None
        if ckpt_config is not None:
            if cfg.overrides:
                raise TrainError("--override applies to presets; a checkpoint's architecture is fixed")
            if self.vision and ckpt_config.vision_config is None and cfg.vision_init is None:
                raise TrainError(f"{cfg.model} has no vision tower (a text-only checkpoint), but the data has images; "
                                 "start from a preset with one (k25-mini, tiny) or a multimodal checkpoint, or add "
                                 "a new tower with --vision-init PRESET")
        if cfg.vision_init is not None:
            model, config = self._graft_vision(ckpt_config)
        elif ckpt_config is not None:
            model = load_model(cfg.model, dtype=torch.float32, vision=self.vision)
            model = model if self.vision else text_model(model)
            config = model.k25_config if hasattr(model, "k25_config") else ckpt_config
        else:
            config = preset(cfg.model)
            if not self.vision:
                config.vision_config = None  # text training; also frees the vision/text width coupling
            elif config.vision_config is None:
                raise TrainError(f"preset {cfg.model!r} has no vision tower, but the data has images")
            elif "hidden_size" in cfg.overrides:  # the projector writes into the text width
                config.vision_config.text_hidden_size = cfg.overrides["hidden_size"]
            if cfg.overrides:
                config = config.replace_text(**cfg.overrides)
        if not self.vision:
            config.vision_config = None  # the text model is trained; checkpoints carry no vision tower
        config.quantization_config = None
        config.text_config.dtype = config.dtype = "float32"
        if model is None:
            model = build_model(config, dtype=torch.float32, seed=cfg.seed, vision=self.vision)
        return model.train(), config

    def _freeze(self) -> None:
        """Train only part of a multimodal model: the tower and projector (``text``), or the projector.

        ``text`` is the LLaVA-style alignment of a new tower; ``text+vision`` is K2.5's short
        projector-only stage that joins a tower trained beside another language model to this one.
        The language model's weights, its router correction biases (no bias update) and its
        attention scales (no QK-Clip) stay exactly as loaded, so text-only prompts give the same
        logits before and after; gradients still flow through it to the projector.
        """
        if not self.vision:
            raise TrainError(f"freeze {self.cfg.freeze} trains only the vision side, but this run has none (no image "
                             "data, or vision is off)")
        trainable = FREEZE[self.cfg.freeze]
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith(trainable))

    def _graft_vision(self, ckpt: K25Config) -> tuple[nn.Module, K25Config]:
        return graft_vision(self.cfg.model, ckpt, self.cfg.vision_init, self.cfg.seed)  # type: ignore[arg-type]

    def set_qat(self, on: bool) -> None:
        """Quantization-aware training (K2-Thinking's recipe): routed experts see their INT4 round trip.

        Weight-only, group 32, symmetric, the straight-through estimator for the gradient; the
        master weights stay in full precision and export exactly with ``k25 quantize``.
        """
        group = 32
        for m in self.model.modules():
            if isinstance(m, Experts):
                if on and m.gate_proj.shape[-1] % group:
                    raise TrainError(f"QAT needs expert input sizes divisible by {group}, got {m.gate_proj.shape[-1]}")
                m.weight_transform = fake_quantize_int4 if on else None

    def _build_tokenizer(self) -> KimiTokenizer:
        spec = self.cfg.tokenizer
        if spec is None:
            spec = self.cfg.model if (Path(self.cfg.model) / "tiktoken.model").is_file() else "bytes"
        tok = load_tokenizer(spec, self.out if self.rank == 0 else self.out / f"rank{self.rank}")
        vocab = self.config.text_config.vocab_size
        if tok.vocab_size > vocab:
            raise TrainError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {vocab}")
        for t in (self.config.text_config, self.config):  # generation stops at <|im_end|>, as the release
            t.bos_token_id, t.eos_token_id, t.pad_token_id = tok.bos_id, tok.im_end_id, tok.pad_id
        if self.vision:  # the placeholder the data's expanded images use
            self.config.media_placeholder_token_id = tok.token_to_id("<|media_pad|>")
        return tok

    def _pretrain_set(self, paths: list[str]) -> Dataset:
        """The token stream's windows; with a vision tower, plus packed rows of the image records."""
        media: list[ChatExample] | None = [] if self.vision else None
        tokens = read_pretrain_tokens(paths, self.tokenizer, media)
        if not media:
            return PackedDataset(tokens, self.cfg.seq_len)
        parts: list[Dataset] = [PackedSFTDataset(media, self.cfg.seq_len, self.tokenizer.pad_id)]
        if len(tokens) > self.cfg.seq_len:
            parts.insert(0, PackedDataset(tokens, self.cfg.seq_len))
        return ConcatDataset(parts)

    def _build_data(self) -> tuple[Dataset, Dataset]:
        cfg = self.cfg
        if cfg.task == "pretrain":
            data = self._pretrain_set(cfg.data)
            if cfg.eval_data:
                return data, self._pretrain_set(cfg.eval_data)
            return data.split(cfg.eval_fraction)  # type: ignore[attr-defined]
        data = SFTDataset.from_jsonl(cfg.data, self.tokenizer, cfg.seq_len, cfg.thinking, pack=cfg.pack)
        if cfg.eval_data:
            return data, SFTDataset.from_jsonl(cfg.eval_data, self.tokenizer, cfg.seq_len, cfg.thinking,
                                               pack=cfg.pack)
        return data.split(cfg.eval_fraction)

    def _shard_model(self) -> None:
        """FSDP2: shard every decoder layer and the root over all ranks (parameters become DTensors).

        Gradients are reduce-scattered as sums (divide factor 1): the loss is already normalised by
        the global token count, exactly as in the data-parallel path.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (self.world,))
        for layer in text_model(self.model).model.layers:  # the vision tower is sharded with the root
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM

    def _shard_experts(self) -> None:
        """Expert parallelism: keep this rank's ``E/world`` routed experts (a contiguous block) per MoE layer.

        Every rank built the same full model (same seed or checkpoint), so the slices are exactly the
        single-process weights; everything else stays replicated, as under ``ddp``.
        """
        try:
            shard_experts(self.model, self.rank, self.world)
        except ValueError as e:
            raise TrainError(f"--parallel ep: {e}") from None

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---- one step ---------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, ids: torch.Tensor, media: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits; ``media`` = (pixel_values, grid_thws) of the rows' images, scattered into their placeholders."""
        with self._autocast():
            if media and media[1].shape[0]:
                return self.model(ids, pixel_values=media[0], grid_thws=media[1])
            return self.model(ids)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches of ``step``: global micro-batch j = a·world + rank."""
        cfg = self.cfg
        b, per_step = cfg.batch_size, cfg.batch_size * cfg.grad_accum * self.world
        out = []
        for a in range(cfg.grad_accum):
            j = a * self.world + self.rank
            start = step * per_step + j * b
            out.append(tuple(t.to(self.device) for t in self.train_set.batch(range(start, start + b), cfg.seed)))
        return out

    def train_step(self) -> dict[str, Any]:
        """Forward/backward over the step's micro-batches, clip, optimizer step, bias update."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        factor = lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
        batches = self.micro_batches(self.step)
        n_tokens = torch.tensor(float(sum(int(b[2].sum()) for b in batches)), device=self.device)
        if self.world > 1:
            dist.all_reduce(n_tokens)
        if n_tokens == 0:
            raise TrainError(f"step {self.step}: no target tokens in the global batch (all masked)")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        opt.zero_grad(set_to_none=True)
        for ids, targets, mask, *media in batches:
            logits = self.forward(ids, media)
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            loss = (token_loss * mask.flatten()).sum() / n_tokens
            if cfg.seq_aux_alpha > 0:
                aux = sequence_aux_loss(model, ids.shape[0], cfg.seq_aux_alpha) / (cfg.grad_accum * self.world)
                aux_sum += aux.detach().double()
                loss = loss + aux
            self.load.collect()
            loss.backward()
            loss_sum += (token_loss.detach() * mask.flatten()).sum().double()
        if self.world > 1:
            if not self.fsdp:  # FSDP2 has already reduce-scattered the gradient shards
                self._all_reduce_grads()
            dist.all_reduce(loss_sum)
            dist.all_reduce(aux_sum)
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if self.ep:
            grad_norm = self._clip_grad_norm_ep(params, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {self.step}: gradient norm is {float(grad_norm)}")
        opt.step()
        imbalance = self.load.update_bias(0.0 if cfg.freeze != "none" else cfg.bias_update_rate)
        self.step += 1
        self.tokens_seen += int(n_tokens)
        clip = opt.last_clip
        return {
            "step": self.step, "loss": float(loss_sum / n_tokens), "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm), "max_logit": clip.max_logit, "clipped_heads": clip.num_clipped,
            "update_rms": opt.last_update_rms, "load_max_over_mean": imbalance, "aux_loss": float(aux_sum),
            "tokens": self.tokens_seen,
        }

    def _all_reduce_grads(self) -> None:
        """Sum gradients over ranks in one flat buffer (data parallel: replicas stay identical).

        A parameter with a gradient on any rank gets one on every rank (zeros where it had none,
        e.g. the vision tower on a rank whose batch held no image), so the buffers line up and the
        optimizer updates the same parameters everywhere, as one process would. Expert-parallel
        slices are skipped: the all-to-all backward already brought each expert the gradient from
        every rank's tokens.
        """
        params = [p for p in self.model.parameters() if not is_expert_parallel(p)]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        for p, there in zip(params, present.tolist(), strict=True):
            if there and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _clip_grad_norm_ep(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over the whole model when each rank holds different experts.

        Replicated gradients are equal on every rank and count once; the expert slices' squared norms
        are summed over ranks. Every rank then scales by the same global coefficient.
        """
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        experts = [p.grad for p in params if is_expert_parallel(p)]
        replicated = [p.grad for p in params if not is_expert_parallel(p)]
        sq = get_total_norm(experts).pow(2) if experts else torch.zeros((), device=self.device)
        dist.all_reduce(sq)
        if replicated:
            sq = sq + get_total_norm(replicated).pow(2)
        total = sq.sqrt()
        clip_grads_with_norm_(params, max_norm, total)
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the first ``eval_batches`` held-out batches (same every time)."""
        cfg, model = self.cfg, self.model
        layers = attention_layers(model)
        recording = [a.record_max_logits for a in layers]
        for a in layers:
            a.record_max_logits = False
        model.eval()
        total, count = 0.0, 0
        try:
            n = min(len(self.eval_set), cfg.eval_batches * cfg.batch_size)
            for start in range(0, n, cfg.batch_size):
                batch = self.eval_set.batch(range(start, min(n, start + cfg.batch_size)), 0, shuffle=False)
                ids, targets, mask, *media = (t.to(self.device) for t in batch)
                logits = self.forward(ids, media)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
                total += float((loss * mask.flatten()).sum())
                count += int(mask.sum())
        finally:
            model.train()
            for a, r in zip(layers, recording, strict=True):
                a.record_max_logits = r
        return total / max(1, count)

    # ---- checkpoints ------------------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step-{step:08d}"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (rank 0), then point ``latest`` at it."""
        final = self.checkpoint_path(self.step)
        model, optim_state = self.model, None
        if self.fsdp:  # gather full tensors (a collective: every rank takes part)
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=opts)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
            if self.rank == 0:
                model = build_model(self.config, dtype=torch.float32, seed=None, vision=self.vision)
                model.load_state_dict(full)
        elif self.ep:  # gather whole expert stacks and their optimizer state (collectives)
            full = full_state_dict(self.model)
            optim_state = full_optimizer_state(self.optimizer)
            if self.rank == 0:
                model = build_model(self.config, dtype=torch.float32, seed=None, vision=False)
                model.load_state_dict(full)
        elif self.device.type != "cpu" and self.rank == 0:
            model = build_model(self.config, dtype=torch.float32, seed=None, vision=self.vision)
            model.load_state_dict({k: v.cpu() for k, v in self.model.state_dict().items()})
        if self.rank == 0:
            tmp = final.with_name(final.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            save_model(model, self.config, tmp)
            self.tokenizer.save_pretrained(tmp)
            write_chat_template(tmp)
            torch.save(optim_state if optim_state is not None else self.optimizer.state_dict(), tmp / "optimizer.pt")
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                     "train_config": self.cfg.to_json()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.ckpt_dir / "latest", final.name)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        keep = max(1, self.cfg.keep_checkpoints)
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if not p.name.endswith(".tmp"))
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        if not (path / "trainer_state.json").is_file():
            raise TrainError(f"{pointer} names {path.name}, which is missing or incomplete")
        return path

    def resume(self, path: Path) -> None:
        """Restore weights, router biases, optimizer state and counters from a checkpoint."""
        state = json.loads((path / "trainer_state.json").read_text())
        saved = state["train_config"]
        mine = self.cfg.to_json()
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fields newer than the checkpoint
        diff = [k for k in mine if k not in TrainConfig.RESUMABLE and saved.get(k, defaults[k]) != mine[k]]
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in diff)
            raise TrainError(f"cannot resume from {path}: the run's settings changed ({details})")
        if state["world_size"] != self.world:
            raise TrainError(f"cannot resume from {path}: written with {state['world_size']} ranks, now {self.world}")
        loaded = load_model(path, dtype=torch.float32, vision=self.vision)
        loaded = loaded if self.vision else text_model(loaded)
        optim_state = torch.load(path / "optimizer.pt", weights_only=False, map_location=self.device)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, loaded.state_dict(), options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, optim_state, options=opts)
        elif self.ep:  # the checkpoint holds whole expert stacks: keep this rank's slice
            self.model.load_state_dict(local_state_dict(self.model, loaded.state_dict()))
            self.optimizer.load_state_dict(local_optimizer_state(self.optimizer, optim_state))
        else:
            self.model.load_state_dict(loaded.state_dict())
            self.optimizer.load_state_dict(optim_state)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]

    # ---- the loop ---------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop records past the resumed step (written before the kill), so the file reads as one run."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
        _atomic_write(path, "".join(ln + "\n" for ln in kept))

    def run(self) -> dict[str, Any]:
        """Train to ``steps`` (resuming from ``checkpoints/latest`` if present); returns the summary."""
        cfg = self.cfg
        latest = self.latest_checkpoint()
        if latest is not None:
            self.resume(latest)
        elif self.rank == 0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        self._truncate_metrics()
        if self.rank == 0:
            _atomic_write(self.out / "train_config.json", json.dumps(cfg.to_json(), indent=2))
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.task} {cfg.optimizer}", unit="step")
        last: dict[str, Any] = {}
        while self.step < cfg.steps:
            t0, tokens0 = time.perf_counter(), self.tokens_seen
            record = self.train_step()
            record["tokens_per_s"] = (self.tokens_seen - tokens0) / max(time.perf_counter() - t0, 1e-9)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                record["eval_loss"] = self.evaluate()
            self._log(record)
            last = record
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                max_logit=f"{record['max_logit']:.1f}")
            if cfg.stop_after is not None and self.step >= cfg.stop_after:
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        path = None
        if self.step >= cfg.steps:
            path = self.save_checkpoint() if self.latest_step() != self.step else self.checkpoint_path(self.step)
        return {"step": self.step, "checkpoint": str(path) if path else None, **{k: last.get(k) for k in
                ("loss", "eval_loss", "max_logit", "tokens")}}

    def latest_step(self) -> int | None:
        latest = self.latest_checkpoint()
        return None if latest is None else json.loads((latest / "trainer_state.json").read_text())["step"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; under torchrun every rank calls this."""
    init_distributed()
    return Trainer(cfg).run()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise TrainError(f"{path}: no metrics file")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
