"""KimiTokenizer: file formats, special-token layout (spec §4), split pattern, long inputs, errors."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import regex

from k25.chat import tokenizer as tk
from k25.chat.tokenizer import KimiTokenizer, TokenizerError, default_special_tokens, write_tiktoken_ranks

# Spec §4 table: id -> (token, special) for the real 163,584-rank vocabulary.
SPEC_TABLE = {
    163584: ("[BOS]", True),
    163585: ("[EOS]", True),
    163586: ("<|im_end|>", True),
    163587: ("<|im_user|>", True),
    163588: ("<|im_assistant|>", True),
    163590: ("<|start_header_id|>", True),
    163591: ("<|end_header_id|>", True),
    163593: ("[EOT]", True),
    163594: ("<|im_system|>", True),
    163595: ("<|tool_calls_section_begin|>", False),
    163596: ("<|tool_calls_section_end|>", False),
    163597: ("<|tool_call_begin|>", False),
    163598: ("<|tool_call_argument_begin|>", False),
    163599: ("<|tool_call_end|>", False),
    163601: ("<|im_middle|>", True),
    163602: ("<|media_begin|>", True),
    163603: ("<|media_content|>", True),
    163604: ("<|media_end|>", True),
    163605: ("<|media_pad|>", True),
    163606: ("<think>", False),
    163607: ("</think>", False),
    163838: ("[UNK]", True),
    163839: ("[PAD]", True),
}


def test_real_vocab_layout_matches_spec() -> None:
    layout = default_special_tokens(163584)
    assert set(layout) == set(range(163584, 163840))
    for tid, (name, special) in layout.items():
        if tid in SPEC_TABLE:
            assert (name, special) == SPEC_TABLE[tid], tid
        else:
            assert name == f"<|reserved_token_{tid}|>"
    assert layout[163589][0] == "<|reserved_token_163589|>"


def test_pat_str_is_the_spec_pattern() -> None:
    spec = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec" / "kimi-k25.md"
    if not spec.is_file():
        pytest.skip(f"spec not found at {spec}")
    block = re.search(r"`pat_str` \(exact.*?```\n(.*?)```", spec.read_text(encoding="utf-8"), re.S)
    assert block, "spec §4 pat_str block not found"
    assert "|".join(block.group(1).strip("\n").split("\n")) == tk.PAT_STR


SPLIT_SAMPLES = [
    "Hello 你好世界 DON'T  abc123456\n\n x",
    "I'm here, they'LL go; it's 3.14159!!\r\n\tEnd  ",
    "ÜBERgroß café Ω naïve ÀB 日本語テキスト mixed中文text",
    "   leading and trailing   \n\n\n",
    "code: def f(x):\n    return x**2  # ok?\n",
]


def _piece_vocab(pieces: list[bytes]) -> dict[bytes, int]:
    """Bytes plus every prefix of each piece, so tiktoken can reach each whole piece by merging."""
    ranks = {bytes([b]): b for b in range(256)}
    for p in pieces:
        for k in range(2, len(p) + 1):
            ranks.setdefault(p[:k], len(ranks))
    return ranks


def test_tiktoken_splits_like_the_pattern(tmp_path: Path) -> None:
    pat = regex.compile("(?V1)" + tk.PAT_STR)
    pieces = [p for s in SPLIT_SAMPLES for p in pat.findall(s)]
    assert pat.findall(SPLIT_SAMPLES[0]) == [
        "Hello",
        " ",
        "你好世界",
        " DON'T",
        " ",
        " abc",
        "123",
        "456",
        "\n\n",
        " x",
    ]
    write_tiktoken_ranks(_piece_vocab([p.encode() for p in pieces]), tmp_path / "tiktoken.model")
    tok = KimiTokenizer(tmp_path / "tiktoken.model")
    for s in SPLIT_SAMPLES:
        ids = tok.encode(s)
        assert [tok.decode([i]) for i in ids] == pat.findall(s)


def test_special_strings_are_special_by_default(tiny_tokenizer: KimiTokenizer) -> None:
    tok = tiny_tokenizer
    n = tok.num_base_tokens
    ids = tok.encode("a<|im_end|>b<think>c")
    assert n + 2 in ids and n + 22 in ids
    plain = tok.encode("a<|im_end|>b<think>c", allow_special_tokens=False)
    assert all(i < n for i in plain)
    assert tok.decode(plain) == tok.decode(ids) == "a<|im_end|>b<think>c"
    assert tok.eos_id == n + 1 and tok.bos_id == n and tok.pad_id == n + 255 and tok.unk_id == n + 254
    assert tok.im_end_id == tok.token_to_id("<|im_end|>") == n + 2
    assert tok.vocab_size == n + 256


def test_skip_special_tokens_keeps_tool_and_think_tokens(tiny_tokenizer: KimiTokenizer) -> None:
    text = "<|im_assistant|>assistant<|im_middle|><think>r</think><|tool_calls_section_begin|>x<|im_end|>"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == (
        "assistant<think>r</think><|tool_calls_section_begin|>x"
    )


def test_round_trip_and_hf_token_strings(tiny_tokenizer: KimiTokenizer) -> None:
    text = 'Hello world! 你好 é \n\t{"a": 1} <|im_user|>'
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    toks = tiny_tokenizer.convert_ids_to_tokens(ids)
    assert "Ġworld" in toks or "Ġ" in toks
    assert toks[-1] == "<|im_user|>"
    assert tiny_tokenizer.convert_tokens_to_ids(toks) == ids


def test_save_and_load_config(tiny_tokenizer: KimiTokenizer, tmp_path: Path) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    n = tiny_tokenizer.num_base_tokens
    assert cfg["bos_token"] == "[BOS]" and cfg["eos_token"] == "[EOS]" and cfg["pad_token"] == "[PAD]"
    assert cfg["added_tokens_decoder"][str(n + 13)] == {
        "content": "<|tool_call_begin|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": False,
    }
    assert len(cfg["added_tokens_decoder"]) == 256
    assert "<|im_middle|>" in cfg["additional_special_tokens"]
    # A renamed reserved token in the config is honoured on load.
    cfg["added_tokens_decoder"][str(n + 30)]["content"] = "<|my_token|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    again = KimiTokenizer.from_pretrained(tmp_path)
    assert again.token_to_id("<|my_token|>") == n + 30
    assert again.encode("<|my_token|>") == [n + 30]


def _reference_pieces(s: str, window: int, run: int) -> list[str]:
    """The official algorithm, char by char, as described in spec §4."""
    out = []
    for i in range(0, len(s), window) if s else [0]:
        w = s[i : i + window]
        length, is_space, start = 0, (w[0].isspace() if w else False), 0
        for j, ch in enumerate(w):
            if ch.isspace() != is_space:
                length, is_space = 1, ch.isspace()
            else:
                length += 1
                if length > run:
                    out.append(w[start:j])
                    start, length = j, 1
        out.append(w[start:])
    return out


def test_long_input_splitting_matches_official_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "MAX_ENCODE_CHARS", 50)
    monkeypatch.setattr(tk, "MAX_RUN_CHARS", 7)
    rng = random.Random(0)
    for _ in range(300):
        s = "".join(rng.choice(["a", "b", " ", "\n", "\u3000", "é"]) * rng.randint(1, 12) for _ in range(15))
        s = s[: rng.randint(0, len(s))]
        assert list(tk.iter_encode_pieces(s)) == _reference_pieces(s, 50, 7), s


def test_long_input_encodes_and_decodes(tiny_tokenizer: KimiTokenizer) -> None:
    text = "x" * 60_000 + " " * 30_000 + "Hello world"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_invalid_files_and_ids(tmp_path: Path, tiny_tokenizer: KimiTokenizer) -> None:
    good = tmp_path / "a.model"
    write_tiktoken_ranks({bytes([b]): b for b in range(256)}, good)
    lines = good.read_text().splitlines()
    bad = tmp_path / "b.model"
    bad.write_text("\n".join(lines[:3] + ["!!notbase64 3"] + lines[4:]))
    with pytest.raises(TokenizerError, match=r"b.model:4: token is not valid base64"):
        KimiTokenizer(bad)
    bad.write_text("\n".join(lines[:10] + lines[11:]))
    with pytest.raises(TokenizerError, match="rank 10 is missing"):
        KimiTokenizer(bad)
    bad.write_text("\n".join(lines + ["YWI= x"]))
    with pytest.raises(TokenizerError, match="rank 'x' is not an integer"):
        KimiTokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        KimiTokenizer(tmp_path / "missing.model")
    n = tiny_tokenizer.vocab_size
    with pytest.raises(TokenizerError, match=f"token id {n} is out of range"):
        tiny_tokenizer.decode([1, n])
    with pytest.raises(TokenizerError, match="token id -1"):
        tiny_tokenizer.convert_ids_to_tokens([-1])
    with pytest.raises(TokenizerError, match="outside the reserved range"):
        KimiTokenizer(good, {5: ("<|x|>", True)})
    with pytest.raises(TokenizerError, match="no tiktoken.model"):
        KimiTokenizer.from_pretrained(tmp_path)


def test_stream_decoder_holds_partial_utf8(tiny_tokenizer: KimiTokenizer) -> None:
    text = "日本語 ok <|im_end|>"
    ids = tiny_tokenizer.encode(text)
    dec = tiny_tokenizer.stream_decoder()
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_apply_chat_template(tiny_tokenizer: KimiTokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    ids = tiny_tokenizer.apply_chat_template(msgs, thinking=False)
    assert ids[-2:] == [tiny_tokenizer.token_to_id("<think>"), tiny_tokenizer.token_to_id("</think>")]
    assert ids[0] == tiny_tokenizer.token_to_id("<|im_user|>")
