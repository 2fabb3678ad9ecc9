"""Parsers (spec §6 and the failure list of inference-anchors §2.3): expected results, streaming,
special tokens split across chunks, and render -> parse identity."""

from __future__ import annotations

import json
import random

import pytest

from k25.chat.parsers import (
    MARKERS,
    ParsedOutput,
    ReasoningParser,
    StreamingParser,
    TokenStreamParser,
    ToolCallParser,
    make_tool_call_id,
    next_tool_call_index,
    parse_ids,
    parse_output,
)
from k25.chat.template import render_assistant_output, render_template
from k25.chat.tokenizer import KimiTokenizer

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def section(*calls: tuple[str, str], begin: str = SB, end: str = SE) -> str:
    return begin + "".join(f"{CB}{i}{AB}{a}{CE}" for i, a in calls) + end


def no_marker_leaks(out: ParsedOutput) -> None:
    for m in MARKERS:
        assert m not in out.content, m
        assert m not in (out.reasoning_content or ""), m


def stream_chars(text: str, thinking: bool = True) -> tuple[ParsedOutput, list[dict]]:
    p = StreamingParser(thinking)
    deltas = [p.feed(ch) for ch in text] + [p.finish()]
    return p.result(), [d for d in deltas if d]


def joined(deltas: list[dict]) -> tuple[str, str, dict[int, dict]]:
    """Concatenate streamed deltas the way an OpenAI client does."""
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            cur = calls.setdefault(c["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in c:
                assert cur["id"] is None, "id sent twice"
                cur["id"], cur["name"] = c["id"], c["function"]["name"]
            cur["arguments"] += c["function"].get("arguments", "")
    return reasoning, content, calls


def check_streaming_equals_whole(
    text: str, thinking: bool = True, chunks: list[str] | None = None, leaks: bool = True
) -> ParsedOutput:
    whole = parse_output(text, thinking)
    p = StreamingParser(thinking)
    deltas = [p.feed(c) for c in (chunks if chunks is not None else list(text))] + [p.finish()]
    deltas = [d for d in deltas if d]
    assert p.result() == whole
    reasoning, content, calls = joined(deltas)
    assert reasoning == (whole.reasoning_content or "")
    assert content == whole.content
    assert [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.id, c.name, c.arguments) for c in whole.tool_calls
    ]
    if leaks:
        no_marker_leaks(whole)
    return whole


def test_reasoning_content_and_one_call() -> None:
    text = "Need weather.</think>Checking." + section(("functions.get_weather:0", '{"city": "Paris"}'))
    out = check_streaming_equals_whole(text)
    assert out.reasoning_content == "Need weather."
    assert out.content == "Checking."
    assert [c.to_openai() for c in out.tool_calls] == [
        {
            "id": "functions.get_weather:0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert out.errors == []
    assert out.to_message() == {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Need weather.",
        "tool_calls": [out.tool_calls[0].to_openai()],
    }


def test_missing_think_end_is_all_reasoning() -> None:
    out = check_streaming_equals_whole("still thinking about it")
    assert out.reasoning_content == "still thinking about it" and out.content == "" and not out.tool_calls
    assert any("no </think>" in e for e in out.errors)


def test_leading_think_is_consumed() -> None:
    out = check_streaming_equals_whole("<think>r</think>c")
    assert (out.reasoning_content, out.content) == ("r", "c")


def test_tool_section_without_think_end_ends_reasoning() -> None:
    text = "I will call it" + section(("functions.f:0", "{}"))
    out = check_streaming_equals_whole(text)
    assert out.reasoning_content == "I will call it"
    assert out.content == ""
    assert [c.name for c in out.tool_calls] == ["f"]


def test_singular_section_tokens() -> None:
    text = "r</think>" + section(
        ("functions.f:0", '{"a": 1}'), begin="<|tool_call_section_begin|>", end="<|tool_call_section_end|>"
    )
    out = check_streaming_equals_whole(text)
    assert [(c.name, c.arguments, c.error) for c in out.tool_calls] == [("f", '{"a": 1}', None)]


def test_several_calls_in_one_section() -> None:
    text = "r</think>" + section(
        ("functions.a:0", '{"x": 1}'), ("functions.b.c:1", '{"y": 2}'), ("functions.a:2", "{}")
    )
    out = check_streaming_equals_whole(text)
    assert [(c.index, c.id, c.name, c.arguments) for c in out.tool_calls] == [
        (0, "functions.a:0", "a", '{"x": 1}'),
        (1, "functions.b.c:1", "c", '{"y": 2}'),
        (2, "functions.a:2", "a", "{}"),
    ]


def test_arguments_with_newlines_and_marker_like_text() -> None:
    args = '{\n  "code": "print(\'<|tool_call\')\\nx = 1",\n  "note": "functions.fake:9 <|im_end"\n}'
    text = "r</think>" + section(("functions.run:0", f"\n {args} \n"))
    out = check_streaming_equals_whole(text)
    assert out.tool_calls[0].arguments == args
    assert json.loads(out.tool_calls[0].arguments)["note"] == "functions.fake:9 <|im_end"
    assert out.tool_calls[0].error is None


def test_invalid_json_is_kept_and_flagged() -> None:
    text = "r</think>" + section(("functions.f:0", '{"a": 1'), ("functions.g:1", '{"ok": true}'))
    out = check_streaming_equals_whole(text)
    assert out.tool_calls[0].arguments == '{"a": 1'
    assert "not valid JSON" in out.tool_calls[0].error
    assert out.tool_calls[1].error is None
    assert any("tool call 0" in e for e in out.errors)


def test_text_before_section_is_content() -> None:
    text = "r</think>Let me look that up.\n" + section(("functions.f:0", "{}"))
    out = check_streaming_equals_whole(text)
    assert out.content == "Let me look that up.\n"


def test_ids_with_whitespace_and_newlines() -> None:
    text = "r</think>" + section((" \n functions.get_weather:0\n ", ' {"c": 1} '))
    out = check_streaming_equals_whole(text)
    assert (out.tool_calls[0].id, out.tool_calls[0].name) == ("functions.get_weather:0", "get_weather")
    bad = check_streaming_equals_whole("r</think>" + section(("weird", "{}")))
    assert bad.tool_calls[0].id == "weird" and "does not look like" in bad.tool_calls[0].error


def test_bundled_end_and_begin_do_not_truncate() -> None:
    # Speculative decoding can deliver <|tool_call_end|><|tool_call_begin|> in one delta.
    text = "r</think>" + section(("functions.a:0", '{"x": "1"}'), ("functions.b:1", '{"y": "2"}'))
    i = text.index(CE)
    chunks = [text[:i], text[i : i + len(CE) + len(CB) + 5], text[i + len(CE) + len(CB) + 5 :]]
    out = check_streaming_equals_whole(text, chunks=chunks)
    assert [c.arguments for c in out.tool_calls] == ['{"x": "1"}', '{"y": "2"}']


def test_call_cut_short_by_next_call_is_flagged() -> None:
    text = "r</think>" + SB + f'{CB}functions.a:0{AB}{{"x": 1{CB}functions.b:1{AB}{{}}{CE}' + SE
    out = check_streaming_equals_whole(text)
    assert out.tool_calls[0].arguments == '{"x": 1' and "cut short" in out.tool_calls[0].error
    assert out.tool_calls[1].error is None


def test_unterminated_call_at_end_is_kept() -> None:
    out = check_streaming_equals_whole("r</think>" + SB + f'{CB}functions.a:0{AB}{{"x": ')
    assert out.tool_calls[0].arguments == '{"x":' and "before <|tool_call_end|>" in out.tool_calls[0].error


def test_instant_mode_is_all_content() -> None:
    out = check_streaming_equals_whole("Hello" + section(("functions.f:0", "{}")), thinking=False)
    assert out.reasoning_content is None and out.content == "Hello" and len(out.tool_calls) == 1


def test_end_of_message_stops_parsing() -> None:
    out = check_streaming_equals_whole("r</think>done<|im_end|>junk")
    assert out.content == "done"
    assert any("dropped" in e for e in out.errors)


def test_vllm_style_split_parsers() -> None:
    text = "<think>r</think>c" + section(("functions.f:0", "{}"))
    reasoning, content = ReasoningParser().extract(text)
    assert reasoning == "r" and content.startswith("c" + SB)
    assert ReasoningParser(thinking=False).extract("x</think>y") == (None, "x</think>y")
    assert ReasoningParser().extract("r" + section(("functions.f:0", "{}")))[1].startswith(SB)
    content2, calls = ToolCallParser().extract(content)
    assert content2 == "c" and calls[0].name == "f"


def test_streaming_deltas_send_name_once_then_argument_pieces() -> None:
    text = "r</think>" + section(("functions.f:0", '{"a": "bc"}'))
    _, deltas = stream_chars(text)
    call_deltas = [c for d in deltas for c in d.get("tool_calls", [])]
    assert call_deltas[0] == {
        "index": 0,
        "id": "functions.f:0",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert all("id" not in c for c in call_deltas[1:])
    assert "".join(c["function"]["arguments"] for c in call_deltas) == '{"a": "bc"}'


# --- token level -----------------------------------------------------------------------------


def test_token_by_token(tiny_tokenizer: KimiTokenizer) -> None:
    msg = {
        "role": "assistant",
        "reasoning_content": "Need 天气 data.",
        "content": "Looking…",
        "tool_calls": [
            {
                "id": "functions.get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    }
    text = render_assistant_output(msg) + "<|im_end|>"
    ids = tiny_tokenizer.encode(text)
    special = {tiny_tokenizer.token_to_id(t) for t in ("</think>", SB, CB, AB, CE, SE, "<|im_end|>")}
    assert special <= set(ids), "markers must be single special ids"
    out = parse_ids(tiny_tokenizer, ids)
    assert out.reasoning_content == "Need 天气 data." and out.content == "Looking…"
    assert json.loads(out.tool_calls[0].arguments) == {"city": "Zürich"}
    assert out.errors == []


def test_render_assistant_output_matches_template() -> None:
    chat = [{"role": "user", "content": "q"}]
    msg = {
        "role": "assistant",
        "reasoning_content": "r",
        "content": "c",
        "tool_calls": [{"id": "functions.f:0", "function": {"name": "f", "arguments": {"a": [1]}}}],
    }
    for thinking in (True, False):
        full = render_template([*chat, msg], thinking=thinking)
        prompt = render_template(chat, thinking=thinking, add_generation_prompt=True)
        assert full == prompt + render_assistant_output(msg, thinking) + "<|im_end|>"


# --- properties (seeded; hypothesis versions in test_chat_parser_properties.py) ------------------

FRAGMENTS = [
    *MARKERS,
    "<",
    "<|",
    "|>",
    "</",
    "think",
    "a",
    " ",
    "\n",
    "{",
    "}",
    '"',
    ":",
    "0",
    "functions.f:1",
    "é",
    "你",
    "<|tool_call",
    "_end|>",
    "[EO",
    "S]",
]


# Text pieces that cannot spell a marker even when a dropped marker joins two of them.
SAFE_FRAGMENTS = [*MARKERS, "a", " ", "\n", "{", "}", '"', ":", "0", "functions.f:1", "é", "你", "<", "|>", ">"]


def random_chunks(rng: random.Random, fragments: list[str]) -> tuple[str, list[str]]:
    text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    return text, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_random_outputs_never_raise_and_stream_equals_whole() -> None:
    # Partial markers ("<|tool_call" + "_end|>") may legitimately join into marker-like text
    # around a dropped marker, so leaks are checked on SAFE_FRAGMENTS below.
    rng = random.Random(1234)
    for _ in range(400):
        text, chunks = random_chunks(rng, FRAGMENTS)
        for thinking in (True, False):
            check_streaming_equals_whole(text, thinking, chunks, leaks=False)


def test_random_outputs_never_leak_markers() -> None:
    rng = random.Random(4321)
    for _ in range(400):
        text, chunks = random_chunks(rng, SAFE_FRAGMENTS)
        for thinking in (True, False):
            check_streaming_equals_whole(text, thinking, chunks)


def random_assistant(rng: random.Random) -> dict:
    words = ["hi", " ", "\n", "<", "|", "<b>", "x:1", "你好", "{", "}", "think", "/"]

    def text() -> str:
        return "".join(rng.choice(words) for _ in range(rng.randint(0, 6)))

    msg: dict = {"role": "assistant", "content": text(), "reasoning_content": text()}
    calls = []
    for i in range(rng.randint(0, 3)):
        name = rng.choice(["f", "get_weather", "a_b"])
        args = {"k": text(), "n": rng.randint(0, 9)} if rng.random() < 0.5 else json.dumps({"s": text()})
        calls.append({"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}})
    if calls:
        msg["tool_calls"] = calls
    return msg


def assert_identity(msg: dict, thinking: bool) -> None:
    out = parse_output(render_assistant_output(msg, thinking), thinking)
    assert out.content == (msg.get("content") or "")
    assert (out.reasoning_content or "") == (msg.get("reasoning_content", "") if thinking else "")
    calls = msg.get("tool_calls") or []
    assert len(out.tool_calls) == len(calls)
    for got, want in zip(out.tool_calls, calls, strict=True):
        assert got.id == want["id"] and got.name == want["function"]["name"] and got.error is None
        args = want["function"]["arguments"]
        if isinstance(args, str):
            assert got.arguments == args
        else:
            assert json.loads(got.arguments) == args
    assert out.errors == []


def test_render_then_parse_is_identity_seeded() -> None:
    rng = random.Random(99)
    for _ in range(300):
        msg = random_assistant(rng)
        if any(m in msg["content"] or m in msg["reasoning_content"] for m in MARKERS):
            continue
        assert_identity(msg, thinking=rng.random() < 0.7)


@pytest.mark.parametrize("thinking", [True, False])
def test_empty_output(thinking: bool) -> None:
    out = check_streaming_equals_whole("", thinking)
    assert out.content == "" and out.tool_calls == []


def test_token_stream_parser(tiny_tokenizer: KimiTokenizer) -> None:
    text = "r é</think>ok" + section(("functions.f:0", '{"a": "ü"}'))
    ids = tiny_tokenizer.encode(text)
    p = TokenStreamParser(tiny_tokenizer)
    deltas = [p.feed(i) for i in ids] + [p.finish()]
    reasoning, content, calls = joined([d for d in deltas if d])
    assert (reasoning, content) == ("r é", "ok")
    assert calls[0]["arguments"] == '{"a": "ü"}' and calls[0]["name"] == "f"
    assert p.result() == parse_output(text)


def test_tool_call_id_helpers() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "functions.a:0"}, {"id": "functions.b:1"}]},
        {"role": "tool", "tool_call_id": "functions.a:0", "content": "x"},
    ]
    assert next_tool_call_index(msgs) == 2
    assert make_tool_call_id("get_weather", 2) == "functions.get_weather:2"
