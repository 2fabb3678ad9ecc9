"""Model output -> ``reasoning_content``, ``content`` and OpenAI ``tool_calls`` (spec §6).

The K2.5 output grammar after the prompt's ``<think>`` is::

    {reasoning}</think>{content}<|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON}<|tool_call_end|> ...
    <|tool_calls_section_end|>

One incremental state machine does all the work, so the non-streaming parse and the
concatenation of streamed deltas are the same by construction, however the text is chunked
(a special token split over two chunks is held back until it is complete or ruled out).
Behaviour follows vLLM's ``kimi_k2`` reasoning and tool parsers:

* reasoning ends at ``</think>`` or, implicitly, where a tool section begins;
  a leading ``<think>`` is consumed; with ``thinking=False`` everything is content;
* the singular ``<|tool_call_section_begin|>``/``_end|>`` variants are accepted;
* content is the text before the section (text after a closed section is appended to it);
* the function name is ``id.split(":")[0].split(".")[-1]``; arguments are the raw text between
  the markers with surrounding whitespace stripped;
* nothing is dropped silently: a call with invalid JSON arguments, a bad id, a missing
  ``<|tool_call_end|>`` or a call cut short by the next ``<|tool_call_begin|>`` is kept and its
  ``error`` set; every anomaly is also listed in ``errors``;
* marker strings never reach ``content`` or ``reasoning_content``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
SECTION_BEGIN_SINGULAR = "<|tool_call_section_begin|>"
SECTION_END_SINGULAR = "<|tool_call_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
END_OF_MESSAGE = ("<|im_end|>", "[EOS]", "[EOT]")

MARKERS = (
    THINK_BEGIN,
    THINK_END,
    SECTION_BEGIN,
    SECTION_END,
    SECTION_BEGIN_SINGULAR,
    SECTION_END_SINGULAR,
    CALL_BEGIN,
    ARG_BEGIN,
    CALL_END,
    *END_OF_MESSAGE,
)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_MARKER_STARTS = frozenset(m[0] for m in MARKERS)
_MAX_MARKER = max(len(m) for m in MARKERS)
_SECTION_BEGINS = (SECTION_BEGIN, SECTION_BEGIN_SINGULAR)
_SECTION_ENDS = (SECTION_END, SECTION_END_SINGULAR)
_ID_RE = re.compile(r"[^<]+:\d+", re.S)

# States of the machine.
REASONING, CONTENT, SECTION, CALL_ID, CALL_ARGS, DONE = "reasoning", "content", "section", "id", "args", "done"


def function_name_from_id(call_id: str) -> str:
    """``functions.get_weather:0`` -> ``get_weather`` (vLLM's rule)."""
    return call_id.split(":")[0].split(".")[-1]


@dataclass
class ToolCall:
    """One parsed call; ``error`` explains what was wrong with it (None when well-formed)."""

    index: int
    id: str
    name: str
    arguments: str
    error: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls[i]`` object."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    """A whole parsed response."""

    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """An OpenAI assistant message (``content`` is None when empty and tool calls were made)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
            if not self.content:
                msg["content"] = None
        return msg


class _Machine:
    """The incremental parser. ``feed`` returns events; ``close`` ends the stream."""

    def __init__(self, thinking: bool) -> None:
        self.state = REASONING if thinking else CONTENT
        self.thinking = thinking
        self.buf = ""
        self.events: list[tuple] = []
        self.errors: list[str] = []
        self.call_index = -1
        self.call_id = ""
        self.args_started = False
        self.args_pending_ws = ""
        self.args_text = ""
        self.stray = ""  # text between calls inside a section
        self.after_done = ""
        self.closed = False

    # -- input ---------------------------------------------------------------------------
    def feed(self, text: str) -> list[tuple]:
        if self.closed:
            raise RuntimeError("parser already finished")
        self.events = []
        self.buf += text
        while True:
            m = _MARKER_RE.search(self.buf)
            if m is None:
                break
            self._text(self.buf[: m.start()])
            self.buf = self.buf[m.end() :]
            self._marker(m.group())
        keep = self._partial_marker_start(self.buf)
        self._text(self.buf[:keep])
        self.buf = self.buf[keep:]
        return self.events

    def close(self) -> list[tuple]:
        if self.closed:
            return []
        self.events = []
        self._text(self.buf)
        self.buf = ""
        if self.state == REASONING and self.thinking:
            self.errors.append("output ended inside reasoning: no </think> and no tool section")
        if self.state == CALL_ID:
            self._finish_call("output ended inside a tool call id (no <|tool_call_argument_begin|>)")
        elif self.state == CALL_ARGS:
            self._finish_call("output ended before <|tool_call_end|>")
        elif self.state == SECTION:
            self.errors.append("output ended before <|tool_calls_section_end|>")
        self._flush_stray()
        if self.after_done.strip():
            self.errors.append(f"text after the end of the message was dropped: {self.after_done[:80]!r}")
        self.closed = True
        return self.events

    @staticmethod
    def _partial_marker_start(buf: str) -> int:
        """Index where a possible unfinished marker begins at the end of ``buf`` (len(buf) if none)."""
        for i in range(max(0, len(buf) - _MAX_MARKER + 1), len(buf)):
            if buf[i] in _MARKER_STARTS:
                tail = buf[i:]
                if any(m.startswith(tail) for m in MARKERS):
                    return i
        return len(buf)

    # -- text in the current state ---------------------------------------------------------
    def _text(self, text: str) -> None:
        if not text:
            return
        s = self.state
        if s == REASONING:
            self.events.append(("reasoning", text))
        elif s == CONTENT:
            self.events.append(("content", text))
        elif s == SECTION:
            self.stray += text
        elif s == CALL_ID:
            self.call_id += text
        elif s == CALL_ARGS:
            self._args_text(text)
        else:
            self.after_done += text

    def _args_text(self, text: str) -> None:
        # Stream arguments stripped of surrounding whitespace: leading whitespace is skipped,
        # trailing whitespace is held until something non-blank follows it.
        if not self.args_started:
            text = text.lstrip()
            if not text:
                return
            self.args_started = True
        full = self.args_pending_ws + text
        body = full.rstrip()
        self.args_pending_ws = full[len(body) :]
        if body:
            self.args_text += body
            self.events.append(("args", self.call_index, body))

    # -- markers ---------------------------------------------------------------------------
    def _marker(self, marker: str) -> None:
        s = self.state
        if s == DONE:
            self.after_done += marker
            return
        if marker in END_OF_MESSAGE:
            if s == CALL_ID:
                self._finish_call(f"message ended ({marker}) inside a tool call id")
            elif s == CALL_ARGS:
                self._finish_call(f"message ended ({marker}) before <|tool_call_end|>")
            elif s == SECTION:
                self.errors.append(f"message ended ({marker}) before <|tool_calls_section_end|>")
            self.state = DONE
            return
        if s in (REASONING, CONTENT):
            if marker == THINK_END and s == REASONING:
                self.state = CONTENT
            elif marker in _SECTION_BEGINS:
                self.state = SECTION
            elif marker == CALL_BEGIN:
                self.errors.append("<|tool_call_begin|> outside a tool section; treated as opening one")
                self._start_call()
            elif marker in (THINK_BEGIN, THINK_END):
                pass  # a leading <think> or a repeated think marker: never shown
            else:
                self.errors.append(f"stray {marker} in {s} dropped")
            return
        if s == SECTION:
            if marker == CALL_BEGIN:
                self._flush_stray()
                self._start_call()
            elif marker in _SECTION_ENDS:
                self._flush_stray()
                self.state = CONTENT
            else:
                self.errors.append(f"stray {marker} inside the tool section dropped")
            return
        if s == CALL_ID:
            if marker == ARG_BEGIN:
                self._begin_args()
            elif marker == CALL_END:
                self._finish_call("no <|tool_call_argument_begin|> in the tool call")
                self.state = SECTION
            elif marker == CALL_BEGIN:
                self._finish_call("tool call id cut short by the next <|tool_call_begin|>")
                self._start_call()
            elif marker in _SECTION_ENDS:
                self._finish_call("tool section ended inside a tool call id")
                self.state = CONTENT
            else:
                self.errors.append(f"stray {marker} inside a tool call id dropped")
            return
        # CALL_ARGS
        if marker == CALL_END:
            self._finish_call(None)
            self.state = SECTION
        elif marker == CALL_BEGIN:
            self._finish_call("arguments cut short by the next <|tool_call_begin|> (no <|tool_call_end|>)")
            self._start_call()
        elif marker in _SECTION_ENDS:
            self._finish_call("tool section ended before <|tool_call_end|>")
            self.state = CONTENT
        else:
            self.errors.append(f"{marker} inside tool-call arguments kept as text")
            self._args_text(marker)

    def _flush_stray(self) -> None:
        if self.stray.strip():
            self.errors.append(f"text between tool calls dropped: {self.stray[:80]!r}")
        self.stray = ""

    def _start_call(self) -> None:
        self.call_index += 1
        self.call_id = ""
        self.args_started = False
        self.args_pending_ws = ""
        self.args_text = ""
        self.state = CALL_ID

    def _begin_args(self) -> None:
        call_id = self.call_id.strip()
        self.call_id = call_id
        self.events.append(("call", self.call_index, call_id, function_name_from_id(call_id)))
        self.state = CALL_ARGS

    def _finish_call(self, error: str | None) -> None:
        if self.state == CALL_ID:
            self._begin_args()
        problems = [error] if error else []
        if not _ID_RE.fullmatch(self.call_id):
            problems.append(f"tool call id {self.call_id!r} does not look like functions.NAME:IDX")
        if error is None:
            try:
                json.loads(self.args_text)
            except ValueError as e:
                problems.append(f"arguments are not valid JSON ({e})")
        message = "; ".join(problems) or None
        if message:
            self.errors.append(f"tool call {self.call_index}: {message}")
        self.events.append(("end", self.call_index, message))
        self.state = SECTION


class StreamingParser:
    """Feed text deltas (e.g. detokenized tokens); get OpenAI-style delta dicts back.

    ``feed`` returns None when nothing can be released yet; ``finish`` flushes the rest.
    ``result()`` is the whole message so far, identical to :func:`parse_output` of the full text.
    """

    def __init__(self, thinking: bool = True) -> None:
        self._m = _Machine(thinking)
        self._out = ParsedOutput(reasoning_content="" if thinking else None)
        self._calls: dict[int, ToolCall] = {}

    def feed(self, text: str) -> dict[str, Any] | None:
        """Consume a text delta; return ``{"reasoning_content"?, "content"?, "tool_calls"?}`` or None."""
        return self._apply(self._m.feed(text))

    def finish(self) -> dict[str, Any] | None:
        """End of generation: release held-back text and close any open call."""
        return self._apply(self._m.close())

    def result(self) -> ParsedOutput:
        """Everything parsed so far."""
        out = self._out
        return ParsedOutput(
            content=out.content,
            reasoning_content=out.reasoning_content,
            tool_calls=[ToolCall(c.index, c.id, c.name, c.arguments, c.error) for c in out.tool_calls],
            errors=list(self._m.errors),
        )

    def _apply(self, events: list[tuple]) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        calls: list[dict[str, Any]] = []
        for ev in events:
            kind = ev[0]
            if kind == "reasoning":
                self._out.reasoning_content = (self._out.reasoning_content or "") + ev[1]
                delta["reasoning_content"] = delta.get("reasoning_content", "") + ev[1]
            elif kind == "content":
                self._out.content += ev[1]
                delta["content"] = delta.get("content", "") + ev[1]
            elif kind == "call":
                _, idx, call_id, name = ev
                call = ToolCall(idx, call_id, name, "")
                self._calls[idx] = call
                self._out.tool_calls.append(call)
                calls.append(
                    {"index": idx, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                )
            elif kind == "args":
                _, idx, text = ev
                self._calls[idx].arguments += text
                if calls and calls[-1]["index"] == idx:
                    calls[-1]["function"]["arguments"] += text
                else:
                    calls.append({"index": idx, "function": {"arguments": text}})
            elif kind == "end":
                self._calls[ev[1]].error = ev[2]
        if calls:
            delta["tool_calls"] = calls
        return delta or None


def parse_output(text: str, thinking: bool = True) -> ParsedOutput:
    """Parse a complete model output (the text after the generation prompt)."""
    p = StreamingParser(thinking)
    p.feed(text)
    p.finish()
    return p.result()


def parse_ids(tokenizer: Any, ids: Iterable[int], thinking: bool = True) -> ParsedOutput:
    """Parse generated ids token by token (tool-call and think tokens must not be skipped)."""
    decoder = tokenizer.stream_decoder()
    p = StreamingParser(thinking)
    for tid in ids:
        p.feed(decoder.push(tid))
    p.feed(decoder.flush())
    p.finish()
    return p.result()


class TokenStreamParser:
    """Token-id streaming: detokenizes incrementally (UTF-8 safe) and parses.

    Use with ``skip_special_tokens=False`` output: tool-call and think tokens are the markers.
    """

    def __init__(self, tokenizer: Any, thinking: bool = True) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._parser = StreamingParser(thinking)

    def feed(self, token_ids: int | Iterable[int]) -> dict[str, Any] | None:
        """Consume one id or several; return the delta they release (or None)."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self._parser.feed("".join(self._decoder.push(t) for t in ids))

    def finish(self) -> dict[str, Any] | None:
        """End of generation."""
        tail = self._parser.feed(self._decoder.flush())
        last = self._parser.finish()
        return _merge_deltas(tail, last)

    def result(self) -> ParsedOutput:
        """Everything parsed so far."""
        return self._parser.result()


def _merge_deltas(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a or not b:
        return a or b
    out = dict(a)
    for key in ("reasoning_content", "content"):
        if key in b:
            out[key] = out.get(key, "") + b[key]
    if "tool_calls" in b:
        out["tool_calls"] = out.get("tool_calls", []) + b["tool_calls"]
    return out


def next_tool_call_index(messages: Iterable[dict[str, Any]]) -> int:
    """Tool calls made so far in a conversation: the IDX the next ``functions.NAME:IDX`` should use.

    vLLM numbers Kimi tool-call ids globally across the conversation this way.
    """
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def make_tool_call_id(name: str, index: int) -> str:
    """The Kimi tool-call id convention ``functions.{name}:{index}``."""
    return f"functions.{name}:{index}"


class ReasoningParser:
    """vLLM-style reasoning split: ``extract(text) -> (reasoning_content, content)``.

    Content keeps any tool section verbatim, for a tool parser to read.
    """

    def __init__(self, thinking: bool = True) -> None:
        self.thinking = thinking

    def extract(self, text: str) -> tuple[str | None, str]:
        """Split a full output at ``</think>`` or at the tool section start."""
        if not self.thinking:
            return None, text
        body = text[len(THINK_BEGIN) :] if text.startswith(THINK_BEGIN) else text
        cut, skip = len(body), 0
        for marker in (THINK_END, *_SECTION_BEGINS):
            i = body.find(marker)
            if i != -1 and i < cut:
                cut, skip = i, (len(marker) if marker == THINK_END else 0)
        return body[:cut].replace(THINK_BEGIN, ""), body[cut + skip :]


class ToolCallParser:
    """vLLM-style tool extraction on content: ``extract(text) -> (content, tool_calls)``."""

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content before the section (and after it), and the calls inside."""
        parsed = parse_output(text, thinking=False)
        return parsed.content, parsed.tool_calls
