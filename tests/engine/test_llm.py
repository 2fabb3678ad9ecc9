"""`k25.LLM` (generate / stream / chat), INT4 checkpoints served packed, `k25 quantize`, `k25 chat`."""

from __future__ import annotations

import argparse

import pytest
import torch

import k25
from k25.chat.tokenizer import KimiTokenizer, write_tiktoken_ranks
from k25.checkpoint import CheckpointError
from k25.engine.cli import register
from k25.engine.experts import FusedExperts, Int4Experts
from k25.engine.generate import generate
from k25.engine.loading import load_int4_text_model
from k25.testing import tiny_config, write_random_checkpoint

GREEDY = k25.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def main(argv: list[str]) -> int:
    """The engine's subcommands alone (the same functions `k25 quantize` / `k25 chat` run)."""
    parser = argparse.ArgumentParser(prog="k25")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny text-only checkpoint with a byte-level tokenizer (256 base + 256 reserved = vocab 512)."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    write_random_checkpoint(path, tiny_config(text_only=True, initializer_range=0.1), seed=4)
    write_tiktoken_ranks({bytes([b]): b for b in range(256)}, path / "tiktoken.model")
    KimiTokenizer(path / "tiktoken.model").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def int4_checkpoint(checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("tiny_int4") / "q"
    assert main(["quantize", str(checkpoint), str(dst)]) == 0
    return dst


def test_lazy_exports():
    from k25.engine.llm import LLM
    from k25.engine.sampling import SamplingParams

    assert k25.LLM is LLM and k25.SamplingParams is SamplingParams


def test_generate_ids_equals_reference(checkpoint):
    llm = k25.LLM(checkpoint, num_blocks=64, block_size=4)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    outs = llm.generate(prompts, GREEDY)
    ref_model = k25.load(checkpoint)
    for p, o in zip(prompts, outs, strict=True):
        assert o.output_ids == generate(ref_model, torch.tensor([p]), 6)[0].tolist()
    assert llm.generate([1, 2, 3, 4, 5], GREEDY)[0].output_ids == outs[0].output_ids  # one prompt, not a batch
    assert isinstance(llm.model.model.layers[1].mlp.experts, FusedExperts)


def test_text_prompts_stream_and_chat(checkpoint):
    llm = k25.LLM(checkpoint, num_blocks=64, block_size=4)
    full = llm.generate("hello", GREEDY)[0]
    assert full.text == llm.tokenizer.decode(full.output_ids)
    pieces = list(llm.stream("hello", GREEDY))
    assert [i for p in pieces for i in p.new_ids] == full.output_ids
    assert "".join(p.new_text for p in pieces) == full.text and pieces[-1].finished
    early = llm.stream("hello", GREEDY)
    next(early)
    early.close()  # cancelling a stream frees its blocks
    assert llm.engine.blocks.num_free == 64
    msg = llm.chat([{"role": "user", "content": "Hi"}], thinking=False,
                   sampling_params=k25.SamplingParams(temperature=0, max_tokens=8))
    assert msg["role"] == "assistant" and msg["finish_reason"] in ("stop", "length")
    ids, text = llm.chat_prompt([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_assistant|>assistant<|im_middle|><think>") and ids[-1] == llm.tokenizer.token_to_id(
        "<think>")


def test_preset_without_tokenizer_fails_clearly():
    llm = k25.LLM("tiny", num_blocks=16, block_size=4)
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].output_ids) == 6
    with pytest.raises(ValueError, match="tokenizer"):
        llm.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text")


def test_int4_checkpoint_served_packed(checkpoint, int4_checkpoint):
    llm = k25.LLM(int4_checkpoint, num_blocks=64, block_size=4)
    experts = llm.model.model.layers[1].mlp.experts
    assert isinstance(experts, Int4Experts)
    quantised_now = k25.LLM(checkpoint, experts="int4", num_blocks=64, block_size=4)
    prompts = [[5, 6, 7, 8], [9, 10]]
    assert [o.output_ids for o in llm.generate(prompts, GREEDY)] == [
        o.output_ids for o in quantised_now.generate(prompts, GREEDY)]
    # the packed experts compute what the dequantising reference loader computes
    ref = k25.load(int4_checkpoint, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        want = ref(ids)
        exact = load_int4_text_model(int4_checkpoint, torch.float32, kernel="dequant")(ids)
        assert (exact - want).abs().max() < 1e-4
        fast = llm.model(ids)
        assert (fast - want).abs().max() < 2e-2 * want.abs().max()


def test_quantize_command(checkpoint, int4_checkpoint, tmp_path):
    assert (int4_checkpoint / "tiktoken.model").exists()
    cfg = k25.K25Config.from_json_file(int4_checkpoint)
    assert cfg.text_config.quantization_config["format"] == "pack-quantized"
    with pytest.raises(CheckpointError, match="already"):
        main(["quantize", str(int4_checkpoint), str(tmp_path / "again")])
    with pytest.raises(CheckpointError, match="not empty"):
        main(["quantize", str(checkpoint), str(int4_checkpoint)])


def test_chat_command(checkpoint, capsys):
    assert main(["chat", str(checkpoint), "--message", "Hi", "--instant", "--max-tokens", "5",
                 "--temperature", "0"]) == 0
    with pytest.raises(SystemExit, match="tokenizer"):
        main(["chat", "tiny", "--message", "Hi"])


def test_offloaded_experts_are_file_backed_and_exact(checkpoint, int4_checkpoint):
    from k25.engine.offload import MappedExperts, load_offloaded_text_model

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        for path in (checkpoint, int4_checkpoint):
            mapped = load_offloaded_text_model(path, torch.float32)
            experts = mapped.model.layers[1].mlp.experts
            assert isinstance(experts, MappedExperts)
            assert not list(experts.parameters()) and not list(experts.buffers())  # nothing resident
            assert (mapped(ids) - k25.load(path, dtype=torch.float32)(ids)).abs().max() < 1e-4
    llm = k25.LLM(int4_checkpoint, offload=True, num_blocks=64, block_size=4)
    ref = k25.load(int4_checkpoint, dtype=torch.float32)
    assert llm.generate([[5, 6, 7]], GREEDY)[0].output_ids == generate(ref, torch.tensor([[5, 6, 7]]), 6)[0].tolist()
    with pytest.raises(ValueError, match="checkpoint directory"):
        k25.LLM("tiny", offload=True)
