"""An oracle model that replays the curriculum's own assistant turns: a check of the harness itself.

Given the records, :class:`ReplayModel` answers a prompt with turn *k* of the record whose
opening (system prompt and task, rendered) the prompt starts with, *k* being the number of
assistant turns already in the prompt. Played through ``k25 eval`` it must score 100% accuracy
and 100% valid tool calls, and every prompt the harness renders must equal, byte for byte, the
prompt the data was rendered with at that turn (``mismatches`` lists those that differ): the
runtime's tool results, call ids and sub-agent answers reproduce the data exactly. The one
inherent exception is the data's injected outages (a tool "timed out"), which a live tool does
not repeat (:func:`injected_outage`).

``mutate(record, turn, text)`` rewrites a replayed turn, to test that each kind of mistake is
scored as it should be. Prompts showing images are matched on their image files too (by file
name: the visual families name each PNG by its hash), since many pictures share one question.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from ..chat.template import GENERATION_PROMPT_INSTANT, GENERATION_PROMPT_THINKING, render, render_assistant_output
from ..data.records import is_chat
from ..data.vision import image_urls
from .model import Completion

ASSISTANT = "<|im_assistant|>"
THINK_END = "</think>"
FALLBACK = "I cannot continue this conversation."

Mutation = Callable[[dict[str, Any], int, str], str]


def injected_outage(record: dict[str, Any]) -> bool:
    """Whether the record shows a tool timing out (an outage the generator injected, not a live result)."""
    return any(m["role"] == "tool" and "timed out after" in str(m.get("content")) for m in record.get("messages", []))


@dataclass
class _Script:
    record: dict[str, Any]
    prompts: list[str]  # the data's prompt before each assistant turn
    outputs: list[str]  # each assistant turn as the model emits it (no <|im_end|>)


class ReplayModel:
    """A :class:`k25.eval.model.Generator` that replays records; tokens are counted as UTF-8 bytes."""

    def __init__(self, records: Iterable[dict[str, Any]], mutate: Mutation | None = None) -> None:
        self.scripts: dict[tuple[str, tuple[str, ...]], _Script] = {}
        for rec in records:
            if not is_chat(rec):
                continue
            msgs, tools, think = rec["messages"], rec.get("tools"), rec.get("mode") == "thinking"
            prompts, outputs = [], []
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    prompts.append(render(msgs[:i], tools, thinking=think, add_generation_prompt=True))
                    outputs.append(render_assistant_output(m, thinking=think))
            key = (prompts[0], _names(image_urls(msgs)))
            self.scripts.setdefault(key, _Script(rec, prompts, outputs))  # first of equal openings
        self.mutate = mutate
        self.mismatches: list[tuple[str, int]] = []  # (record id, turn) whose prompt differs from the data's
        self.unknown: list[str] = []  # prompts no record opens, or past a record's last turn
        self.calls = 0

    def _script(self, prompt: str, images: Sequence[str]) -> _Script | None:
        first = prompt.find(ASSISTANT)
        if first < 0:
            return None
        # The mode is the current generation prompt's: an Instant opening extends a Thinking one.
        gen = GENERATION_PROMPT_INSTANT if prompt.endswith(GENERATION_PROMPT_INSTANT) else GENERATION_PROMPT_THINKING
        if not prompt.startswith(gen, first):
            return None
        return self.scripts.get((prompt[: first + len(gen)], _names(images)))

    def complete_one(self, prompt: str, images: Sequence[str] = ()) -> Completion:
        """The replayed turn for ``prompt`` showing ``images`` (a short final answer when there is none)."""
        self.calls += 1
        thinking = prompt.endswith(GENERATION_PROMPT_THINKING)
        script = self._script(prompt, images)
        turn = prompt.count(ASSISTANT) - 1
        if script is None or turn >= len(script.outputs):
            self.unknown.append(prompt)
            text = (THINK_END if thinking else "") + FALLBACK
        else:
            if prompt != script.prompts[turn]:
                self.mismatches.append((script.record["id"], turn))
            text = script.outputs[turn]
            if self.mutate is not None:
                text = self.mutate(script.record, turn, text)
        reasoning = len(text[: text.find(THINK_END) + len(THINK_END)].encode()) if thinking and THINK_END in text \
            else (len(text.encode()) if thinking else 0)
        return Completion(text, len(text.encode()) + 1, reasoning, len(prompt.encode()), "stop")

    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[str]] | None = None) -> list[Completion]:
        """Replayed turns for a batch of prompts (``images``: per prompt, the image files it shows)."""
        return [self.complete_one(p, images[i] if images else ()) for i, p in enumerate(prompts)]


def _names(urls: Sequence[str]) -> tuple[str, ...]:
    """Image files by name (a record's relative URL and the path the harness resolves it to agree)."""
    return tuple(PurePath(u).name for u in urls)
