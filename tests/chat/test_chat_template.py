"""Chat template: expected strings from spec §5, and jinja (ours and the release's) == Python."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from k25.chat.template import (
    TemplateError,
    chat_template_text,
    missing_reasoning,
    render,
    render_jinja,
    render_template,
    write_chat_template,
)
from k25.chat.toolspec import deep_sort, tools_to_typescript

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name: str, idx: int, args: object) -> dict:
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": args}}


# --- spec §5.4 examples -------------------------------------------------------------------


def test_system_user_thinking_default() -> None:
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    assert render(msgs) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    )


def test_instant_generation_prompt() -> None:
    out = render([{"role": "user", "content": "Hi"}], thinking=False)
    assert out == "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>"


def test_no_default_system_prompt_and_no_bos() -> None:
    out = render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert out == "<|im_user|>user<|im_middle|>Hi<|im_end|>"


def test_tool_round_trip_json_fallback() -> None:
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need tool.",
            "tool_calls": [call("get_weather", 0, {"city": "Paris"})],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 20}'},
    ]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Get weather","name":"get_weather",'
        '"parameters":{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}},'
        '"type":"function"}]<|im_end|><|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>'
        "<|im_assistant|>assistant<|im_middle|><think>Need tool.</think><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}'
        "<|tool_call_end|><|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>"
        '## Return of functions.get_weather:0\n{"temp": 20}<|im_end|>'
        "<|im_assistant|>assistant<|im_middle|><think>"
    )
    assert render(msgs, [WEATHER_TOOL], tool_format="json") == expected


def test_multi_turn_history_drops_reasoning_current_chain_keeps_it() -> None:
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": None, "reasoning_content": "R1", "tool_calls": [call("a", 0, "{}")]},
        {"role": "tool", "tool_call_id": "functions.a:0", "content": "r1"},
        {"role": "assistant", "content": "final", "reasoning_content": "R2"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "", "reasoning_content": "R3", "tool_calls": [call("a", 1, "{}")]},
        {"role": "tool", "tool_call_id": "functions.a:1", "content": "r2"},
    ]
    sec = "<|tool_calls_section_begin|><|tool_call_begin|>functions.a:{}<|tool_call_argument_begin|>{{}}"
    sec += "<|tool_call_end|><|tool_calls_section_end|>"
    expected = (
        "<|im_user|>user<|im_middle|>Q<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>"
        + sec.format(0)
        + "<|im_end|><|im_system|>tool<|im_middle|>## Return of functions.a:0\nr1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>final<|im_end|>"
        "<|im_user|>user<|im_middle|>Q2<|im_end|><|im_assistant|>assistant<|im_middle|><think>R3</think>"
        + sec.format(1)
        + "<|im_end|><|im_system|>tool<|im_middle|>## Return of functions.a:1\nr2<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>"
    )
    assert render(msgs) == expected
    # Instant mode drops the current chain's reasoning too.
    assert "R3" not in render(msgs, thinking=False)


def test_multimodal_placeholders() -> None:
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe:"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
                {"type": "text", "text": "and"},
                {"type": "video", "video": "v.mp4"},
            ],
        }
    ]
    assert render(msgs) == (
        "<|im_user|>user<|im_middle|>Describe:<|media_begin|>image<|media_content|><|media_pad|>"
        "<|media_end|>\nand<|kimi_k25_video_placeholder|>\n<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    )


def test_name_replaces_role_and_tool_uses_im_system() -> None:
    msgs = [
        {"role": "user", "name": "alice", "content": "x"},
        {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:0", "content": "y"},
    ]
    assert render(msgs, add_generation_prompt=False) == (
        "<|im_user|>alice<|im_middle|>x<|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\ny<|im_end|>"
    )


def test_reasoning_alias_from_reasoning_field() -> None:
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "reasoning": "R", "tool_calls": [call("a", 0, "{}")]},
    ]
    assert "<think>R</think>" in render(msgs)


def test_missing_reasoning_lists_current_chain_tool_calls() -> None:
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [call("a", 0, "{}")]},
        {"role": "assistant", "content": "final"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "tool_calls": [call("a", 1, "{}")]},
        {"role": "assistant", "reasoning_content": "r", "tool_calls": [call("a", 2, "{}")]},
    ]
    assert missing_reasoning(msgs) == [4]


def test_errors_name_the_json_path() -> None:
    with pytest.raises(TemplateError, match=r"messages\[1\]\.tool_calls\[0\]\.function"):
        render([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "x"}]}])
    with pytest.raises(TemplateError, match=r"messages\[0\]: missing 'role'"):
        render([{"content": "q"}])
    with pytest.raises(TemplateError, match=r"messages\[0\]\.content"):
        render([{"role": "user", "content": 5}])


# --- TypeScript tool declaration (spec §5.5) -----------------------------------------------


def test_typescript_spec_example() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
                },
                "required": ["location"],
            },
        },
    }
    assert tools_to_typescript(deep_sort([tool])) == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "// Get the current weather for a location\n"
        "type get_weather = (_: {\n"
        "  // The city and state, e.g. San Francisco, CA\n"
        "  location: string,\n"
        "  // Temperature unit\n"
        '  unit?: "celsius" | "fahrenheit"\n'
        "}) => any;\n"
        "}\n"
    )
    out = render([{"role": "user", "content": "hi"}], [tool])
    assert out.startswith("<|im_system|>tool_declare<|im_middle|># Tools\n\n## functions\n")
    assert "}\n<|im_end|><|im_user|>" in out


def test_typescript_rules() -> None:
    params = {
        "type": "object",
        "$defs": {"Point": {"type": "object", "description": "A point", "properties": {"x": {"type": "number"}}}},
        "properties": {
            "count": {"type": "integer", "minimum": 1, "maximum": 5, "default": 2},
            "name": {"type": "string", "maxLength": 10, "pattern": "^a", "default": "bob"},
            "tags": {"type": "array", "items": {"type": "string", "description": "a tag"}, "maxItems": 3},
            "ids": {"type": "array", "items": {"type": "integer"}},
            "mode": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "either": {"type": ["string", "integer", "object", "array"]},
            "where": {"$ref": "#/$defs/Point"},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
            "closed": {"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": False},
            "anything": {},
        },
        "required": ["name", "count"],
    }
    ts = tools_to_typescript(deep_sort([{"type": "function", "function": {"name": "f", "parameters": params}}]))
    assert ts == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "// A point\ninterface Point {\n  x?: number\n}\n"
        "type f = (_: {\n"
        "  // maximum: 5, minimum: 1\n  // Default: 2\n  count: number,\n"
        '  // maxLength: 10, pattern: ^a\n  // Default: "bob"\n  name: string,\n'
        "  anything?: any,\n"
        "  closed?: {\n    a?: boolean,\n    [k: string]: never\n  },\n"
        "  either?: string | number | {} | Array<any>,\n"
        "  ids?: Array<number>,\n"
        "  meta?: {\n    [k: string]: string\n  },\n"
        "  mode?: string | null,\n"
        "  // maxItems: 3\n  tags?: Array<\n    // a tag\n    string\n  >,\n"
        "  where?: Point\n"
        "}) => any;\n}\n"
    )


def test_typescript_self_reference_and_skips() -> None:
    params = {"type": "object", "properties": {"child": {"$ref": "#"}, "v": {"type": "string"}}, "required": ["v"]}
    tools = [{"type": "function", "function": {"name": "tree", "parameters": params}}, {"type": "_plugin"}]
    assert tools_to_typescript(tools) == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "interface parameters {\n  child?: parameters,\n  v: string\n}\n"
        "type tree = (_: parameters) => any;\n}\n"
    )
    assert tools_to_typescript([{"type": "_plugin"}]) == ""
    assert tools_to_typescript([]) == ""


def test_typescript_self_reference_inside_a_definition_keeps_inline_root() -> None:
    # The root becomes `interface parameters` only for a "#" reference among its own fields.
    params = {
        "type": "object",
        "$defs": {"C": {"type": "object", "properties": {"parent": {"$ref": "#"}}}},
        "properties": {"c": {"$ref": "#/$defs/C"}},
    }
    assert tools_to_typescript([{"type": "function", "function": {"name": "f", "parameters": params}}]) == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "interface C {\n  parent?: parameters\n}\n"
        "type f = (_: {\n  c?: C\n}) => any;\n}\n"
    )


def test_typescript_failure_falls_back_to_json() -> None:
    bad = {
        "type": "function",
        "function": {"name": "g", "parameters": {"type": "object", "properties": {"x": {"description": "no type"}}}},
    }
    out = render([{"role": "user", "content": "hi"}], [bad])
    assert out.startswith('<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"g"')


# --- shipped jinja template ----------------------------------------------------------------


def test_write_chat_template(tmp_path: Path) -> None:
    path = write_chat_template(tmp_path)
    assert path.name == "chat_template.jinja"
    assert path.read_text(encoding="utf-8") == chat_template_text()


def test_transformers_renders_written_template(tmp_path: Path) -> None:
    """transformers' own chat-template compiler (what apply_chat_template uses) agrees with us."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    compiled = utils._compile_jinja_template(chat_template_text())
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [call("w", 0, {"c": "P"})]},
    ]
    for thinking in (True, False):
        got = compiled.render(messages=msgs, tools=[WEATHER_TOOL], add_generation_prompt=True, thinking=thinking)
        assert got == render_template(msgs, tools=[WEATHER_TOOL], thinking=thinking, add_generation_prompt=True)


# --- randomized agreement --------------------------------------------------------------------

WORDS = ["hi", "Paris", " ", "\n", "<b>&amp;</b>", "{{ x }}", "{% raw %}", "'q'", '"dq"', "你好", "é", "\t", "  "]


def rand_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5)))


def rand_content(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.5:
        return rand_text(rng)
    if r < 0.6:
        return None
    parts = []
    for _ in range(rng.randint(0, 4)):
        kind = rng.choice(["text", "text", "image", "image_url", "video", "video_url", None])
        if kind == "text":
            parts.append({"type": "text", "text": rand_text(rng)})
        elif kind is None:
            parts.append({"text": rand_text(rng)} if rng.random() < 0.5 else {"other": 1})
        else:
            parts.append({"type": kind, kind: "x"})
    return parts


def rand_args(rng: random.Random) -> object:
    if rng.random() < 0.5:
        return json.dumps({"q": rand_text(rng)}, ensure_ascii=rng.random() < 0.5)
    return {"q": rand_text(rng), "n": rng.randint(-3, 3), "nested": {"b": [1.5, None, True]}, "é": "ü"}


def rand_message(rng: random.Random, state: dict) -> dict:
    role = rng.choice(["system", "user", "assistant", "assistant", "tool", "developer"])
    m: dict = {"role": role}
    if rng.random() < 0.15:
        m["name"] = rng.choice(["alice", "", "get_weather"])
    if rng.random() < 0.9:
        m["content"] = rand_content(rng)
    if role == "assistant":
        r = rng.random()
        if r < 0.6:
            m["reasoning_content"] = rand_text(rng)
        elif r < 0.65:
            m["reasoning_content"] = None
        if rng.random() < 0.5:
            calls = []
            for _ in range(rng.randint(0, 3)):
                name = rng.choice(["get_weather", "search", "run_code"])
                calls.append(call(name, state["n"], rand_args(rng)))
                state["n"] += 1
            m["tool_calls"] = calls
    if role == "tool" and rng.random() < 0.9:
        m["tool_call_id"] = f"functions.search:{rng.randint(0, state['n'])}"
    return m


def rand_case(rng: random.Random) -> dict:
    state = {"n": 0}
    msgs = [rand_message(rng, state) for _ in range(rng.randint(0, 8))]
    tools = rng.choice([None, [], [WEATHER_TOOL], [WEATHER_TOOL, {"type": "function", "function": {"name": "é"}}]])
    return {
        "messages": msgs,
        "tools": tools,
        "tools_ts_str": rng.choice([None, "", tools_to_typescript(tools) if tools else None]),
        "thinking": rng.choice([None, True, False]),
        "add_generation_prompt": rng.choice([True, False]),
    }


CASES = [rand_case(random.Random(seed)) for seed in range(400)]


def test_ours_jinja_matches_python_on_random_corpus() -> None:
    template = chat_template_text()
    for i, case in enumerate(CASES):
        expected = render_template(**copy.deepcopy(case))
        ctx = copy.deepcopy(case)
        got = render_jinja(template, ctx.pop("messages"), **ctx)
        assert got == expected, f"case {i}: {case}"


def test_official_template_matches_python_on_random_corpus(official_template: str) -> None:
    for i, case in enumerate(CASES):
        expected = render_template(**copy.deepcopy(case))
        ctx = copy.deepcopy(case)
        got = render_jinja(official_template, ctx.pop("messages"), **ctx)
        assert got == expected, f"case {i}: {case}"


def test_official_template_in_transformers_environment(official_template: str) -> None:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    official = utils._compile_jinja_template(official_template)
    ours = utils._compile_jinja_template(chat_template_text())
    for case in CASES[:100]:
        ctx = {k: v for k, v in copy.deepcopy(case).items() if v is not None}
        assert ours.render(**ctx) == official.render(**copy.deepcopy(ctx))
