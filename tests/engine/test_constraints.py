"""Constrained decoding: the engine only samples tokens the JSON grammar allows."""

from __future__ import annotations

import json

import pytest
import torch

import k25
from k25.engine.constraints import ConstraintError, JsonConstraint
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
