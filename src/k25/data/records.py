"""Using the records: training text with loss masks, validation through the parsers, scoring.

A record's conversation is one task in one mode. Its training sequence is the prompt up to the
last assistant turn plus that turn as the model generates it; the K2.5 template keeps the
reasoning of every earlier turn of the tool-use chain there, so one sequence holds every
assistant turn exactly as the model would emit it. :func:`training_segments` marks which spans
are model output (the loss targets).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..chat.parsers import parse_output
from ..chat.template import render, render_assistant_output
from .tools import check_tool_call

END = "<|im_end|>"


def is_chat(record: dict[str, Any]) -> bool:
    """Chat records have messages; text records have ``text``."""
    return bool(record.get("messages"))


def thinking(record: dict[str, Any]) -> bool:
    """Whether the record is in Thinking mode."""
    return record.get("mode") == "thinking"


def training_segments(record: dict[str, Any], mask_failed: bool = True) -> list[tuple[str, bool]]:
    """``[(text, is_target), ...]`` whose concatenation is the training sequence.

    Targets are the assistant outputs (``reasoning</think>content tool-calls<|im_end|>``); turns
    listed in ``meta.failed_turns`` (a call the data shows failing) are context, not targets,
    unless ``mask_failed`` is False. Text records are a single target segment.
    """
    if not is_chat(record):
        return [(record["text"], True)]
    msgs, tools, think = record["messages"], record.get("tools"), thinking(record)
    failed = set(record.get("meta", {}).get("failed_turns", ())) if mask_failed else set()
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(msgs[:i], tools, thinking=think, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise ValueError(f"{record.get('id')}: turn {i} does not extend the previous rendering")
        segments.append((prompt[len(done):], False))
        output = render_assistant_output(m, thinking=think) + END
        segments.append((output, i not in failed))
        done = prompt + output
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if last != len(msgs) - 1:
        raise ValueError(f"{record.get('id')}: the conversation must end with an assistant turn")
    return segments


def training_text(record: dict[str, Any]) -> str:
    """The whole training sequence as text (the segments joined)."""
    return "".join(text for text, _ in training_segments(record))


_SPECIAL = re.compile(r"<\|[a-z_0-9]+\|>|</?think>")


def plain_text(record: dict[str, Any]) -> str:
    """The training text with every special token replaced by a newline (a corpus for ``k25 vocab train``).

    The special tokens are single ids in the Kimi tokenizer, so the BPE must not spend merges on them.
    """
    return _SPECIAL.sub("\n", training_text(record)).strip("\n")


def prompt_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """What an evaluation sends the model: the messages before the first assistant turn."""
    msgs = record["messages"]
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:first]


def check_record(record: dict[str, Any]) -> list[str]:
    """Every problem with a record; empty when it is well-formed.

    Each assistant turn is rendered as the model would emit it and parsed back with
    :mod:`k25.chat.parsers`: reasoning, content and tool calls must come back unchanged, tool
    calls must name a declared tool with arguments that fit its schema, tool results must answer
    a call made earlier, and reasoning may appear only in Thinking mode.
    """
    rid = record.get("id", "?")
    errors: list[str] = []
    for field in ("id", "family", "split", "mode"):
        if not record.get(field):
            errors.append(f"{rid}: missing {field}")
    if not is_chat(record):
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            errors.append(f"{rid}: text record without text")
        return errors
    think = thinking(record)
    if record.get("mode") not in ("thinking", "instant"):
        errors.append(f"{rid}: mode must be thinking or instant, got {record.get('mode')!r}")
    tools = record.get("tools")
    pending: set[str] = set()
    for i, m in enumerate(record["messages"]):
        where = f"{rid} messages[{i}]"
        if m["role"] == "tool":
            if m.get("tool_call_id") not in pending:
                errors.append(f"{where}: result for unknown or answered call {m.get('tool_call_id')!r}")
            pending.discard(m.get("tool_call_id"))
            continue
        if m["role"] != "assistant":
            continue
        if pending:
            errors.append(f"{where}: calls {sorted(pending)} have no result before the next turn")
        has_reasoning = bool(m.get("reasoning_content"))
        if has_reasoning != think:
            errors.append(f"{where}: reasoning_content {'missing' if think else 'present'} in {record['mode']} mode")
        parsed = parse_output(render_assistant_output(m, thinking=think), thinking=think)
        if parsed.errors:
            errors.append(f"{where}: parser errors {parsed.errors}")
        if (parsed.reasoning_content or "") != (m.get("reasoning_content") or ""):
            errors.append(f"{where}: reasoning does not round-trip")
        if parsed.content != (m.get("content") or ""):
            errors.append(f"{where}: content does not round-trip")
        calls = m.get("tool_calls") or []
        if [c.to_openai() for c in parsed.tool_calls] != calls:
            errors.append(f"{where}: tool calls do not round-trip")
        for c in parsed.tool_calls:
            if c.error:
                errors.append(f"{where}: tool call {c.id}: {c.error}")
            errors += [f"{where}: {e}" for e in check_tool_call(c.name, c.arguments, tools)]
            pending.add(c.id)
    if pending:
        errors.append(f"{rid}: calls {sorted(pending)} never got a result")
    last = record["messages"][-1]
    if last["role"] != "assistant" or last.get("tool_calls"):
        errors.append(f"{rid}: must end with a final assistant answer")
    try:
        training_segments(record)
    except ValueError as e:
        errors.append(str(e))
    return errors


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def score_answer(record: dict[str, Any], text: str | None) -> bool:
    """Exact match of a final answer: the last number for numeric answers, the phrase for text ones.

    Numbers are compared after removing thousands separators; text answers must appear as whole
    words (case-insensitive), so "Varnholm" matches "Varnholm is the oldest".
    """
    if not text or record.get("answer") is None:
        return False
    expected = str(record["answer"])
    if record.get("answer_type") == "number":
        found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
        return bool(found) and float(found[-1]) == float(expected)
    return re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", text, re.IGNORECASE) is not None


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of one JSONL file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None


def record_stats(records: Iterable[dict[str, Any]], tokenizer: Any = None) -> dict[str, Any]:
    """Counts for one family/split: records, modes, tool calls, recoveries, characters, tokens, images."""
    from .vision import image_urls

    stats: dict[str, Any] = {"records": 0, "thinking": 0, "instant": 0, "tool_calls": 0, "recoveries": 0, "chars": 0}
    target_tokens = tokens = images = 0
    for rec in records:
        stats["records"] += 1
        images += len(image_urls(rec.get("messages") or []))
        if rec.get("mode") in ("thinking", "instant"):
            stats[rec["mode"]] += 1
        meta = rec.get("meta") or {}
        stats["tool_calls"] += meta.get("tool_calls", 0)
        stats["recoveries"] += bool(meta.get("failed_turns"))
        segments = training_segments(rec)
        stats["chars"] += sum(len(t) for t, _ in segments)
        if tokenizer is not None:
            for text, target in segments:
                n = len(tokenizer.encode(text))
                tokens += n
                target_tokens += n if target else 0
    if tokenizer is not None:
        stats["tokens"] = tokens  # an image counts as its one <|media_pad|> here, not its expanded positions
        stats["target_tokens"] = target_tokens
    if images:
        stats["images"] = images
    return stats
