"""Agent Swarm: an orchestrator that creates sub-agents and runs their tasks in parallel.

The orchestrator gets the interface K2.5 was trained on, ``create_subagent(name, system_prompt)``
and ``assign_task(agent, prompt)`` (several ``assign_task`` calls in one turn run concurrently),
plus ``assign_batch(agent, prompt_template, items)`` for one instruction over many items. Each
task runs a fresh :class:`~k25.agents.agent.Agent` with its own context and trace; only its
final message goes back to the orchestrator.

Latency is counted in critical steps, as the K2.5 report defines it: for every orchestration
stage (one orchestrator step and the tasks it launched), the orchestrator's step plus the longest
task's steps, summed over stages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent import Agent, AgentConfig, ToolBudget
from .model import ChatModel, ModelError, Pricing, RateLimited, Usage
from .tools import Tool, ToolContext, ToolError, Toolset, as_toolset, tool
from .trace import Trace, read_events, replay

ORCHESTRATOR_PROMPT = """You are the orchestrator of an agent swarm. Split the task into independent sub-tasks and \
delegate them: create_subagent defines a specialised sub-agent (a name and a system prompt), assign_task gives one \
of them a self-contained task, and assign_batch runs one prompt template over many items. Several assign_task calls \
in the same turn run in parallel, so launch independent tasks together. Sub-agents cannot see your conversation: \
put everything they need into the prompt. When the results are in, combine them and give the final answer."""

SUBAGENT_SUFFIX = """

You are a sub-agent working for an orchestrator. It cannot see your context; it only sees your final message, so \
end with a complete, self-contained answer to the task you were given."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\- ]{0,63}")
# What the orchestrator is told when a sub-agent stopped without an answer and left no text.
_NO_ANSWER = {
    "length": "its last reply was cut at the token limit before it gave an answer",
    "max_steps": "it ran out of steps before it gave an answer",
    "repeated_calls": "it kept repeating refused tool calls and was stopped",
}


@dataclass
class SwarmConfig:
    """Limits of a swarm run (defaults: K2.5's published 100 sub-agents and 1,500 tool calls)."""

    max_subagents: int = 100
    max_tool_calls: int = 1500
    orchestrator_steps: int = 100
    subagent_steps: int = 100
    max_concurrency: int | None = None
    ramp_initial: int = 5
    ramp_interval: float = 0.7
    task_timeout: float = 1800.0
    rate_limit_requeues: int = 4
    rate_limit_delay: float = 3.0
    capacity_shrink_interval: float = 2.0
    capacity_recover_after: float = 180.0
    orchestrator_uses_tools: bool = True
    subagent_config: AgentConfig | None = None
    pricing: Pricing = field(default_factory=Pricing)


class Scheduler:
    """When sub-agent tasks may start: a ramp (N at once, then one per interval) and a capacity.

    A 429 shrinks the capacity by one (at most once per ``shrink_interval``) below the number
    running; after ``recover_after`` quiet seconds it grows back by one.
    """

    def __init__(self, cfg: SwarmConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.max_capacity = cfg.max_concurrency or cfg.max_subagents
        self.capacity = self.max_capacity
        self.running = 0
        self.started = 0
        self.peak = 0
        self._next_start = 0.0
        self._last_shrink = -1e18
        self._last_429 = -1e18
        self._clock = clock
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            while True:
                now = self._clock()
                if self.capacity < self.max_capacity and now - self._last_429 >= self.cfg.capacity_recover_after:
                    self.capacity += 1
                    self._last_429 = now
                if self.running < self.capacity and now >= self._next_start:
                    self.running += 1
                    self.started += 1
                    self.peak = max(self.peak, self.running)
                    if self.started >= self.cfg.ramp_initial:
                        self._next_start = now + self.cfg.ramp_interval
                    return
                timeout = None if self.running >= self.capacity else max(0.0, self._next_start - now)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), timeout)

    async def release(self) -> None:
        async with self._cond:
            self.running -= 1
            self._cond.notify_all()

    def rate_limited(self) -> None:
        """Called on every 429 a sub-agent sees."""
        now = self._clock()
        self._last_429 = now
        if now - self._last_shrink >= self.cfg.capacity_shrink_interval:
            self.capacity = max(1, min(self.capacity, max(self.running, 1)) - 1)
            self._last_shrink = now


@dataclass
class SwarmResult:
    """A swarm run's answer and its accounting."""

    answer: str | None
    stop_reason: str
    critical_steps: int
    total_steps: int
    orchestrator_steps: int
    subagents: int
    tasks: list[dict[str, Any]]
    tool_calls: int
    usage: Usage
    cost: float
    wall_seconds: float
    run_dir: str | None
    peak_concurrency: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)  # the orchestrator's conversation

    def summary(self) -> dict[str, Any]:
        return {
            "stop_reason": self.stop_reason, "critical_steps": self.critical_steps, "total_steps": self.total_steps,
            "orchestrator_steps": self.orchestrator_steps, "subagents": self.subagents, "tasks": len(self.tasks),
            "tool_calls": self.tool_calls, "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens, "cost_usd": round(self.cost, 6),
            "wall_seconds": round(self.wall_seconds, 3), "peak_concurrency": self.peak_concurrency,
        }


def critical_steps(orchestrator_steps: int, stage_task_steps: dict[int, list[int]]) -> int:
    """Σ over stages of (orchestrator step + the longest task launched in it); 1 step per stage."""
    return orchestrator_steps + sum(max(steps, default=0) for steps in stage_task_steps.values())


def batch_result(items: Sequence[str], outcomes: Sequence[tuple[str, str]]) -> str:
    """What ``assign_batch`` returns: one ``{item, status, result}`` per item, in the items' order.

    One function, so the curriculum's swarm traces show the orchestrator exactly these bytes.
    """
    return json.dumps([{"item": it, "status": st, "result": text}
                       for it, (st, text) in zip(items, outcomes, strict=True)], ensure_ascii=False)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Swarm:
    """An orchestrator model plus the worker tools every sub-agent gets."""

    def __init__(
        self,
        model: ChatModel,
        tools: Toolset | Sequence[Tool | Callable[..., Any]] | None = None,
        config: SwarmConfig | None = None,
        system_prompt: str | None = None,
        subagent_model: ChatModel | None = None,
    ) -> None:
        self.model = model
        self.worker_tools = as_toolset(tools)
        self.config = config or SwarmConfig()
        self.system_prompt = system_prompt or ORCHESTRATOR_PROMPT
        self.subagent_model = subagent_model or model

    async def run(
        self,
        task: str,
        run_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> SwarmResult:
        """Run ``task``; ``run_dir`` keeps the traces (orchestrator and one per task) for resume."""
        if run_dir is None:
            with tempfile.TemporaryDirectory(prefix="k25-swarm-") as tmp:
                result = await _SwarmRun(self, Path(tmp), on_event).run(task, resume=False)
                result.run_dir = None
                return result
        return await _SwarmRun(self, Path(run_dir), on_event).run(task, resume)


class _SwarmRun:
    """The state of one swarm run: sub-agent definitions, the shared budget, the scheduler."""

    def __init__(self, swarm: Swarm, run_dir: Path, on_event: Callable[[dict[str, Any]], None] | None) -> None:
        self.swarm = swarm
        self.cfg = swarm.config
        self.dir = run_dir
        self.on_event = on_event
        self.subagents: dict[str, str] = {}
        self.budget = ToolBudget(self.cfg.max_tool_calls)
        self.scheduler = Scheduler(self.cfg)
        self.sub_model = swarm.subagent_model.clone(on_rate_limit=self.scheduler.rate_limited)
        self.index_path = run_dir / "tasks.jsonl"
        self.index: Trace | None = None

    # -- the orchestrator's tools ------------------------------------------------------------

    def orchestrator_tools(self) -> list[Tool]:
        def create_subagent(name: str, system_prompt: str) -> str:
            """Create a custom subagent with specific system prompt and name for reuse.

            Args:
                name: a short unique name for the sub-agent (letters, digits, spaces, _ or -).
                system_prompt: the sub-agent's role and instructions.
            """
            if not _NAME_RE.fullmatch(name):
                raise ToolError(f"sub-agent name {name!r}: use 1-64 letters, digits, spaces, _ or -")
            if name in self.subagents:
                raise ToolError(f"a sub-agent named {name!r} already exists; assign tasks to it or pick another name")
            if len(self.subagents) >= self.cfg.max_subagents:
                raise ToolError(f"the limit of {self.cfg.max_subagents} sub-agents is reached; reuse existing ones: "
                                + ", ".join(self.subagents))
            self.subagents[name] = system_prompt
            return f"sub-agent {name!r} created; give it work with assign_task(agent={name!r}, prompt=...)"

        async def assign_task(agent: str, prompt: str, ctx: ToolContext) -> str:
            """Launch a new agent to work on a task. You can launch multiple agents concurrently by calling this tool
            several times in one turn. When the agent is done, it will return a single message back to you.

            Args:
                agent: the name of a sub-agent made with create_subagent.
                prompt: the complete task; the sub-agent cannot see your conversation.
            """
            self._check_agent(agent)
            status, text = await self.run_task(agent, prompt, ctx.step, f"{ctx.step}-{ctx.call_id}")
            if status != "done":
                raise ToolError(f"sub-agent {agent!r} did not finish ({status}): {text}")
            return text

        async def assign_batch(agent: str, prompt_template: str, items: list[str], ctx: ToolContext) -> str:
            """Run one sub-agent task per item, in parallel: each prompt is prompt_template with {{item}} replaced
            by the item. Results come back in the order of the items.

            Args:
                agent: the name of a sub-agent made with create_subagent.
                prompt_template: the task, containing {{item}} where each item goes.
                items: the items, one task each.
            """
            self._check_agent(agent)
            if "{{item}}" not in prompt_template:
                raise ToolError("prompt_template must contain {{item}}")
            if not items:
                raise ToolError("items is empty; give at least one item")
            prompts = [prompt_template.replace("{{item}}", str(it)) for it in items]
            if len(set(prompts)) != len(prompts):
                raise ToolError("the items give duplicate prompts; make every item distinct")
            outs = await asyncio.gather(*(
                self.run_task(agent, p, ctx.step, f"{ctx.step}-{ctx.call_id}-{i}") for i, p in enumerate(prompts)
            ))
            return batch_result(items, outs)

        return [tool(create_subagent), tool(assign_task), tool(assign_batch)]

    def _check_agent(self, agent: str) -> None:
        if agent not in self.subagents:
            known = ", ".join(self.subagents) or "none yet"
            raise ToolError(f"no sub-agent named {agent!r} (created: {known}); call create_subagent first")

    # -- running tasks -----------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        if self.index is not None:
            self.index.write(event)
        elif self.on_event:
            self.on_event(event)

    async def run_task(self, agent: str, prompt: str, stage: int, task_id: str) -> tuple[str, str]:
        """Run one sub-agent task under the scheduler; returns (status, final text or error)."""
        cfg = self.cfg
        trace = self.dir / "tasks" / f"{_safe(task_id)}.jsonl"
        sub_cfg = cfg.subagent_config or AgentConfig()
        sub_cfg = AgentConfig(**{**sub_cfg.__dict__, "max_steps": cfg.subagent_steps, "pricing": cfg.pricing})
        worker = Agent(self.sub_model, self.swarm.worker_tools, self.subagents[agent] + SUBAGENT_SUFFIX, sub_cfg,
                       name=f"{agent}/{task_id}", budget=self.budget)
        self._emit({"type": "task_start", "task_id": task_id, "agent": agent, "stage": stage,
                    "trace": str(trace.relative_to(self.dir)), "prompt": prompt})
        requeues = 0
        status, text, steps = "failed", "", 0
        while True:
            await self.scheduler.acquire()
            try:
                res = await asyncio.wait_for(worker.run(prompt, trace, resume=True, on_event=self.on_event),
                                             cfg.task_timeout)
                status = "done" if res.stop_reason == "answer" else res.stop_reason
                text, steps = res.answer or "", res.steps
                if status != "done" and not text:
                    text = _NO_ANSWER.get(status, "it stopped without an answer")
                break
            except RateLimited as e:
                requeues += 1
                if requeues > cfg.rate_limit_requeues:
                    status, text = "rate_limited", str(e)
                    break
                retry_in = cfg.rate_limit_delay * 2 ** (requeues - 1)
            except asyncio.TimeoutError:
                status, text = "timeout", f"the task timed out after {cfg.task_timeout:g} s"
                break
            except ModelError as e:
                status, text = "failed", str(e)
                break
            finally:
                await self.scheduler.release()
            self._emit({"type": "task_requeued", "task_id": task_id, "after_seconds": retry_in})
            await asyncio.sleep(retry_in)
        if steps == 0:
            steps = replay(read_events(trace)).steps
        self._emit({"type": "task_end", "task_id": task_id, "agent": agent, "stage": stage, "status": status,
                    "steps": steps})
        return status, text

    # -- the run -----------------------------------------------------------------------------

    async def run(self, task: str, resume: bool) -> SwarmResult:
        start = time.monotonic()
        orch_trace = self.dir / "orchestrator.jsonl"
        if not resume and (orch_trace.exists() or self.index_path.exists()):
            raise FileExistsError(f"{self.dir} already holds a swarm run; resume it or use a new directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore(orch_trace)
        self.index = Trace(self.index_path, self.on_event)
        try:
            tools = self.orchestrator_tools()
            if self.cfg.orchestrator_uses_tools:
                tools += list(self.swarm.worker_tools)
            orch_cfg = AgentConfig(max_steps=self.cfg.orchestrator_steps, pricing=self.cfg.pricing)
            orchestrator = Agent(self.swarm.model, tools, self.swarm.system_prompt, orch_cfg, name="orchestrator",
                                 budget=self.budget)
            res = await orchestrator.run(task, orch_trace, resume=resume, on_event=self.on_event)
        finally:
            self.index.close()
        return self._result(res, time.monotonic() - start)

    def _restore(self, orch_trace: Path) -> None:
        """Rebuild sub-agent definitions and the spent budget from the traces of a killed run."""
        events = read_events(orch_trace)
        results = {(e["step"], e["id"]): e for e in events if e.get("type") == "tool_result"}
        for e in events:
            if e.get("type") == "tool_call" and e["name"] == "create_subagent":
                r = results.get((e["step"], e["id"]))
                if r is not None and not r["is_error"]:
                    args = json.loads(e["arguments"]) if isinstance(e["arguments"], str) else e["arguments"]
                    self.subagents[args["name"]] = args["system_prompt"]
        used = sum(1 for e in events if e.get("type") == "tool_call" and e.get("executed", True))
        for path in (self.dir / "tasks").glob("*.jsonl"):
            used += sum(1 for e in read_events(path) if e.get("type") == "tool_call" and e.get("executed", True))
        self.budget.used = used

    def _result(self, res: Any, wall: float) -> SwarmResult:
        starts: dict[str, dict[str, Any]] = {}
        for e in read_events(self.index_path):
            if e.get("type") == "task_start":
                starts[e["task_id"]] = e
        stage_steps: dict[int, list[int]] = {}
        usage = Usage().add(res.usage)
        tool_calls = res.tool_calls
        tasks = []
        for task_id, e in starts.items():
            state = replay(read_events(self.dir / e["trace"]))
            usage.add(state.usage)
            tool_calls += state.tool_calls
            stage_steps.setdefault(e["stage"], []).append(state.steps)
            final = state.final or {}
            status = final.get("stop_reason", "unfinished")
            tasks.append({"task_id": task_id, "agent": e["agent"], "stage": e["stage"], "steps": state.steps,
                          "tool_calls": state.tool_calls, "status": "done" if status == "answer" else status,
                          "prompt": e.get("prompt"), "answer": final.get("answer"), "messages": state.messages})
        return SwarmResult(
            answer=res.answer, stop_reason=res.stop_reason,
            critical_steps=critical_steps(res.steps, stage_steps),
            total_steps=res.steps + sum(t["steps"] for t in tasks), orchestrator_steps=res.steps,
            subagents=len(self.subagents), tasks=tasks, tool_calls=tool_calls, usage=usage,
            cost=self.cfg.pricing.cost(usage), wall_seconds=wall, run_dir=str(self.dir),
            peak_concurrency=self.scheduler.peak, messages=res.messages,
        )


def timeline(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Each sub-agent task of a swarm run as a bar: start/end (seconds from the run's first
    event), stage, status and steps, in start order. This is what a UI draws as the timeline."""
    root = Path(run_dir)
    events = read_events(root / "tasks.jsonl")
    orch = read_events(root / "orchestrator.jsonl")
    t0 = min([e["t"] for e in orch[:1]] + [e["t"] for e in events[:1]], default=0.0)
    bars: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("type") == "task_start" and e["task_id"] not in bars:
            bars[e["task_id"]] = {"task_id": e["task_id"], "agent": e["agent"], "stage": e["stage"],
                                  "start": round(e["t"] - t0, 3), "end": None, "status": "running", "steps": 0}
        elif e.get("type") == "task_end" and e["task_id"] in bars:
            bars[e["task_id"]].update(end=round(e["t"] - t0, 3), status=e["status"], steps=e["steps"])
    return sorted(bars.values(), key=lambda b: b["start"])
