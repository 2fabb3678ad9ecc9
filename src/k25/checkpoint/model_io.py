"""Build, load and save whole K2.5 models (config.json + sharded safetensors)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..chat.template import write_chat_template
from ..chat.tokenizer import KimiTokenizer
from ..config import KIMI_K25_QUANTIZATION_CONFIG, K25Config
from ..model.multimodal import K25ForConditionalGeneration
from ..model.transformer import K25ForCausalLM
from ..model.vision import MoonViT3d, PatchMergerMLP
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


K25Model = K25ForCausalLM | K25ForConditionalGeneration


def _empty_model(config: K25Config, vision: bool | None) -> K25Model:
    """The model class a config calls for, on the meta device (no memory)."""
    if vision is None:
        vision = config.vision_config is not None
    if vision and config.vision_config is None:
        raise CheckpointError("vision=True but the config has no vision_config")
    with torch.device("meta"):
        return K25ForConditionalGeneration(config) if vision else K25ForCausalLM(config.text_config)


def _init_computed_buffers(model: K25Model) -> None:
    text = model.language_model if isinstance(model, K25ForConditionalGeneration) else model
    text.model.rotary_emb.reset()
    if isinstance(model, K25ForConditionalGeneration):
        model.vision_tower.init_buffers()


def text_model(model: K25Model) -> K25ForCausalLM:
    """The causal LM inside either model class."""
    return model.language_model if isinstance(model, K25ForConditionalGeneration) else model


def build_model(
    config: K25Config,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int | None = 0,
    vision: bool | None = None,
) -> K25Model:
    """A randomly initialised model (or an empty one on `device="meta"`, for accounting).

    The multimodal model when the config has a vision tower (unless `vision=False`).
    """
    dtype = resolve_dtype(dtype, config)
    model = _empty_model(config, vision)
    if str(device) == "meta":
        return model.to(dtype)
    model.to_empty(device=device)
    _init_computed_buffers(model)
    text_model(model).init_weights(seed)
    if isinstance(model, K25ForConditionalGeneration):  # PyTorch's default init for the ViT layers
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model.vision_tower = MoonViT3d(config.vision_config)
            model.mm_projector = PatchMergerMLP(config.vision_config)
            # The position table starts small (the text init's std), not at the reference module's
            # N(0, 1), which outweighed the patch embedding of mostly-plain pictures in vision run 2
            # (docs/k25-mini.md). The digit probe shows no difference under MuonClip at 5e-3; k25-mini's
            # vision runs from run 4 on start this way.
            with torch.no_grad():
                model.vision_tower.patch_embed.pos_emb.weight.normal_(0.0, config.text_config.initializer_range)
    return model.to(dtype)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    vision: bool | None = None,
    strict_config: bool = True,
    progress: bool | None = None,
) -> K25Model:
    """Load a checkpoint directory (K2.5 layout or text-only K2 layout).

    Returns `K25ForConditionalGeneration` when the config has a vision tower (all tensors
    loaded), or `K25ForCausalLM` for text-only configs or `vision=False` (vision tensors are
    then skipped). Tensors are read from the memory-mapped shards straight into the model's
    storage (built on the meta device first), so peak memory is the model plus one tensor.
    INT4 `pack-quantized` experts are dequantised on the way in.
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
    if not config.text_only and ckpt_prefix != TEXT_PREFIX:
        raise CheckpointError(
            f"{path}: config.json is a kimi_k25 config but the tensors use the text-only 'model.' layout"
        )
    model = _empty_model(config, vision)
    want_vision = isinstance(model, K25ForConditionalGeneration)
    load_state_into(
        model,
        reader,
        prefix_map=checkpoint_prefix_map(ckpt_prefix, want_vision=want_vision),
        text_config=config.text_config,
        dtype=resolve_dtype(dtype, config),
        progress=progress,
    )
    _init_computed_buffers(model)
    model.k25_config = config  # what it was loaded from (token ids, quantization, vision)
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
    tokenizer: KimiTokenizer | None = None,
) -> Path:
    """Write `config.json` and sharded safetensors in the official layout.

    `config.text_only` picks the K2 layout (`model.layers...`), else the K2.5 layout
    (`language_model.model.layers...`). `int4_experts` stores routed experts as INT4
    `pack-quantized` (group 32) and records the quantization_config. `extra_tensors` (e.g. the
    vision tower's, already under official names) are written alongside. Our
    `chat_template.jinja` is always written next to the weights (so transformers and vLLM render
    the K2.5 format), and the tokenizer's files when one is given.
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
    if isinstance(model, K25ForConditionalGeneration):
        if config.text_only:
            raise CheckpointError("a multimodal model cannot be saved in the text-only K2 layout")
        prefix = ""  # its own names are the official ones
    else:
        prefix = "" if config.text_only else TEXT_PREFIX

    def tensors():
        yield from iter_official_tensors(model, prefix, int4_experts=int4_experts)
        if extra_tensors:
            yield from extra_tensors.items()

    save_tensors(tensors(), path, max_shard_bytes=max_shard_bytes, dtype=target_dtype)
    config.save(path)
    write_chat_template(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
