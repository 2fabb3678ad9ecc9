"""The HTTP layer against a scripted backend: modes, parsing, tools, streaming, errors, metrics.

The backend replays scripted model outputs token by token (the byte tokenizer makes every
character one token), so each assertion is about what the server does with known output. The
real `openai` client talks to a real uvicorn server on a free localhost port.
"""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

from k25.server.app import create_app
from k25.testing import ScriptedBackend, ServerThread, byte_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def backend(tokenizer):
    return ScriptedBackend(tokenizer)


@pytest.fixture
def server(backend):
    with ServerThread(create_app(backend)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_thinking_by_default(client, backend):
    backend.outputs = ["Two and two.</think>It is 4.<|im_end|>"]
    r = client.chat.completions.create(model="k25-test", messages=[{"role": "user", "content": "2+2?"}])
    msg = r.choices[0].message
    assert msg.content == "It is 4." and msg.model_extra["reasoning_content"] == "Two and two."
    assert r.choices[0].finish_reason == "stop"
    assert backend.prompts[0].endswith("<|im_assistant|>assistant<|im_middle|><think>")
    assert backend.sampling[0]["temperature"] == 1.0 and backend.sampling[0]["top_p"] == 0.95
    u = r.usage
    assert u.prompt_tokens == len(backend.tokenizer.encode(backend.prompts[0]))
    assert u.completion_tokens == len(backend.tokenizer.encode("Two and two.</think>It is 4.<|im_end|>"))
    assert u.prompt_tokens_details.cached_tokens == 3
    assert u.completion_tokens_details.reasoning_tokens == len(backend.tokenizer.encode("Two and two.</think>"))


@pytest.mark.parametrize("extra", [{"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"thinking": False}}])
def test_instant_mode_both_spellings(client, backend, extra):
    backend.outputs = ["Four.<|im_end|>"]
    r = client.chat.completions.create(model="k25-test", messages=[{"role": "user", "content": "2+2?"}],
                                       extra_body=extra)
    assert r.choices[0].message.content == "Four."
    assert backend.prompts[0].endswith("<think></think>")
    assert backend.sampling[0]["temperature"] == 0.6


def test_checkpoint_generation_config_sets_the_default_sampling(backend, tmp_path):
    """A checkpoint's generation_config.json (as vLLM reads it) replaces the card's defaults in both
    modes; the request's own values and the strict platform rules still win."""
    from k25.server.protocol import SamplingDefaults

    path = tmp_path / "generation_config.json"
    assert SamplingDefaults.from_generation_config(path) == SamplingDefaults()  # absent: K2.5's card
    path.write_text(json.dumps({"do_sample": False, "top_p": 0.9, "eos_token_id": 163586}))
    backend.sampling_defaults = SamplingDefaults.from_generation_config(path)
    msgs = [{"role": "user", "content": "2+2?"}]
    with ServerThread(create_app(backend)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        for extra in ({}, {"thinking": {"type": "disabled"}}):
            backend.outputs = ["</think>4.<|im_end|>" if not extra else "4.<|im_end|>"]
            client.chat.completions.create(model="k25-test", messages=msgs, extra_body=extra)
        backend.outputs = ["</think>4.<|im_end|>"]
        client.chat.completions.create(model="k25-test", messages=msgs, temperature=0.7)
    assert [(s["temperature"], s["top_p"]) for s in backend.sampling] == [(0.0, 0.9), (0.0, 0.9), (0.7, 0.9)]
    with ServerThread(create_app(backend, strict_kimi_api=True)) as srv:
        backend.outputs = ["</think>4.<|im_end|>"]
        openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model="k25-test", messages=msgs)
    assert (backend.sampling[-1]["temperature"], backend.sampling[-1]["top_p"]) == (1.0, 0.95)
    path.write_text(json.dumps({"temperature": 0.3}))
    assert SamplingDefaults.from_generation_config(path) == SamplingDefaults(0.3, 0.3, 0.95)
    for bad, message in (({"temperature": "hot"}, "temperature must be a number"), ({"top_p": 2}, "top_p must be"),
                         ({"do_sample": "no"}, "do_sample must be true or false"), ([1], "expected a JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            SamplingDefaults.from_generation_config(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        SamplingDefaults.from_generation_config(path)


def test_tool_call_round_trip_ids_numbered_across_the_conversation(client, backend):
    backend.outputs = ["Need the tool.</think>" + CALL]
    r = client.chat.completions.create(model="k25-test", messages=[{"role": "user", "content": "Paris?"}],
                                       tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.id == "functions.get_weather:0" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "tool_declare" in backend.prompts[0]
    # second turn: the result goes back; a new call is numbered after the first one
    history = [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18C"},
    ]
    backend.outputs = ["Again.</think>" + CALL]
    r2 = client.chat.completions.create(model="k25-test", messages=history, tools=[WEATHER])
    assert r2.choices[0].message.tool_calls[0].id == "functions.get_weather:1"
    assert "## Return of functions.get_weather:0\n18C" in backend.prompts[1]
    assert "<think>Need the tool.</think>" in backend.prompts[1]


def test_streaming_deltas_and_usage_chunk(client, backend):
    backend.outputs = ["Hmm.</think>" + CALL]
    stream = client.chat.completions.create(
        model="k25-test", messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER], stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, args, ids, finish, usage = "", "", "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.id:
                ids.append(tc.id)
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "Hmm." and content == "" and ids == ["functions.get_weather:0"]
    assert json.loads(args) == {"city": "Paris"} and finish == "tool_calls"
    assert usage.completion_tokens == len(backend.tokenizer.encode("Hmm.</think>" + CALL))


def test_named_tool_choice_forces_the_call_after_reasoning(client, backend):
    backend.outputs = ["I must call it.</think>",
                       '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>']
    r = client.chat.completions.create(
        model="k25-test", messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert r.choices[0].message.model_extra["reasoning_content"] == "I must call it."
    assert backend.prompts[1].endswith(
        "I must call it.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>")


def test_logprobs(client, backend):
    backend.outputs = ["ok<|im_end|>"]
    r = client.chat.completions.create(model="k25-test", messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=1, extra_body={"thinking": {"type": "disabled"}})
    lp = r.choices[0].logprobs.content
    assert [e.token for e in lp[:2]] == ["o", "k"] and lp[0].logprob == -0.5 and lp[0].top_logprobs[0].token == "o"


def test_max_tokens_gives_length(client, backend):
    backend.outputs = ["a long answer<|im_end|>"]
    r = client.chat.completions.create(model="k25-test", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=4, extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_errors(client, backend, server):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="n: only n=1"):
        client.chat.completions.create(model="k25-test", messages=msgs, n=2)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        client.chat.completions.create(model="k25-test", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="tool_choice.function.name='nope'"):
        client.chat.completions.create(model="k25-test", messages=msgs, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="response_format.json_schema.schema: required"):
        client.chat.completions.create(model="k25-test", messages=msgs,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(openai.BadRequestError, match="response_format with tools is not supported"):
        client.chat.completions.create(model="k25-test", messages=msgs, tools=[WEATHER],
                                       response_format={"type": "json_object"})
    long = [{"role": "user", "content": "x" * 5000}]
    too_long = r"the prompt has \d+ tokens but the model's context length is 4096"
    with pytest.raises(openai.BadRequestError, match=too_long):
        client.chat.completions.create(model="k25-test", messages=long)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_queue_full_is_429_with_retry_after(backend, server):
    backend.full = True
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_client_disconnect_aborts_generation(backend, server):
    # 30 s of output: far longer than the abort takes, even on a loaded machine
    backend.outputs = ["x" * 3000 + "<|im_end|>"]
    backend.delay = 0.01
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 5:
                break
    for _ in range(500):
        if backend.aborted:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert backend.aborted


def test_strict_kimi_api(backend):
    with ServerThread(create_app(backend, strict_kimi_api=True)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.BadRequestError, match="invalid temperature: only 1.0"):
            client.chat.completions.create(model="k25-test", messages=msgs, temperature=0.3)
        with pytest.raises(openai.BadRequestError, match="cannot specify both 'thinking' and 'reasoning_effort'"):
            client.chat.completions.create(model="k25-test", messages=msgs, reasoning_effort="low",
                                           extra_body={"thinking": {"type": "enabled"}})
        history = [*msgs, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"}]
        with pytest.raises(openai.BadRequestError, match="reasoning_content is missing in assistant tool call "
                                                         "message at index 1"):
            client.chat.completions.create(model="k25-test", messages=history, tools=[WEATHER])
        backend.outputs = ["fine<|im_end|>"]
        r = client.chat.completions.create(model="k25-test", messages=msgs, temperature=0.6,
                                           extra_body={"thinking": {"type": "disabled"}})
        assert r.choices[0].message.content == "fine"


def test_models_health_metrics_and_completions(client, backend, server):
    assert [m.id for m in client.models.list().data] == ["k25-test"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    backend.outputs = ["abc<|im_end|>"]
    r = client.completions.create(model="k25-test", prompt="hello", max_tokens=10)
    assert r.choices[0].text == "abc<|im_end|>" and r.usage.prompt_tokens == 5
    backend.outputs = ["xyz<|im_end|>"]
    text = "".join(c.choices[0].text for c in client.completions.create(model="k25-test", prompt=[1, 2],
                                                                           max_tokens=10, stream=True) if c.choices)
    assert text == "xyz<|im_end|>"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'k25_requests_total{endpoint="completions",status="200"} 2.0' in metrics
    assert "k25_queue_depth 0.0" in metrics and "k25_prefix_cache_hit_rate" in metrics
    assert "k25_time_to_first_token_seconds_bucket" in metrics


def test_api_key(backend):
    with ServerThread(create_app(backend, api_key="s3cret")) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
            bad.models.list()
        assert httpx.post(srv.url + "/v1/chat/completions", json={}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "k25-test"


@pytest.mark.parametrize("body", [
    [], "text", 3, None, {"messages": None}, {"messages": [{}]}, {"messages": [{"role": "user"}], "tools": "x"},
    {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": {}}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f",
                                                                                              "parameters": []}}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
])
def test_malformed_requests_get_openai_errors(server, body):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.url + path, json=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # still alive
