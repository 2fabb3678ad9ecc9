"""Agent mode: model step -> tool calls (concurrently) -> results back, until an answer or a budget.

The shape follows kimi-cli's loop (step guard, compaction check, one retried model call, tools
run at the same time, stop when the model calls no tool). Reasoning is kept on every assistant
turn, so the K2.5 template renders the current tool-use chain with its thinking. Everything is
written to the trace first, so a killed run resumes from the file.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import ChatModel, Pricing, Usage
from .tools import Tool, ToolContext, Toolset, as_toolset
from .trace import ReplayState, Trace, TraceError, call_key, read_events, replay, tool_message

COMPACTION_SYSTEM = "You are a helpful assistant that compacts conversation context."
COMPACTION_PROMPT = (
    "Summarise the agent transcript below so the agent can continue the task without it. Keep every fact, "
    "number, name, file path, document id and intermediate result that may still matter, what has been tried "
    "(and failed), and what remains to do. Write plain text, no preamble.\n\nTASK:\n{task}\n\nTRANSCRIPT:\n{transcript}"
)


@dataclass
class AgentConfig:
    """Budgets and policies of one agent run (defaults follow K2.5's Agent mode)."""

    max_steps: int = 300
    parallel_tool_calls: bool = True
    # An identical call (same tool, same arguments) that already succeeded `repeat_limit` times is
    # refused unexecuted (its answer will not change); one that keeps failing may be retried
    # `error_retries` more times. After `repeat_stop` consecutive steps of nothing but refused
    # calls the run stops: a prompt alone does not stop a looping model.
    repeat_limit: int = 3
    error_retries: int = 5
    repeat_stop: int = 3
    max_context_tokens: int = 262_144
    compaction_ratio: float = 0.85
    reserved_context_tokens: int = 16_384
    keep_last_messages: int = 4
    # With a streaming model, start each tool as soon as its call has streamed in (as kosong does).
    start_tools_early: bool = True
    pricing: Pricing = field(default_factory=Pricing)


@dataclass
class AgentResult:
    """How a run ended and what it cost."""

    answer: str | None
    stop_reason: str  # answer | length (the final reply was cut at the token limit) | max_steps | repeated_calls
    steps: int
    tool_calls: int
    usage: Usage
    cost: float
    wall_seconds: float
    messages: list[dict[str, Any]]
    trace_path: str | None = None
    resumed: bool = False


class ToolBudget:
    """A tool-call allowance shared by several agents (the swarm's 1,500-call limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.limit is not None and self.used >= self.limit:
            return False
        self.used += 1
        return True


class Agent:
    """An agent: a model, tools, a system prompt and budgets. ``run(task)`` drives the loop."""

    def __init__(
        self,
        model: ChatModel,
        tools: Toolset | Sequence[Tool | Callable[..., Any]] | None = None,
        system_prompt: str | None = None,
        config: AgentConfig | None = None,
        name: str = "agent",
        budget: ToolBudget | None = None,
    ) -> None:
        self.model = model
        self.tools = as_toolset(tools)
        self.system_prompt = system_prompt
        self.config = config or AgentConfig()
        self.name = name
        self.budget = budget

    async def run(
        self,
        task: str,
        trace: str | os.PathLike[str] | None = None,
        resume: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> AgentResult:
        """Run ``task`` to an answer or a budget; with ``resume`` continue the run in ``trace``."""
        start = time.monotonic()
        events = read_events(trace) if trace is not None else []
        if events and not resume:
            raise TraceError(f"trace {trace} already holds a run; pass resume=True to continue it or use a new path")
        log = Trace(trace, on_event)
        try:
            state = replay(events)
            resumed = bool(events)
            if state.run is not None and state.run.get("task") != task:
                raise TraceError(f"trace {trace} is for another task: {state.run.get('task')!r}")
            if state.run is None:
                log.write({"type": "run", "agent": self.name, "task": task, "model": self.model.model,
                           "tools": self.tools.names, "max_steps": self.config.max_steps})
                for msg in self._opening(task):
                    log.write({"type": "message", "message": msg})
                    state.messages.append(msg)
            elif resumed:
                log.write({"type": "resume", "after_events": state.events, "steps": state.steps})
            stop_reason = await self._loop(state, log, task) if state.final is None else state.final["stop_reason"]
        finally:
            log.close()
        answer = state.final.get("answer") if state.final else None
        return AgentResult(
            answer, stop_reason, state.steps, state.tool_calls, state.usage, self.config.pricing.cost(state.usage),
            time.monotonic() - start, state.messages, str(trace) if trace is not None else None, resumed,
        )

    def _opening(self, task: str) -> list[dict[str, Any]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": task}]

    async def _loop(self, s: ReplayState, log: Trace, task: str) -> str:
        cfg = self.config
        last = s.messages[-1] if s.messages else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):  # killed just before "final"
            return self._finish(s, log, "answer", last.get("content") or "")
        if s.open_step is not None:  # killed while tools ran: finish the calls that have no result yet
            step, msg, done = s.open_step
            await self._run_tools(s, log, step, msg, done)
        while True:
            if s.refused_streak >= cfg.repeat_stop:
                return self._finish(s, log, "repeated_calls")
            if s.steps >= cfg.max_steps:
                return self._finish(s, log, "max_steps")
            if self._context_full(s):
                await self._compact(s, log, task)
            step = s.steps + 1
            log.write({"type": "request", "step": step, "prompt_messages": len(s.messages)})
            started: dict[str, tuple[asyncio.Future[tuple[str, str]], bool]] = {}

            def start_early(call: dict[str, Any], step: int = step, started: dict[str, Any] = started) -> None:
                """A call streamed in completely: start it while the rest of the reply streams."""
                if (step, call["id"]) in s.early:  # finished before the run was killed
                    return
                job, refused = self._issue(s, log, step, call)
                started[call["id"]] = (asyncio.ensure_future(job), refused)

            options: dict[str, Any] = {}
            if not cfg.parallel_tool_calls and self.tools:
                options["parallel_tool_calls"] = False
            elif self.model.stream and cfg.start_tools_early:
                options["on_tool_call"] = start_early
            try:
                reply = await self.model.complete(s.messages, self.tools.specs() or None, **options)
            except BaseException:
                for fut, _ in started.values():
                    fut.cancel()
                raise
            s.steps = step
            s.usage.add(reply.usage)
            s.last_usage = reply.usage
            log.write({"type": "response", "step": step, "message": reply.message, "usage": reply.usage.to_dict(),
                       "finish_reason": reply.finish_reason, "attempts": reply.attempts, "agent": self.name})
            s.messages.append(reply.message)
            if not reply.message.get("tool_calls"):  # a reply cut at the token limit is not a finished answer
                reason = "length" if reply.finish_reason == "length" else "answer"
                return self._finish(s, log, reason, reply.message.get("content") or "")
            done = {c["id"]: s.early.pop((step, c["id"])) for c in reply.message["tool_calls"]
                    if (step, c["id"]) in s.early}
            await self._run_tools(s, log, step, reply.message, done, started)

    def _finish(self, s: ReplayState, log: Trace, reason: str, answer: str | None = None) -> str:
        if answer is None:  # out of budget: the last thing the model said is the best answer there is
            answer = next((m.get("content") for m in reversed(s.messages)
                           if m.get("role") == "assistant" and m.get("content")), None)
        s.final = log.write({"type": "final", "stop_reason": reason, "answer": answer, "steps": s.steps,
                             "tool_calls": s.tool_calls, "usage": s.usage.to_dict(),
                             "cost": self.config.pricing.cost(s.usage)})
        return reason

    async def _run_tools(
        self, s: ReplayState, log: Trace, step: int, message: dict[str, Any], done: dict[str, dict[str, Any]],
        started: dict[str, tuple[asyncio.Future[tuple[str, str]], bool]] | None = None,
    ) -> None:
        """Run the calls of one assistant turn (those not ``done`` already) and append the results."""
        calls = message["tool_calls"]
        results: dict[str, str] = {cid: e["content"] for cid, e in done.items()}
        refused = 0
        jobs: list[Any] = []
        for call in calls:
            if call["id"] in results:
                continue
            if started and call["id"] in started:
                job, was_refused = started.pop(call["id"])
            else:
                job, was_refused = self._issue(s, log, step, call)
            jobs.append(job)
            refused += was_refused
        for fut, _ in (started or {}).values():  # streamed calls the final message does not have
            fut.cancel()
        if self.config.parallel_tool_calls:
            outs = await asyncio.gather(*jobs)
        else:
            outs = [await j for j in jobs]
        results.update(outs)
        s.messages.extend(tool_message(c["id"], results[c["id"]]) for c in calls)
        s.open_step = None
        all_refused = bool(jobs) and refused == len(jobs)
        s.refused_streak = s.refused_streak + 1 if all_refused else 0
        log.write({"type": "tool_round", "step": step, "refused_streak": s.refused_streak})

    def _issue(self, s: ReplayState, log: Trace, step: int, call: dict[str, Any]) -> tuple[Any, bool]:
        """Apply the repeat guard and the budget, log the call, and return (its job, refused?)."""
        cfg = self.config
        name, args = call["function"]["name"], call["function"].get("arguments")
        earlier = s.issued.get((step, call["id"]))
        if earlier is not None:  # issued before the run was killed: run it now, count it once
            error = None if earlier.get("executed", True) else earlier.get("error")
            return self._one_call(log, step, call, error, s), bool(earlier.get("refused"))
        key = call_key(name, args)
        count = s.repeats.get(key, 0) + 1
        s.repeats[key] = count
        error = None
        is_refused = s.successes.get(key, 0) >= cfg.repeat_limit or count > cfg.repeat_limit + cfg.error_retries
        if is_refused:
            error = (f"Error: refused. This exact call ({name} with the same arguments) has been made {count} "
                     f"times; repeating it will not give a different result. Use the earlier result, change "
                     f"the arguments, or answer.")
        elif self.budget is not None and not self.budget.take():
            error = (f"Error: the tool-call budget of {self.budget.limit} calls for this run is spent; "
                     f"answer with what you have.")
        s.issued[(step, call["id"])] = log.write({
            "type": "tool_call", "step": step, "id": call["id"], "name": name, "arguments": args,
            "repeat": count, "executed": error is None, "refused": is_refused, "error": error,
            "agent": self.name})
        if error is None:
            s.tool_calls += 1
        return self._one_call(log, step, call, error, s), is_refused

    async def _one_call(
        self, log: Trace, step: int, call: dict[str, Any], error: str | None, s: ReplayState
    ) -> tuple[str, str]:
        name = call["function"]["name"]
        if error is not None:
            content, is_error, seconds = error, True, 0.0
        else:
            ctx = ToolContext(agent=self.name, step=step, call_id=call["id"])
            result = await self.tools.call(name, call["function"].get("arguments"), ctx)
            content, is_error, seconds = result.content, result.is_error, result.seconds
            if not is_error:
                key = call_key(name, call["function"].get("arguments"))
                s.successes[key] = s.successes.get(key, 0) + 1
        log.write({"type": "tool_result", "step": step, "id": call["id"], "name": name, "content": content,
                   "is_error": is_error, "seconds": round(seconds, 4), "agent": self.name})
        return call["id"], content

    # -- context management ------------------------------------------------------------------

    def estimate_tokens(self, s: ReplayState) -> int:
        """Context size: the last reported prompt+completion plus ~4 characters a token for newer messages."""
        chars = [len(str(m.get("content") or "")) + len(str(m.get("reasoning_content") or ""))
                 + len(str(m.get("tool_calls") or "")) for m in s.messages]
        if s.last_usage is not None and s.last_usage.prompt_tokens > 0:
            last_assistant = max(i for i, m in enumerate(s.messages) if m.get("role") == "assistant")
            newer = sum(chars[last_assistant + 1 :])
            return s.last_usage.prompt_tokens + s.last_usage.completion_tokens + newer // 4
        return sum(chars) // 4

    def _context_full(self, s: ReplayState) -> bool:
        cfg = self.config
        tokens = self.estimate_tokens(s)
        # the reply reserve is capped at a quarter of the window: a small model's 4k context must not
        # be "full" before the first step
        reserve = min(cfg.reserved_context_tokens, cfg.max_context_tokens // 4)
        return (tokens >= cfg.max_context_tokens * cfg.compaction_ratio
                or tokens + reserve >= cfg.max_context_tokens)

    async def _compact(self, s: ReplayState, log: Trace, task: str) -> None:
        """Summarise everything between the opening and the last few messages in one model call."""
        msgs = s.messages
        head = 2 if self.system_prompt else 1
        cut = max(head, len(msgs) - self.config.keep_last_messages)
        while cut < len(msgs) and msgs[cut].get("role") == "tool":  # never split a call from its results
            cut += 1
        middle = msgs[head:cut]
        if not middle:
            return
        transcript = "\n\n".join(_render_for_summary(m) for m in middle)
        reply = await self.model.complete(
            [{"role": "system", "content": COMPACTION_SYSTEM},
             {"role": "user", "content": COMPACTION_PROMPT.format(task=task, transcript=transcript)}],
        )
        summary = reply.message.get("content") or ""
        note = {"role": "user", "content": f"[Earlier context was compacted. Summary of the work so far:]\n{summary}"}
        s.messages = [*msgs[:head], note, *msgs[cut:]]
        s.usage.add(reply.usage)
        s.last_usage = None
        log.write({"type": "compaction", "step": s.steps, "messages": s.messages, "usage": reply.usage.to_dict(),
                   "summarised_messages": len(middle)})


def _render_for_summary(m: dict[str, Any]) -> str:
    role = m.get("role")
    if role == "tool":
        return f"[tool result {m.get('tool_call_id')}]\n{m.get('content')}"
    text = f"[{role}]\n{m.get('content') or ''}"
    for c in m.get("tool_calls") or []:
        text += f"\n[call {c['id']}] {c['function']['name']}({c['function'].get('arguments')})"
    return text
