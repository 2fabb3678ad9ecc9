"""k25.data.tools: the exact calculator, argument checking, and the runtime's schemas."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from k25.data.tools import (
    PYTHON_TOOL,
    calculate,
    calculator_tool,
    check_tool_call,
    run_python,
    runtime_specs,
    tool_schemas,
)


def test_calculator_agrees_with_python_on_random_integer_expressions():
    rng = random.Random(0)
    for _ in range(300):
        terms = [str(rng.randint(0, 999)) for _ in range(rng.randint(2, 5))]
        expr = terms[0]
        for t in terms[1:]:
            expr += f" {rng.choice('+-*')} {t}"
        if rng.random() < 0.3:
            expr = f"({expr}) * {rng.randint(2, 9)}"
        assert calculate(expr) == str(eval(expr)), expr  # noqa: S307 - our own expression


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("7 / 2", "3.5"),
        ("10 / 3", "3.333333"),
        ("2 ** 10", "1024"),
        ("-(3 - 5)", "2"),
        ("17 // 5 + 17 % 5", "5"),
        ("1,248 * 36", "Error: commas are not allowed; write numbers without thousands separators"),
        ("5 / 0", "Error: division by zero"),
    ],
)
def test_calculator_results_and_errors(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr", ["12 x 4", "12 × 4", "abs(3)", "__import__('os')", "2 ** 1000"])
def test_calculator_rejects_anything_but_arithmetic(expr):
    assert calculate(expr).startswith("Error: ")


def test_calculator_tool_reports_like_the_runtime():
    """Served through k25.agents, the calculator returns exactly what the data shows."""
    tool = calculator_tool()
    ok = asyncio.run(tool(json.dumps({"expression": "3884 * (6 + 5)"})))
    bad = asyncio.run(tool(json.dumps({"expression": "3,884 * 11"})))
    assert (ok.content, ok.is_error) == ("42724", False)
    assert (bad.content, bad.is_error) == (calculate("3,884 * 11"), True)


def test_python_results_use_the_sandbox_report_format():
    assert run_python("print(6 * 7)") == "42"
    assert run_python("x = 1") == "[no output]"
    assert run_python("print(math.pi)") == "[stderr]\nNameError: name 'math' is not defined\n[exit code 1]"


def test_schemas_are_the_runtime_tools():
    from k25.agents.builtin import DocumentSearch, code_interpreter

    specs = runtime_specs()
    assert set(specs) == {"calculator", PYTHON_TOOL, "search", "open_document", "create_subagent", "assign_task",
                          "assign_batch"}
    search, open_document = (t.spec() for t in DocumentSearch.__new__(DocumentSearch).tools())
    assert specs["search"] == search and specs["open_document"] == open_document
    assert specs[PYTHON_TOOL]["function"]["parameters"] == code_interpreter().spec()["function"]["parameters"]
    assert specs["calculator"]["function"]["parameters"]["required"] == ["expression"]
    assert specs["create_subagent"]["function"]["parameters"]["required"] == ["name", "system_prompt"]
    assert specs["assign_task"]["function"]["parameters"]["required"] == ["agent", "prompt"]
    with pytest.raises(KeyError, match="unknown tools"):
        tool_schemas("weather")


def test_check_tool_call():
    tools = tool_schemas("calculator", "search")
    assert check_tool_call("calculator", '{"expression": "1 + 1"}', tools) == []
    assert check_tool_call("search", '{"query": "x", "k": 3}', tools) == []
    assert "not declared" in check_tool_call("python", '{"code": "1"}', tools)[0]
    assert "not valid JSON" in check_tool_call("calculator", '{"expression": ', tools)[0]
    assert "must be a JSON object" in check_tool_call("calculator", "[1]", tools)[0]
    assert "missing required argument 'expression'" in check_tool_call("calculator", "{}", tools)[0]
    assert "expected integer" in check_tool_call("search", '{"query": "x", "k": "3"}', tools)[0]
    assert "above the maximum" in check_tool_call("search", '{"query": "x", "k": 99}', tools)[0]
    assert "unexpected argument 'n'" in check_tool_call("search", '{"query": "x", "n": 1}', tools)[0]
