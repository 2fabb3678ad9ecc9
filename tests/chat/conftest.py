"""Shared fixtures for the chat tests: a tiny vocabulary built in the test, and the spec's template."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from k25.chat.tokenizer import KimiTokenizer, write_tiktoken_ranks

SPEC = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec" / "kimi-k25.md"

CORPUS = (
    "Hello world! The quick brown fox jumps over the lazy dog. "
    "def add(x, y):\n    return x + y\n"
    "你好世界，今天天气很好。 Ünïcödé text and numbers 12345 67890.\n"
    '{"city": "Paris", "unit": "celsius"} functions.get_weather:0 '
) * 20


def build_ranks(text: str = CORPUS, merges: int = 150) -> dict[bytes, int]:
    """A tiny byte-level BPE learned by counting pairs (no library, so the test checks the class alone)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in re.findall(r"\S+|\s+", text)]
    for _ in range(merges):
        counts: dict[tuple[bytes, bytes], int] = {}
        for w in words:
            for a, b in zip(w, w[1:], strict=False):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    return ranks


@pytest.fixture(scope="session")
def tiny_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_vocab")
    write_tiktoken_ranks(build_ranks(), d / "tiktoken.model")
    KimiTokenizer(d / "tiktoken.model").save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab_dir: Path) -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(tiny_vocab_dir)


@pytest.fixture(scope="session")
def official_template() -> str:
    """The released K2.5 template text, read from the spec at test time (never copied into k25)."""
    if not SPEC.is_file():
        pytest.skip(f"spec not found at {SPEC}: the official template peer is unavailable")
    text = SPEC.read_text(encoding="utf-8")
    section = text.split("### 5.1 Verbatim text", 1)
    if len(section) != 2:
        pytest.skip("spec has no §5.1 'Verbatim text' section")
    m = re.search(r"```jinja\n(.*?)```", section[1], re.S)
    if not m:
        pytest.skip("spec §5.1 has no ```jinja block")
    return m.group(1)
