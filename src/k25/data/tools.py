"""The tools the curriculum uses, as OpenAI function tools, and the exact executors behind them.

The schemas are the ones the agents runtime serves (``calculator(expression)``, ``python(code)``,
``search(query, k)``, ``create_subagent(name, system_prompt)``, ``assign_task(agent, prompt)``),
so a model trained on this data calls tools the runtime accepts. Every tool result written into
the data comes from running these executors, never from typed-in values. The calculator lives in
the runtime (``k25.agents.builtin``) and is re-exported here, so both use one implementation.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..agents.builtin import CalculatorError, calculate, calculator, calculator_tool, format_number

__all__ = [
    "ORCHESTRATOR_TOOLS", "PYTHON_TOOL", "SWARM_WORKER_TOOLS", "CalculatorError", "calculate", "calculator",
    "calculator_tool", "check_tool_call", "create_subagent_results", "format_number", "is_error", "run_python",
    "runtime_specs", "tool_schemas",
]

PYTHON_TOOL = "code_interpreter"  # the runtime's name for its interpreter (k25.agents.builtin)
ORCHESTRATOR_TOOLS = ("create_subagent", "assign_task", "assign_batch")
# What a swarm record's sub-agents get (k25.data.families._subagent_run); the batch form's
# orchestrator holds them too, after its own.
SWARM_WORKER_TOOLS = ("search", "calculator")


class _Unused:
    """Stands in for a model or sandbox where the runtime only needs one to build tool schemas."""

    def __init__(self) -> None:
        from ..agents.sandbox import Limits

        self.limits = Limits()

    def clone(self, **_: Any) -> _Unused:
        return self


@functools.lru_cache(maxsize=1)
def runtime_specs() -> dict[str, dict[str, Any]]:
    """The OpenAI tool specs exactly as the agents runtime declares them, plus the calculator.

    Built from the runtime's own tool objects (interpreter, document search, orchestrator tools),
    so the declarations in the data are byte-for-byte what ``k25 agent``/``k25 swarm`` send.
    """
    import tempfile

    from ..agents.builtin import DocumentSearch, code_interpreter
    from ..agents.swarm import Swarm, _SwarmRun

    search = DocumentSearch.__new__(DocumentSearch)  # schemas only: no corpus is needed
    specs = [calculator_tool().spec(), code_interpreter(_Unused()).spec(), *(t.spec() for t in search.tools())]
    with tempfile.TemporaryDirectory() as tmp:
        run = _SwarmRun(Swarm(_Unused()), Path(tmp), None)  # type: ignore[arg-type]
        specs += [t.spec() for t in run.orchestrator_tools()]
    return {s["function"]["name"]: s for s in specs}


@functools.lru_cache(maxsize=1)
def _orchestrator_run() -> Any:
    from ..agents.swarm import Swarm, _SwarmRun

    return _SwarmRun(Swarm(_Unused()), Path("unused"), None)  # type: ignore[arg-type]


def create_subagent_results(calls: list[tuple[str, str]]) -> list[str]:
    """What the runtime's ``create_subagent`` returns for each ``(name, system_prompt)`` of one run."""
    run = _orchestrator_run()
    run.subagents.clear()  # a fresh run: no sub-agents yet
    create = next(t for t in run.orchestrator_tools() if t.name == "create_subagent")
    return [create.fn(name=name, system_prompt=prompt) for name, prompt in calls]


def tool_schemas(*names: str) -> list[dict[str, Any]]:
    """The OpenAI tool list for ``names`` (copies, so callers may edit them)."""
    specs = runtime_specs()
    missing = [n for n in names if n not in specs]
    if missing:
        raise KeyError(f"unknown tools {missing}; known: {sorted(specs)}")
    return [json.loads(json.dumps(specs[n])) for n in names]


# ---------------------------------------------------------------------------------------------
# Argument checking: the subset of JSON schema these tools use (what `k25 eval` scores).

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def check_tool_call(name: str, arguments: str, tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Why a call is invalid: unknown tool, arguments not a JSON object, or not matching the schema.

    An empty list means the call parses, names a declared tool and its arguments fit the schema.
    """
    declared = {t["function"]["name"]: t["function"] for t in tools or () if t.get("type") == "function"}
    if name not in declared:
        return [f"tool {name!r} is not declared (declared: {sorted(declared)})"]
    try:
        args = json.loads(arguments)
    except (TypeError, json.JSONDecodeError) as e:
        return [f"{name}: arguments are not valid JSON ({e})"]
    if not isinstance(args, dict):
        return [f"{name}: arguments must be a JSON object, got {type(args).__name__}"]
    schema = declared[name].get("parameters") or {}
    props: dict[str, Any] = schema.get("properties", {})
    errors = [f"{name}: missing required argument {r!r}" for r in schema.get("required", []) if r not in args]
    for key, value in args.items():
        spec = props.get(key)
        if spec is None:
            errors.append(f"{name}: unexpected argument {key!r}")
            continue
        kind = spec.get("type")
        if kind in _JSON_TYPES and not _JSON_TYPES[kind](value):
            errors.append(f"{name}.{key}: expected {kind}, got {type(value).__name__}")
            continue
        if "minimum" in spec and value < spec["minimum"]:
            errors.append(f"{name}.{key}: {value} is below the minimum {spec['minimum']}")
        if "maximum" in spec and value > spec["maximum"]:
            errors.append(f"{name}.{key}: {value} is above the maximum {spec['maximum']}")
        if "enum" in spec and value not in spec["enum"]:
            errors.append(f"{name}.{key}: {value!r} is not one of {spec['enum']}")
    return errors


# ---------------------------------------------------------------------------------------------
# Python: run the curriculum's own generated snippets to get their real output.


def run_python(code: str) -> str:
    """Run a generated snippet; report it as the runtime's sandbox does (stdout, ``[stderr]``, exit code).

    This executes only code the generators wrote (no user input), in a fresh namespace, to obtain
    the exact output the interpreter tool would show; it is not a sandbox. A traceback is reduced
    to its last line (the real one names temporary paths, which would make the data vary).
    """
    out = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "main.py", "exec"), namespace)  # noqa: S102 - our own generated code
    except Exception as e:  # the tool reports any error to the model
        error = "".join(traceback.format_exception_only(type(e), e)).strip()
        parts = [out.getvalue().rstrip("\n")] if out.getvalue() else []
        return "\n".join([*parts, f"[stderr]\n{error}", "[exit code 1]"])
    text = out.getvalue()
    return text.rstrip("\n") if text else "[no output]"


def is_error(result: str) -> bool:
    """Whether a tool result (as the runtime formats it) reports a failure."""
    return result.startswith("Error") or "[stderr]" in result or result in ("[no output]", "[]")
