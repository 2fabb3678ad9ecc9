"""Building OpenAI-style conversations with K2.5 tool-call ids, and records around them.

:class:`Chat` keeps the ``functions.NAME:IDX`` numbering global across the conversation (as vLLM
and the K2.5 template expect), runs every tool call through a real executor to get its result,
and drops reasoning in Instant mode so a record can never carry reasoning it should not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from ..chat.parsers import make_tool_call_id

Executor = Callable[[str, dict[str, Any]], str]


class Chat:
    """One conversation under construction."""

    def __init__(self, tools: list[dict[str, Any]] | None, thinking: bool, system: str | None = None) -> None:
        self.tools = tools
        self.thinking = thinking
        self.messages: list[dict[str, Any]] = []
        self.failed_turns: list[int] = []
        self.tool_calls = 0
        if system is not None:
            self.messages.append({"role": "system", "content": system})

    def user(self, text: str, images: Sequence[str] = ()) -> None:
        """Append the user's task; with ``images`` (URLs), content parts: the images, then the text."""
        if not images:
            self.messages.append({"role": "user", "content": text})
            return
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        self.messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})

    def _assistant(self, reasoning: str, content: str | None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if self.thinking:
            msg["reasoning_content"] = reasoning
        return msg

    def call(
        self, reasoning: str, calls: list[tuple[str, dict[str, Any]]], execute: Executor, failed: bool = False
    ) -> list[str]:
        """An assistant turn making ``calls`` (run in order through ``execute``); returns the results.

        ``failed`` marks the turn as one whose call the data shows going wrong, so trainers can
        leave it out of the loss while still training on the recovery.
        """
        msg = self._assistant(reasoning, None)
        msg["tool_calls"] = []
        for name, args in calls:
            call_id = make_tool_call_id(name, self.tool_calls)
            self.tool_calls += 1
            msg["tool_calls"].append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            )
        if failed:
            self.failed_turns.append(len(self.messages))
        self.messages.append(msg)
        results = []
        for (name, args), tc in zip(calls, msg["tool_calls"], strict=True):
            result = execute(name, args)
            results.append(result)
            self.messages.append({"role": "tool", "tool_call_id": tc["id"], "content": result})
        return results

    def answer(self, reasoning: str, content: str) -> None:
        """The final assistant turn (no tool calls)."""
        self.messages.append(self._assistant(reasoning, content))


def record(
    family: str,
    chat: Chat,
    answer: str,
    answer_type: str,
    key: str,
    **meta: Any,
) -> dict[str, Any]:
    """A chat record (``id`` and ``split`` are filled in by the generator)."""
    return {
        "id": "",
        "family": family,
        "split": "",
        "mode": "thinking" if chat.thinking else "instant",
        "messages": chat.messages,
        "tools": chat.tools,
        "answer": answer,
        "answer_type": answer_type,
        "meta": {"key": key, "tool_calls": chat.tool_calls, "failed_turns": chat.failed_turns, **meta},
    }
