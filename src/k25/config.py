"""K25Config: the Kimi K2.5 `config.json`, field for field under the Hugging Face names.

The layout is the released one: a top-level ``kimi_k25`` object with a ``text_config``
(model_type ``kimi_k2``/``deepseek_v3``), a ``vision_config`` and a ``quantization_config``.
A text-only Kimi K2 ``config.json`` (model_type ``kimi_k2``/``deepseek_v3`` at top level) is
read too; it gives a config with ``vision_config=None`` and ``text_only=True``.

Unknown fields and inconsistent values fail with a :class:`ConfigError` that names the field
(its JSON path), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is unknown, mistyped or inconsistent; the message names it."""


# Fields every Hugging Face PretrainedConfig serialises (generation defaults, bookkeeping).
# They carry no architecture, so they are accepted, kept and written back unchanged.
HF_GENERIC_FIELDS = frozenset(
    {
        "_name_or_path", "add_cross_attention", "bad_words_ids", "begin_suppress_tokens",
        "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
        "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
        "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id",
        "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
        "num_beams", "num_return_sequences", "output_attentions", "output_hidden_states",
        "output_scores", "prefix", "problem_type", "pruned_heads", "remove_invalid_values",
        "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
        "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
        "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torchscript",
        "transformers_version", "typical_p", "use_bfloat16", "torch_dtype", "_attn_implementation",
        "_attn_implementation_autoset", "output_router_logits", "rope_interleave",
    }
)

TEXT_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_type(value: Any, expected: Any, where: str) -> Any:
    """Check a JSON value against a dataclass field's declared type (a small, strict subset)."""
    if expected in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif expected in ("float", float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif expected in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
    elif expected in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif expected == "int | None" and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer or null, got {value!r}")
    elif expected == "dict | None" and value is not None and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object or null, got {value!r}")
    elif expected == "list | None" and value is not None and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list or null, got {value!r}")
    elif expected == "list" and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str, strict: bool) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys fail (or go to ``extra`` if generic)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        where = _path(prefix, key)
        if key in fields:
            kwargs[key] = _check_type(value, fields[key].type, where)
        elif key in HF_GENERIC_FIELDS or not strict:
            extra[key] = value
        else:
            raise ConfigError(
                f"{where}: unknown field (not part of the {cls.__name__} layout); "
                "fix the name or load with strict=False to keep it as an opaque extra"
            )
    obj = cls(**kwargs)
    obj.extra = extra
    return obj


def _to_dict(obj: Any) -> dict[str, Any]:
    out = {f.name: copy.deepcopy(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "extra"}
    out.update(copy.deepcopy(obj.extra))
    return dict(sorted(out.items()))


@dataclass
class TextConfig:
    """The language model's `text_config` (DeepSeek-V3 architecture, Kimi K2 values by default)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 384
    routed_scaling_factor: float = 2.827
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    seq_aux: bool = True
    aux_loss_alpha: float = 0.001
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 163839
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163585
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 50000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 64.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 0
    ep_size: int = 1
    model_type: str = "kimi_k2"
    architectures: list | None = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    auto_map: dict | None = field(
        default_factory=lambda: {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        }
    )
    quantization_config: dict | None = None
    dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, repr=False)

    # ---- derived values -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq` layers."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    def softmax_scale(self) -> float:
        """`qk_head_dim^-0.5`, times mscale² when YaRN sets `mscale_all_dim` (DeepSeek rule)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if self.rope_type == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def validate(self, prefix: str = "text_config") -> None:
        """Fail on values the architecture cannot honour, naming the field."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{_path(prefix, name)}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.model_type not in TEXT_MODEL_TYPES:
            raise bad("model_type", f"expected one of {TEXT_MODEL_TYPES}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise bad("q_lora_rank", "must be positive or null (null = plain q_proj)")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "rotary dims come in pairs; must be even")
        if self.n_routed_experts < 0:
            raise bad("n_routed_experts", "must be >= 0")
        if self.n_routed_experts:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", f"cannot exceed n_routed_experts={self.n_routed_experts}")
            if self.num_experts_per_tok <= 0:
                raise bad("num_experts_per_tok", "must be positive")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be positive")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be in 1..n_group={self.n_group}")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise bad("n_group", "group scoring sums the top-2 scores; each group needs >= 2 experts")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * per_group:
                raise bad("num_experts_per_tok", "more than the experts in the topk_group selected groups")
            if self.scoring_func != "sigmoid":
                raise bad("scoring_func", "only 'sigmoid' (DeepSeek-V3/Kimi K2) is implemented")
            if self.topk_method not in ("noaux_tc", "greedy"):
                raise bad("topk_method", "only 'noaux_tc' (and 'greedy') routing is implemented")
            if self.n_shared_experts < 0:
                raise bad("n_shared_experts", "must be >= 0")
            if self.moe_layer_freq <= 0:
                raise bad("moe_layer_freq", "must be positive")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be in 0..num_hidden_layers={self.num_hidden_layers}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is implemented")
        if self.attention_bias:
            raise bad("attention_bias", "Kimi K2/K2.5 attention is bias-free; true is not implemented")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "Kimi K2/K2.5 has an untied lm_head; true is not implemented")
        if self.num_nextn_predict_layers not in (0,):
            raise bad("num_nextn_predict_layers", "multi-token-prediction layers are not implemented (K2.5 ships 0)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise bad(name, f"outside the vocabulary (vocab_size={self.vocab_size})")
        rs = self.rope_scaling
        if rs is not None:
            kind = self.rope_type
            if kind not in ("yarn", "default"):
                raise ConfigError(f"{prefix}.rope_scaling.type={kind!r}: only 'yarn' is implemented")
            if kind == "yarn":
                allowed = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                           "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor"}
                for key in rs:
                    if key not in allowed:
                        raise ConfigError(f"{prefix}.rope_scaling.{key}: unknown YaRN field")
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise ConfigError(f"{prefix}.rope_scaling.{key}: required for YaRN")
                if float(rs["factor"]) < 1.0:
                    raise ConfigError(f"{prefix}.rope_scaling.factor={rs['factor']!r}: must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "text_config", strict: bool = True) -> TextConfig:
        cfg = _from_dict(cls, data, prefix, strict)
        # Newer transformers write `rope_parameters` instead of `rope_theta` + `rope_scaling`.
        rp = cfg.extra.pop("rope_parameters", None) if not strict else None
        if rp:
            cfg.rope_theta = float(rp.get("rope_theta", cfg.rope_theta))
            cfg.rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"} or None
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·mscale·ln(scale) + 1 (1 when not extending)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class VisionConfig:
    """MoonViT-3D + PatchMergerMLP projector (`vision_config`, official field names)."""

    patch_size: int = 14
    vt_hidden_size: int = 1152
    vt_num_hidden_layers: int = 27
    vt_num_attention_heads: int = 16
    vt_intermediate_size: int = 4304
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    init_pos_emb_time: int = 4
    pos_emb_type: str = "divided_fixed"
    video_attn_type: str = "spatial_temporal"
    merge_kernel_size: list = field(default_factory=lambda: [2, 2])
    merge_type: str = "sd2_tpool"
    mm_projector_type: str = "patchmerger"
    mm_hidden_size: int = 1152
    text_hidden_size: int = 7168
    projector_hidden_act: str = "gelu"
    projector_ln_eps: float = 1e-5
    extra: dict = field(default_factory=lambda: {"_attn_implementation": "flash_attention_2"}, repr=False)

    @property
    def head_dim(self) -> int:
        return self.vt_hidden_size // self.vt_num_attention_heads

    def validate(self, prefix: str = "vision_config") -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{_path(prefix, name)}={getattr(self, name)!r}: {why}")

        for name in ("patch_size", "vt_hidden_size", "vt_num_hidden_layers", "vt_num_attention_heads",
                     "vt_intermediate_size", "init_pos_emb_height", "init_pos_emb_width", "init_pos_emb_time"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.vt_hidden_size % self.vt_num_attention_heads:
            raise bad("vt_num_attention_heads", f"must divide vt_hidden_size={self.vt_hidden_size}")
        if self.head_dim % 4:
            raise bad("vt_num_attention_heads", "2-D RoPE needs a head dim divisible by 4")
        if self.vt_hidden_size % 2:
            raise bad("vt_hidden_size", "the sin-cos time embedding needs an even width")
        if len(self.merge_kernel_size) != 2 or any(k <= 0 for k in self.merge_kernel_size):
            raise bad("merge_kernel_size", "expected two positive integers")
        if self.mm_hidden_size != self.vt_hidden_size:
            raise bad("mm_hidden_size", f"must equal vt_hidden_size={self.vt_hidden_size}")
        for name, allowed in (("merge_type", "sd2_tpool"), ("mm_projector_type", "patchmerger"),
                              ("pos_emb_type", "divided_fixed"), ("video_attn_type", "spatial_temporal")):
            if getattr(self, name) != allowed:
                raise bad(name, f"only {allowed!r} is implemented")

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "vision_config", strict: bool = True) -> VisionConfig:
        cfg = _from_dict(cls, data, prefix, strict)
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


# The released quantization_config (routed experts INT4, group 32, symmetric; everything else BF16).
KIMI_K25_QUANTIZATION_CONFIG: dict[str, Any] = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 32,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


@dataclass
class K25Config:
    """The whole checkpoint config: text model, vision tower, token ids and quantization."""

    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig | None = field(default_factory=VisionConfig)
    architectures: list | None = field(default_factory=lambda: ["KimiK25ForConditionalGeneration"])
    auto_map: dict | None = field(
        default_factory=lambda: {
            "AutoConfig": "configuration_kimi_k25.KimiK25Config",
            "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
        }
    )
    model_type: str = "kimi_k25"
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163585
    pad_token_id: int | None = 163839
    ignore_index: int = -100
    media_placeholder_token_id: int = 163605
    tie_word_embeddings: bool = False
    use_unified_vision_chunk: bool = True
    video_placeholder: str = "<|kimi_k25_video_placeholder|>"
    dtype: str = "bfloat16"
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)
    # Not a config.json field: True when read from a text-only Kimi K2 config.json
    # (checkpoint tensors then have no `language_model.` prefix).
    text_only: bool = field(default=False, compare=False, repr=False)

    # ---- I/O ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> K25Config:
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type in TEXT_MODEL_TYPES:  # text-only Kimi K2 / DeepSeek-V3 layout
            text = TextConfig.from_dict(data, prefix="", strict=strict)
            cfg = cls(
                text_config=text,
                vision_config=None,
                architectures=text.architectures,
                auto_map=None,
                bos_token_id=text.bos_token_id,
                eos_token_id=text.eos_token_id,
                pad_token_id=text.pad_token_id,
                quantization_config=text.quantization_config,
                dtype=text.dtype,
                text_only=True,
            )
            return cfg
        if model_type != "kimi_k25":
            raise ConfigError(
                f"model_type={model_type!r}: expected 'kimi_k25' (or a text-only {TEXT_MODEL_TYPES} config)"
            )
        data = dict(data)
        if "text_config" not in data:
            raise ConfigError("text_config: missing; a kimi_k25 config.json nests the language model there")
        text = TextConfig.from_dict(data.pop("text_config"), strict=strict)
        vision_raw = data.pop("vision_config", None)
        vision = VisionConfig.from_dict(vision_raw, strict=strict) if vision_raw is not None else None
        cfg = _from_dict(cls, data, "", strict)
        cfg.text_config, cfg.vision_config = text, vision
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        if self.text_only:
            return self.text_config.to_dict()
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("extra", "text_only", "text_config", "vision_config")
        }
        out["text_config"] = self.text_config.to_dict()
        if self.vision_config is not None:
            out["vision_config"] = self.vision_config.to_dict()
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | Path, strict: bool = True) -> K25Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, strict=strict)

    def save(self, directory: str | Path) -> Path:
        """Write `config.json` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def validate(self) -> None:
        t = self.text_config
        t.validate()
        if self.vision_config is not None:
            self.vision_config.validate()
            if self.vision_config.text_hidden_size != t.hidden_size:
                raise ConfigError(
                    f"vision_config.text_hidden_size={self.vision_config.text_hidden_size}: must equal "
                    f"text_config.hidden_size={t.hidden_size}"
                )
        if not 0 <= self.media_placeholder_token_id < t.vocab_size:
            raise ConfigError(
                f"media_placeholder_token_id={self.media_placeholder_token_id}: outside the vocabulary "
                f"(text_config.vocab_size={t.vocab_size})"
            )
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=True: Kimi K2.5 has an untied lm_head")

    def replace_text(self, **changes: Any) -> K25Config:
        """A copy with text_config fields changed (validated)."""
        new = copy.deepcopy(self)
        for k, v in changes.items():
            if not hasattr(new.text_config, k):
                raise ConfigError(f"text_config.{k}: unknown field")
            setattr(new.text_config, k, v)
        new.validate()
        return new


# ---- presets ---------------------------------------------------------------------------------


def _tiny() -> K25Config:
    """A K2.5-shaped model small enough for unit tests (every feature on: YaRN, MoE, shared expert)."""
    text = TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=2048,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        pad_token_id=511, bos_token_id=256, eos_token_id=257, dtype="float32",
    )
    vision = VisionConfig(
        vt_hidden_size=32, vt_num_hidden_layers=2, vt_num_attention_heads=2, vt_intermediate_size=64,
        init_pos_emb_height=8, init_pos_emb_width=8, mm_hidden_size=32, text_hidden_size=64,
    )
    # Token ids follow the Kimi layout over a 256-entry base vocabulary (the byte tokenizer of
    # k25.testing): [BOS] = base+0, [EOS] = base+1, <|media_pad|> = base+21, [PAD] = base+255.
    return K25Config(text_config=text, vision_config=vision, bos_token_id=256, eos_token_id=257,
                     pad_token_id=511, media_placeholder_token_id=277, dtype="float32")


def _bench() -> K25Config:
    """A mid-size K2.5-shaped model for CPU benchmarks (~1B total, ~0.2B active)."""
    text = TextConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=1, kv_lora_rank=256, q_lora_rank=384,
        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=32768,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        pad_token_id=32767, bos_token_id=32764, eos_token_id=32765,
    )
    return K25Config(text_config=text, vision_config=None, bos_token_id=32764, eos_token_id=32765,
                     pad_token_id=32767, media_placeholder_token_id=32766)


def _k25_mini() -> K25Config:
    """k25-mini: the K2.5 architecture at ~27M parameters (~8M active), trainable on a 2-core CPU.

    Vocabulary: 4,096 BPE ranks trained on k25's curriculum + the 256 Kimi specials. Token ids
    follow the Kimi layout over that base (specials from 4096). YaRN extends the 1,024-token
    training context to 4,096.
    """
    base = 4096
    text = TextConfig(
        vocab_size=base + 256, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=64, q_lora_rank=128,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=4096,
        rope_theta=50000.0, routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=base, eos_token_id=base + 1, pad_token_id=base + 255,
    )
    vision = VisionConfig(
        vt_hidden_size=128, vt_num_hidden_layers=2, vt_num_attention_heads=2, vt_intermediate_size=256,
        init_pos_emb_height=16, init_pos_emb_width=16, mm_hidden_size=128, text_hidden_size=256,
    )
    return K25Config(text_config=text, vision_config=vision, bos_token_id=base, eos_token_id=base + 1,
                     pad_token_id=base + 255, media_placeholder_token_id=base + 21)


def _kimi_k25() -> K25Config:
    """The released Kimi K2.5 config.json (spec §1.1–§2.1)."""
    text = TextConfig(quantization_config=copy.deepcopy(KIMI_K25_QUANTIZATION_CONFIG))
    return K25Config(text_config=text, quantization_config=copy.deepcopy(KIMI_K25_QUANTIZATION_CONFIG))


def _kimi_k2_thinking() -> K25Config:
    """Text-only Kimi K2-Thinking: the K2.5 text model with YaRN beta_fast=1 (spec §1.3)."""
    cfg = _kimi_k25()
    text = cfg.text_config
    text.rope_scaling = dict(text.rope_scaling, beta_fast=1.0)
    return K25Config(text_config=text, vision_config=None, architectures=text.architectures, auto_map=None,
                     quantization_config=text.quantization_config, text_only=True)


PRESETS = {
    "kimi-k2.5": _kimi_k25,
    "kimi-k2-thinking": _kimi_k2_thinking,
    "tiny": _tiny,
    "bench": _bench,
    "k25-mini": _k25_mini,
}


def preset(name: str) -> K25Config:
    """A named config: `kimi-k2.5` (released), `kimi-k2-thinking`, `tiny` (tests), `bench`, `k25-mini`."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
