"""From per-record results to the report: per-family metrics, thinking vs instant, the targets.

The issue's targets are checked here: at least 99% of the tool calls the model emits are valid,
and at least 90% accuracy on held-out tool-using arithmetic (the ``tool_calc`` family).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..data.vision import VISION_FAMILIES
from .harness import TEXT_FAMILIES, RecordResult

TARGET_VALIDITY = 0.99
TARGET_TOOL_ARITHMETIC = 0.90
TOOL_ARITHMETIC_FAMILY = "tool_calc"
# Families with tools whose records come in both modes (the comparison splits them by mode).
TOOL_FAMILIES = ("tool_calc", "tool_calc_agent", "tool_python", "tool_search", "tool_search_check", "agent",
                 "agent_docs", "swarm", "swarm_sub", "swarm_batch", "swarm_batch_sub")


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def mode_stats(results: Sequence[RecordResult]) -> dict[str, Any]:
    """n, accuracy and mean generated / reasoning tokens of some chat records."""
    return {
        "n": len(results),
        "accuracy": _ratio(sum(bool(r.correct) for r in results), len(results)),
        "mean_tokens": _mean([r.tokens for r in results]),
        "mean_reasoning_tokens": _mean([r.reasoning_tokens for r in results]),
    }


def invalid_kinds(results: Sequence[RecordResult]) -> dict[str, int]:
    """The invalid tool calls of some records by kind (cut off, malformed, undeclared, arguments)."""
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.invalid_kinds)
    return dict(sorted(total.items()))


def family_metrics(family: str, results: Sequence[RecordResult]) -> dict[str, Any]:
    """Everything reported for one family."""
    if family in TEXT_FAMILIES:
        scored = [r for r in results if r.loss_tokens]
        tokens = sum(r.loss_tokens or 0 for r in scored)
        loss = sum(r.loss or 0.0 for r in scored) / tokens if tokens else None
        return {"n": len(results), "kind": "text", "loss": round(loss, 4) if loss is not None else None,
                "perplexity": round(math.exp(loss), 3) if loss is not None else None, "loss_tokens": tokens}
    calls = sum(r.tool_calls for r in results)
    valid = sum(r.valid_tool_calls for r in results)
    out: dict[str, Any] = {
        "n": len(results),
        "kind": "chat",
        "correct": sum(bool(r.correct) for r in results),
        **{k: v for k, v in mode_stats(results).items() if k != "n"},
        "tool_calls": calls,
        "valid_tool_calls": valid,
        "tool_call_validity": _ratio(valid, calls),
        "invalid_kinds": invalid_kinds(results),
        "executed_tool_calls": sum(r.executed_tool_calls for r in results),
        "mean_steps": _mean([r.steps for r in results]),
        "stop_reasons": dict(Counter(r.stop_reason for r in results)),
        "truncated_turns": sum(r.truncated_turns for r in results),
        "by_mode": {mode: mode_stats([r for r in results if r.mode == mode])
                    for mode in sorted({r.mode for r in results})},
    }
    swarm = [r for r in results if r.critical_steps is not None]
    if swarm:
        faster = [r for r in swarm if r.single_agent_steps is not None and r.critical_steps < r.single_agent_steps]
        out["mean_critical_steps"] = _mean([r.critical_steps for r in swarm])
        out["mean_single_agent_steps"] = _mean([r.single_agent_steps for r in swarm if r.single_agent_steps])
        out["fewer_critical_steps"] = _ratio(len(faster), len(swarm))
        out["solved_with_fewer_critical_steps"] = _ratio(sum(bool(r.correct) for r in faster), len(swarm))
    return out


def thinking_vs_instant(by_family: dict[str, list[RecordResult]]) -> list[dict[str, Any]]:
    """The same tasks in both modes: arith_think against arith_instant; each tool and visual family by mode."""
    rows = []
    if by_family.get("arith_think") and by_family.get("arith_instant"):
        rows.append({"task": "arithmetic (arith_think / arith_instant)",
                     "thinking": mode_stats(by_family["arith_think"]),
                     "instant": mode_stats(by_family["arith_instant"])})
    for fam in (*TOOL_FAMILIES, *VISION_FAMILIES):
        results = by_family.get(fam) or []
        think = [r for r in results if r.mode == "thinking"]
        instant = [r for r in results if r.mode == "instant"]
        if think and instant:
            rows.append({"task": fam, "thinking": mode_stats(think), "instant": mode_stats(instant)})
    return rows


def targets(families: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's two targets, with whether they are met (None when the families needed were not run)."""
    chat = [m for m in families.values() if m["kind"] == "chat"]
    calls = sum(m["tool_calls"] for m in chat)
    validity = _ratio(sum(m["valid_tool_calls"] for m in chat), calls)
    calc = families.get(TOOL_ARITHMETIC_FAMILY)
    accuracy = calc["accuracy"] if calc else None
    return [
        {"target": "valid tool calls", "value": validity, "goal": TARGET_VALIDITY,
         "met": None if validity is None else validity >= TARGET_VALIDITY},
        {"target": f"held-out tool-using arithmetic accuracy ({TOOL_ARITHMETIC_FAMILY})", "value": accuracy,
         "goal": TARGET_TOOL_ARITHMETIC, "met": None if accuracy is None else accuracy >= TARGET_TOOL_ARITHMETIC},
    ]


def summarize(
    results: Sequence[RecordResult],
    families: Sequence[str] | None = None,
    info: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole report: settings, per-family metrics, overall figures, the comparison, targets, records."""
    by_family: dict[str, list[RecordResult]] = {f: [] for f in families or ()}
    for r in results:
        by_family.setdefault(r.family, []).append(r)
    fams = {f: family_metrics(f, rs) for f, rs in by_family.items()}
    chat = [r for f, rs in by_family.items() if f not in TEXT_FAMILIES for r in rs]
    calls = sum(r.tool_calls for r in chat)
    overall = {
        "records": len(results),
        "chat_records": len(chat),
        "accuracy": _ratio(sum(bool(r.correct) for r in chat), len(chat)),
        "tool_calls": calls,
        "valid_tool_calls": sum(r.valid_tool_calls for r in chat),
        "tool_call_validity": _ratio(sum(r.valid_tool_calls for r in chat), calls),
        "invalid_kinds": invalid_kinds(chat),
    }
    return {
        "info": dict(info or {}),
        "families": fams,
        "overall": overall,
        "thinking_vs_instant": thinking_vs_instant(by_family),
        "targets": targets(fams),
        "warnings": list(warnings),
        "records": [r.to_dict() for r in results],
    }
