"""Builtin tools: an exact calculator, a sandboxed Python interpreter, BM25 search over a folder, workspace files.

Each factory returns plain :class:`~k25.agents.tools.Tool` objects bound to one resource (a
sandbox, a corpus, a workspace root), so a swarm can hand every sub-agent the same tools.
"""

from __future__ import annotations

import ast
import operator
import os
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Annotated

from pydantic import Field

from .sandbox import Limits, Sandbox
from .tools import Tool, ToolError, tool

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".json", ".csv", ".html", ".htm", ".py")


def code_interpreter(
    sandbox: Sandbox | None = None, workdir: str | os.PathLike[str] | None = None, name: str = "code_interpreter"
) -> Tool:
    """A Python interpreter tool: each call runs in a fresh, limited child process.

    With ``workdir`` the runs share that directory (files persist between calls, as in a
    notebook's folder); without it every run gets a new empty directory.
    """
    box = sandbox or Sandbox()

    async def run_python(code: str) -> str:
        """Run a Python 3 script in a sandbox (no network; files only in its working directory) and return
        what it printed. Variables do not persist between calls: print what you need.

        Args:
            code: the complete script to run; use print() to show results.
        """
        result = await box.run(code, workdir)
        return result.report()

    return tool(run_python, name=name, timeout=box.limits.wall_seconds + 30)


# ---------------------------------------------------------------------------------------------
# Calculator: exact rational arithmetic over a parsed expression (no eval). k25-mini is trained on
# its results (k25.data re-exports it), so the runtime serves the very tool the data shows.

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class CalculatorError(ValueError):
    """An expression the calculator rejects; the message is what the tool returns."""


def _eval_node(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > 64:
                raise CalculatorError("exponent must be a whole number between -64 and 64")
            return left ** int(right)
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"unsupported operator {type(node.op).__name__}")
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise CalculatorError("division by zero")
        return op(left, right)
    if isinstance(node, ast.Tuple):
        raise CalculatorError("commas are not allowed; write numbers without thousands separators")
    raise CalculatorError(f"unsupported element {type(node).__name__}; use numbers, + - * / // % ** and ()")


def format_number(value: Fraction) -> str:
    """An exact integer as is; a fraction as a decimal rounded to 6 places, trailing zeros removed."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(round(value, 6)):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def calculate(expression: str) -> str:
    """The calculator tool: the result as text, or ``Error: ...`` (never raises)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        return f"Error: invalid expression ({e.msg}); use numbers, + - * / // % ** and ()"
    try:
        return format_number(_eval_node(tree))
    except CalculatorError as e:
        return f"Error: {e}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. (12 + 7) * 3; write * for
            multiplication and numbers without thousands separators.
    """
    result = calculate(expression)
    if result.startswith("Error: "):
        raise ToolError(result.removeprefix("Error: "))
    return result


def calculator_tool() -> Tool:
    """The calculator as a :class:`Tool`: the one k25-mini's curriculum calls, so the runtime can serve it."""
    return tool(calculator)


class DocumentSearch:
    """BM25 over the text files of a folder (``bm25s``), plus reading a document by its id.

    Documents are split into passages of about ``passage_words`` words so that a hit points at
    the right part of a long file; the document id is the file's path relative to the folder.
    """

    def __init__(
        self, folder: str | os.PathLike[str], passage_words: int = 200, suffixes: Iterable[str] = TEXT_SUFFIXES
    ) -> None:
        import bm25s

        self.root = Path(folder).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"document folder {self.root} does not exist")
        suffixes = tuple(suffixes)
        self.docs: dict[str, str] = {}
        self.passages: list[tuple[str, str]] = []
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.suffix.lower() in suffixes:
                doc_id = path.relative_to(self.root).as_posix()
                text = path.read_text(encoding="utf-8", errors="replace")
                self.docs[doc_id] = text
                words = text.split()
                for start in range(0, max(len(words), 1), passage_words):
                    self.passages.append((doc_id, " ".join(words[start : start + passage_words])))
        if not self.passages:
            raise ValueError(f"no text documents ({', '.join(suffixes)}) under {self.root}")
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        corpus = [f"{doc_id} {text}" for doc_id, text in self.passages]
        self.retriever.index(self._tokenize(corpus), show_progress=False)

    def _tokenize(self, texts: list[str]):
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def search(self, query: str, k: int = 5) -> list[dict[str, object]]:
        """The best ``k`` passages (one per document) with scores, best first."""
        if not query.strip():
            raise ToolError("the query is empty")
        n = min(len(self.passages), max(k * 4, k))
        ids, scores = self.retriever.retrieve(self._tokenize([query]), k=n, show_progress=False)
        hits: list[dict[str, object]] = []
        seen: set[str] = set()
        for idx, score in zip(ids[0].tolist(), scores[0].tolist(), strict=True):
            doc_id, passage = self.passages[idx]
            if score <= 0 or doc_id in seen:
                continue
            seen.add(doc_id)
            hits.append({"doc_id": doc_id, "score": round(float(score), 3), "snippet": passage[:600]})
            if len(hits) == k:
                break
        return hits

    def read(self, doc_id: str) -> str:
        """The full text of a document."""
        if doc_id not in self.docs:
            close = [d for d in self.docs if doc_id.lower() in d.lower()][:5]
            hint = f"; did you mean: {', '.join(close)}" if close else "; use search to find document ids"
            raise ToolError(f"no document with id {doc_id!r}{hint}")
        return self.docs[doc_id]

    def tools(self) -> list[Tool]:
        """``search(query, k)`` and ``open_document(doc_id)`` bound to this corpus."""

        def search(query: str, k: Annotated[int, Field(ge=1, le=20)] = 5) -> list[dict[str, object]]:
            """Search the local document collection (BM25 keyword ranking) and return the best passages with
            their document ids.

            Args:
                query: keywords to look for.
                k: how many documents to return (1-20).
            """
            return self.search(query, k)

        def open_document(doc_id: str) -> str:
            """Read a whole document from the local collection.

            Args:
                doc_id: a document id as returned by search.
            """
            return self.read(doc_id)

        return [tool(search), tool(open_document)]


class Workspace:
    """A directory the agent may read and write; every path is resolved and kept inside it."""

    def __init__(self, root: str | os.PathLike[str], max_read_chars: int = 100_000) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_read_chars = max_read_chars

    def resolve(self, path: str) -> Path:
        """The absolute path for ``path``; refuses anything that escapes the workspace (``..``, links)."""
        if not path or "\x00" in path:
            raise ToolError("give a non-empty relative path")
        candidate = (self.root / path).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ToolError(f"path {path!r} is outside the workspace; use paths relative to the workspace root")
        return candidate

    def read(self, path: str) -> str:
        p = self.resolve(path)
        if not p.is_file():
            raise ToolError(f"no file {path!r} in the workspace")
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text) > self.max_read_chars:
            return text[: self.max_read_chars] + f"\n... [{len(text) - self.max_read_chars} more characters]"
        return text

    def write(self, path: str, content: str, append: bool = False) -> str:
        p = self.resolve(path)
        if p == self.root or p.is_dir():
            raise ToolError(f"{path!r} is a directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a" if append else "w", encoding="utf-8") as f:
            f.write(content)
        return f"{'appended' if append else 'wrote'} {len(content)} characters to {p.relative_to(self.root).as_posix()}"

    def list(self, path: str = ".") -> list[str]:
        p = self.resolve(path)
        if not p.is_dir():
            raise ToolError(f"no directory {path!r} in the workspace")
        return sorted(
            q.relative_to(self.root).as_posix() + ("/" if q.is_dir() else "") for q in p.iterdir()
        )

    def tools(self) -> list[Tool]:
        """``read_file``, ``write_file`` and ``list_files`` confined to this workspace."""

        def read_file(path: str) -> str:
            """Read a text file from the workspace.

            Args:
                path: path relative to the workspace root.
            """
            return self.read(path)

        def write_file(path: str, content: str, append: bool = False) -> str:
            """Write (or append to) a text file in the workspace, creating folders as needed.

            Args:
                path: path relative to the workspace root.
                content: the text to write.
                append: add to the end instead of replacing the file.
            """
            return self.write(path, content, append)

        def list_files(path: str = ".") -> list[str]:
            """List a folder of the workspace (folders end with /).

            Args:
                path: folder relative to the workspace root.
            """
            return self.list(path)

        return [tool(read_file), tool(write_file), tool(list_files)]


def default_tools(
    workspace: str | os.PathLike[str] | None = None,
    docs: str | os.PathLike[str] | None = None,
    code: bool = True,
    limits: Limits | None = None,
    calculator: bool = True,
) -> list[Tool]:
    """The usual kit: the calculator, the interpreter (sharing the workspace folder when there is one), file
    tools, search.

    Calculator, interpreter, search (and ``open_document`` with ``docs``) is the order k25-mini's
    curriculum declares them in (its ``agent`` and ``agent_docs`` families), so the built-in model sees
    the tool list it was trained on.
    """
    out: list[Tool] = []
    if calculator:
        out.append(calculator_tool())
    if code:
        out.append(code_interpreter(Sandbox(limits), workdir=workspace))
    if workspace is not None:
        out.extend(Workspace(workspace).tools())
    if docs is not None:
        out.extend(DocumentSearch(docs).tools())
    return out

