"""The offline WideSearch-style benchmark: scoring, the generated corpus, agent vs swarm runs."""

from __future__ import annotations

import asyncio

import pytest

from k25.agents.bench import (
    extract_profile,
    flaky,
    generate_corpus,
    make_tasks,
    parse_markdown_table,
    run_benchmark,
    score_table,
)
from k25.agents.builtin import DocumentSearch

GOLD = [{"name": "Zorvan Labs", "city": "Kessel", "founded": 1987, "employees": 4210},
        {"name": "Quinmos Works", "city": "Brask", "founded": 2001, "employees": 77}]


def test_parse_the_last_markdown_table():
    text = ("Here:\n| a | b |\n|---|---|\n| 1 | 2 |\n\nFinal:\n```markdown\n| Name | City |\n| :-- | --: |\n"
            "| Zorvan Labs | Kessel |\n```")
    assert parse_markdown_table(text) == [{"name": "Zorvan Labs", "city": "Kessel"}]
    assert parse_markdown_table("no table") == [] and parse_markdown_table(None) == []


def test_scores_item_and_row_f1_like_widesearch():
    perfect = "| name | city | founded | employees |\n|---|---|---|---|\n" + "\n".join(
        f"| {g['name']} | {g['city']} | {g['founded']} | {g['employees']:,} |" for g in GOLD)
    assert score_table(perfect, GOLD) == {"item_precision": 1.0, "item_recall": 1.0, "item_f1": 1.0,
                                          "row_f1": 1.0, "success": 1.0}
    one_wrong_cell = perfect.replace("| 77 |", "| 78 |")
    s = score_table(one_wrong_cell, GOLD)
    assert s["item_precision"] == s["item_recall"] == 7 / 8 and s["row_f1"] == 0.5 and s["success"] == 0.0
    extra_row = perfect + "\n| Nobody Inc | Pyrne | 1999 | 5 |"
    s = score_table(extra_row, GOLD)
    assert s["item_precision"] == pytest.approx(8 / 12) and s["item_recall"] == 1.0
    assert score_table("", GOLD)["item_f1"] == 0.0


def test_corpus_and_tasks_are_deterministic(tmp_path):
    a = generate_corpus(tmp_path / "a", seed=3)
    b = generate_corpus(tmp_path / "b", seed=3)
    assert a == b and len(a) == 36
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.md"))
    assert files == sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*.md"))
    tasks = make_tasks(a, 6, seed=3)
    assert [t.task_id for t in tasks] == [f"ws-{i:02d}" for i in range(6)] and all(t.gold for t in tasks)
    for t in tasks:  # every gold row is stated in its company's profile
        for row in t.gold:
            search = next(p for p in (tmp_path / "a" / "companies").glob("*.md") if p.read_text().startswith(
                f"# {row['name']}\n"))
            fields = extract_profile(search.read_text())
            assert {k: fields[k] for k in ("city", "founded", "employees")} == {
                k: row[k] for k in ("city", "founded", "employees")}


def test_injected_failures_are_deterministic(tmp_path):
    generate_corpus(tmp_path, seed=0)
    tools = flaky(DocumentSearch(tmp_path).tools(), rate=0.5, seed=1)
    search = tools[0]
    outs = [asyncio.run(search({"query": f"robotics {i}"})).is_error for i in range(40)]
    assert 8 < sum(outs) < 32  # about half fail
    tools2 = flaky(DocumentSearch(tmp_path).tools(), rate=0.5, seed=1)
    assert outs == [asyncio.run(tools2[0]({"query": f"robotics {i}"})).is_error for i in range(40)]
    err = next(asyncio.run(search({"query": f"robotics x{i}"})) for i in range(40)
               if asyncio.run(tools2[0]({"query": f"robotics x{i}"})).is_error)
    assert err.content.startswith("Error:")


def test_agent_and_swarm_solve_the_tasks_despite_failing_tools():
    report = asyncio.run(run_benchmark(n_tasks=2, per_sector=4, failure_rate=0.12, latency=0.0))
    agent, swarm = report.modes["agent"], report.modes["swarm"]
    for mode in (agent, swarm):
        assert mode.item_f1 == 1.0 and mode.row_f1 == 1.0 and mode.success == 1.0
        assert mode.tokens > 0 and mode.cost > 0
    assert agent.critical_steps == agent.total_steps
    assert swarm.critical_steps < agent.critical_steps < swarm.total_steps
    failures = sum(t["tool_calls"] for t in agent.per_task) - sum(
        2 * 4 + 2 for _ in agent.per_task)  # calls beyond the minimum are the retries of failed ones
    assert failures > 0
    again = asyncio.run(run_benchmark(n_tasks=2, per_sector=4, failure_rate=0.12, latency=0.0))
    for m in ("agent", "swarm"):
        keys = ("item_f1", "critical_steps", "total_steps", "tool_calls", "tokens")
        assert [getattr(again.modes[m], k) for k in keys] == [getattr(report.modes[m], k) for k in keys]
    assert set(report.to_dict()["speedup"]) == {"wall", "critical_steps"}
