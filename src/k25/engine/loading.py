"""Loading a checkpoint for serving: INT4 routed experts go straight into packed modules.

`k25.load` dequantises INT4 experts to full precision (the reference). For serving that would
cost 7× the memory, so here the text model is built on the meta device with the routed experts
left out, everything else is loaded as usual, and each layer's `weight_packed`/`weight_scale`
tensors are read into an :class:`~k25.engine.experts.Int4Experts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.io import CheckpointError, ShardedReader, checkpoint_prefix_map, detect_text_prefix, load_state_into
from ..checkpoint.model_io import resolve_dtype
from ..config import K25Config
from ..model.moe import MoE
from ..model.transformer import K25ForCausalLM
from .experts import Int4Experts

_ROUTED = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.")


class _NoExperts(nn.Module):
    """Placeholder while loading: holds no tensors, so the loader expects none for it."""


def is_int4_checkpoint(config: K25Config) -> bool:
    qc = config.text_config.quantization_config or config.quantization_config or {}
    return qc.get("format") == "pack-quantized"


@dataclass
class PartialLoad:
    """A text model loaded without its routed experts, and what is needed to fill them in."""

    model: K25ForCausalLM
    config: K25Config
    reader: ShardedReader
    prefix: str
    moe_layers: list[int]

    def experts_stem(self, layer: int) -> str:
        return f"{self.prefix}model.layers.{layer}.mlp.experts"


def load_without_routed_experts(path: str | Path, dtype: torch.dtype | str | None = None) -> PartialLoad:
    """Build the text model on the meta device and load every tensor except the routed experts.

    The callers (INT4 serving, expert offload) then install their own expert modules, so the
    full-precision experts are never materialised.
    """
    path = Path(path)
    config = K25Config.from_json_file(path)
    reader = ShardedReader(path)
    prefix = detect_text_prefix(reader.weight_map)
    text = config.text_config
    with torch.device("meta"):
        model = K25ForCausalLM(text)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    for i in moe_layers:
        model.model.layers[i].mlp.experts = _NoExperts()
    base = checkpoint_prefix_map(prefix, want_vision=False)

    def mapper(name: str) -> str | None:
        mapped = base(name)
        return None if mapped is None or _ROUTED.search(mapped) else mapped

    load_state_into(model, reader, prefix_map=mapper, text_config=text, dtype=resolve_dtype(dtype, config))
    model.model.rotary_emb.reset()
    model.k25_config = config
    return PartialLoad(model, config, reader, prefix, moe_layers)


def load_int4_text_model(
    path: str | Path, dtype: torch.dtype | str | None = None, kernel: str | None = None
) -> K25ForCausalLM:
    """The text model of an INT4 `pack-quantized` checkpoint with its routed experts kept at 4 bits."""
    config = K25Config.from_json_file(path)
    if not is_int4_checkpoint(config):
        raise CheckpointError(f"{path}: config.json has no pack-quantized quantization_config (not an INT4 checkpoint)")
    part = load_without_routed_experts(path, dtype)
    for i in part.moe_layers:
        part.model.model.layers[i].mlp.experts = _read_experts(
            part.reader, part.experts_stem(i), part.config.text_config, kernel
        )
    return part.model.eval()


def _read_experts(reader: ShardedReader, stem: str, text, kernel: str | None) -> Int4Experts:
    def part(e: int, proj: str, kind: str) -> torch.Tensor:
        name = f"{stem}.{e}.{proj}.{kind}"
        if name not in reader.weight_map:
            raise CheckpointError(f"{name}: missing from the INT4 checkpoint")
        return reader.get(name)

    gate_up_p, gate_up_s, down_p, down_s = [], [], [], []
    for e in range(text.n_routed_experts):
        gate_up_p.append(torch.cat([part(e, "gate_proj", "weight_packed"), part(e, "up_proj", "weight_packed")]))
        gate_up_s.append(torch.cat([part(e, "gate_proj", "weight_scale"), part(e, "up_proj", "weight_scale")]))
        down_p.append(part(e, "down_proj", "weight_packed"))
        down_s.append(part(e, "down_proj", "weight_scale"))
    h, i = text.hidden_size, text.moe_intermediate_size
    want = {"gate_up": (2 * i, -(-h // 8)), "down": (h, -(-i // 8))}
    for name, packed in (("gate_up", gate_up_p[0]), ("down", down_p[0])):
        if tuple(packed.shape) != want[name]:
            raise CheckpointError(f"{stem}.0 {name}: packed shape {list(packed.shape)}, expected {list(want[name])} "
                                  f"(hidden_size={h}, moe_intermediate_size={i})")
    return Int4Experts(torch.stack(gate_up_p), torch.stack(gate_up_s), torch.stack(down_p), torch.stack(down_s),
                       h, i, kernel)
