"""The tools a curriculum declares, as the runtime's own Tool objects, over the data directory.

The data's tool results came from these same executors (``k25.data.families.Tools``): the
calculator is :func:`k25.data.calculator_tool`, search is the runtime's
:class:`~k25.agents.DocumentSearch` over ``DIR/corpus``, and the interpreter is the runtime's
:func:`~k25.agents.code_interpreter` in a :class:`~k25.agents.Sandbox` (the model's code is never
run in this process). The one difference the data made on purpose is kept: it cut an interpreter
traceback to its last line, so the data would not depend on temporary paths, and
:func:`data_style_report` does the same to the sandbox's report, so the model sees the format it
was trained on. The swarm's orchestrator tools are the runtime's own and come with ``Swarm``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..agents.tools import Tool, Toolset
from ..data.tools import PYTHON_TOOL, calculator_tool
from .model import EvalError

if TYPE_CHECKING:
    from ..agents.builtin import DocumentSearch

_STDERR = re.compile(r"(?:^|\n)\[stderr\]\n(.*?)(?=\n\[(?:exit code |stopped: |files in the working directory: )|\Z)",
                     re.S)
# Python 3.10/3.11 print a NameError's "Did you mean" hint, but traceback.format_exception_only
# (what the data used) adds it only from 3.12 on.
_SUGGESTION = re.compile(r"\. Did you mean: '[^']*'\?$")


def data_style_report(report: str) -> str:
    """The sandbox's report with a traceback cut to its last line, as ``k25.data.tools.run_python`` writes it."""
    m = _STDERR.search(report)
    if m is None or not m.group(1).startswith("Traceback (most recent call last):"):
        return report
    last = m.group(1).rstrip().splitlines()[-1]
    if sys.version_info < (3, 12):
        last = _SUGGESTION.sub("", last)
    return report[: m.start(1)] + last + report[m.end(1) :]


class ToolKit:
    """Tool objects by name for one data directory; each is built on first use and shared."""

    def __init__(self, data_dir: str | Path, sandbox: Any = None) -> None:
        self.data_dir = Path(data_dir)
        self._sandbox = sandbox
        self._tools: dict[str, Tool] = {}
        self._docs: DocumentSearch | None = None
        self.warnings: list[str] = []

    def _build(self, name: str) -> Tool:
        if name == "calculator":
            return calculator_tool()
        if name in ("search", "open_document"):
            return next(t for t in self._documents().tools() if t.name == name)
        if name == PYTHON_TOOL:
            from ..agents.builtin import code_interpreter
            from ..agents.sandbox import Sandbox

            base = code_interpreter(self._sandbox or Sandbox())

            async def run(code: str) -> str:
                return data_style_report(await base.fn(code=code))

            return dataclasses.replace(base, fn=run)
        raise EvalError(f"the data declares a tool {name!r} that k25 eval cannot run "
                        f"(known: calculator, {PYTHON_TOOL}, search, open_document and the swarm's orchestrator tools)")

    def _documents(self) -> DocumentSearch:
        """The runtime's DocumentSearch over ``DIR/corpus`` (one index for ``search`` and ``open_document``)."""
        if self._docs is None:
            from ..agents.builtin import DocumentSearch

            corpus = self.data_dir / "corpus"
            if not corpus.is_dir():
                raise EvalError(f"{corpus} does not exist: the search tool needs the corpus `k25 data generate` writes")
            self._docs = DocumentSearch(corpus)
        return self._docs

    def tool(self, name: str) -> Tool:
        """The tool called ``name``."""
        if name not in self._tools:
            self._tools[name] = self._build(name)
        return self._tools[name]

    def toolset(self, declared: Sequence[dict[str, Any]] | Sequence[str] | None) -> Toolset:
        """A Toolset for a record's declared tools (specs or names), in the declared order.

        A declaration that differs from the tool's own spec is noted in ``warnings``: the prompts
        then differ from the ones the data was rendered with.
        """
        tools = []
        for entry in declared or ():
            name = entry if isinstance(entry, str) else entry["function"]["name"]
            t = self.tool(name)
            if not isinstance(entry, str) and t.spec() != entry:
                note = f"the data's declaration of {name!r} differs from the runtime's (data from another version?)"
                if note not in self.warnings:
                    self.warnings.append(note)
            tools.append(t)
        return Toolset(tools)
