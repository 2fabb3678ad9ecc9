"""Build, load and save whole K2.5 models (config.json + sharded safetensors)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..config import KIMI_K25_QUANTIZATION_CONFIG, K25Config
from ..model.transformer import K25ForCausalLM
from .io import (
    TEXT_PREFIX,
    CheckpointError,
    ShardedReader,
    checkpoint_prefix_map,
    detect_text_prefix,
    iter_official_tensors,
    load_state_into,
    save_tensors,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, config: K25Config) -> torch.dtype:
    """An explicit dtype, else the config's `dtype` (bfloat16 for the released model)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or config.text_config.dtype or config.dtype
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"dtype {name!r}: expected one of {sorted(DTYPES)}") from None


def build_model(
    config: K25Config,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int | None = 0,
) -> K25ForCausalLM:
    """A randomly initialised text model (or an empty one on `device="meta"`, for accounting)."""
    dtype = resolve_dtype(dtype, config)
    if str(device) == "meta":
        with torch.device("meta"):
            return K25ForCausalLM(config.text_config).to(dtype)
    with torch.device("meta"):
        model = K25ForCausalLM(config.text_config)
    model.to_empty(device=device)
    model.model.rotary_emb.reset()  # computed, never stored
    model.init_weights(seed)
    return model.to(dtype)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    strict_config: bool = True,
    progress: bool | None = None,
) -> K25ForCausalLM:
    """Load a checkpoint directory (K2.5 layout or text-only K2 layout) into the text model.

    Tensors are read from the memory-mapped shards straight into the model's storage (built on
    the meta device first), so peak memory is the model plus one tensor. INT4 `pack-quantized`
    experts are dequantised on the way in. Vision tensors are checked for presence by the
    reader but not loaded here (the vision tower is a separate module).
    """
    path = Path(path)
    config = K25Config.from_json_file(path, strict=strict_config)
    reader = ShardedReader(path)
    ckpt_prefix = detect_text_prefix(reader.weight_map)
    if config.text_only and ckpt_prefix == TEXT_PREFIX:
        raise CheckpointError(
            f"{path}: config.json is a text-only ({config.text_config.model_type}) config but the tensors use "
            f"the K2.5 '{TEXT_PREFIX}' layout"
        )
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = K25ForCausalLM(config.text_config)
    load_state_into(
        model,
        reader,
        prefix_map=checkpoint_prefix_map(config, ckpt_prefix, want_vision=False),
        text_config=config.text_config,
        dtype=dtype,
        progress=progress,
    )
    model.model.rotary_emb.reset()
    model.k25_config = config  # what it was loaded from (tokens ids, quantization, vision)
    return model.eval()


def save_model(
    model: nn.Module,
    config: K25Config,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    int4_experts: bool = False,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `config.json` and sharded safetensors in the official layout.

    `config.text_only` picks the K2 layout (`model.layers...`), else the K2.5 layout
    (`language_model.model.layers...`). `int4_experts` stores routed experts as INT4
    `pack-quantized` (group 32) and records the quantization_config. `extra_tensors` (e.g. the
    vision tower's, already under official names) are written alongside.
    """
    path = Path(path)
    config = copy.deepcopy(config)
    if int4_experts:
        qc = copy.deepcopy(KIMI_K25_QUANTIZATION_CONFIG)
        config.text_config.quantization_config = qc
        config.quantization_config = copy.deepcopy(qc)
    else:
        config.text_config.quantization_config = None
        config.quantization_config = None
    target_dtype = resolve_dtype(dtype, config) if dtype is not None else None
    if target_dtype is not None:
        name = {v: k for k, v in DTYPES.items()}[target_dtype]
        config.text_config.dtype = name
        config.dtype = name
    prefix = "" if config.text_only else TEXT_PREFIX

    def tensors():
        yield from iter_official_tensors(model, prefix, int4_experts=int4_experts)
        if extra_tensors:
            yield from extra_tensors.items()

    save_tensors(tensors(), path, max_shard_bytes=max_shard_bytes, dtype=target_dtype)
    config.save(path)
    return path
