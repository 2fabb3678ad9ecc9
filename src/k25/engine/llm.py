"""`k25.LLM`: the Python API over the engine (generate, chat, stream).

    >>> llm = k25.LLM("path/to/checkpoint")              # or a preset name: random weights
    >>> llm.generate([[1, 2, 3]], k25.SamplingParams(temperature=0, max_tokens=8))[0].output_ids
    >>> llm.chat([{"role": "user", "content": "Hi"}])   # parsed assistant message (needs a tokenizer)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine import EngineConfig, LLMEngine, RequestOutput
from .sampling import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """A model plus an engine. `model` is a checkpoint directory, a preset name, or a model object.

    `experts`: "auto" (INT4 checkpoints stay INT4, others run the fused full-precision path),
    "fused", "int4" (quantise on load) or "reference". `tokenizer`: a directory holding
    `tiktoken.model`, a `KimiTokenizer`, or None (then the checkpoint directory is tried; a
    preset has none, and text prompts and `chat` fail with a clear error). `offload=True` keeps
    a checkpoint's routed experts memory-mapped on disk (see offload.py). Other keyword
    arguments go to :class:`EngineConfig`.
    """

    def __init__(
        self,
        model: str | Path | torch.nn.Module = "tiny",
        *,
        tokenizer: Any = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        experts: str = "auto",
        offload: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        from ..chat.tokenizer import KimiTokenizer

        self.source = str(model) if not isinstance(model, torch.nn.Module) else type(model).__name__
        directory: Path | None = None
        if isinstance(model, torch.nn.Module):
            net, mode = model, "fused" if experts == "auto" else experts
        elif Path(model).exists():
            directory = Path(model)
            if offload:
                from .offload import load_offloaded_text_model

                net, mode = load_offloaded_text_model(directory, dtype), "reference"
            else:
                net, mode = _load(directory, dtype, experts)
        else:
            if offload:
                raise ValueError(f"offload needs a checkpoint directory; {model!r} is not one")
            from ..checkpoint.model_io import build_model
            from ..config import preset

            net = build_model(preset(str(model)), seed=seed, dtype=dtype, vision=False)
            mode = "fused" if experts == "auto" else experts
        if tokenizer is None and directory is not None and (directory / "tiktoken.model").exists():
            tokenizer = KimiTokenizer.from_pretrained(directory)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = KimiTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(net, EngineConfig(experts=mode, **engine_kwargs), tokenizer=tokenizer)
        self.model = self.engine.model

    # ---- prompts -----------------------------------------------------------------------------

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer("text prompts").encode(prompt, allow_special_tokens=True)
        return [int(t) for t in prompt]

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                f"{what} need a tokenizer, and {self.source} has none (a preset or random model has no "
                "vocabulary): pass LLM(..., tokenizer='dir/with/tiktoken.model') or give token ids"
            )
        return self.tokenizer

    def _batch(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            return [self._ids(prompts)]
        return [self._ids(p) for p in prompts]

    # ---- API -------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids), all batched together; outputs in prompt order."""
        batch = self._batch(prompts)
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else sampling_params
        return self.engine.run(batch, params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one output per new token (`new_ids`/`new_text` are the delta) until the request ends.

        Closing the iterator early cancels the request and frees its cache blocks.
        """
        rid = self.engine.add_request(self._ids(prompt), sampling_params)
        try:
            if self.engine.sequences[rid].is_finished:
                yield self.engine.output(rid)
                return
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)
            self.engine.release(rid)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = True,
        sampling_params: SamplingParams | None = None,
    ) -> dict[str, Any]:
        """Render the conversation with the K2.5 template, generate until `<|im_end|>`, parse the reply.

        Returns an OpenAI-style assistant message (`content`, `reasoning_content`, `tool_calls`).
        """
        ids, _ = self.chat_prompt(messages, tools, thinking)
        params = sampling_params or SamplingParams(temperature=1.0 if thinking else 0.6, top_p=0.95, max_tokens=1024)
        out = self.engine.run([ids], params)[0]
        return self.parse(out, thinking)

    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = True,
    ) -> tuple[list[int], str]:
        """(token ids, text) of the prompt `chat` sends."""
        from ..chat.template import render

        tok = self._need_tokenizer("chat")
        text = render(messages, tools=tools, thinking=thinking)
        return tok.encode(text, allow_special_tokens=True), text

    def parse(self, out: RequestOutput, thinking: bool = True) -> dict[str, Any]:
        """The assistant message in a finished output (the closing stop token is not part of it)."""
        from ..chat.parsers import parse_ids

        tok = self._need_tokenizer("chat")
        ids = list(out.output_ids)
        if ids and out.finish_reason == "stop" and ids[-1] in self.engine.eos_ids | {tok.im_end_id}:
            ids = ids[:-1]
        msg = parse_ids(tok, ids, thinking=thinking).to_message()
        msg["finish_reason"] = out.finish_reason
        return msg


def _load(directory: Path, dtype: torch.dtype | str | None, experts: str) -> tuple[torch.nn.Module, str]:
    """A checkpoint's text model and the expert mode to serve it with."""
    from ..checkpoint.model_io import load_model, text_model
    from ..config import K25Config
    from .loading import is_int4_checkpoint, load_int4_text_model

    config = K25Config.from_json_file(directory)
    if is_int4_checkpoint(config) and experts in ("auto", "int4"):
        return load_int4_text_model(directory, dtype), "int4"
    return text_model(load_model(directory, dtype=dtype, vision=False)), "fused" if experts == "auto" else experts
