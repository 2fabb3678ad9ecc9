"""Constrained decoding: the engine only samples tokens the JSON grammar allows."""

from __future__ import annotations

import json

import pytest
import torch

import k25
from k25.chat.parsers import parse_ids
from k25.data.tools import check_tool_call
from k25.engine.constraints import ConstraintError, JsonConstraint, ToolCallConstraint
from k25.engine.engine import EngineConfig, LLMEngine
from k25.engine.sampling import SamplingParams
from k25.testing import byte_tokenizer, tiny_config

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tok = byte_tokenizer(tmp_path_factory.mktemp("tok"))
    model = k25.build_model(tiny_config(), dtype=torch.float32, vision=False)
    return LLMEngine(model, EngineConfig(cache_tokens=4096), tokenizer=tok), tok


def test_random_model_output_matches_the_schema(engine):
    eng, tok = engine
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=64, constraint=JsonConstraint(tok, SCHEMA))
              for s in range(6)]
    outs = eng.run([[1, 2, 3]] * 6, params)
    for o in outs:
        data = json.loads(o.text)
        assert o.finish_reason == "stop" and o.output_ids[-1] == tok.im_end_id
        assert set(data) == {"ok", "n"} and isinstance(data["ok"], bool) and 0 <= data["n"] <= 99
    free = eng.run([[1, 2, 3]], SamplingParams(temperature=1.0, seed=0, max_tokens=64))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)  # without the constraint the same random model writes no JSON


def test_mask_tracks_the_grammar(engine):
    _, tok = engine
    c = JsonConstraint(tok, SCHEMA)
    first = c.allowed(tok.vocab_size)
    assert first.sum() == 1 and first[ord("{")]  # compact JSON: only "{" can start it
    for ch in '{"ok":true,"n":7':
        assert c.allowed(tok.vocab_size)[ord(ch)]
        c.accept(ord(ch))
    mid = c.allowed(tok.vocab_size)
    assert mid[ord("5")] and mid[ord("}")] and not mid[tok.im_end_id]  # 75 or 7, but the object is open
    c.accept(ord("}"))
    end = c.allowed(tok.vocab_size)
    assert end.sum() == 1 and end[tok.im_end_id]  # complete: only the end of the message


def test_bad_schema_is_a_clear_error(engine):
    _, tok = engine
    with pytest.raises(ConstraintError, match="invalid JSON schema"):
        JsonConstraint(tok, {"type": "no-such-type"})


TOOLS = [
    {"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["query"],
        "properties": {"query": {"type": "string", "maxLength": 8}, "k": {"type": "integer", "minimum": 1}}}}},
]


def test_tool_call_grammar_is_lazy_and_holds_calls_to_the_schemas(engine):
    """Free until the section opens; then declared names, schema-valid JSON, the Kimi markers; then free again."""
    _, tok = engine
    c = ToolCallConstraint(tok, TOOLS)
    free = c.allowed(tok.vocab_size)
    inner = [tok.token_to_id(m) for m in ("<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>")]
    assert not c.inside and free[tok.token_to_id("<|tool_calls_section_begin|>")] and not free[inner].any()
    assert int(free.sum()) == tok.vocab_size - 4  # everything else is free
    text = ('ok<|tool_calls_section_begin|><|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>'
            '{"query": "x", "k": 2}<|tool_call_end|><|tool_calls_section_end|>')
    head, rest = text.split("functions.")
    for t in tok.encode(head + "functions.", allow_special_tokens=True):
        assert c.allowed(tok.vocab_size)[t], tok.decode([t])
        c.accept(t)
    names = c.allowed(tok.vocab_size)
    assert names[ord("c")] and names[ord("s")] and not names[ord("x")]  # calculator or search only
    for t in tok.encode(rest, allow_special_tokens=True):
        assert c.allowed(tok.vocab_size)[t], tok.decode([t])
        c.accept(t)
    assert not c.inside and c.sections == 1 and torch.equal(c.allowed(tok.vocab_size), free)
    d = ToolCallConstraint(tok, TOOLS)
    for t in tok.encode('<|tool_calls_section_begin|><|tool_call_begin|>functions.search:0'
                        '<|tool_call_argument_begin|>{"query": "', allow_special_tokens=True):
        d.accept(t)
    mask = d.allowed(tok.vocab_size)
    assert mask[ord("a")] and not mask[tok.token_to_id("<|tool_call_end|>")]  # the JSON is open
    with pytest.raises(ConstraintError, match="broke the tool-call grammar"):
        d.accept(tok.token_to_id("<|tool_call_end|>"))


def test_tool_arguments_are_closed_to_undeclared_keys(engine):
    """A schema without ``additionalProperties`` still admits only its declared arguments, as the
    validator requires; an explicit ``additionalProperties`` is kept."""
    from k25.engine.constraints import closed_schema

    _, tok = engine
    c = ToolCallConstraint(tok, TOOLS)
    for t in tok.encode('<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0'
                        '<|tool_call_argument_begin|>{"expression": "1"', allow_special_tokens=True):
        c.accept(t)
    mask = c.allowed(tok.vocab_size)
    assert mask[ord("}")] and not mask[ord(",")]  # calculator declares `expression` only
    nested = {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {}}}},
              "$defs": {"d": {"type": "object", "properties": {}}}}
    closed = closed_schema(nested)
    assert closed["additionalProperties"] is False and closed["properties"]["p"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False and "additionalProperties" not in nested
    assert closed_schema({"type": "object", "properties": {}, "additionalProperties": True})["additionalProperties"]
    assert closed_schema({"type": "object"}) == {"type": "object"}  # no properties listed: any object


# short arguments only, so a random model finishes its calls within the token budget
TIGHT = [TOOLS[1], {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}]


def test_random_model_tool_calls_parse_and_validate(engine):
    """Sampling from a random model inside an opened section gives calls that pass k25's own validator."""
    eng, tok = engine
    section, end = tok.token_to_id("<|tool_calls_section_begin|>"), tok.token_to_id("<|tool_call_end|>")
    complete = 0
    for seed in range(3):
        c = ToolCallConstraint(tok, TIGHT)
        c.accept(section)
        (out,) = eng.run([[1, 2, 3, section]], SamplingParams(temperature=1.0, seed=seed, max_tokens=150,
                                                              constraint=c))
        ids = list(out.output_ids)
        assert end in ids, tok.decode(ids)
        # the calls finished within the budget (a random model keeps calling until the budget runs out)
        ids = ids[: len(ids) - ids[::-1].index(end)] + [tok.token_to_id("<|tool_calls_section_end|>")]
        parsed = parse_ids(tok, [section, *ids], thinking=False)
        assert parsed.tool_calls and not parsed.errors, parsed
        for call in parsed.tool_calls:
            assert call.error is None and check_tool_call(call.name, call.arguments, TIGHT) == [], call
        complete += len(parsed.tool_calls)
    assert complete >= 3


def test_bad_tools_are_a_clear_error(engine):
    _, tok = engine
    with pytest.raises(ConstraintError, match=r"tools\[1\].function.name"):
        ToolCallConstraint(tok, [TOOLS[0], {"type": "function", "function": {}}])
    with pytest.raises(ConstraintError, match="at least one tool"):
        ToolCallConstraint(tok, [])
