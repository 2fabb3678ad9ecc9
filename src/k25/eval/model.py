"""The model side of ``k25 eval``: a small pluggable interface, batching, and the runtime's model adapter.

Anything that completes a batch of rendered K2.5 prompts can be evaluated: the interface is one
method, :meth:`Generator.generate` (prompt texts in, :class:`Completion` texts out). The real one
is :class:`EngineGenerator` (``k25.LLM``, greedy); tests plug in :class:`k25.eval.replay.ReplayModel`.

The conversations themselves are driven by the agents runtime (:class:`k25.agents.Agent` and
:class:`k25.agents.Swarm`), exactly as ``k25 agent``/``k25 swarm`` drive them, so tool execution,
error texts, call ids and critical-step accounting are the runtime's. Those call an OpenAI-style
``complete(messages, tools)``; :class:`EvalChatModel` answers it in-process the way k25's server
and the ``openai`` client would (K2.5 template, the chat parsers, ``functions.NAME:IDX`` ids), and
scores every tool call the model emits on the way. :class:`Batcher` gathers the requests of all
conversations in flight into one ``generate`` call, so the engine batches them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..agents.model import ModelReply, Usage, assistant_message
from ..chat.parsers import ParsedOutput, make_tool_call_id, next_tool_call_index, parse_output
from ..chat.template import GENERATION_PROMPT_THINKING, render
from ..data.tools import check_tool_call
from ..data.vision import image_urls


class EvalError(ValueError):
    """Bad ``k25 eval`` input (data directory, family names, model directory); the message says what to fix."""


@dataclass
class Completion:
    """One generated assistant turn: the text after the generation prompt (no closing ``<|im_end|>``).

    ``reasoning_tokens`` counts the tokens up to and including ``</think>`` (all of them if the
    reasoning never closed), as the server reports ``completion_tokens_details.reasoning_tokens``.
    """

    text: str
    tokens: int = 0
    reasoning_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = "stop"


@runtime_checkable
class Generator(Protocol):
    """What ``k25 eval`` needs from a model: greedy completions of a batch of rendered prompts, in order.

    An implementation may also offer ``text_loss(texts) -> [(summed NLL in nats, predicted tokens)]``
    (teacher-forced), which the prose families are scored with; without it they are reported as n/a.
    Prompts showing images (the visual families) come with ``images=``: per prompt, the image files
    (paths or data URLs) in the order of the prompt's ``<|media_pad|>`` placeholders; a generator
    without that keyword cannot be given them.
    """

    def generate(self, prompts: Sequence[str]) -> list[Completion]: ...


class Batcher:
    """Turns the single requests of many concurrent conversations into batched ``generate`` calls.

    A batch is sent once requests stop arriving for ``linger`` seconds (the conversations that are
    running tools get a moment to catch up); it runs in a worker thread, so tools keep running and
    new requests queue for the next batch meanwhile. One batch runs at a time.
    """

    def __init__(self, generator: Generator, linger: float = 0.01) -> None:
        self.generator = generator
        self.linger = linger
        self.queue: list[tuple[str, list[str], list[dict[str, Any]] | None, asyncio.Future[Completion]]] = []
        self.batches = 0
        self.largest = 0
        self._task: asyncio.Task[None] | None = None

    async def complete(self, prompt: str, images: Sequence[str] = (),
                       tools: list[dict[str, Any]] | None = None) -> Completion:
        """The completion of one prompt (showing ``images``, declaring ``tools``), batched with what else is pending.

        The tools reach a generator that holds tool calls to them (``tool_grammar``); others see only the prompt.
        """
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self.queue.append((prompt, list(images), tools, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.queue:
            seen = -1
            while seen != len(self.queue):  # wait until arrivals stop
                seen = len(self.queue)
                await asyncio.sleep(self.linger)
            batch, self.queue = self.queue, []
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            try:
                prompts = [p for p, _, _, _ in batch]
                kwargs: dict[str, Any] = {}
                if any(images for _, images, _, _ in batch):
                    kwargs["images"] = [images for _, images, _, _ in batch]
                if getattr(self.generator, "tool_grammar", False) and any(tools for _, _, tools, _ in batch):
                    kwargs["tools"] = [tools for _, _, tools, _ in batch]
                outs = await asyncio.to_thread(self.generator.generate, prompts, **kwargs)
                if len(outs) != len(batch):
                    raise RuntimeError(f"the model returned {len(outs)} completions for {len(batch)} prompts")
            except Exception as e:  # every waiting conversation learns of it
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (*_, fut), out in zip(batch, outs, strict=True):
                if not fut.done():
                    fut.set_result(out)


# ---------------------------------------------------------------------------------------------
# Tool-call validity: what k25 eval scores on every assistant turn.

# Parser anomalies that are not about tool calls (a reply cut off while reasoning, text after the end).
_NOT_TOOL_ERRORS = ("output ended inside reasoning", "text after the end of the message")
_BAD_JSON = "arguments are not valid JSON"  # how the parser starts a call's error when only its JSON is wrong


# Why a call is invalid, as the report counts it (the problems keep the full reasons).
INVALID_KINDS = {
    "cut_off": "cut off at the token or context limit",
    "malformed": "malformed markers",
    "undeclared": "undeclared tool",
    "arguments": "arguments not JSON or not fitting the schema",
}


@dataclass
class TurnCheck:
    """Tool calls one assistant turn emitted: how many, how many valid, and what was wrong."""

    calls: int = 0
    valid: int = 0
    problems: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)  # invalid calls by INVALID_KINDS key


def check_turn(parsed: ParsedOutput, tools: Sequence[dict[str, Any]] | None, cut_off: bool = False) -> TurnCheck:
    """Score the tool calls of one parsed turn against the declared tools.

    A call is valid when the parser found it well-formed (id, closing marker, JSON arguments), it
    names a declared tool and its arguments fit the schema (:func:`k25.data.check_tool_call`). A
    malformed tool-call section (stray or missing markers, text between calls) makes every call of
    the turn invalid, and counts as one invalid call when it holds none. ``cut_off`` says the
    generation stopped at its token or context limit: a call it left open is then counted as cut
    off rather than malformed, since the budget, not the model's format, ended it.
    """
    section = [e for e in parsed.errors if not e.startswith(("tool call ", *_NOT_TOOL_ERRORS))]
    declared = {t["function"]["name"] for t in tools or () if t.get("type") == "function"}

    def markers_kind(errors: list[str]) -> str:  # the budget ended the output, or the model broke the format
        return "cut_off" if cut_off and all(e.startswith("output ended") for e in errors) else "malformed"

    out = TurnCheck()
    for c in parsed.tool_calls:
        why = ([c.error] if c.error else []) + check_tool_call(c.name, c.arguments, tools) + section
        out.calls += 1
        if not why:
            out.valid += 1
            continue
        out.problems.append(f"{c.name or '(no name)'}: {'; '.join(why)}")
        if c.error and not c.error.startswith(_BAD_JSON):  # the parser's own problem beyond the JSON
            out.kinds[markers_kind([c.error])] += 1
        elif section:
            out.kinds[markers_kind(section)] += 1
        else:
            out.kinds["undeclared" if c.name not in declared else "arguments"] += 1
    if section and not parsed.tool_calls:
        out.calls += 1
        out.problems.append(f"malformed tool-call section: {'; '.join(section)}")
        out.kinds[markers_kind(section)] += 1
    return out


@dataclass
class Tally:
    """Per-conversation accounting (shared by a swarm's orchestrator and its sub-agents)."""

    turns: int = 0
    calls: int = 0
    valid: int = 0
    problems: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    truncated: int = 0  # turns that hit --max-tokens or the context length

    def add(self, check: TurnCheck, completion: Completion) -> None:
        self.turns += 1
        self.calls += check.calls
        self.valid += check.valid
        self.problems += check.problems
        self.kinds.update(check.kinds)
        self.truncated += is_cut_off(completion)


def is_cut_off(completion: Completion) -> bool:
    """Whether generation stopped at ``--max-tokens`` or the context length rather than by the model."""
    return completion.finish_reason in ("length", "context_full")


class EvalChatModel:
    """The agents runtime's model interface (``complete``, ``clone``, ``model``, ``stream``) served in-process.

    Each ``complete`` renders the conversation with the K2.5 template in the record's mode, gets a
    completion through the batcher, parses it with :mod:`k25.chat.parsers`, numbers the calls
    ``functions.NAME:IDX`` across the conversation as k25's server does and converts the message as
    the ``openai`` client path does (:func:`k25.agents.model.assistant_message`), so the history the
    runtime keeps is the one it would keep against ``k25 serve``. Every turn's tool calls are scored
    into ``tally``.
    """

    stream = False

    def __init__(self, batcher: Batcher, thinking: bool, tally: Tally, name: str = "k25-eval") -> None:
        self.batcher = batcher
        self.thinking = thinking
        self.tally = tally
        self.model = name

    def clone(self, **_: Any) -> EvalChatModel:
        """The swarm clones its sub-agent model (to hook rate limits, which cannot happen here)."""
        return EvalChatModel(self.batcher, self.thinking, self.tally, self.model)

    async def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **_: Any
    ) -> ModelReply:
        """One assistant turn for ``messages`` with ``tools`` declared."""
        prompt = render(messages, tools, thinking=self.thinking, add_generation_prompt=True)
        out = await self.batcher.complete(prompt, image_urls(messages), tools)
        parsed = parse_output(out.text, thinking=self.thinking)
        self.tally.add(check_turn(parsed, tools, cut_off=is_cut_off(out)), out)
        message = parsed.to_message()
        base = next_tool_call_index(messages)
        for i, call in enumerate(message.get("tool_calls") or []):
            call["id"] = make_tool_call_id(call["function"]["name"], base + i)
        usage = Usage(1, out.prompt_tokens, out.tokens, 0, out.reasoning_tokens)
        return ModelReply(assistant_message(message, messages), usage, out.finish_reason)


# ---------------------------------------------------------------------------------------------
# The real model: k25.LLM, greedy.


class EngineGenerator:
    """A checkpoint served by ``k25.LLM`` (continuous batching within each batch), greedy decoding.

    A prompt longer than the model's context gets an empty completion with finish reason
    ``context_full`` instead of failing the whole batch.
    """

    def __init__(
        self,
        model_dir: str | Path,
        max_tokens: int = 512,
        experts: str = "auto",
        concurrency: int = 16,
        tokenizer: str | Path | None = None,
        dtype: str | None = None,
        tool_grammar: bool = False,
    ) -> None:
        from ..chat.tokenizer import KimiTokenizer
        from ..config import K25Config
        from ..engine import LLM

        directory = Path(model_dir)
        if not directory.is_dir():
            raise EvalError(f"model directory {directory} does not exist")
        if not (directory / "config.json").is_file():
            raise EvalError(f"{directory} is not a checkpoint directory (no config.json)")
        tok_dir = Path(tokenizer) if tokenizer is not None else directory
        if not (tok_dir / "tiktoken.model").is_file():
            raise EvalError(
                f"{tok_dir} has no tokenizer (tiktoken.model): k25 eval renders chat prompts as text; "
                "pass --tokenizer DIR"
            )
        config = K25Config.from_json_file(directory)
        max_len = config.text_config.max_position_embeddings
        self.directory, self.dtype = directory, dtype
        self.has_vision = config.vision_config is not None
        self.media_token_id = config.media_placeholder_token_id
        self._vision: Any = None
        self.llm = LLM(directory, tokenizer=KimiTokenizer.from_pretrained(tok_dir), experts=experts, dtype=dtype,
                       max_num_seqs=concurrency, cache_tokens=max(32768, concurrency * min(max_len, 4096)))
        self.tokenizer = self.llm.tokenizer
        self.max_tokens = max_tokens
        self.max_len = max_len
        self.tool_grammar = tool_grammar  # hold tool calls to the declared tools, as `k25 serve` does by default
        self.think_end = self.tokenizer.token_to_id("</think>")
        self.stop_ids = self.llm.engine.eos_ids

    def vision_model(self) -> Any:
        """The checkpoint's K25ForConditionalGeneration, loaded on first use (its tower encodes the images)."""
        if not self.has_vision:
            raise EvalError(f"{self.directory} has no vision tower (no vision_config): it cannot be shown the "
                            "images of the visual families; leave them out with --families")
        if self._vision is None:
            from ..checkpoint.model_io import load_model

            self._vision = load_model(self.directory, dtype=self.dtype, vision=True)
        return self._vision

    def _media(self, ids: list[int], images: Sequence[str]) -> tuple[list[int], Any]:
        """The prompt ids with each image's placeholder expanded, and the images' embeddings (as the server)."""
        import torch

        from ..media import MediaError, expand_media_placeholders, pack_media, preprocess_image

        try:
            items = [preprocess_image(src) for src in images]
            ids = expand_media_placeholders(ids, items, self.media_token_id)
        except MediaError as e:
            raise EvalError(str(e)) from None
        with torch.no_grad():
            embeds = torch.cat(self.vision_model().encode_media(*pack_media(items)))
        return ids, embeds

    def _run(self, ids: list[list[int]], embeds: list[Any], params: Any) -> list[Any]:
        """``LLMEngine.run`` with each request's media embeddings attached."""
        media = [{"media_embeds": e, "media_token_id": None if e is None else self.media_token_id} for e in embeds]
        return self.llm.engine.run(ids, params, request_kwargs=media)

    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[str]] | None = None,
                 tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[Completion]:
        """Greedy completions of ``prompts`` (showing ``images``: per prompt, its image files), in one engine run.

        ``tools`` (per prompt, its declared tools) hold the tool calls to them when ``tool_grammar`` is on.
        """
        from ..engine import SamplingParams
        from ..engine.constraints import ToolCallConstraint

        ids = [self.tokenizer.encode(p, allow_special_tokens=True) for p in prompts]
        embeds: list[Any] = [None] * len(ids)
        for i, srcs in enumerate(images or []):
            if srcs:
                ids[i], embeds[i] = self._media(ids[i], srcs)
        fits = [i for i, x in enumerate(ids) if len(x) < self.max_len]
        def params(i: int) -> SamplingParams:
            grammar = tools[i] if self.tool_grammar and tools is not None and tools[i] else None
            constraint = ToolCallConstraint(self.tokenizer, grammar) if grammar else None
            return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, constraint=constraint)

        plist = [params(i) for i in fits]
        if any(e is not None for e in embeds):
            outs = self._run([ids[i] for i in fits], [embeds[i] for i in fits], plist) if fits else []
        else:
            outs = self.llm.generate([ids[i] for i in fits], plist) if fits else []
        done: dict[int, Completion] = {}
        for i, out in zip(fits, outs, strict=True):
            gen = list(out.output_ids)
            if gen and out.finish_reason == "stop" and gen[-1] in self.stop_ids:
                gen = gen[:-1]
            reasoning = 0
            if prompts[i].endswith(GENERATION_PROMPT_THINKING):
                reasoning = gen.index(self.think_end) + 1 if self.think_end in gen else len(gen)
            done[i] = Completion(self.tokenizer.decode(gen), len(out.output_ids), reasoning, len(ids[i]),
                                 out.finish_reason)
        return [done.get(i, Completion("", 0, 0, len(ids[i]), "context_full")) for i in range(len(prompts))]

    def text_loss(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """Teacher-forced (summed NLL, predicted tokens) of each text, tokenized as training does.

        The text is encoded without special tokens and ends in EOS (``k25.train.data.curriculum_example``);
        texts longer than the context are cut to it.
        """
        import torch
        import torch.nn.functional as F

        out = []
        model = self.llm.model
        for text in texts:
            ids = (self.tokenizer.encode(text, allow_special_tokens=False) + [self.tokenizer.eos_id])[: self.max_len]
            if len(ids) < 2:
                out.append((0.0, 0))
                continue
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x)
            nll = F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum")
            out.append((float(nll), len(ids) - 1))
        return out


def describe(generator: Any) -> str:
    """A short name for reports."""
    llm = getattr(generator, "llm", None)
    return str(llm.source) if llm is not None else type(generator).__name__

