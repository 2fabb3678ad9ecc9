"""Append-only JSONL traces: every prompt, reply, tool call, result and usage, one event a line.

The trace is the run's state: :func:`replay` rebuilds the conversation, counters and usage from
it, so a run killed at any point (even mid-line) resumes where it stopped. Tool results are
written the moment each call finishes, so finished work is never redone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Usage


class TraceError(ValueError):
    """A trace that cannot be resumed (another task, corrupt in the middle)."""


class Trace:
    """An append-only event log; a torn last line (the process died mid-write) is cut on open."""

    def __init__(self, path: str | os.PathLike[str] | None, on_event: Callable[[dict[str, Any]], None] | None = None):
        self.path = Path(path) if path is not None else None
        self.on_event = on_event
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(self.path)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> dict[str, Any]:
        event = {"t": round(time.time(), 3), **event}
        if self._file is not None:
            self._file.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
        if self.on_event is not None:
            self.on_event(event)
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete events; a torn last line is ignored, a corrupt line elsewhere is an error."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text(encoding="utf-8").split("\n")
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # the torn tail of a killed run
                break
            raise TraceError(f"{p}: line {n} is not JSON ({e.msg}); the trace is corrupt") from None
    return events


@dataclass
class ReplayState:
    """What a trace says about a run: history, counters, and unfinished tool calls."""

    run: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    tool_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    last_usage: Usage | None = None
    repeats: dict[str, int] = field(default_factory=dict)
    successes: dict[str, int] = field(default_factory=dict)
    refused_streak: int = 0
    final: dict[str, Any] | None = None
    # The last assistant turn's calls still without results: (step, message, {call_id: result event}).
    open_step: tuple[int, dict[str, Any], dict[str, dict[str, Any]]] | None = None
    # tool_call events by (step, call id): a resumed step does not count or log them twice.
    issued: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    # Results of streamed calls whose reply never got recorded (the run died mid-stream).
    early: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    events: int = 0


def call_key(name: str, arguments: Any) -> str:
    """Identity of a call for the repeat guard: the name plus canonical JSON arguments."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        canon = json.dumps(args, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        canon = str(arguments)
    return f"{name}\x00{canon}"


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def replay(events: list[dict[str, Any]]) -> ReplayState:
    """Fold events into the state the agent loop had when the last event was written."""
    s = ReplayState(events=len(events))
    early = s.early

    def close_open_step() -> None:
        if s.open_step is None:
            return
        _, msg, results = s.open_step
        calls = msg.get("tool_calls") or []
        if all(c["id"] in results for c in calls):
            s.messages.extend(tool_message(c["id"], results[c["id"]]["content"]) for c in calls)
            s.open_step = None

    for e in events:
        kind = e.get("type")
        if kind == "run":
            s.run = e
        elif kind == "message":
            close_open_step()
            s.messages.append(e["message"])
        elif kind == "response":
            close_open_step()
            s.steps = e["step"]
            u = Usage.from_dict(e.get("usage") or {})
            s.usage.add(u)
            s.last_usage = u
            s.messages.append(e["message"])
            if e["message"].get("tool_calls"):
                got = {c["id"]: early.pop((e["step"], c["id"])) for c in e["message"]["tool_calls"]
                       if (e["step"], c["id"]) in early}
                s.open_step = (e["step"], e["message"], got)
                close_open_step()
        elif kind == "tool_call":
            s.tool_calls += 1 if e.get("executed", True) else 0
            s.repeats[call_key(e["name"], e.get("arguments"))] = e.get("repeat", 1)
            s.issued[(e["step"], e["id"])] = e
        elif kind == "tool_result":
            issued = s.issued.get((e["step"], e["id"]))
            if issued is not None and not e.get("is_error"):
                key = call_key(issued["name"], issued.get("arguments"))
                s.successes[key] = s.successes.get(key, 0) + 1
            if s.open_step is not None and s.open_step[0] == e["step"]:
                s.open_step[2][e["id"]] = e
                close_open_step()
            else:  # a streamed call finished before its reply was complete
                early[(e["step"], e["id"])] = e
        elif kind == "tool_round":
            s.refused_streak = e.get("refused_streak", 0)
        elif kind == "compaction":
            close_open_step()
            s.messages = list(e["messages"])
            u = Usage.from_dict(e.get("usage") or {})
            s.usage.add(u)
            s.last_usage = None
        elif kind == "final":
            s.final = e
    return s
