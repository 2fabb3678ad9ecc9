"""The agent runtime against k25's own server: tool calls, results and reasoning make the round trip."""

from __future__ import annotations

import asyncio
import json

from k25.agents import Agent, AgentConfig, ChatModel, tool
from k25.server.app import create_app
from k25.testing import ScriptedBackend, ServerThread, byte_tokenizer

CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>"
        '{"a": 2, "b": 40}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


def test_agent_runs_tools_through_the_k25_server(tmp_path):
    backend = ScriptedBackend(byte_tokenizer(tmp_path / "tok"))
    backend.outputs = ["I should add.</think>" + CALL, "The tool said 42.</think>The answer is 42.<|im_end|>"]
    with ServerThread(create_app(backend)) as srv:
        model = ChatModel(base_url=srv.url + "/v1", model="k25-test", api_key="none")
        result = asyncio.run(Agent(model, [add], config=AgentConfig(max_steps=5)).run(
            "What is 2 + 40?", trace=str(tmp_path / "run.jsonl")))
    assert result.answer.strip() == "The answer is 42."
    second_prompt = backend.prompts[1]
    # the declared tool, the call with its reasoning, and the tool's result went back in K2.5's format
    assert "tool_declare" in second_prompt and "type add = " in second_prompt
    assert "<think>I should add.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.add:0" in second_prompt
    assert "## Return of functions.add:0\n42" in second_prompt
    events = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert any("tool" in json.dumps(e) for e in events)
