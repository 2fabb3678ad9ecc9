"""The compressed-tensors `pack-quantized` INT4 codec used by Kimi K2-Thinking and K2.5.

Symmetric, per-group (32 input columns) scales, no zero point. Eight 4-bit values share one
int32: input column `8g+i` sits in bits [4i, 4i+4) of packed column `g`, stored as `q + 8`.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit values per int32
QMAX = 7
QMIN = -8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [out, in] → int32 [out, ceil(in/8)] (columns zero-padded)."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError(f"values outside the int4 range [{QMIN}, {QMAX}]: min {int(q.min())}, max {int(q.max())}")
    rows, cols = q.shape
    pad = (-cols) % PACK
    u = (q.to(torch.int64) + 8)
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=8)  # pads encode q=0
    u = u.view(rows, -1, PACK)
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int64)
    packed = (u << shifts).sum(-1)  # < 2**32, fits int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(torch.int32)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [out, G] → int8 [out, cols] with values in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    if cols > packed.shape[-1] * PACK or cols <= (packed.shape[-1] - 1) * PACK:
        raise ValueError(f"{cols} columns do not fit {packed.shape[-1]} packed int32 columns")
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (u.flatten(-2)[..., :cols] - 8).to(torch.int8)


def _group_scale_and_q(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] → (q [..., in/group, group] as float, scale [..., in/group] in ``scale_dtype``)."""
    in_f = w.shape[-1]
    if in_f % group_size:
        raise ValueError(f"input dim {in_f} is not a multiple of group_size {group_size}")
    g = w.float().unflatten(-1, (in_f // group_size, group_size))
    scale = (g.abs().amax(-1) / QMAX).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = torch.round(g / scale.float()[..., None]).clamp(QMIN, QMAX)
    return q, scale


def quantize_int4(
    w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric min-max group quantisation: w [out, in] → (q int8 [out, in], scale [out, in/group]).

    scale = max|w| / 7 per group (compressed-tensors' minmax observer, symmetric int4), rounded
    to `scale_dtype` first so that q = clamp(round(w / scale), -8, 7) uses the stored scale.
    """
    q, scale = _group_scale_and_q(w, group_size, scale_dtype)
    return q.to(torch.int8).view(w.shape), scale


def fake_quantize_int4(
    w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Quantization-aware training: the INT4 round trip of ``w`` [..., in] with a straight-through gradient.

    The forward value is exactly what :func:`quantize_int4` + :func:`dequantize_int4` give (same
    scale rounding), so a QAT-trained weight exports to ``pack-quantized`` without further error;
    the backward pass treats the rounding as identity (the straight-through estimator).
    """
    q, scale = _group_scale_and_q(w.detach(), group_size, scale_dtype)
    deq = (q * scale.float()[..., None]).flatten(-2).to(w.dtype)
    return w + (deq - w).detach()


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """`W[o, c] = q[o, c] * scale[o, c // group]` from the stored tensors."""
    out_f, in_f = shape
    if packed.shape[0] != out_f or scale.shape[0] != out_f:
        raise ValueError(
            f"packed {tuple(packed.shape)} / scale {tuple(scale.shape)} do not match weight shape {tuple(shape)}"
        )
    group = in_f // scale.shape[1] if scale.shape[1] else 0
    if group == 0 or group * scale.shape[1] != in_f:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not divide weight shape {tuple(shape)} into groups")
    q = unpack_int4(packed, in_f).float()
    w = q.view(out_f, -1, group) * scale.float()[..., None]
    return w.view(out_f, in_f).to(dtype)
