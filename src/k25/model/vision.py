"""MoonViT-3D vision tower and the PatchMergerMLP projector (spec §3.2–§3.6).

Parameter names are the official ones, so a released checkpoint's ``vision_tower.*`` and
``mm_projector.*`` tensors load here with the prefix stripped:

``MoonViT3d``          ``patch_embed.proj.{weight,bias}``, ``patch_embed.pos_emb.weight`` [H0,W0,D],
                       ``encoder.blocks.N.{wqkv,wo,mlp.fc0,mlp.fc1,norm0,norm1}.{weight,bias}``,
                       ``encoder.final_layernorm.{weight,bias}``
``PatchMergerMLP``     ``pre_norm.{weight,bias}``, ``proj.0.{weight,bias}``, ``proj.2.{weight,bias}``

The fixed sin-cos time table and the RoPE inverse frequencies are non-persistent buffers (not in
the checkpoint); they stay fp32 and are rebuilt on every ``.to()``/``to_empty()``.

Data layout. ``pixel_values`` is [N, 3, p, p]: the patches of every media item packed one after
another, each item frame-major then row-major (t → h → w). ``grid_thws`` is [n_items, 3] int64 with
(t, h, w) in patches. Items attend only to themselves (all t·h·w patches of a video chunk attend to
each other); nothing crosses an item boundary.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from k25.config import VisionConfig

# The original Rope2DPosEmbRepeated precomputes a 512x512 table; larger grids are refused there.
ROPE_MAX_GRID = 512
ROPE_THETA = 10000.0
TIME_THETA = 10000.0
# Every LayerNorm inside the tower uses this eps (the projector's comes from the config).
VIT_LN_EPS = 1e-5

Grid = tuple[int, int, int]


class VisionInputError(ValueError):
    """Pixel values or grids that do not describe a valid packed batch; the message names the item."""


# ---- small pieces ---------------------------------------------------------------------------------


def sincos_time_table(num_frames: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 1-D sin-cos embedding [num_frames, dim]: ``cat(sin(pos·ω), cos(pos·ω))``.

    ω_k = 1/10000^(k/(dim/2)). It is added to every patch of frame ``pos`` of a multi-frame chunk,
    so the tower can tell frames apart without learning a temporal table.
    """
    half = dim // 2
    omega = 1.0 / TIME_THETA ** (torch.arange(half, dtype=torch.float64, device=device) / half)
    pos = torch.arange(num_frames, dtype=torch.float64, device=device)
    angles = torch.outer(pos, omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def rope_2d_angles(h: int, w: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE angles [h·w, head_dim/2] for a row-major h×w grid.

    Complex slot 2i rotates by column·f_i (x), slot 2i+1 by row·f_i (y): the original code
    concatenates [x, y] per frequency (its docstring says the opposite; the code is what the
    checkpoint was trained with).
    """
    ys = torch.arange(h, device=inv_freq.device, dtype=torch.float32)
    xs = torch.arange(w, device=inv_freq.device, dtype=torch.float32)
    x_ang = xs[None, :, None] * inv_freq  # [1, w, F]
    y_ang = ys[:, None, None] * inv_freq  # [h, 1, F]
    angles = torch.stack([x_ang.expand(h, w, -1), y_ang.expand(h, w, -1)], dim=-1)  # [h, w, F, 2]
    return angles.reshape(h * w, -1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (d[2j], d[2j+1]) of x [N, heads, hd] by slot j, in fp32.

    cos/sin are [N, hd/2]. This is the complex multiply of the original (non-neox) layout.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def parse_grids(grid_thws: torch.Tensor | Sequence[Sequence[int]]) -> list[Grid]:
    """[n_items, 3] (t, h, w) → list of int triples, with a clear error on a bad shape or value."""
    g = torch.as_tensor(grid_thws)
    if g.ndim != 2 or g.shape[1] != 3:
        raise VisionInputError(f"grid_thws: expected shape [n_items, 3] (t, h, w), got {tuple(g.shape)}")
    if g.is_floating_point():
        raise VisionInputError(f"grid_thws: expected integers, got dtype {g.dtype}")
    grids = [(int(t), int(h), int(w)) for t, h, w in g.tolist()]
    for i, (t, h, w) in enumerate(grids):
        if min(t, h, w) <= 0:
            raise VisionInputError(f"grid_thws[{i}]=({t}, {h}, {w}): every entry must be positive")
    return grids


# ---- modules ------------------------------------------------------------------------------------


class _FixedTables(nn.Module, abc.ABC):
    """Owns fixed (not learned) fp32 tables kept as non-persistent buffers.

    ``module.to(torch.bfloat16)`` would round them (RoPE frequencies in bf16 are off by up to
    2^-8 relative, i.e. whole radians at position 500), and ``to_empty`` leaves them garbage; so
    after any such move they are rebuilt in fp32 on the new device.
    """

    @abc.abstractmethod
    def init_buffers(self) -> None:
        """(Re)compute the tables in fp32 on the module's device."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _FixedTables:
        super()._apply(fn, recurse)
        self.init_buffers()
        return self


class Learnable2DInterpPosEmbDividedFixed(_FixedTables):
    """Learnable [H0, W0, D] table, bicubic-resized per item, plus a fixed time table for t > 1."""

    def __init__(self, height: int, width: int, num_frames: int, dim: int) -> None:
        super().__init__()
        self.height, self.width, self.num_frames, self.dim = height, width, num_frames, dim
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        self.register_buffer("time_weight", sincos_time_table(num_frames, dim), persistent=False)
        nn.init.normal_(self.weight)

    def init_buffers(self) -> None:
        """Recompute the fp32 time table on the weight's device."""
        self.time_weight = sincos_time_table(self.num_frames, self.dim, device=self.weight.device)

    def spatial(self, h: int, w: int) -> torch.Tensor:
        """The table resized to (h, w), flattened row-major to [h·w, D] (fp32).

        Resampled in fp32 whatever the weight dtype: the bf16 rounding of a 16-tap bicubic sum is
        avoidable noise. Same size → the table as is (bicubic at scale 1 is the identity anyway).
        """
        table = self.weight.float()
        if (h, w) != (self.height, self.width):
            table = F.interpolate(
                table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False
            )[0].permute(1, 2, 0)
        return table.reshape(h * w, self.dim)

    def forward(self, x: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """x [N, D] packed patches → x + position embedding."""
        parts = []
        for t, h, w in grids:
            pos = self.spatial(h, w)
            if t > 1:
                pos = (pos[None] + self.time_weight[:t, None, :].float()).reshape(t * h * w, self.dim)
            parts.append(pos)
        return x + torch.cat(parts).to(x.dtype)


class PatchEmbed3d(nn.Module):
    """Conv patch embedding (with bias) followed by the position embedding."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d, p = config.vt_hidden_size, config.patch_size
        self.patch_size = p
        self.proj = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=True)
        self.pos_emb = Learnable2DInterpPosEmbDividedFixed(
            config.init_pos_emb_height, config.init_pos_emb_width, config.init_pos_emb_time, d
        )

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)  # [N, D]
        return self.pos_emb(x, grids)


class Rope2D(_FixedTables):
    """2-D rotary tables for head_dim = 4F: F frequencies each for column and row."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        idx = torch.arange(0, self.head_dim, 4, dtype=torch.float32, device=device)
        return 1.0 / ROPE_THETA ** (idx / self.head_dim)

    def init_buffers(self) -> None:
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, grids: Sequence[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed cos, sin [N, head_dim/2]; every frame of a chunk reuses its 2-D table."""
        parts = []
        for t, h, w in grids:
            ang = rope_2d_angles(h, w, self.inv_freq)
            parts.append(ang.repeat(t, 1) if t > 1 else ang)
        angles = torch.cat(parts)
        return angles.cos(), angles.sin()


class MLP2(nn.Module):
    """fc0 → GELU(tanh approximation) → fc1, both with bias."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonViTEncoderLayer(nn.Module):
    """Pre-norm block: fused-qkv attention with 2-D RoPE, then the GELU-tanh MLP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.vt_hidden_size
        self.num_heads = config.vt_num_attention_heads
        self.head_dim = config.head_dim
        self.norm0 = nn.LayerNorm(d, eps=VIT_LN_EPS)
        self.norm1 = nn.LayerNorm(d, eps=VIT_LN_EPS)
        self.wqkv = nn.Linear(d, 3 * d, bias=True)
        self.wo = nn.Linear(d, d, bias=True)
        self.mlp = MLP2(d, config.vt_intermediate_size)

    def attention(
        self, x: torch.Tensor, seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Non-causal attention inside each item; looping over items (not tokens) keeps memory O(L²)."""
        n = x.shape[0]
        q, k, v = self.wqkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = apply_rope_interleaved(q, cos, sin)
        k = apply_rope_interleaved(k, cos, sin)
        outs = []
        for qi, ki, vi in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens), strict=True):
            # [L, H, hd] → [H, L, hd]; default scale is head_dim^-0.5.
            o = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
            outs.append(o.transpose(0, 1).reshape(-1, self.num_heads * self.head_dim))
        return self.wo(torch.cat(outs))

    def forward(
        self, x: torch.Tensor, seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), seqlens, cos, sin)
        return x + self.mlp(self.norm1(x))


class MoonViTEncoder(nn.Module):
    """The block stack plus final LayerNorm; owns the RoPE tables."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.rope_2d = Rope2D(config.head_dim)
        self.blocks = nn.ModuleList(MoonViTEncoderLayer(config) for _ in range(config.vt_num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.vt_hidden_size, eps=VIT_LN_EPS)

    def forward(self, x: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        seqlens = [t * h * w for t, h, w in grids]
        cos, sin = self.rope_2d(grids)
        for block in self.blocks:
            x = block(x, seqlens, cos, sin)
        return self.final_layernorm(x)


def tpool_merge(hidden: torch.Tensor, grids: Sequence[Grid], kernel: Sequence[int]) -> list[torch.Tensor]:
    """``sd2_tpool``: per item, mean over its t frames, then kh×kw spatial groups.

    Returns per item [h/kh · w/kw, kh·kw, D]; groups are row-major over the merged grid and the
    patches inside a group are in (row, col) order: (0,0), (0,1), (1,0), (1,1) for 2×2.
    """
    kh, kw = int(kernel[0]), int(kernel[1])
    d = hidden.shape[-1]
    out = []
    for seq, (t, h, w) in zip(hidden.split([t * h * w for t, h, w in grids]), grids, strict=True):
        g = seq.view(t, h // kh, kh, w // kw, kw, d).permute(0, 1, 3, 2, 4, 5).mean(dim=0)
        out.append(g.reshape((h // kh) * (w // kw), kh * kw, d))
    return out


class MoonViT3d(nn.Module):
    """The MoonViT-3D tower: images and ≤ init_pos_emb_time-frame video chunks → merged patch groups.

    ``forward(pixel_values [N,3,p,p], grid_thws [n_items,3]) -> list`` of per-item tensors
    [h/kh · w/kw, kh·kw, D] (D = vt_hidden_size), ready for :class:`PatchMergerMLP`.
    ``forward_features`` gives the packed [N, D] encoder output before merging.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.merge_kernel_size = tuple(int(k) for k in config.merge_kernel_size)
        self.patch_embed = PatchEmbed3d(config)
        self.encoder = MoonViTEncoder(config)

    def init_buffers(self) -> None:
        """Recompute the non-persistent fp32 tables (``.to``/``to_empty`` already do this)."""
        self.patch_embed.pos_emb.init_buffers()
        self.encoder.rope_2d.init_buffers()

    def check_inputs(
        self, pixel_values: torch.Tensor, grid_thws: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[Grid]:
        """Validate the packed batch against the config; return the grids as int triples."""
        cfg = self.config
        p = cfg.patch_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise VisionInputError(
                f"pixel_values: expected shape [N, 3, {p}, {p}], got {tuple(pixel_values.shape)}"
            )
        grids = parse_grids(grid_thws)
        kh, kw = self.merge_kernel_size
        for i, (t, h, w) in enumerate(grids):
            if t > cfg.init_pos_emb_time:
                raise VisionInputError(
                    f"grid_thws[{i}]=({t}, {h}, {w}): a chunk holds at most "
                    f"init_pos_emb_time={cfg.init_pos_emb_time} frames"
                )
            if h > ROPE_MAX_GRID or w > ROPE_MAX_GRID:
                raise VisionInputError(
                    f"grid_thws[{i}]=({t}, {h}, {w}): at most {ROPE_MAX_GRID} patches per side "
                    "(the 2-D RoPE range)"
                )
            if h % kh or w % kw:
                raise VisionInputError(
                    f"grid_thws[{i}]=({t}, {h}, {w}): h and w must be multiples of the merge kernel {kh}x{kw}"
                )
        total = sum(t * h * w for t, h, w in grids)
        if total != pixel_values.shape[0]:
            raise VisionInputError(
                f"pixel_values has {pixel_values.shape[0]} patches but grid_thws {[list(g) for g in grids]} "
                f"describe {total}"
            )
        return grids

    def forward_features(
        self, pixel_values: torch.Tensor, grid_thws: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Packed encoder output [N, D] after the final LayerNorm (before merging)."""
        grids = self.check_inputs(pixel_values, grid_thws)
        x = self.patch_embed(pixel_values, grids)
        return self.encoder(x, grids)

    def forward(
        self, pixel_values: torch.Tensor, grid_thws: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        grids = parse_grids(grid_thws)
        return tpool_merge(self.forward_features(pixel_values, grids), grids, self.merge_kernel_size)


class PatchMergerMLP(nn.Module):
    """Projector: LayerNorm per patch, concat the kh·kw group, Linear → GELU(exact) → Linear.

    ``forward(merged [n, kh·kw, D]) -> [n, text_hidden_size]``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kh, kw = (int(k) for k in config.merge_kernel_size)
        self.in_dim = config.mm_hidden_size * kh * kw
        self.pre_norm = nn.LayerNorm(config.mm_hidden_size, eps=config.projector_ln_eps)
        self.proj = nn.Sequential(
            nn.Linear(self.in_dim, self.in_dim),
            nn.GELU(),
            nn.Linear(self.in_dim, config.text_hidden_size),
        )

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        if merged.ndim != 3 or merged.shape[1] * merged.shape[2] != self.in_dim:
            raise VisionInputError(
                f"PatchMergerMLP input: expected [n, group, {self.pre_norm.normalized_shape[0]}] with "
                f"group·width = {self.in_dim}, got {tuple(merged.shape)}"
            )
        x = self.pre_norm(merged).reshape(merged.shape[0], self.in_dim)
        return self.proj(x)


# ---- convenience ----------------------------------------------------------------------------------


def num_media_tokens(grid_thw: Sequence[int], merge_kernel_size: Sequence[int] = (2, 2)) -> int:
    """LM positions one item occupies: (h/kh)·(w/kw), independent of t (frames are mean-pooled)."""
    _, h, w = (int(v) for v in grid_thw)
    kh, kw = (int(k) for k in merge_kernel_size)
    return (h // kh) * (w // kw)


def encode_media(
    vision_tower: MoonViT3d,
    projector: PatchMergerMLP,
    pixel_values: torch.Tensor,
    grid_thws: torch.Tensor | Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """Per-item LM embeddings [(h/2)(w/2), text_hidden_size], in item order, for scattering.

    The merged groups of all items go through the projector as one batch (it is per-token), then
    are split back per item. ``pixel_values`` is cast to the tower's dtype (BF16 in the release).
    """
    merged = vision_tower(pixel_values, grid_thws)
    counts = [m.shape[0] for m in merged]
    embeds = projector(torch.cat(merged).to(projector.pre_norm.weight.dtype))
    return list(embeds.split(counts))


def count_parameters(module: nn.Module) -> int:
    """Parameter count (works on the meta device)."""
    return sum(math.prod(p.shape) for p in module.parameters())
