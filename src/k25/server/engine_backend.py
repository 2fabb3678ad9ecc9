"""The server's Backend over k25's continuous-batching engine, stepped in one background thread.

HTTP handlers run on the asyncio loop; the engine is synchronous and owns the model. One worker
thread takes new requests and aborts from a command queue between steps, runs `engine.step()`,
and hands each request's new tokens to its asyncio queue. Many clients therefore share every
forward, and a client that goes away frees its cache blocks before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from ..chat.tokenizer import KimiTokenizer
from ..engine.engine import LLMEngine, RequestOutput
from ..engine.sampling import SamplingParams
from ..model.multimodal import K25ForConditionalGeneration
from .backend import QueueFullError, StepOutput
from .protocol import SamplingDefaults


class EngineBackend:
    """Serve `engine` to asyncio callers; at most `max_waiting` requests wait before 429s."""

    def __init__(self, engine: LLMEngine, tokenizer: KimiTokenizer, model_name: str, max_waiting: int = 64,
                 max_model_len: int | None = None, vision_model: K25ForConditionalGeneration | None = None,
                 sampling_defaults: SamplingDefaults | None = None) -> None:
        if engine.tokenizer is None:
            engine.tokenizer = tokenizer
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len or engine.max_model_len
        self.max_waiting = max_waiting
        # The multimodal model whose vision tower encodes media (its language model is the engine's).
        self.vision_model = vision_model
        self.supports_media = vision_model is not None
        # The checkpoint's generation_config.json defaults (None: K2.5's model card).
        self.sampling_defaults = sampling_defaults
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._delivered: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="k25-engine", daemon=True)
        self._thread.start()

    # ---- Backend ---------------------------------------------------------------------------------
    def stream(self, request_id: str, prompt_ids: list[int], sampling: dict[str, Any], max_tokens: int | None,
               media: tuple[Any, Any] | None = None) -> AsyncIterator[StepOutput]:
        if self.stats()["queue_depth"] >= self.max_waiting:
            raise QueueFullError(retry_after=1.0)
        params = SamplingParams(**sampling, max_tokens=max_tokens)
        sink: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._sinks[request_id] = (asyncio.get_running_loop(), sink)
        if media is not None and self.vision_model is None:
            raise ValueError("this backend has no vision tower")
        self._commands.put(("add", (request_id, list(prompt_ids), params, media)))
        return self._drain(request_id, sink)

    async def _drain(self, request_id: str, sink: asyncio.Queue) -> AsyncIterator[StepOutput]:
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            with self._lock:
                self._sinks.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict[str, float]:
        sched = self.engine.scheduler
        return {"queue_depth": len(sched.waiting) + self._commands.qsize(), "running": len(sched.running)}

    def close(self) -> None:
        self._stop.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    # ---- worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            try:
                self._handle(self._commands.get(block=block, timeout=0.5 if block else None))
                while True:
                    self._handle(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                for rid in list(self._sinks):
                    self._send(rid, RuntimeError(f"generation failed: {e}"))
                    self.engine.abort(rid)
                continue
            for out in outputs:
                self._deliver(out)

    def _handle(self, command: tuple[str, Any]) -> None:
        kind, arg = command
        if kind == "add":
            rid, ids, params, media = arg
            try:
                extra = {}
                if media is not None:  # the vision tower runs here, on the engine's thread, once per request
                    with torch.no_grad():
                        embeds = self.vision_model.encode_media(*media)
                    extra = {"media_embeds": torch.cat(embeds),
                             "media_token_id": self.vision_model.k25_config.media_placeholder_token_id}
                self.engine.add_request(ids, params, request_id=rid, **extra)
            except ValueError as e:
                self._send(rid, e)
                return
            self._delivered[rid] = 0
            if self.engine.sequences[rid].is_finished:  # max_tokens == 0
                self._deliver(self.engine.output(rid))
        elif kind == "abort" and self.engine.abort(arg):
            self.engine.release(arg)
            self._delivered.pop(arg, None)

    def _deliver(self, out: RequestOutput) -> None:
        seen = self._delivered.get(out.request_id, 0)
        new_lp = out.logprobs[seen:] if out.logprobs else []
        self._delivered[out.request_id] = len(out.output_ids)
        step = StepOutput(
            token_ids=list(out.new_ids),
            finish_reason=("stop" if out.finish_reason == "abort" else out.finish_reason) if out.finished else None,
            prompt_tokens=len(out.prompt_ids),
            cached_tokens=out.num_cached_tokens,
            logprobs=[(lp.logprob, list(lp.top)) for lp in new_lp] or None,
            stop_reason=out.stop_reason,
        )
        self._send(out.request_id, step)
        if out.finished:
            self.engine.release(out.request_id)
            self._delivered.pop(out.request_id, None)

    def _send(self, request_id: str, item: Any) -> None:
        with self._lock:
            sink = self._sinks.get(request_id)
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, item)
