"""The server over the real engine: a tiny random checkpoint with a byte tokenizer, the `openai` client.

Greedy output through HTTP must equal the reference generation loop on the same prompt ids;
concurrent clients share the engine and get the same answers as alone; a repeated prompt is
served from the prefix cache; the `k25 serve` command starts and answers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import openai
import pytest
import torch

import k25
from k25.chat.parsers import parse_ids
from k25.chat.template import render
from k25.chat.tokenizer import KimiTokenizer
from k25.engine.engine import EngineConfig, LLMEngine
from k25.server.app import create_app
from k25.server.engine_backend import EngineBackend
from k25.testing import ServerThread, byte_tokenizer, tiny_config, write_random_checkpoint

INSTANT = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_served")
    write_random_checkpoint(path, tiny_config(initializer_range=0.1), seed=3,
                            tokenizer=byte_tokenizer(tmp_path_factory.mktemp("tok")))
    return path


@pytest.fixture(scope="module")
def served(checkpoint):
    tokenizer = KimiTokenizer.from_pretrained(checkpoint)
    model = k25.load(checkpoint, dtype=torch.float32, vision=False)
    engine = LLMEngine(model, EngineConfig(cache_tokens=4096, max_num_seqs=8, block_size=16), tokenizer=tokenizer)
    backend = EngineBackend(engine, tokenizer, "tiny", max_model_len=2048)
    with ServerThread(create_app(backend)) as srv:
        yield srv, model, tokenizer, backend
    backend.close()


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_greedy_chat_equals_the_reference_loop(served):
    srv, model, tokenizer, _ = served
    messages = [{"role": "user", "content": "Hello there, k25!"}]
    r = _client(srv).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                             extra_body=INSTANT)
    prompt = tokenizer.encode(render(messages, thinking=False, add_generation_prompt=True))
    ref = k25.generate(model, torch.tensor([prompt]), 12, eos_token_id=[tokenizer.im_end_id,
                                                                        model.config.eos_token_id])[0].tolist()
    if tokenizer.im_end_id in ref:
        ref = ref[: ref.index(tokenizer.im_end_id) + 1]
    assert r.usage.completion_tokens == len(ref)
    expected = parse_ids(tokenizer, ref, thinking=False).to_message()
    assert (r.choices[0].message.content or "") == (expected.get("content") or "")
    assert r.usage.prompt_tokens == len(prompt)


def test_concurrent_clients_match_sequential_and_prefix_cache_hits(served):
    srv, *_ = served
    client = _client(srv)
    prompts = [f"Question number {i}: what comes next in the sequence {i}, {i + 1}, {i + 2}?" for i in range(4)]

    def ask(text):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                           temperature=0, max_tokens=8, extra_body=INSTANT)
        return r.choices[0].message.content, r.usage

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert [a[0] for a in alone] == [t[0] for t in together]
    # the second time round, whole prompt blocks come from the prefix cache
    assert all(t[1].prompt_tokens_details.cached_tokens >= 16 for t in together)


def test_streaming_and_seeded_sampling(served):
    srv, *_ = served
    client = _client(srv)
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 10,
              "seed": 7, "temperature": 1.0}
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.choices[0].message.model_dump() == second.choices[0].message.model_dump()
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens


def test_k25_serve_command(checkpoint):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "k25.cli", "serve", str(checkpoint), "--port", str(port),
                             "--dtype", "float32", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 90
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    output = proc.stdout.read().decode() if proc.poll() is not None else "no answer"
                    raise AssertionError(f"k25 serve did not come up: {output}") from None
                time.sleep(0.3)
        assert models.data[0].id == checkpoint.name
        r = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_disconnect_frees_the_engine(served):
    import httpx2 as httpx

    srv, _, _, backend = served
    free_before = backend.engine.blocks.num_free
    body = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 1500,
            "stream": True, "ignore_eos": True, "temperature": 1.0}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break
    deadline = time.monotonic() + 30
    while backend.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backend.engine.has_unfinished()
    assert not backend.engine.sequences  # aborted requests are released, not kept
    assert backend.engine.blocks.num_free == free_before


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14}}}


def test_response_format_json_schema_is_enforced(served):
    """Even a random model answers with JSON matching the schema: the grammar masks every other token."""
    srv, *_ = served
    client = _client(srv)
    for n, extra in enumerate([INSTANT, {}]):  # Instant, then Thinking (free reasoning, then the JSON)
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Plan a trip."}], max_tokens=200, seed=n,
            temperature=1.0, extra_body=extra,
            response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}},
        )
        data = json.loads(r.choices[0].message.content)
        assert set(data) == {"city", "days"} and 1 <= data["days"] <= 14 and len(data["city"]) <= 12
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Anything."}],
                                       max_tokens=200, seed=5, response_format={"type": "json_object"},
                                       extra_body=INSTANT)
    assert isinstance(json.loads(r.choices[0].message.content), dict) or r.choices[0].finish_reason == "length"


def test_tool_choice_none_never_calls_even_when_the_model_would(served):
    """Force the model towards a tool call (bias the section token by a huge logit) and check that
    `tool_choice: "none"` still answers in text, with the tools declared in the prompt."""
    srv, model, tokenizer, backend = served
    section = tokenizer.token_to_id("<|tool_calls_section_begin|>")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with torch.no_grad():
        saved = model.lm_head.weight[section].clone()
        model.lm_head.weight[section] = model.model.norm.weight.sign() * 50  # dominates every position
    try:
        client = _client(srv)
        kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Use f."}], "tools": [tool],
                  "max_tokens": 6, "temperature": 0, "extra_body": INSTANT}
        free = client.chat.completions.create(**kwargs)
        # with tool_choice auto the model opens a tool-call section at once (no text)
        assert not free.choices[0].message.content and free.usage.completion_tokens == 6
        none = client.chat.completions.create(**kwargs, tool_choice="none")
        assert not none.choices[0].message.tool_calls and none.choices[0].message.content
    finally:
        with torch.no_grad():
            model.lm_head.weight[section] = saved


PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}


def test_tool_calls_are_held_to_the_declared_names_and_schemas(served):
    """A random model that opens tool-call sections (biased towards the section token) still calls a
    declared tool with schema-valid arguments: the lazy tool-call grammar; `tool_choice: "required"` too."""
    srv, model, tokenizer, backend = served
    section = tokenizer.token_to_id("<|tool_calls_section_begin|>")
    client = _client(srv)
    kwargs = {"model": "tiny", "tools": [PICK], "max_tokens": 60, "temperature": 1.0, "extra_body": INSTANT,
              "parallel_tool_calls": False}
    for seed in range(3):  # forced section prefix, the grammar fills in the name and the arguments
        r = client.chat.completions.create(**kwargs, messages=[{"role": "user", "content": "Pick one."}], seed=seed,
                                           tool_choice="required")
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "pick" and 0 <= json.loads(call.function.arguments)["n"] <= 9
        assert r.choices[0].finish_reason == "tool_calls"
    with torch.no_grad():
        saved = model.lm_head.weight[section].clone()
        model.lm_head.weight[section] = model.model.norm.weight.sign() * 50
    try:
        r = client.chat.completions.create(**kwargs, messages=[{"role": "user", "content": "Pick."}], seed=7)
        (call,) = r.choices[0].message.tool_calls  # the model opened the section itself (tool_choice auto)
        assert call.function.name == "pick" and 0 <= json.loads(call.function.arguments)["n"] <= 9
    finally:
        with torch.no_grad():
            model.lm_head.weight[section] = saved
