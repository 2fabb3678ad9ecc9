"""K25Config: the released layout, presets, and errors that name the offending field."""

from __future__ import annotations

import copy
import json

import pytest

from k25.config import KIMI_K25_QUANTIZATION_CONFIG, PRESETS, ConfigError, K25Config, preset


def released_config_json() -> dict:
    """A config.json shaped like the released one, generic HF bookkeeping fields included."""
    d = preset("kimi-k2.5").to_dict()
    d["text_config"].update({"id2label": {"0": "LABEL_0"}, "transformers_version": "4.56.2", "top_k": 50})
    d["vision_config"]["_attn_implementation"] = "flash_attention_2"
    return d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = preset(name)
    cfg.save(tmp_path)
    again = K25Config.from_json_file(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.text_only == cfg.text_only


def test_kimi_k25_preset_is_the_released_config():
    d = preset("kimi-k2.5").to_dict()
    assert d["model_type"] == "kimi_k25"
    assert d["architectures"] == ["KimiK25ForConditionalGeneration"]
    assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (163584, 163585, 163839)
    assert d["media_placeholder_token_id"] == 163605 and d["tie_word_embeddings"] is False
    t = d["text_config"]
    assert t["model_type"] == "kimi_k2"
    expected = {
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 1, "n_routed_experts": 384, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "routed_scaling_factor": 2.827, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "num_attention_heads": 64, "vocab_size": 163840,
        "max_position_embeddings": 262144, "rope_theta": 50000.0, "rms_norm_eps": 1e-5, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0,
    }
    assert {k: t[k] for k in expected} == expected
    assert t["rope_scaling"] == {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert t["quantization_config"] == d["quantization_config"] == KIMI_K25_QUANTIZATION_CONFIG
    v = d["vision_config"]
    assert (v["vt_hidden_size"], v["vt_num_hidden_layers"], v["vt_num_attention_heads"]) == (1152, 27, 16)
    assert v["merge_type"] == "sd2_tpool" and v["text_hidden_size"] == 7168


def test_softmax_scale_matches_spec():
    # 192^-0.5 * (0.1 ln 64 + 1)^2
    assert preset("kimi-k2.5").text_config.softmax_scale() == pytest.approx(0.1446796, abs=1e-7)


def test_generic_hf_fields_are_kept_and_written_back():
    d = released_config_json()
    cfg = K25Config.from_dict(copy.deepcopy(d))
    assert cfg.text_config.extra["transformers_version"] == "4.56.2"
    assert cfg.to_dict() == json.loads(json.dumps(d, sort_keys=True))


def test_text_only_k2_layout():
    d = preset("kimi-k2-thinking").to_dict()
    assert d["model_type"] == "kimi_k2" and "text_config" not in d
    cfg = K25Config.from_dict(d)
    assert cfg.text_only and cfg.vision_config is None
    assert cfg.text_config.rope_scaling["beta_fast"] == 1.0


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("text_config", "hiden_size"), 7168, "text_config.hiden_size: unknown field"),
        (("text_config", "num_experts_per_tok"), 500,
         "text_config.num_experts_per_tok=500: cannot exceed n_routed_experts=384"),
        (("text_config", "kv_lora_rank"), "512", "text_config.kv_lora_rank: expected an integer"),
        (("text_config", "first_k_dense_replace"), 62, "text_config.first_k_dense_replace=62"),
        (("text_config", "n_group"), 5, "text_config.n_group=5: must divide n_routed_experts=384"),
        (("text_config", "scoring_func"), "softmax", "text_config.scoring_func='softmax'"),
        (("text_config", "qk_rope_head_dim"), 63, "text_config.qk_rope_head_dim=63"),
        (("vision_config", "vt_num_attention_heads"), 7, "vision_config.vt_num_attention_heads=7"),
        (("vision_config", "text_hidden_size"), 4096, "vision_config.text_hidden_size=4096"),
        (("media_placeholder_token_id",), 999999, "media_placeholder_token_id=999999"),
        (("model_type",), "llama", "model_type='llama'"),
        (("bogus",), 1, "bogus: unknown field"),
    ],
)
def test_bad_fields_are_named(path, value, message):
    d = released_config_json()
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        K25Config.from_dict(d)
    assert message in str(err.value)


def test_rope_scaling_fields_are_checked():
    d = released_config_json()
    d["text_config"]["rope_scaling"]["beta_fats"] = 32.0
    with pytest.raises(ConfigError, match=r"text_config\.rope_scaling\.beta_fats: unknown YaRN field"):
        K25Config.from_dict(d)


def test_non_strict_keeps_unknown_fields():
    d = released_config_json()
    d["text_config"]["future_field"] = 3
    cfg = K25Config.from_dict(d, strict=False)
    assert cfg.to_dict()["text_config"]["future_field"] == 3


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        K25Config.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        K25Config.from_json_file(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
