"""The chat subcommands, run through an argparse parser built with k25.chat.cli.register."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from k25.chat.cli import register
from k25.chat.tokenizer import KimiTokenizer


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k25")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokenize_and_decode(tiny_vocab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["tokenize", "Hello<|im_end|>", "--tokenizer", str(tiny_vocab_dir)]) == 0
    ids = capsys.readouterr().out.split()
    tok = KimiTokenizer.from_pretrained(tiny_vocab_dir)
    assert [int(i) for i in ids] == tok.encode("Hello<|im_end|>")
    assert run(["tokenize", "--decode", " ".join(ids), "--tokenizer", str(tiny_vocab_dir)]) == 0
    assert capsys.readouterr().out == "Hello<|im_end|>\n"


def test_render_and_parse_round_trip(tiny_vocab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conv = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    }
    f = tmp_path / "conv.json"
    f.write_text(json.dumps(conv))
    assert run(["render", str(f), "--tokenizer", str(tiny_vocab_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].endswith("<|im_assistant|>assistant<|im_middle|><think>")
    assert "type get_weather = (_: {}) => any;" in out["text"]
    assert KimiTokenizer.from_pretrained(tiny_vocab_dir).decode(out["ids"]) == out["text"]
    assert run(["template", "render", str(f), "--instant"]) == 0
    assert capsys.readouterr().out.endswith("<think></think>\n")

    gen = tmp_path / "out.txt"
    gen.write_text(
        "Need it.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
    )
    assert run(["parse", str(gen)]) == 0
    msg = json.loads(capsys.readouterr().out)
    assert msg["reasoning_content"] == "Need it." and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.json"
    f.write_text('{"messages": [{"content": "no role"}]}')
    assert run(["render", str(f)]) == 2
    assert "messages[0]: missing 'role'" in capsys.readouterr().err
    assert run(["tokenize", "x", "--tokenizer", str(tmp_path)]) == 2
    assert "no tiktoken.model" in capsys.readouterr().err


def test_vocab_train_and_template_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. 你好，世界。\n" * 50)
    out = tmp_path / "vocab"
    assert run(["vocab", "train", "--corpus", str(corpus), "--size", "300", "--out", str(out)]) == 0
    assert "vocab_size" in capsys.readouterr().out
    tok = KimiTokenizer.from_pretrained(out)
    assert 256 < tok.num_base_tokens <= 300
    assert tok.special_tokens["<|im_end|>"] == tok.num_base_tokens + 2
    text = "the cat sat on the log 你好<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    assert run(["template", "write", str(out)]) == 0
    assert (out / "chat_template.jinja").is_file()
