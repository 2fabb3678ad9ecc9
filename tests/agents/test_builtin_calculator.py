"""The calculator k25-mini is trained with is part of the runtime's default kit and runs through it."""

from __future__ import annotations

import asyncio
import json

from k25.agents import Agent, AgentConfig, ChatModel, default_tools
from k25.agents.builtin import calculate, calculator_tool
from k25.agents.cli import main
from k25.agents.scripted import call, say
from k25.data import calculator_tool as data_calculator_tool


def _names(tools) -> list[str]:
    return [t.name for t in tools]


def test_default_tools_declare_what_k25_mini_was_trained_with(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Alder was founded in 1820.")
    # the order of the curriculum's `agent` family: calculator, interpreter, search
    assert _names(default_tools(docs=docs)) == ["calculator", "code_interpreter", "search", "open_document"]
    assert _names(default_tools(code=False)) == ["calculator"]
    assert _names(default_tools(calculator=False, code=False)) == []


def test_the_runtime_serves_the_calculator_the_data_was_written_with():
    assert calculator_tool().spec() == data_calculator_tool().spec()
    assert data_calculator_tool().fn is calculator_tool().fn


def test_calculator_calls_run_through_the_agent_loop(serve):
    script = [call("calculator", {"expression": "3,884 * 11"}),            # rejected: thousands separator
              call("calculator", {"expression": "3884 * (6 + 5)"}), say("The truck travels 42724 km.")]
    with serve(script) as srv:
        model = ChatModel(base_url=srv.base_url, model="m", api_key="k")
        result = asyncio.run(Agent(model, default_tools(code=False), config=AgentConfig(max_steps=5)).run(
            "How far does the truck travel?"))
    assert result.answer == "The truck travels 42724 km." and result.tool_calls == 2
    declared = [t["function"]["name"] for t in srv.requests[0]["tools"]]
    assert declared == ["calculator"]
    first, second = srv.requests[1]["messages"][-1], srv.requests[2]["messages"][-1]
    assert first["role"] == "tool" and calculate("3,884 * 11").removeprefix("Error: ") in first["content"]
    assert second == {"role": "tool", "tool_call_id": second["tool_call_id"], "content": "42724"}


def test_k25_agent_offers_and_runs_the_calculator(serve, capsys):
    with serve([call("calculator", {"expression": "2 ** 40"}), say("1099511627776")]) as srv:
        rc = main(["agent", "What is 2 to the power 40?", "--base-url", srv.base_url, "--model", "m", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["tool_calls"] == 1
    declared = [t["function"]["name"] for t in srv.requests[0]["tools"]]
    assert declared[:2] == ["calculator", "code_interpreter"]
    assert srv.requests[1]["messages"][-1]["content"] == "1099511627776"
