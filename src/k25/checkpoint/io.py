"""Safetensors checkpoints in the official Kimi K2.5 layout: names, sharding, lazy loading.

The model's own parameter names equal the official tensor names except for the routed experts,
which the model stacks ([E, out, in]) and the checkpoint stores one matrix per expert
(`...mlp.experts.E.gate_proj.weight`, or INT4 `weight_packed`/`weight_scale`/`weight_shape`).
:func:`official_names` gives, for a model, every tensor name it expects and where it goes.

Loading builds nothing twice: the model is created on the meta device, and each tensor is
read from its memory-mapped shard straight into a freshly allocated parameter.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import TextConfig
from .int4 import dequantize_int4, pack_int4, quantize_int4

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TEXT_PREFIX = "language_model."
_EXPERT = re.compile(r"^(?P<base>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>\w+)$")
_STACKED = re.compile(r"^(?P<base>.*\.mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model; the message names the tensor."""


@dataclass(frozen=True)
class Target:
    """Where one official tensor lands: a model parameter/buffer, or one expert slice of it."""

    internal: str
    shape: tuple[int, ...]
    expert: int | None = None


def official_names(model: nn.Module, prefix: str = "") -> dict[str, Target]:
    """Official tensor name → target, for every persistent tensor of `model` (experts unstacked)."""
    out: dict[str, Target] = {}
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if _is_persistent(model, n)})
    for name, t in tensors.items():
        m = _STACKED.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{prefix}{m['base']}.{e}.{m['proj']}.weight"] = Target(name, tuple(t.shape[1:]), e)
        else:
            out[prefix + name] = Target(name, tuple(t.shape))
    return out


def _is_persistent(model: nn.Module, name: str) -> bool:
    mod_name, _, buf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return buf not in mod._non_persistent_buffers_set


# ---- shape hints -----------------------------------------------------------------------------

_HINTS: list[tuple[str, tuple[str, ...]]] = [
    ("q_a_layernorm", ("q_lora_rank",)),
    ("kv_a_layernorm", ("kv_lora_rank",)),
    ("q_a_proj", ("q_lora_rank", "hidden_size")),
    ("q_b_proj", ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "q_lora_rank")),
    ("q_proj", ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "hidden_size")),
    ("kv_a_proj_with_mqa", ("kv_lora_rank", "qk_rope_head_dim", "hidden_size")),
    ("kv_b_proj", ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank")),
    ("o_proj", ("num_attention_heads", "v_head_dim", "hidden_size")),
    ("embed_tokens", ("vocab_size", "hidden_size")),
    ("lm_head", ("vocab_size", "hidden_size")),
    ("mlp.gate.", ("n_routed_experts", "hidden_size")),
    ("mlp.experts.", ("moe_intermediate_size", "hidden_size")),
    ("shared_experts", ("moe_intermediate_size", "n_shared_experts", "hidden_size")),
    ("mlp.", ("intermediate_size", "hidden_size")),
    ("layernorm", ("hidden_size",)),
    ("norm", ("hidden_size",)),
]


def shape_hint(name: str, text: TextConfig | None) -> str:
    """Which config fields set the expected shape of tensor `name` (for error messages)."""
    if text is None or not (name.startswith(TEXT_PREFIX) or name.startswith("model.") or "lm_head" in name):
        return ""
    for key, fields in _HINTS:
        if key in name:
            return " (set by text_config " + ", ".join(f"{f}={getattr(text, f)}" for f in fields) + ")"
    return ""


# ---- reading ---------------------------------------------------------------------------------


class ShardedReader:
    """Name → shard map of a checkpoint directory, with memory-mapped tensor reads."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a checkpoint directory")
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must be an object of tensor name → shard file")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no {INDEX_FILE} and no *.safetensors files")
            weight_map = {}
            for f in files:
                for name in self._open(f.name).keys():  # noqa: SIM118 (safe_open has no __iter__)
                    weight_map[name] = f.name
        self.weight_map: dict[str, str] = weight_map
        for shard in sorted(set(weight_map.values())):
            keys = set(self._open(shard).keys())
            for name in (n for n, s in weight_map.items() if s == shard):
                if name not in keys:
                    raise CheckpointError(f"{INDEX_FILE} lists tensor {name} in {shard}, but that shard lacks it")

    def _open(self, shard: str):
        handle = self._handles.get(shard)
        if handle is not None:
            return handle
        path = self.directory / shard
        if not path.exists():
            raise CheckpointError(f"shard {shard} is listed in {INDEX_FILE} but missing from {self.directory}")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            _ = handle.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        self._handles[shard] = handle
        return handle

    def close(self, shard: str | None = None) -> None:
        """Unmap one shard (or all): its pages stop counting against the process once read."""
        for name in [shard] if shard is not None else list(self._handles):
            self._handles.pop(name, None)

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names_in(self, shard: str) -> list[str]:
        return [n for n, s in self.weight_map.items() if s == shard]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name]
        try:
            return self._open(shard).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{name} in {shard}: cannot be read (truncated or corrupt shard?): {e}") from None

    def total_bytes(self) -> int:
        return sum((self.directory / s).stat().st_size for s in self.shards())


def detect_text_prefix(names: Iterator[str] | list[str]) -> str:
    """`language_model.` for the K2.5 layout, `` for the text-only Kimi K2 layout."""
    names = list(names)
    if any(n.startswith(TEXT_PREFIX) for n in names):
        return TEXT_PREFIX
    if any(n.startswith("model.") for n in names):
        return ""
    raise CheckpointError("no text-model tensors found (expected names under 'language_model.model.' or 'model.')")


def load_state_into(
    model: nn.Module,
    reader: ShardedReader,
    *,
    prefix_map: Callable[[str], str | None],
    text_config: TextConfig | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> None:
    """Materialise `model` (possibly on the meta device) from `reader`.

    `prefix_map` turns a checkpoint name into the name `official_names(model)` uses, or None to
    skip it on purpose (e.g. vision tensors when loading the text model alone). Fails on missing,
    unexpected and mis-shaped tensors, naming them.
    """
    expected = official_names(model)
    mapped: dict[str, str] = {}  # model-side official name → checkpoint name
    unexpected: list[str] = []
    quantized: dict[str, dict[str, str]] = {}
    for ckpt_name in reader.weight_map:
        name = prefix_map(ckpt_name)
        if name is None:
            continue
        m = _EXPERT.match(name)
        if m and m["kind"] in ("weight_packed", "weight_scale", "weight_shape"):
            base = f"{m['base']}.{m['e']}.{m['proj']}.weight"
            quantized.setdefault(base, {})[m["kind"]] = ckpt_name
            continue
        if name in expected:
            mapped[name] = ckpt_name
        else:
            unexpected.append(ckpt_name)
    for base, parts in quantized.items():
        missing_parts = {"weight_packed", "weight_scale"} - parts.keys()
        if missing_parts:
            raise CheckpointError(f"{base}: INT4 tensor lacks {sorted(missing_parts)}")
        if base in expected:
            mapped[base] = parts["weight_packed"]
        else:
            unexpected.append(parts["weight_packed"])
    missing = sorted(set(expected) - mapped.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(sorted(unexpected)[:5])})")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))

    # Shapes are checked from the headers before anything is allocated.
    for name, ckpt_name in mapped.items():
        target = expected[name]
        if ckpt_name.endswith(".weight_packed"):
            shape = _int4_logical_shape(reader, ckpt_name, target.shape)
        else:
            shape = reader.shape(ckpt_name)
        if tuple(shape) != target.shape:
            raise CheckpointError(
                f"{ckpt_name}: checkpoint has shape {list(shape)}, model expects {list(target.shape)}"
                + shape_hint(ckpt_name, text_config)
            )

    # Allocate real storage for every meta tensor, then fill shard by shard.
    _materialise(model, dtype)
    by_internal = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    shards = reader.shards()
    show = progress if progress is not None else (len(shards) > 1 and reader.total_bytes() > 2**30)
    wanted = set(mapped.values())
    iterator = shards
    if show:
        from tqdm import tqdm

        iterator = tqdm(shards, desc="loading shards", unit="shard")
    with torch.no_grad():
        ckpt_to_model = {c: n for n, c in mapped.items()}
        for shard in iterator:
            for ckpt_name in reader.names_in(shard):
                if ckpt_name not in wanted:
                    continue
                name = ckpt_to_model[ckpt_name]
                target = expected[name]
                if ckpt_name.endswith(".weight_packed"):
                    stem = ckpt_name[: -len("weight_packed")]
                    value = dequantize_int4(
                        reader.get(ckpt_name), reader.get(stem + "weight_scale"), target.shape, torch.float32
                    )
                else:
                    value = reader.get(ckpt_name)
                dest = by_internal[target.internal]
                if target.expert is not None:
                    dest = dest[target.expert]
                dest.copy_(value)
                del value
            reader.close(shard)  # at most one shard mapped at a time


def _int4_logical_shape(reader: ShardedReader, packed_name: str, expected: tuple[int, ...]) -> tuple[int, ...]:
    stem = packed_name[: -len("weight_packed")]
    shape_name = stem + "weight_shape"
    if shape_name in reader.weight_map:
        shape = tuple(int(v) for v in reader.get(shape_name).tolist())
    else:
        packed = reader.shape(packed_name)
        shape = (packed[0], packed[1] * 8)
    packed = reader.shape(packed_name)
    if len(shape) != 2 or packed != (shape[0], math.ceil(shape[1] / 8)):
        raise CheckpointError(f"{packed_name}: packed shape {list(packed)} does not hold a {list(shape)} weight")
    scale = reader.shape(stem + "weight_scale")
    if scale[0] != shape[0] or scale[1] == 0 or shape[1] % scale[1]:
        raise CheckpointError(f"{stem}weight_scale: shape {list(scale)} does not fit a {list(shape)} weight")
    return shape


def _materialise(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Give every meta parameter/buffer real (uninitialised) CPU storage, in `dtype` if given."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=dtype if p.is_floating_point() and dtype else p.dtype),
                    requires_grad=p.requires_grad,
                )
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    if dtype is not None:
        model.to(dtype)


# ---- writing ---------------------------------------------------------------------------------


def iter_official_tensors(
    model: nn.Module, prefix: str = "", int4_experts: bool = False, group_size: int = 32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) for every persistent tensor; experts one matrix each (or INT4)."""
    by_internal = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    for name, target in official_names(model, prefix).items():
        t = by_internal[target.internal].detach()
        if target.expert is not None:
            t = t[target.expert]
            if int4_experts:
                stem = name[: -len("weight")]
                scale_dtype = t.dtype if t.dtype != torch.float32 else torch.bfloat16
                q, scale = quantize_int4(t, group_size, scale_dtype=scale_dtype)
                yield stem + "weight_packed", pack_int4(q)
                yield stem + "weight_scale", scale
                yield stem + "weight_shape", torch.tensor(list(t.shape), dtype=torch.int32)
                continue
        yield name, t.contiguous()


def save_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    directory: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Write tensors as `model-0000i-of-0000N.safetensors` shards plus the index; returns shard names.

    Floating tensors are cast to `dtype` when given, except fp32-by-design ones
    (`e_score_correction_bias`). Files are written under temporary names and renamed at the end,
    so a crash never leaves a half-written checkpoint that looks complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tensors:
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        if t.is_floating_point() and name.endswith("e_score_correction_bias"):
            t = t.float()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
        total += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        tmp = directory / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    for fname in names:
        os.replace(directory / (fname + ".tmp"), directory / fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def checkpoint_prefix_map(ckpt_prefix: str, want_vision: bool) -> Callable[[str], str | None]:
    """Map checkpoint names onto a model's names: text under `ckpt_prefix`, vision kept or skipped."""

    def mapper(name: str) -> str | None:
        if name.startswith(("vision_tower.", "mm_projector.")):
            return name if want_vision else None
        if want_vision:
            return name  # the multimodal model uses the checkpoint names as they are
        if ckpt_prefix and name.startswith(ckpt_prefix):
            return name[len(ckpt_prefix):]
        return name

    return mapper
