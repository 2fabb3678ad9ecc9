"""The report as a rich table (stdout) and as Markdown ready to paste into a model card or BENCHMARKS.md."""

from __future__ import annotations

from typing import Any

from .model import INVALID_KINDS

DASH = "—"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def invalid_note(kinds: dict[str, int] | None) -> str:
    """The invalid calls by kind, most common first, e.g. "5 cut off at the token or context limit"."""
    items = sorted((kinds or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{n} {INVALID_KINDS.get(k, k)}" for k, n in items)


def _overall(report: dict[str, Any]) -> str:
    o = report["overall"]
    why = invalid_note(o.get("invalid_kinds"))
    return (f"{_pct(o['accuracy'])} accuracy over {o['chat_records']} conversations, "
            f"{_pct(o['tool_call_validity'])} valid tool calls ({o['valid_tool_calls']}/{o['tool_calls']})"
            + (f"; invalid: {why}" if why else ""))


def family_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per family: family, n, accuracy, valid tool calls, mean tokens, mean reasoning tokens, notes."""
    rows = []
    for fam, m in report["families"].items():
        if m["kind"] == "text":
            note = DASH if m["loss"] is None else (
                f"loss {m['loss']:.3f} nats/token, perplexity {m['perplexity']:.2f} ({m['loss_tokens']:,} tokens)")
            rows.append([fam, str(m["n"]), DASH, DASH, DASH, DASH, note])
            continue
        validity = DASH if not m["tool_calls"] else \
            f"{_pct(m['tool_call_validity'])} ({m['valid_tool_calls']}/{m['tool_calls']})"
        notes = []
        if "mean_critical_steps" in m:
            notes.append(f"critical steps {_num(m['mean_critical_steps'])} vs {_num(m['mean_single_agent_steps'])} "
                         f"single-agent; solved with fewer: {_pct(m['solved_with_fewer_critical_steps'])}")
        if why := invalid_note(m.get("invalid_kinds")):
            notes.append(f"invalid: {why}")
        if m["truncated_turns"]:
            notes.append(f"{m['truncated_turns']} turns cut at the token or context limit")
        unfinished = {k: v for k, v in m["stop_reasons"].items() if k != "answer"}
        if unfinished:
            notes.append("stopped: " + ", ".join(f"{k} {v}" for k, v in sorted(unfinished.items())))
        rows.append([fam, str(m["n"]), _pct(m["accuracy"]), validity, _num(m["mean_tokens"]),
                     _num(m["mean_reasoning_tokens"]), "; ".join(notes)])
    return rows


FAMILY_HEADER = ["family", "n", "accuracy", "valid tool calls", "mean tokens", "mean reasoning tokens", "notes"]
MODE_HEADER = ["task", "thinking n", "thinking accuracy", "thinking tokens", "instant n", "instant accuracy",
               "instant tokens"]
TARGET_HEADER = ["target", "value", "goal", "met"]


def mode_rows(report: dict[str, Any]) -> list[list[str]]:
    """Thinking vs instant: accuracy and mean generated tokens of the same tasks in each mode."""
    rows = []
    for row in report["thinking_vs_instant"]:
        t, i = row["thinking"], row["instant"]
        rows.append([row["task"], str(t["n"]), _pct(t["accuracy"]), _num(t["mean_tokens"]), str(i["n"]),
                     _pct(i["accuracy"]), _num(i["mean_tokens"])])
    return rows


def target_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[t["target"], _pct(t["value"]), f"≥ {_pct(t['goal'])}",
             DASH if t["met"] is None else ("yes" if t["met"] else "no")] for t in report["targets"]]


def _title(report: dict[str, Any]) -> str:
    info = report["info"]
    limit = f", first {info['limit']} per family" if info.get("limit") else ""
    return f"k25 eval: {info.get('model', '?')} on {info.get('data', '?')} ({info.get('split', 'heldout')}{limit})"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables in GitHub Markdown."""

    def table(header: list[str], rows: list[list[str]], right: int) -> list[str]:
        aligns = ["---" if i not in range(1, 1 + right) else "---:" for i in range(len(header))]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
        return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]

    info = report["info"]
    out = [f"### {_title(report)}", ""]
    out += [f"Greedy decoding; at most {info.get('max_steps')} steps per conversation. Overall: {_overall(report)}.",
            ""]
    out += table(FAMILY_HEADER, family_rows(report), 5)
    if report["thinking_vs_instant"]:
        out += ["", "Thinking vs instant (same tasks):", ""]
        out += table(MODE_HEADER, mode_rows(report), 6)
    out += ["", "Targets:", ""]
    out += table(TARGET_HEADER, target_rows(report), 2)
    if report["warnings"]:
        out += ["", *[f"> note: {w}" for w in report["warnings"]]]
    return "\n".join(out) + "\n"


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """Rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(width=max(Console().width, 150))

    def table(title: str, header: list[str], rows: list[list[str]], right: int) -> Table:
        t = Table(title=Text(title), title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="right" if 1 <= i <= right else "left", no_wrap=i == 0)
        for row in rows:
            t.add_row(*(Text(c) for c in row))  # plain text: cells may hold brackets
        return t

    console.print(table(_title(report), FAMILY_HEADER, family_rows(report), 5))
    console.print(f"overall: {_overall(report)}; {report['info'].get('seconds', 0)} s", highlight=False)
    if report["thinking_vs_instant"]:
        console.print(table("thinking vs instant", MODE_HEADER, mode_rows(report), 6))
    console.print(table("targets", TARGET_HEADER, target_rows(report), 2))
    for w in report["warnings"]:
        console.print(Text.assemble(("note: ", "yellow"), w))
