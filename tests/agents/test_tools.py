"""Tools from typed functions: schemas, validation, and every failure turned into an error result."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import pytest
from pydantic import Field

from k25.agents import DocumentSearch, Tool, ToolContext, ToolError, Toolset, Workspace, tool


def _run(coro):
    return asyncio.run(coro)


@tool
def weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: Annotated[int, Field(ge=1)] = 1):
    """Get the weather forecast for a city.

    Args:
        city: the city name, e.g. Paris.
        unit: temperature unit.
        days: how many days ahead.
    """
    return {"city": city, "unit": unit, "days": days}


def test_schema_comes_from_type_hints_and_docstring():
    spec = weather.spec()
    fn = spec["function"]
    assert spec["type"] == "function" and fn["name"] == "weather"
    assert fn["description"] == "Get the weather forecast for a city."
    params = fn["parameters"]
    assert params["type"] == "object" and params["required"] == ["city"]
    assert params["properties"]["city"] == {"type": "string", "description": "the city name, e.g. Paris."}
    assert params["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert params["properties"]["unit"]["default"] == "celsius"
    assert params["properties"]["days"]["minimum"] == 1
    assert "title" not in json.dumps(params)  # pydantic's titles are noise for a model


def test_schema_renders_in_the_k25_tool_declaration():
    from k25.chat import render

    prompt = render([{"role": "user", "content": "hi"}], tools=[weather.spec()])
    assert "type weather = (_: {" in prompt and "// the city name, e.g. Paris." in prompt


def test_valid_call_and_json_result():
    res = _run(weather('{"city": "Paris", "days": 2}'))
    assert not res.is_error and json.loads(res.content) == {"city": "Paris", "unit": "celsius", "days": 2}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"city": "Paris"', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{}", "city: Field required"),
        ('{"city": "Paris", "unit": "kelvin"}', "unit: Input should be 'celsius' or 'fahrenheit'"),
        ('{"city": "Paris", "days": 0}', "days: Input should be greater than or equal to 1"),
        ('{"city": "Paris", "colour": "red"}', "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_arguments_become_error_messages(arguments, expected):
    res = _run(weather(arguments))
    assert res.is_error and res.content.startswith("Error:") and expected in res.content, res.content
    assert "weather" in res.content


def test_raising_and_timing_out_tools_report_errors():
    @tool
    def broken(x: int) -> int:
        """Always fails."""
        raise ValueError(f"bad x {x}")

    @tool(timeout=0.2)
    async def slow(seconds: float) -> str:
        """Sleeps."""
        await asyncio.sleep(seconds)
        return "done"

    @tool
    def refuses(x: int) -> int:
        """Refuses politely."""
        raise ToolError("x must be prime")

    assert _run(broken('{"x": 4}')).content == "Error: tool `broken` raised ValueError: bad x 4"
    res = _run(slow('{"seconds": 5}'))
    assert res.is_error and res.content == "Error: tool `slow` timed out after 0.2 s"
    assert _run(slow('{"seconds": 0}')).content == "done"
    assert _run(refuses('{"x": 4}')).content == "Error: x must be prime"


def test_unknown_tool_lists_the_real_ones():
    res = _run(Toolset([weather]).call("wether", "{}"))
    assert res.is_error and "no tool named `wether`" in res.content and "weather" in res.content


def test_context_parameter_is_hidden_and_filled():
    @tool
    def who(x: int, ctx: ToolContext) -> str:
        """Says who called."""
        return f"{ctx.agent}:{ctx.step}:{ctx.call_id}:{x}"

    assert "ctx" not in who.parameters["properties"]
    res = _run(who('{"x": 1}', ToolContext(agent="a", step=3, call_id="functions.who:0")))
    assert res.content == "a:3:functions.who:0:1"


def test_tool_definition_errors_are_clear():
    def untyped(x):
        """Has no hints."""

    with pytest.raises(TypeError, match="parameter 'x' needs a type hint"):
        tool(untyped)

    def nodoc(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="give it a docstring"):
        tool(nodoc)


def test_long_results_are_truncated_with_a_note():
    @tool(max_result_chars=100)
    def big() -> str:
        """Returns a lot."""
        return "x" * 1000

    res = _run(big(None))
    assert len(res.content) < 200 and "900 characters cut" in res.content


def test_workspace_is_confined(tmp_path):
    ws = Workspace(tmp_path / "ws")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (ws.root / "link").symlink_to(outside)
    tools = Toolset(ws.tools())
    wrote = _run(tools.call("write_file", {"path": "notes/a.txt", "content": "hello"}))
    assert wrote.content == "wrote 5 characters to notes/a.txt"
    assert _run(tools.call("read_file", {"path": "notes/a.txt"})).content == "hello"
    assert json.loads(_run(tools.call("list_files", {})).content) == ["link", "notes/"]
    for bad in ("../secret.txt", str(outside), "link", "notes/../../secret.txt"):
        for name, args in (("read_file", {"path": bad}), ("write_file", {"path": bad, "content": "x"})):
            res = _run(tools.call(name, args))
            assert res.is_error and "outside the workspace" in res.content, (name, bad, res.content)
    assert outside.read_text() == "secret"


def test_document_search_ranks_with_bm25(tmp_path):
    (tmp_path / "a.md").write_text("The Zorvan Labs company builds robots in Kessel.")
    (tmp_path / "b.txt").write_text("Quillen is a harbour town known for fishing boats.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("Robots and more robots: a history of robotics.")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    search = DocumentSearch(tmp_path)
    hits = search.search("Zorvan robots", k=2)
    assert [h["doc_id"] for h in hits] == ["a.md", "sub/c.md"]
    assert hits[0]["score"] > hits[1]["score"] > 0
    tools = Toolset(search.tools())
    assert "fishing" in _run(tools.call("open_document", {"doc_id": "b.txt"})).content
    res = _run(tools.call("open_document", {"doc_id": "../etc/passwd"}))
    assert res.is_error and "no document with id" in res.content
    assert _run(tools.call("search", {"query": "robots", "k": 50})).is_error  # k is capped by the schema


def test_plain_functions_become_tools():
    def double(x: int) -> int:
        """Double a number."""
        return 2 * x

    ts = Toolset([tool(double)])
    assert isinstance(ts["double"], Tool) and _run(ts.call("double", {"x": 4})).content == "8"
