"""Running held-out records: each conversation through the agents runtime, the prose through the loss.

For a chat record the opening messages (``prompt_messages``: system prompt and user task) go to
a :class:`k25.agents.Agent` with the record's declared tools and the record's mode; a record
whose tools are the swarm's orchestrator tools goes to :class:`k25.agents.Swarm` instead, whose
``assign_task`` runs each sub-agent (the created system prompt plus the runtime's sub-agent
suffix, the search and calculator tools) as its own conversation with the same model and returns
its final message. The runtime counts critical steps as the data defines them (per stage: the
orchestrator step plus the longest sub-agent). Every conversation stops when the model answers
without a tool call or after ``max_steps`` steps. All records run concurrently (up to
``concurrency`` at once) so the model sees large batches.

The runtime is used as it is, not re-implemented: its only dependency on an endpoint is the
``ChatModel`` interface, which :class:`~k25.eval.model.EvalChatModel` provides in-process (the same
rendering, parsing and call ids as k25's server behind the ``openai`` client), so no HTTP server is
needed and any :class:`~k25.eval.model.Generator` can stand behind it. The runtime's compaction
never triggers here (the default 262k-token budget); a prompt past the model's context gets an
empty reply instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.generate import ALL_FAMILIES
from ..data.records import is_chat, prompt_messages, read_jsonl, score_answer
from ..data.tools import ORCHESTRATOR_TOOLS, SWARM_WORKER_TOOLS
from ..data.vision import has_images, resolve_image_urls
from .model import Batcher, EvalChatModel, EvalError, Generator, Tally
from .tools import ToolKit

TEXT_FAMILIES = ("text", "simple_text")


@dataclass
class RecordResult:
    """How the model did on one record (JSON-ready through :meth:`to_dict`)."""

    id: str
    family: str
    mode: str
    correct: bool | None = None
    answer: str | None = None
    expected: str | None = None
    stop_reason: str = ""
    steps: int = 0
    tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: int = 0  # emitted by the model (valid or not)
    valid_tool_calls: int = 0
    executed_tool_calls: int = 0
    invalid: list[str] = field(default_factory=list)
    invalid_kinds: dict[str, int] = field(default_factory=dict)  # the invalid calls by INVALID_KINDS key
    truncated_turns: int = 0
    critical_steps: int | None = None
    single_agent_steps: int | None = None
    loss: float | None = None  # text records: summed NLL (nats) over `loss_tokens`
    loss_tokens: int | None = None
    messages: list[dict[str, Any]] | None = None
    tasks: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def available_families(data_dir: Path, split: str) -> list[str]:
    """The families ``data_dir`` has a ``FAMILY/SPLIT.jsonl`` for, in curriculum order."""
    return [f for f in ALL_FAMILIES if (data_dir / f / f"{split}.jsonl").is_file()]


def load_records(
    data_dir: str | Path, families: Sequence[str] | None = None, split: str = "heldout", limit: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``{family: records}`` of one split (the first ``limit`` of each), with clear errors for bad input."""
    root = Path(data_dir)
    if not root.is_dir():
        raise EvalError(f"data directory {root} does not exist (make one with `k25 data generate --out {root}`)")
    present = available_families(root, split)
    if not present:
        raise EvalError(f"{root} holds no FAMILY/{split}.jsonl files (make them with `k25 data generate --out {root}`)")
    wanted = list(families) if families else present
    unknown = [f for f in wanted if f not in ALL_FAMILIES]
    if unknown:
        raise EvalError(f"unknown families {', '.join(unknown)}; valid families: {', '.join(ALL_FAMILIES)}")
    missing = [f for f in wanted if f not in present]
    if missing:
        raise EvalError(f"{root} has no {split} records for {', '.join(missing)} (it has: {', '.join(present)})")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")
    out = {}
    for fam in wanted:
        records = []
        for rec in read_jsonl(root / fam / f"{split}.jsonl"):
            if limit is not None and len(records) >= limit:
                break
            if has_images(rec):  # image URLs are relative to the record's file: make them paths a model can open
                rec["messages"] = resolve_image_urls(rec["messages"], root / fam)
            records.append(rec)
        out[fam] = records
    return out


@dataclass
class Settings:
    """How conversations run."""

    max_steps: int = 12
    concurrency: int = 16
    keep_messages: bool = True


def is_swarm(record: dict[str, Any]) -> bool:
    """Whether the record is an orchestrator's (its tools are the swarm's)."""
    return any(t["function"]["name"] in ORCHESTRATOR_TOOLS for t in record.get("tools") or [])


def prepare_tools(kit: ToolKit, records: Sequence[dict[str, Any]]) -> None:
    """Build every tool the records need now, so a missing corpus fails before any model is loaded."""
    for rec in records:
        if is_chat(rec):
            kit.toolset(SWARM_WORKER_TOOLS if is_swarm(rec) else rec.get("tools"))


async def run_record(record: dict[str, Any], batcher: Batcher, kit: ToolKit, settings: Settings) -> RecordResult:
    """One chat record through the runtime; the final reply scored with ``score_answer``."""
    from ..agents.agent import Agent, AgentConfig
    from ..agents.model import Pricing
    from ..agents.swarm import Swarm, SwarmConfig

    opening = prompt_messages(record)
    if [m["role"] for m in opening] not in (["user"], ["system", "user"]):
        raise EvalError(f"{record.get('id')}: expected a user message (after an optional system prompt) "
                        f"before the first assistant turn, got roles {[m['role'] for m in opening]}")
    system = opening[0]["content"] if len(opening) == 2 else None
    task = opening[-1]["content"]
    tally = Tally()
    model = EvalChatModel(batcher, record.get("mode") == "thinking", tally)
    meta = record.get("meta") or {}
    result = RecordResult(record["id"], record["family"], record.get("mode", ""), expected=record.get("answer"))
    free = Pricing(0.0, 0.0)
    if is_swarm(record):
        # The orchestrator holds the workers' tools too when the record declares them (the batch form).
        uses_tools = any(t["function"]["name"] not in ORCHESTRATOR_TOOLS for t in record.get("tools") or [])
        swarm_config = SwarmConfig(orchestrator_uses_tools=uses_tools, orchestrator_steps=settings.max_steps,
                                   subagent_steps=settings.max_steps, ramp_interval=0.0, pricing=free)
        swarm = Swarm(model, kit.toolset(SWARM_WORKER_TOOLS), swarm_config, system_prompt=system)
        res = await swarm.run(task)
        result.steps, result.critical_steps = res.total_steps, res.critical_steps
        result.single_agent_steps = meta.get("single_agent_steps")
        if settings.keep_messages:  # the orchestrator's conversation; each task keeps its sub-agent's
            result.messages, result.tasks = res.messages, res.tasks
        else:
            result.tasks = [{k: v for k, v in t.items() if k != "messages"} for t in res.tasks]
        answer, stop, executed, usage = res.answer, res.stop_reason, res.tool_calls, res.usage
    else:
        agent_config = AgentConfig(max_steps=settings.max_steps, pricing=free)
        agent = Agent(model, kit.toolset(record.get("tools")), system, agent_config, name=record["id"])
        res = await agent.run(task)
        result.steps = res.steps
        if settings.keep_messages:
            result.messages = res.messages
        answer, stop, executed, usage = res.answer, res.stop_reason, res.tool_calls, res.usage
    result.answer, result.stop_reason, result.executed_tool_calls = answer, stop, executed
    result.correct = score_answer(record, answer)
    result.tokens, result.reasoning_tokens = usage.completion_tokens, usage.reasoning_tokens
    result.tool_calls, result.valid_tool_calls, result.invalid = tally.calls, tally.valid, tally.problems
    result.invalid_kinds = dict(tally.kinds)
    result.truncated_turns = tally.truncated
    return result


async def run_chat_records(
    records: Sequence[dict[str, Any]],
    generator: Generator,
    kit: ToolKit,
    settings: Settings,
    on_result: Callable[[RecordResult], None] | None = None,
) -> tuple[list[RecordResult], dict[str, int]]:
    """Every chat record concurrently (at most ``settings.concurrency`` at a time), results in input order."""
    batcher = Batcher(generator)
    gate = asyncio.Semaphore(max(1, settings.concurrency))

    async def one(rec: dict[str, Any]) -> RecordResult:
        async with gate:
            res = await run_record(rec, batcher, kit, settings)
        if on_result is not None:
            on_result(res)
        return res

    results = await asyncio.gather(*(one(r) for r in records))
    return list(results), {"batches": batcher.batches, "largest_batch": batcher.largest}


def run_text_records(records: Sequence[dict[str, Any]], generator: Generator) -> list[RecordResult]:
    """Teacher-forced loss of each prose record (empty results when the model offers no ``text_loss``)."""
    loss_fn = getattr(generator, "text_loss", None)
    results = [RecordResult(r["id"], r["family"], r.get("mode", "text")) for r in records]
    if loss_fn is None or not records:
        return results
    for res, (nll, n) in zip(results, loss_fn([r["text"] for r in records]), strict=True):
        res.loss, res.loss_tokens = nll, n
    return results


def evaluate(
    generator: Generator,
    data_dir: str | Path,
    families: Sequence[str] | None = None,
    limit: int | None = None,
    split: str = "heldout",
    settings: Settings | None = None,
    on_result: Callable[[RecordResult], None] | None = None,
    kit: ToolKit | None = None,
) -> dict[str, Any]:
    """Evaluate ``generator`` on ``data_dir``'s ``split``; the report :func:`k25.eval.metrics.summarize` builds."""
    from .metrics import summarize
    from .model import describe

    settings = settings or Settings()
    by_family = load_records(data_dir, families, split, limit)
    kit = kit or ToolKit(data_dir)
    start = time.monotonic()
    chat = [r for fam, recs in by_family.items() if fam not in TEXT_FAMILIES for r in recs if is_chat(r)]
    chat_results, batching = asyncio.run(run_chat_records(chat, generator, kit, settings, on_result)) if chat \
        else ([], {"batches": 0, "largest_batch": 0})
    text = [r for fam, recs in by_family.items() for r in recs if not is_chat(r)]
    text_results = run_text_records(text, generator)
    if on_result is not None:
        for res in text_results:
            on_result(res)
    warnings = list(kit.warnings)
    if text and not hasattr(generator, "text_loss"):
        warnings.append(f"{describe(generator)} gives no teacher-forced loss: the prose families are not scored")
    results = {r.id: r for r in [*chat_results, *text_results]}
    ordered = [results[r["id"]] for recs in by_family.values() for r in recs]
    return summarize(
        ordered,
        families=list(by_family),
        info={"model": describe(generator), "data": str(data_dir), "split": split, "limit": limit,
              "max_steps": settings.max_steps, "concurrency": settings.concurrency,
              "seconds": round(time.monotonic() - start, 2), **batching},
        warnings=warnings,
    )
