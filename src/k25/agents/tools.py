"""Tools from typed Python functions: JSON schema from the signature, validated arguments.

A model only ever sees a tool through its schema and its result text, so everything that can go
wrong in a call (bad JSON, wrong argument types, an exception, a timeout, an unknown name) is
turned into an ``Error: ...`` result the model can read and act on; the run itself never stops
because of a tool.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

# Results longer than this are cut (with a note) before they reach the model's context.
DEFAULT_MAX_RESULT_CHARS = 32_000


@dataclass
class ToolContext:
    """Facts about the call in progress, handed to tools that declare a ``ToolContext`` parameter.

    It never appears in the schema the model sees; the swarm uses it to know which orchestrator
    step launched a sub-agent task.
    """

    agent: str = "agent"
    step: int = 0
    call_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    """What a tool call gave back: the text for the model, and whether it is an error."""

    content: str
    is_error: bool = False
    seconds: float = 0.0


class ToolError(Exception):
    """Raised by a tool to send the model a plain error message (no traceback type prefix)."""


def _doc_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a docstring into (description, {param: description}).

    Understands Google style (``Args:`` / ``name (type): text``) and reST (``:param name: text``).
    """
    if not doc:
        return "", {}
    text = inspect.cleandoc(doc)
    params: dict[str, str] = {}
    for m in re.finditer(r":param\s+(?:\w+\s+)?(\w+):\s*(.+?)(?=\n\s*:|\Z)", text, re.S):
        params[m.group(1)] = " ".join(m.group(2).split())
    lines = text.splitlines()
    desc_lines: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^(Args|Arguments|Parameters|Params):\s*$", line.strip()):
            i += 1
            current = None
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                m = re.match(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", lines[i])
                if m and len(lines[i]) - len(lines[i].lstrip()) <= 8:
                    current = m.group(1)
                    params[current] = m.group(2).strip()
                elif current and lines[i].strip():
                    params[current] = (params[current] + " " + lines[i].strip()).strip()
                i += 1
            continue
        if re.match(r"^(Returns?|Raises|Yields|Examples?):\s*$", line.strip()) or line.strip().startswith(":"):
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                i += 1
            continue
        desc_lines.append(line)
        i += 1
    description = "\n".join(desc_lines).strip()
    return description, params


def _strip_titles(schema: Any) -> Any:
    """Drop pydantic's auto-generated ``title`` keys: they cost tokens and say nothing new."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "title" and isinstance(v, str):
                continue
            if k in ("properties", "$defs") and isinstance(v, dict):
                out[k] = {name: _strip_titles(sub) for name, sub in v.items()}
            else:
                out[k] = _strip_titles(v)
        return out
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def _context_param(fn: Callable[..., Any], hints: dict[str, Any]) -> str | None:
    for name, hint in hints.items():
        if hint is ToolContext:
            return name
    return None


@dataclass
class Tool:
    """One callable tool: its OpenAI schema, its argument model and the function behind it."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    args_model: type[pydantic.BaseModel]
    timeout: float | None = None
    context_param: str | None = None
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS

    def spec(self) -> dict[str, Any]:
        """The entry for the ``tools`` list of a chat-completions request."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def parse_arguments(self, arguments: str | dict[str, Any] | None) -> dict[str, Any]:
        """Decode and validate the model's arguments; raises ToolError with a readable message."""
        if arguments is None or arguments == "":
            data: Any = {}
        elif isinstance(arguments, dict):
            data = arguments
        else:
            try:
                data = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(
                    f"the arguments for `{self.name}` are not valid JSON ({e.msg} at character {e.pos}); "
                    f"send one JSON object matching the tool's schema"
                ) from None
        if not isinstance(data, dict):
            raise ToolError(f"the arguments for `{self.name}` must be a JSON object, got {type(data).__name__}")
        try:
            model = self.args_model.model_validate(data)
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(arguments)'}: {err['msg']}" for err in e.errors()
            )
            raise ToolError(f"invalid arguments for `{self.name}`: {problems}") from None
        return {name: getattr(model, name) for name in type(model).model_fields}

    async def __call__(
        self, arguments: str | dict[str, Any] | None, context: ToolContext | None = None
    ) -> ToolResult:
        """Run the tool; every failure comes back as an error result, never as an exception."""
        start = time.monotonic()
        try:
            kwargs = self.parse_arguments(arguments)
            if self.context_param:
                kwargs[self.context_param] = context or ToolContext()
            if inspect.iscoroutinefunction(self.fn):
                coro: Awaitable[Any] = self.fn(**kwargs)
            else:
                coro = asyncio.to_thread(self.fn, **kwargs)
            value = await (asyncio.wait_for(coro, self.timeout) if self.timeout else coro)
            content, is_error = format_result(value), False
        except ToolError as e:
            content, is_error = f"Error: {e}", True
        except asyncio.TimeoutError:
            content, is_error = f"Error: tool `{self.name}` timed out after {self.timeout:g} s", True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a tool bug is the model's information, not the run's end
            content, is_error = f"Error: tool `{self.name}` raised {type(e).__name__}: {e}", True
        return ToolResult(truncate(content, self.max_result_chars), is_error, time.monotonic() - start)


def format_result(value: Any) -> str:
    """Tool return value -> text: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def truncate(text: str, limit: int) -> str:
    """Keep the head and the tail of an over-long result, saying how much was cut."""
    if limit <= 0 or len(text) <= limit:
        return text
    head = limit * 3 // 4
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
) -> Any:
    """Make a :class:`Tool` from a typed function (usable as ``@tool`` or ``@tool(timeout=5)``).

    The JSON schema comes from the type hints (pydantic types and ``Annotated[..., Field(...)]``
    constraints included) and the docstring (the summary becomes the description, ``Args:``
    entries the parameter descriptions). A parameter annotated ``ToolContext`` is filled in at
    call time and hidden from the model.
    """

    def build(f: Callable[..., Any]) -> Tool:
        doc_desc, doc_params = _doc_parts(f.__doc__)
        hints = typing.get_type_hints(f, include_extras=True)
        ctx = _context_param(f, hints)
        fields: dict[str, Any] = {}
        for pname, param in inspect.signature(f).parameters.items():
            if pname == ctx:
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {f.__name__}: *args/**kwargs cannot be described to a model ({pname})")
            if pname not in hints:
                raise TypeError(f"tool {f.__name__}: parameter {pname!r} needs a type hint")
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[pname] = (hints[pname], pydantic.Field(default, description=doc_params.get(pname)))
        tool_name = name or f.__name__
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}", tool_name):
            raise ValueError(f"tool name {tool_name!r}: use letters, digits, _ or - (at most 64)")
        model = pydantic.create_model(f"{tool_name}_args", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
        schema = _strip_titles(model.model_json_schema())
        schema.pop("additionalProperties", None)
        schema.setdefault("properties", {})
        schema.setdefault("type", "object")
        desc = description if description is not None else doc_desc
        if not desc:
            raise ValueError(f"tool {tool_name}: give it a docstring or a description; the model needs one")
        return Tool(tool_name, desc, schema, f, model, timeout, ctx, max_result_chars)

    return build(fn) if fn is not None else build


class Toolset:
    """Tools by name; runs calls, answering unknown names and budget exhaustion with errors."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool) -> None:
        if t.name in self._tools:
            raise ValueError(f"two tools are named {t.name!r}")
        self._tools[t.name] = t

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        """The ``tools`` list for a request."""
        return [t.spec() for t in self._tools.values()]

    async def call(
        self, name: str, arguments: str | dict[str, Any] | None, context: ToolContext | None = None
    ) -> ToolResult:
        """Run one call by name; an unknown name is an error result listing the real ones."""
        if name not in self._tools:
            known = ", ".join(self._tools) or "none"
            return ToolResult(f"Error: there is no tool named `{name}`; the tools are: {known}", True)
        return await self._tools[name](arguments, context)


def as_toolset(tools: Toolset | Sequence[Tool | Callable[..., Any]] | None) -> Toolset:
    """Accept a Toolset, Tools, or plain typed functions (made into tools on the way)."""
    if isinstance(tools, Toolset):
        return tools
    return Toolset(t if isinstance(t, Tool) else tool(t) for t in (tools or ()))
