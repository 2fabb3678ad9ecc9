"""Checkpoints: official names, sharding, lazy loading, INT4 codec, and failures that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import k25
from k25.checkpoint import CheckpointError, ShardedReader
from k25.checkpoint.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from k25.config import K25Config
from k25.testing import tiny_config, write_random_checkpoint

L1 = "language_model.model.layers.1."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = write_random_checkpoint(path, tiny_config(), seed=3, max_shard_bytes=250_000)
    return path, model


def _all_names(path) -> dict[str, tuple[list[int], str]]:
    reader = ShardedReader(path)
    out = {}
    for shard in reader.shards():
        with safe_open(str(path / shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_slice(name)
                out[name] = (t.get_shape(), t.get_dtype())
    return out


def test_official_tensor_names_and_shapes(saved):
    path, _ = saved
    names = _all_names(path)
    cfg = tiny_config().text_config
    h, e = cfg.hidden_size, cfg.moe_intermediate_size
    assert names["language_model.model.embed_tokens.weight"][0] == [cfg.vocab_size, h]
    assert names["language_model.lm_head.weight"][0] == [cfg.vocab_size, h]
    assert names["language_model.model.norm.weight"][0] == [h]
    assert names[L1 + "self_attn.q_a_proj.weight"][0] == [cfg.q_lora_rank, h]
    assert names[L1 + "self_attn.q_b_proj.weight"][0] == [cfg.num_attention_heads * cfg.qk_head_dim, cfg.q_lora_rank]
    assert names[L1 + "self_attn.kv_a_proj_with_mqa.weight"][0] == [cfg.kv_lora_rank + cfg.qk_rope_head_dim, h]
    assert names[L1 + "self_attn.kv_b_proj.weight"][0] == [
        cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank]
    assert names[L1 + "mlp.gate.weight"][0] == [cfg.n_routed_experts, h]
    assert names[L1 + "mlp.gate.e_score_correction_bias"] == ([cfg.n_routed_experts], "F32")
    assert names[L1 + "mlp.experts.7.gate_proj.weight"][0] == [e, h]
    assert names[L1 + "mlp.experts.7.down_proj.weight"][0] == [h, e]
    assert names[L1 + "mlp.shared_experts.up_proj.weight"][0] == [e, h]
    assert names["language_model.model.layers.0.mlp.gate_proj.weight"][0] == [cfg.intermediate_size, h]
    assert "vision_tower.encoder.blocks.0.wqkv.weight" in names
    assert "mm_projector.proj.2.weight" in names
    assert not any("rotary" in n or "inv_freq" in n or "time_weight" in n for n in names)


def test_index_and_shards(saved):
    path, _ = saved
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        (path / s).stat().st_size for s in shards) - sum(_header_bytes(path / s) for s in shards)
    assert not list(path.glob("*.tmp"))


def _header_bytes(file) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@torch.no_grad()
def test_round_trip_all_layouts(saved, tmp_path):
    path, model = saved
    ids = torch.randint(0, 500, (2, 11))
    again = k25.load(path, dtype=torch.float32)
    assert isinstance(again, k25.K25ForConditionalGeneration)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    text = k25.load(path, dtype=torch.float32, vision=False)
    assert isinstance(text, k25.K25ForCausalLM)
    assert torch.equal(text(ids), model.language_model(ids))
    # text-only K2 layout: names without the language_model. prefix
    k2 = tmp_path / "k2"
    cfg = tiny_config(text_only=True)
    k25.save(text, cfg, k2)
    assert all(n.startswith(("model.", "lm_head.")) for n in _all_names(k2))
    assert torch.equal(k25.load(k2, dtype=torch.float32)(ids), text(ids))


def test_bf16_save_keeps_router_bias_fp32(saved, tmp_path):
    _, model = saved
    k25.save(model, tiny_config(), tmp_path, dtype=torch.bfloat16)
    names = _all_names(tmp_path)
    assert names[L1 + "mlp.gate.e_score_correction_bias"][1] == "F32"
    assert names[L1 + "mlp.gate.weight"][1] == "BF16"
    assert K25Config.from_json_file(tmp_path).dtype == "bfloat16"
    loaded = k25.load(tmp_path)
    assert loaded.language_model.lm_head.weight.dtype == torch.bfloat16


# ---- failures ------------------------------------------------------------------------------------


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_shard_of(path, name, edit):
    """Rewrite the shard holding `name` after `edit(dict)` changed its tensors."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name]
    with safe_open(str(path / shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(path / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {k: shard for k in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor_is_named(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    name = L1 + "self_attn.kv_b_proj.weight"
    _edit_shard_of(path, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. " + name.replace(".", r"\.")):
        k25.load(path)


def test_unexpected_tensor_is_named(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    name = L1 + "self_attn.q_a_proj.weight"
    _edit_shard_of(path, name, lambda t: t.update({L1 + "self_attn.q_extra.weight": torch.zeros(2)}))
    expected = r"1 unexpected \(e\.g\. " + (L1 + "self_attn.q_extra").replace(".", r"\.")
    with pytest.raises(CheckpointError, match=expected):
        k25.load(path)


def test_config_that_does_not_match_the_tensors_names_field_and_shapes(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    cfg = K25Config.from_json_file(path)
    cfg.text_config.kv_lora_rank = 16
    cfg.save(path)
    with pytest.raises(CheckpointError) as err:
        k25.load(path)
    msg = str(err.value)
    assert "checkpoint has shape" in msg and "model expects" in msg and "kv_lora_rank=16" in msg


def test_truncated_shard_fails_cleanly(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        k25.load(path)


def test_garbage_shard_and_index(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    sorted(path.glob("model-*.safetensors"))[0].write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        k25.load(path)
    path = _copy(saved[0], tmp_path / "d")
    (path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        k25.load(path)
    path = _copy(saved[0], tmp_path / "e")
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing from"):
        k25.load(path)


def test_layout_and_config_disagree(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    tiny_config(text_only=True).save(path)
    with pytest.raises(CheckpointError, match="text-only"):
        k25.load(path)


# ---- INT4 ----------------------------------------------------------------------------------------


def test_int4_bit_layout_matches_spec():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7, 5, -1]])
    packed = pack_int4(q)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    # column 8g+i sits in bits [4i, 4i+4) of packed column g, stored as q + 8
    def signed(word: int) -> int:
        return word - 2**32 if word >= 2**31 else word

    word0 = sum((v + 8) << (4 * i) for i, v in enumerate(q[0, :8].tolist()))
    word1 = sum((v + 8) << (4 * i) for i, v in enumerate([5, -1, 0, 0, 0, 0, 0, 0]))  # padding encodes 0
    assert packed[0].tolist() == [signed(word0), signed(word1)]
    assert torch.equal(unpack_int4(packed, 10), q.to(torch.int8))


def test_int4_round_trip_every_value():
    q = torch.arange(-8, 8).repeat(5, 4)  # [5, 64]
    assert torch.equal(unpack_int4(pack_int4(q), 64), q.to(torch.int8))
    with pytest.raises(ValueError, match="outside the int4 range"):
        pack_int4(torch.tensor([[8]]))


def test_int4_quantization_error_is_within_half_a_step():
    w = torch.randn(16, 64)
    q, scale = quantize_int4(w, 32, scale_dtype=torch.float32)
    deq = dequantize_int4(pack_int4(q), scale, (16, 64), torch.float32)
    step = scale.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


@torch.no_grad()
def test_int4_checkpoint_loads_dequantized(saved, tmp_path):
    _, model = saved
    k25.save(model, tiny_config(), tmp_path, int4_experts=True)
    names = _all_names(tmp_path)
    stem = L1 + "mlp.experts.3.gate_proj."
    cfg = tiny_config().text_config
    h, e = cfg.hidden_size, cfg.moe_intermediate_size
    assert names[stem + "weight_packed"] == ([e, h // 8], "I32")
    assert names[stem + "weight_scale"] == ([e, h // 32], "BF16")
    assert names[stem + "weight_shape"] == ([2], "I32")
    assert stem + "weight" not in names and L1 + "mlp.shared_experts.gate_proj.weight" in names
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    loaded = k25.load(tmp_path, dtype=torch.float32)
    w = model.language_model.model.layers[1].mlp.experts.gate_proj[3]
    got = loaded.language_model.model.layers[1].mlp.experts.gate_proj[3]
    reader = ShardedReader(tmp_path)
    expected = dequantize_int4(reader.get(stem + "weight_packed"), reader.get(stem + "weight_scale"), (e, h),
                               torch.float32)
    assert torch.equal(got, expected)
    assert (got - w).abs().max() < w.abs().max() / 7  # close to the original, not equal


def test_chat_template_and_tokenizer_are_written_next_to_the_weights(saved, tmp_path):
    from k25.chat.template import chat_template_text
    from k25.chat.tokenizer import KimiTokenizer, write_tiktoken_ranks

    path, _ = saved
    assert (path / "chat_template.jinja").read_text() == chat_template_text()
    write_tiktoken_ranks({bytes([b]): b for b in range(256)}, tmp_path / "vocab.model")
    tok = KimiTokenizer(tmp_path / "vocab.model")
    out = tmp_path / "with_tok"
    k25.save(k25.load(path, vision=False), tiny_config(), out, tokenizer=tok)
    again = KimiTokenizer.from_pretrained(out)
    assert again.encode("hi<|im_end|>") == tok.encode("hi<|im_end|>")


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak resident memory while loading stays near the model's own size (no second full copy)."""
    import subprocess
    import sys
    import textwrap

    # many mid-size tensors, so "one copy + one tensor in flight" and "two copies" are far apart
    cfg = tiny_config(text_only=True, vocab_size=4096, hidden_size=768, intermediate_size=1024,
                      moe_intermediate_size=512, num_hidden_layers=6)
    model = write_random_checkpoint(tmp_path, cfg, seed=0, max_shard_bytes=24 * 2**20)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    script = textwrap.dedent(f"""
        import torch, k25
        k25.build_model(k25.preset("tiny"), device="meta")  # torch's one-off meta-device start-up cost
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith(("VmHWM", "VmRSS")):
                    yield int(line.split()[1]) * 1024
        base = max(hwm())
        m = k25.load({str(tmp_path)!r}, dtype=torch.float32)
        print(max(hwm()) - base, sum(p.numel() * p.element_size() for p in m.parameters()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grown, loaded = int(out[0]), int(out[1])
    assert loaded == model_bytes > 150 * 2**20
    # the model itself, plus the tensors in flight (and their pages while mapped), plus allocator slack;
    # a second full copy would add another model_bytes
    assert grown < model_bytes + 3 * largest + 32 * 2**20 < 2 * model_bytes, (grown / 2**20, model_bytes / 2**20)


def test_a_new_vision_tower_starts_with_a_small_position_table():
    """build_model's tower: the position table at the text init's std, not the reference N(0, 1)."""
    from k25.checkpoint.model_io import build_model
    from k25.model.vision import PatchEmbed3d

    cfg = tiny_config()
    table = build_model(cfg, dtype=torch.float32, seed=0).vision_tower.patch_embed.pos_emb.weight
    assert abs(table.std().item() - cfg.text_config.initializer_range) < 0.2 * cfg.text_config.initializer_range
    reference = PatchEmbed3d(cfg.vision_config).pos_emb.weight  # the module itself keeps the reference init
    assert 0.8 < reference.std().item() < 1.2
