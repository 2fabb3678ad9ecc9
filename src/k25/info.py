"""Scale accounting: parameters, weight bytes and KV-cache bytes, computed from the model itself.

The model is built on the meta device (no memory), so the full 1T-parameter Kimi K2.5 is
counted in a second. Weight bytes walk the official tensor list exactly as a checkpoint
would store it (BF16, or the native mix: INT4 `pack-quantized` routed experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checkpoint.io import official_names
from .checkpoint.model_io import build_model, text_model
from .config import K25Config
from .model.multimodal import K25ForConditionalGeneration

BF16 = 2


@dataclass
class ModelReport:
    """Figures for one config; every number is derived from the built (meta) model."""

    text_params: int
    text_active_params: int
    routed_expert_params: int
    vision_params: int
    projector_params: int
    bytes_bf16: int
    bytes_native: int
    kv_bytes_per_token_mla: int
    kv_bytes_per_token_mha: int
    num_layers: int
    max_position_embeddings: int

    @property
    def total_params(self) -> int:
        return self.text_params + self.vision_params + self.projector_params

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes_per_token_mha / self.kv_bytes_per_token_mla


def _int4_bytes(shape: tuple[int, ...], group_size: int) -> int:
    """Bytes of one pack-quantized matrix: int32 packs, BF16 group scales, int32[2] shape."""
    out_f, in_f = shape
    return out_f * math.ceil(in_f / 8) * 4 + out_f * (in_f // group_size) * BF16 + 2 * 4


def model_report(config: K25Config, cache_dtype_bytes: int = BF16) -> ModelReport:
    """Count a config's model; KV bytes assume `cache_dtype_bytes` per cached value (BF16)."""
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    text = text_model(model)
    tc = config.text_config
    names = official_names(model)
    # Every stored tensor counts, the fp32 router correction biases included (as in the release).
    text_params = sum(math.prod(t.shape) for t in official_names(text).values())
    routed = sum(p.numel() for n, p in text.named_parameters() if ".mlp.experts." in n)
    # A token runs num_experts_per_tok of the n_routed_experts routed experts, and everything else.
    active = text_params - routed
    if tc.n_routed_experts:
        active += routed * tc.num_experts_per_tok // tc.n_routed_experts
    vision = projector = 0
    if isinstance(model, K25ForConditionalGeneration):
        vision = sum(p.numel() for p in model.vision_tower.parameters())
        projector = sum(p.numel() for p in model.mm_projector.parameters())
    quant = config.quantization_config or tc.quantization_config or {}
    group = 32
    for grp in quant.get("config_groups", {}).values():
        group = int(grp.get("weights", {}).get("group_size", group))
    bytes_bf16 = bytes_native = 0
    for name, target in names.items():
        n = math.prod(target.shape)
        itemsize = 4 if name.endswith("e_score_correction_bias") else BF16
        bytes_bf16 += n * itemsize
        if target.expert is not None:
            bytes_native += _int4_bytes(target.shape, group)
        else:
            bytes_native += n * itemsize
    layers = tc.num_hidden_layers
    mla = layers * (tc.kv_lora_rank + tc.qk_rope_head_dim) * cache_dtype_bytes
    mha = layers * tc.num_attention_heads * (tc.qk_head_dim + tc.v_head_dim) * cache_dtype_bytes
    return ModelReport(
        text_params=text_params,
        text_active_params=active,
        routed_expert_params=routed,
        vision_params=vision,
        projector_params=projector,
        bytes_bf16=bytes_bf16,
        bytes_native=bytes_native,
        kv_bytes_per_token_mla=mla,
        kv_bytes_per_token_mha=mha,
        num_layers=layers,
        max_position_embeddings=tc.max_position_embeddings,
    )


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{suffix}{unit}"
    return f"{n:,.0f}{unit}"


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"


def report_rows(name: str, config: K25Config, r: ModelReport) -> list[tuple[str, str]]:
    """(label, value) rows for printing; exact integers next to the rounded figures."""
    tc = config.text_config
    ctx = r.max_position_embeddings
    rows = [
        ("model", name),
        ("layers (dense + MoE)", f"{tc.num_hidden_layers} ({tc.first_k_dense_replace} dense)"),
        ("experts", f"{tc.n_routed_experts} routed, {tc.num_experts_per_tok} per token, "
                    f"{tc.n_shared_experts} shared"),
        ("text parameters", f"{r.text_params:,} ({_human(r.text_params)})"),
        ("  activated per token", f"{r.text_active_params:,} ({_human(r.text_active_params)})"),
        ("  routed experts", f"{r.routed_expert_params:,} ({_human(r.routed_expert_params)})"),
    ]
    if r.vision_params:
        rows += [
            ("vision tower (MoonViT-3D)", f"{r.vision_params:,} ({_human(r.vision_params)})"),
            ("projector (PatchMergerMLP)", f"{r.projector_params:,} ({_human(r.projector_params)})"),
            ("all parameters", f"{r.total_params:,} ({_human(r.total_params)})"),
        ]
    rows += [
        ("weights, all BF16", _gb(r.bytes_bf16)),
        ("weights, native INT4 mix", _gb(r.bytes_native) + "  [routed experts INT4 g32, rest BF16]"),
        ("KV cache / token, MLA latent",
         f"{r.kv_bytes_per_token_mla:,} B  [{tc.num_hidden_layers} x ({tc.kv_lora_rank}+{tc.qk_rope_head_dim}) x 2 B]"),
        ("KV cache / token, full MHA", f"{r.kv_bytes_per_token_mha:,} B  [{tc.num_hidden_layers} x "
                                        f"{tc.num_attention_heads} x ({tc.qk_head_dim}+{tc.v_head_dim}) x 2 B]"),
        ("  MLA saving", f"{r.kv_ratio:.1f}x"),
        (f"KV cache at {ctx:,} tokens", f"MLA {_gb(r.kv_bytes_per_token_mla * ctx)}; "
                                         f"MHA {_gb(r.kv_bytes_per_token_mha * ctx)}"),
    ]
    return rows
