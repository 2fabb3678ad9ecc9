"""Expert offload: routed experts stay memory-mapped in the checkpoint's shards.

The routed experts are nearly all of K2.5's weights (1.01T of 1.03T parameters), yet a token
reads only k of them per layer. Here every expert matrix is a zero-copy view of its bytes in
the safetensors file (`numpy.memmap` at the offset the header gives), so the OS reads exactly
the pages of the experts that tokens select and may drop them again under memory pressure: a
checkpoint larger than RAM still generates, at the speed of the disk for cold experts.

Works for full-precision experts (`weight`) and for INT4 `pack-quantized` ones (`weight_packed`
+ `weight_scale`, dequantised per selected expert right before its matmul).
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.int4 import PACK, unpack_int4
from ..checkpoint.io import CheckpointError
from ..model.transformer import K25ForCausalLM
from .experts import GROUP, _combine
from .loading import load_without_routed_experts

_ROUTED = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.")
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I32": np.int32, "I8": np.int8, "U8": np.uint8}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I8": torch.int8,
          "U8": torch.uint8}


class MappedShards:
    """Zero-copy tensors straight from safetensors files (read-only, paged in on first touch)."""

    def __init__(self, directory: Path, weight_map: dict[str, str]) -> None:
        self.directory = directory
        self.weight_map = weight_map
        self._headers: dict[str, tuple[int, dict]] = {}

    def _header(self, shard: str) -> tuple[int, dict]:
        if shard not in self._headers:
            with open(self.directory / shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[shard] = (8 + n, json.loads(f.read(n)))
        return self._headers[shard]

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{name}: not in the checkpoint")
        base, header = self._header(shard)
        meta = header[name]
        dtype = meta["dtype"]
        if dtype not in _NP:
            raise CheckpointError(f"{name}: dtype {dtype} cannot be memory-mapped")
        start, stop = meta["data_offsets"]
        shape = tuple(meta["shape"])
        arr = np.memmap(self.directory / shard, dtype=_NP[dtype], mode="r", offset=base + start, shape=shape)
        if arr.nbytes != stop - start:
            raise CheckpointError(f"{name}: header size does not match its shape {list(shape)}")
        with warnings.catch_warnings():  # read-only mapping: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        return t.view(_TORCH[dtype])


class MappedExperts(nn.Module):
    """Routed experts as views into the mapped shards; only selected experts are ever read."""

    def __init__(self, mats: list[dict[str, torch.Tensor]], hidden: int, inter: int, int4: bool) -> None:
        super().__init__()
        self.mats = mats  # per expert: {"gate_proj": ..., ...} or {"gate_proj.packed": ..., ".scale": ...}
        self.hidden, self.inter, self.int4 = hidden, inter, int4
        self.n_experts = len(mats)

    def _weight(self, e: int, proj: str, dtype: torch.dtype) -> torch.Tensor:
        m = self.mats[e]
        if not self.int4:
            return m[proj].to(dtype)
        packed, scale = m[proj + ".packed"], m[proj + ".scale"]
        in_f = packed.shape[1] * PACK
        q = unpack_int4(packed, in_f).view(packed.shape[0], -1, GROUP).to(dtype)
        return (q * scale.to(dtype)[..., None]).view(packed.shape[0], in_f)

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        g = F.linear(xs, self._weight(e, "gate_proj", xs.dtype))
        u = F.linear(xs, self._weight(e, "up_proj", xs.dtype))
        return F.linear(F.silu(g) * u, self._weight(e, "down_proj", xs.dtype))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        return _combine(x, idx, weights, self._expert)


def load_offloaded_text_model(path: str | Path, dtype: torch.dtype | str | None = None) -> K25ForCausalLM:
    """The text model with everything but the routed experts in memory; experts memory-mapped."""
    part = load_without_routed_experts(path, dtype)
    model, reader, prefix, text = part.model, part.reader, part.prefix, part.config.text_config
    moe_layers = part.moe_layers
    shards = MappedShards(Path(path), reader.weight_map)
    for i in moe_layers:
        stem = f"{prefix}model.layers.{i}.mlp.experts"
        int4 = f"{stem}.0.gate_proj.weight_packed" in reader.weight_map
        mats = []
        for e in range(text.n_routed_experts):
            m = {}
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if int4:
                    m[proj + ".packed"] = shards.get(f"{stem}.{e}.{proj}.weight_packed")
                    m[proj + ".scale"] = shards.get(f"{stem}.{e}.{proj}.weight_scale")
                else:
                    m[proj] = shards.get(f"{stem}.{e}.{proj}.weight")
            mats.append(m)
        model.model.layers[i].mlp.experts = MappedExperts(mats, text.hidden_size, text.moe_intermediate_size, int4)
    return model.eval()
