"""Hypothesis properties: render -> parse is the identity for assistant messages, and no input
(however it is chunked) makes the parser raise or stream differently from the whole parse."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from k25.chat.parsers import MARKERS, StreamingParser, parse_output  # noqa: E402
from k25.chat.template import render_assistant_output  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

plain_text = (
    st.lists(st.sampled_from([*'ab <>|/{}":,\n\té你', "think", "tool", "_end", "functions.", "[EO"]), max_size=20)
    .map("".join)
    .filter(lambda s: not any(m in s for m in MARKERS))
)


@st.composite
def assistant_messages(draw: st.DrawFn) -> dict:
    msg = {"role": "assistant", "content": draw(plain_text), "reasoning_content": draw(plain_text)}
    calls = []
    for i in range(draw(st.integers(0, 3))):
        name = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True))
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers(-1000, 1000) | plain_text,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner, max_size=3),
            max_leaves=6,
        )
        args = draw(st.dictionaries(plain_text, json_values, max_size=3))
        if draw(st.booleans()):
            args = json.dumps(args, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
        calls.append({"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}})
    if calls:
        msg["tool_calls"] = calls
    return msg


@SETTINGS
@given(assistant_messages(), st.booleans())
def test_render_then_parse_is_identity(msg: dict, thinking: bool) -> None:
    text = render_assistant_output(msg, thinking)
    out = parse_output(text, thinking)
    assert out.content == msg["content"]
    assert (out.reasoning_content or "") == (msg["reasoning_content"] if thinking else "")
    calls = msg.get("tool_calls", [])
    assert [(c.id, c.name) for c in out.tool_calls] == [(c["id"], c["function"]["name"]) for c in calls]
    for got, want in zip(out.tool_calls, calls, strict=True):
        args = want["function"]["arguments"]
        assert got.error is None
        if isinstance(args, str):
            assert got.arguments == args.strip()
        else:
            assert json.loads(got.arguments) == args
    assert out.errors == []


output_text = st.lists(
    st.sampled_from(
        [
            *MARKERS,
            "<",
            "<|",
            "|>",
            "[EO",
            "_end|>",
            "<|tool_call",
            "x",
            " ",
            "\n",
            "{}",
            "é",
            "functions.f:0",
            ":",
            "1",
        ]
    ),
    max_size=40,
).map("".join)


@SETTINGS
@given(output_text, st.lists(st.integers(0, 400), max_size=8), st.booleans())
def test_any_output_any_chunking_never_raises(text: str, cuts: list[int], thinking: bool) -> None:
    whole = parse_output(text, thinking)
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    p = StreamingParser(thinking)
    for c in chunks:
        p.feed(c)
    p.finish()
    assert p.result() == whole
    for call in whole.tool_calls:
        json.dumps(call.to_openai())
