"""An offline WideSearch-style benchmark: fill tables from a generated local corpus.

Each task asks for a table (one row per company of a sector, optionally filtered by founding
year, with fixed columns). The corpus (company profiles, sector overviews, and news items that
mention the same companies with other numbers) and the gold tables are generated from a seed, so
everything is deterministic and needs no network. Answers are scored the WideSearch way with
deterministic metrics only: item-level precision/recall/F1 over cells, row-level F1 (a row counts
when all its cells are right), and whole-table success.

The same tasks run against any model: a real one through ``--base-url``, or the built-in
scripted model (:func:`scripted_policy`), which reads the conversation it is sent and acts as a
careful but strictly sequential researcher (one tool call a step as a single agent; as an
orchestrator it delegates one company per sub-agent). With the scripted model the numbers measure
the runtime (steps, critical steps, wall time under a fixed per-call latency, tool-failure
recovery), not a model's skill.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent import Agent, AgentConfig
from .builtin import DocumentSearch
from .model import ChatModel
from .scripted import Reply, ScriptedServer, call, calls, say
from .swarm import Swarm, SwarmConfig
from .tools import Tool

SECTORS = ("robotics", "biotech", "aerospace", "fintech", "agritech", "semiconductor")
CITIES = ("Kessel", "Varna Bay", "Oltmoor", "Quillen", "Brask", "Tarrow", "Elm Harbor", "Saldune", "Pyrne", "Corvid")
_SYL = ("zor", "van", "kel", "tri", "mos", "ara", "quin", "dex", "lum", "bor", "sta", "fen", "ori", "pax", "nel", "rho")
_SUFFIX = ("Labs", "Systems", "Works", "Dynamics", "Industries", "Collective", "Group", "Technologies")
COLUMNS = ("name", "city", "founded", "employees")
METRICS = {"name": "exact", "city": "exact", "founded": "number", "employees": "number"}

SINGLE_PROMPT = "You are a meticulous research agent. Use the search and open_document tools; never guess."
TASK_TEMPLATE = (
    "Using only the local document collection, list every company in the {sector} sector{condition}. Answer with "
    "one markdown table with exactly these columns: name | city | founded | employees (founded is the year, "
    "employees the current head count as a plain integer), one row per company."
)


@dataclass
class Company:
    name: str
    sector: str
    city: str
    founded: int
    employees: int


@dataclass
class BenchTask:
    """One table-filling question and its gold rows."""

    task_id: str
    prompt: str
    sector: str
    founded_after: int | None
    gold: list[dict[str, Any]]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def generate_corpus(folder: str | Path, seed: int = 0, per_sector: int = 6) -> list[Company]:
    """Write the corpus under ``folder`` and return the companies it describes."""
    rng = random.Random(seed)
    root = Path(folder)
    (root / "companies").mkdir(parents=True, exist_ok=True)
    (root / "sectors").mkdir(exist_ok=True)
    (root / "news").mkdir(exist_ok=True)
    names: set[str] = set()
    companies: list[Company] = []
    for sector in SECTORS:
        for _ in range(per_sector):
            while True:
                name = (rng.choice(_SYL) + rng.choice(_SYL)).capitalize() + " " + rng.choice(_SUFFIX)
                if name not in names:
                    names.add(name)
                    break
            companies.append(Company(name, sector, rng.choice(CITIES), rng.randint(1961, 2019),
                                     rng.randint(12, 48_000)))
    for c in companies:
        openers = (
            f"{c.name} is a {c.sector} company headquartered in {c.city}.",
            f"Headquartered in {c.city}, {c.name} works in the {c.sector} sector.",
        )
        founding = (f"It was founded in {c.founded}.", f"The firm was established in {c.founded}.")
        staff = (f"Today it employs {c.employees:,} people.", f"Its current head count is {c.employees:,} employees.")
        text = (f"# {c.name}\n\n{rng.choice(openers)} {rng.choice(founding)} {rng.choice(staff)} "
                f"It is known locally for its work on {rng.choice(_SYL)}{rng.choice(_SYL)} processes.\n")
        (root / "companies" / f"{_slug(c.name)}.md").write_text(text, encoding="utf-8")
    for sector in SECTORS:
        members = [c.name for c in companies if c.sector == sector]
        rng.shuffle(members)
        (root / "sectors" / f"{sector}.md").write_text(
            f"# The {sector} sector\n\nOverview of the {sector} sector. The companies operating in the {sector} "
            f"sector are: {'; '.join(members)}.\n", encoding="utf-8")
    for i in range(len(companies) // 2):  # hard negatives: the same names with the wrong numbers
        c = rng.choice(companies)
        (root / "news" / f"item-{i:03d}.md").write_text(
            f"# News: {c.name} plans\n\nIn {rng.randint(1990, 2024)} {c.name} announced it would hire "
            f"{rng.randint(10, 900)} people for a new office in {rng.choice(CITIES)}.\n", encoding="utf-8")
    return companies


def make_tasks(companies: Sequence[Company], n: int = 6, seed: int = 0) -> list[BenchTask]:
    """``n`` tasks: a sector, sometimes a founding-year filter; gold rows from the generator."""
    rng = random.Random(seed + 1)
    tasks = []
    for i in range(n):
        sector = SECTORS[i % len(SECTORS)]
        after = rng.choice((None, 1980, 1990, 2000)) if i >= len(SECTORS) // 2 else None
        condition = f" that was founded after {after}" if after else ""
        gold = [{"name": c.name, "city": c.city, "founded": c.founded, "employees": c.employees}
                for c in companies if c.sector == sector and (after is None or c.founded > after)]
        tasks.append(BenchTask(f"ws-{i:02d}", TASK_TEMPLATE.format(sector=sector, condition=condition), sector,
                               after, gold))
    return tasks


# -- scoring ------------------------------------------------------------------------------------

def parse_markdown_table(text: str | None) -> list[dict[str, str]]:
    """Rows of the last pipe table in ``text`` (header names lower-cased, spaces to _)."""
    if not text:
        return []
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.count("|") >= 2:
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    for table in reversed(tables):
        rows = [r for r in table if not all(re.fullmatch(r":?-{2,}:?", c) for c in r if c)]
        if len(rows) >= 1:
            header = [re.sub(r"\s+", "_", h.lower()) for h in rows[0]]
            return [dict(zip(header, r, strict=False)) for r in rows[1:]]
    return []


def _norm(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def _number(text: Any) -> float | None:
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?", str(text))
    return float(m.group(0).replace(",", "")) if m else None


def cell_score(metric: str, predicted: Any, gold: Any) -> float:
    """exact_match on normalised text, or number_near (within 0.1 %)."""
    if metric == "number":
        p, g = _number(predicted), float(gold)
        return float(p is not None and abs(p - g) <= max(1e-9, 1e-3 * abs(g)))
    return float(_norm(predicted) == _norm(gold))


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def score_table(answer: str | None, gold: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS,
                key: str = "name") -> dict[str, float]:
    """Item- and row-level precision, recall and F1, and success (1 only for a perfect table)."""
    pred = parse_markdown_table(answer)
    by_key: dict[str, dict[str, str]] = {}
    for row in pred:
        by_key.setdefault(_norm(row.get(key, "")), row)
    item_tp = row_tp = 0.0
    for g in gold:
        p = by_key.get(_norm(g[key]))
        if p is None:
            continue
        cells = [cell_score(METRICS.get(c, "exact"), p.get(c, ""), g[c]) for c in columns]
        item_tp += sum(cells)
        row_tp += min(cells)
    n_pred, n_gold = len(pred), len(gold)
    item_p = item_tp / (n_pred * len(columns)) if n_pred else 0.0
    item_r = item_tp / (n_gold * len(columns)) if n_gold else 0.0
    row_p = row_tp / n_pred if n_pred else 0.0
    row_r = row_tp / n_gold if n_gold else 0.0
    return {"item_precision": item_p, "item_recall": item_r, "item_f1": _f1(item_p, item_r),
            "row_f1": _f1(row_p, row_r), "success": float(item_p == 1.0 and item_r == 1.0)}


# -- tools with injected failures ---------------------------------------------------------------

def flaky(tools: Sequence[Tool], rate: float, seed: int = 0) -> list[Tool]:
    """Copies of ``tools`` whose calls fail with probability ``rate``, decided by a hash of
    (seed, tool, arguments, attempt), so failures do not depend on timing or concurrency."""
    if rate <= 0:
        return list(tools)
    attempts: dict[str, int] = {}
    out = []
    for t in tools:
        def make(t: Tool) -> Tool:
            inner = t.fn

            def wrapped(**kwargs: Any) -> Any:
                key = f"{t.name}:{json.dumps(kwargs, sort_keys=True, default=str)}"
                attempts[key] = attempts.get(key, 0) + 1
                h = hashlib.sha256(f"{seed}:{key}:{attempts[key]}".encode()).digest()
                if int.from_bytes(h[:8], "big") / 2**64 < rate:
                    raise ConnectionError("injected failure: the backend did not answer, try again")
                return inner(**kwargs)

            return Tool(t.name, t.description, t.parameters, wrapped, t.args_model, t.timeout, t.context_param,
                        t.max_result_chars)

        out.append(make(t))
    return out


# -- the scripted model -------------------------------------------------------------------------

_TASK_RE = re.compile(r"every company in the (\w+) sector(?: that was founded after (\d+))?")
_SUB_RE = re.compile(r"Find the profile of the company (.+?) in the local")


def _history(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """(tool name, arguments, result) for every answered call, in order."""
    results = {m.get("tool_call_id"): m.get("content") or "" for m in messages if m.get("role") == "tool"}
    out = []
    for m in messages:
        for c in m.get("tool_calls") or []:
            if c["id"] in results:
                try:
                    args = json.loads(c["function"]["arguments"] or "{}")
                except json.JSONDecodeError:
                    args = {}
                out.append((c["function"]["name"], args, results[c["id"]]))
    return out


History = list[tuple[str, dict[str, Any], str]]


def _last_ok(hist: History, name: str, pred: Callable[[dict[str, Any]], bool]) -> str | None:
    for n, args, result in reversed(hist):
        if n == name and pred(args) and not result.startswith("Error:"):
            return result
    return None


def _failed_last(hist: list[tuple[str, dict[str, Any], str]]) -> tuple[str, dict[str, Any]] | None:
    if hist and hist[-1][2].startswith("Error:") and "refused" not in hist[-1][2]:
        return hist[-1][0], hist[-1][1]
    return None


def extract_profile(text: str) -> dict[str, Any]:
    """Fields of a company profile, as a reader would take them from its sentences."""
    city = re.search(r"headquartered in ([A-Z][\w ]+?)[.,]", text) or re.search(r"Headquartered in ([\w ]+),", text)
    year = re.search(r"(?:founded|established) in (\d{4})", text)
    staff = re.search(r"employs ([\d,]+) people", text) or re.search(r"head count is ([\d,]+)", text)
    name = re.search(r"^# (.+)$", text, re.M)
    return {"name": name.group(1).strip() if name else None, "city": city.group(1).strip() if city else None,
            "founded": int(year.group(1)) if year else None,
            "employees": int(staff.group(1).replace(",", "")) if staff else None}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| name | city | founded | employees |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['city']} | {r['founded']} | {r['employees']} |" for r in rows]
    return "\n".join(lines)


def _members(hist: list[tuple[str, dict[str, Any], str]], sector: str) -> list[str] | None:
    overview = _last_ok(hist, "open_document", lambda a: a.get("doc_id") == f"sectors/{sector}.md")
    if overview is None:
        return None
    m = re.search(r"sector are: (.+)\.", overview)
    return [n.strip() for n in m.group(1).split(";")] if m else []


def _find_doc(hist: list[tuple[str, dict[str, Any], str]], query: str, prefix: str) -> str | None:
    found = _last_ok(hist, "search", lambda a: a.get("query") == query)
    if found is None:
        gave_up = any(n == "search" and a.get("query") == query and r.startswith("Error: refused")
                      for n, a, r in hist)
        return "" if gave_up else None
    for hit in json.loads(found):
        if hit["doc_id"].startswith(prefix):
            return hit["doc_id"]
    return ""


def _explore(hist: list[tuple[str, dict[str, Any], str]], sector: str) -> Reply | list[str]:
    """Shared first steps: find and read the sector overview; returns the member list when done."""
    retry = _failed_last(hist)
    if retry:
        return call(*retry, reasoning="That call failed; try it again.")
    query = f"{sector} sector companies overview"
    doc = _find_doc(hist, query, f"sectors/{sector}")
    if doc is None:
        return call("search", {"query": query}, reasoning=f"First find the overview of the {sector} sector.")
    members = _members(hist, sector)
    if members is None:
        return call("open_document", {"doc_id": doc or f"sectors/{sector}.md"}, reasoning="Read the overview.")
    return members


def _research_one(hist: list[tuple[str, dict[str, Any], str]], company: str) -> Reply | dict[str, Any]:
    """Search a company, open its profile; returns the extracted fields when done."""
    retry = _failed_last(hist)
    if retry:
        return call(*retry, reasoning="That call failed; try it again.")
    doc = _find_doc(hist, company, "companies/")
    if doc is None:
        return call("search", {"query": company}, reasoning=f"Look up {company}.")
    if not doc:
        return {"name": company, "city": None, "founded": None, "employees": None}
    profile = _last_ok(hist, "open_document", lambda a: a.get("doc_id") == doc)
    if profile is None:
        return call("open_document", {"doc_id": doc}, reasoning=f"Read the profile of {company}.")
    return {**extract_profile(profile), "name": company}


def _keep(row: dict[str, Any], after: int | None) -> bool:
    return after is None or (row.get("founded") or 0) > after


def scripted_policy(body: dict[str, Any]) -> Reply:
    """The scripted model: decides the next turn from the conversation in the request alone."""
    messages = body.get("messages") or []
    tools = {t["function"]["name"] for t in body.get("tools") or []}
    system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    user = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
    hist = _history(messages)
    if not tools:  # a compaction request: summarise
        return say("Summary: " + user[-2000:])
    sub = _SUB_RE.search(user)
    if "sub-agent" in system and sub:
        got = _research_one(hist, sub.group(1))
        return got if isinstance(got, Reply) else say(json.dumps(got), reasoning="Report the fields.")
    task = _TASK_RE.search(user)
    if task is None:
        return say("I can only answer the benchmark's table questions.")
    sector, after = task.group(1), int(task.group(2)) if task.group(2) else None
    members = _explore(hist, sector)
    if isinstance(members, Reply):
        return members
    if "assign_task" in tools:  # orchestrator: one sub-agent task per company, all in one turn
        if not any(n == "create_subagent" and not r.startswith("Error:") for n, _, r in hist):
            return call("create_subagent", {"name": "profiler", "system_prompt": "You read company profiles in a "
                        "local document collection and report their fields as JSON."},
                        reasoning="Create a profile reader.")
        done = {a.get("prompt"): r for n, a, r in hist if n == "assign_task" and not r.startswith("Error:")}
        prompts = {m: f"Find the profile of the company {m} in the local document collection and report its "
                      f"name, city, founded year and employees as a JSON object." for m in members}
        todo = [("assign_task", {"agent": "profiler", "prompt": p}) for p in prompts.values() if p not in done]
        if todo:
            return calls(todo, reasoning="Delegate one company per sub-agent, all in parallel.")
        rows = []
        for m, p in prompts.items():
            try:
                rows.append({**json.loads(done[p]), "name": m})
            except (json.JSONDecodeError, TypeError):
                rows.append({"name": m, "city": None, "founded": None, "employees": None})
        return say(_table([r for r in rows if _keep(r, after)]), reasoning="Combine the sub-agents' results.")
    rows = []
    for m in members:  # single agent: one company after the other, one tool call a step
        got = _research_one(hist, m)
        if isinstance(got, Reply):
            return got
        rows.append(got)
    return say(_table([r for r in rows if _keep(r, after)]), reasoning="All profiles read; write the table.")


# -- running ------------------------------------------------------------------------------------

@dataclass
class ModeReport:
    """Mean scores and costs of one mode (agent or swarm) over the tasks."""

    mode: str
    item_f1: float
    row_f1: float
    success: float
    critical_steps: float
    total_steps: float
    tool_calls: float
    wall_seconds: float
    tokens: int
    cost: float
    per_task: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "per_task"}


@dataclass
class BenchReport:
    modes: dict[str, ModeReport]
    model: str
    tasks: int
    failure_rate: float

    @property
    def speedup(self) -> dict[str, float] | None:
        a, s = self.modes.get("agent"), self.modes.get("swarm")
        if not a or not s or not s.wall_seconds or not s.critical_steps:
            return None
        return {"wall": a.wall_seconds / s.wall_seconds, "critical_steps": a.critical_steps / s.critical_steps}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": self.tasks, "failure_rate": self.failure_rate,
                "modes": {k: v.row() for k, v in self.modes.items()}, "speedup": self.speedup}


async def run_benchmark(
    model: ChatModel | None = None,
    n_tasks: int = 6,
    seed: int = 0,
    modes: Sequence[str] = ("agent", "swarm"),
    failure_rate: float = 0.0,
    latency: float = 0.02,
    per_sector: int = 6,
    workdir: str | Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> BenchReport:
    """Run the tasks in each mode; ``model=None`` starts the scripted model on 127.0.0.1."""
    with tempfile.TemporaryDirectory(prefix="k25-bench-") as tmp:
        root = Path(workdir or tmp)
        companies = generate_corpus(root / "corpus", seed, per_sector)
        tasks = make_tasks(companies, n_tasks, seed)
        search = DocumentSearch(root / "corpus")
        if model is None:
            with ScriptedServer(scripted_policy, latency=latency) as server:
                m = ChatModel(base_url=server.base_url, model=server.model, api_key="offline", backoff_base=0.05)
                return await _run_modes(m, tasks, search, modes, failure_rate, seed, root, on_event)
        return await _run_modes(model, tasks, search, modes, failure_rate, seed, root, on_event)


async def _run_modes(model: ChatModel, tasks: list[BenchTask], search: DocumentSearch, modes: Sequence[str],
                     failure_rate: float, seed: int, root: Path,
                     on_event: Callable[[dict[str, Any]], None] | None) -> BenchReport:
    reports = {}
    for mode in modes:
        if mode not in ("agent", "swarm"):
            raise ValueError(f"unknown benchmark mode {mode!r}; use agent or swarm")
        per_task = []
        for task in tasks:
            tools = flaky(search.tools(), failure_rate, seed)
            start = time.monotonic()
            if mode == "agent":
                res = await Agent(model, tools, SINGLE_PROMPT, AgentConfig(max_steps=100)).run(
                    task.prompt, root / "runs" / mode / f"{task.task_id}.jsonl", on_event=on_event)
                crit, total, calls_, usage, cost, answer = (res.steps, res.steps, res.tool_calls, res.usage,
                                                            res.cost, res.answer)
            else:
                cfg = SwarmConfig(orchestrator_steps=100, subagent_steps=100, ramp_interval=0.0)
                sres = await Swarm(model, tools, cfg).run(task.prompt, root / "runs" / mode / task.task_id,
                                                          on_event=on_event)
                crit, total, calls_, usage, cost, answer = (sres.critical_steps, sres.total_steps, sres.tool_calls,
                                                            sres.usage, sres.cost, sres.answer)
            wall = time.monotonic() - start
            per_task.append({"task_id": task.task_id, **score_table(answer, task.gold), "critical_steps": crit,
                             "total_steps": total, "tool_calls": calls_, "wall_seconds": wall,
                             "tokens": usage.total_tokens, "cost": cost})
        def mean(k: str, rows: list[dict[str, Any]] = per_task) -> float:
            return statistics.fmean(t[k] for t in rows)

        reports[mode] = ModeReport(
            mode, mean("item_f1"), mean("row_f1"), mean("success"), mean("critical_steps"), mean("total_steps"),
            mean("tool_calls"), sum(t["wall_seconds"] for t in per_task), sum(t["tokens"] for t in per_task),
            sum(t["cost"] for t in per_task), per_task)
    return BenchReport(reports, model.model, len(tasks), failure_rate)


def run_benchmark_sync(**kwargs: Any) -> BenchReport:
    """:func:`run_benchmark` for callers without an event loop."""
    return asyncio.run(run_benchmark(**kwargs))

