"""The model side of an agent: one chat-completions call through the official ``openai`` client.

Works with any OpenAI-compatible endpoint (k25's server, vLLM/SGLang running Kimi K2.5, Moonshot's
API). Transport errors, timeouts, 429s and 5xx answers are retried here with exponential backoff
and jitter (``Retry-After`` honoured); anything else (400, 401, 404...) is the caller's problem and
is raised at once, since retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import openai

from k25.chat.parsers import make_tool_call_id, next_tool_call_index

ENV_BASE_URL = ("K25_BASE_URL", "OPENAI_BASE_URL")
ENV_API_KEY = ("K25_API_KEY", "OPENAI_API_KEY", "MOONSHOT_API_KEY")
ENV_MODEL = ("K25_MODEL",)


def env_first(names: tuple[str, ...]) -> str | None:
    """The first of these environment variables that is set and not empty."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@dataclass
class Pricing:
    """Dollars per million tokens; cached input falls back to the input price when not given."""

    input_per_m: float = 0.60
    output_per_m: float = 3.00
    cached_input_per_m: float | None = None

    def cost(self, usage: Usage) -> float:
        cached = usage.cached_tokens if self.cached_input_per_m is not None else 0
        cached_price = self.cached_input_per_m or 0.0
        return (
            (usage.prompt_tokens - cached) * self.input_per_m
            + cached * cached_price
            + usage.completion_tokens * self.output_per_m
        ) / 1e6


@dataclass
class Usage:
    """Token counts summed over requests."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> Usage:
        for k in ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Usage:
        return cls(**{k: int(d.get(k, 0) or 0) for k in cls.__dataclass_fields__})

    @classmethod
    def from_api(cls, usage: Any) -> Usage:
        """From an OpenAI ``usage`` object, with Moonshot's top-level ``cached_tokens`` too."""
        if usage is None:
            return cls(requests=1)
        d = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
        cached = (d.get("prompt_tokens_details") or {}).get("cached_tokens") or d.get("cached_tokens") or 0
        reasoning = (d.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
        return cls(1, d.get("prompt_tokens") or 0, d.get("completion_tokens") or 0, cached, reasoning)


@dataclass
class ModelReply:
    """One assistant turn, as a message dict ready to append to the history."""

    message: dict[str, Any]
    usage: Usage
    finish_reason: str | None = None
    attempts: int = 1


class ModelError(Exception):
    """The endpoint failed in a way retrying does not fix, or retries ran out."""


class RateLimited(ModelError):
    """The endpoint kept answering 429 after every retry (the swarm requeues such tasks)."""


RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's own errors (a stream can break with these mid-way): httpx, or httpx2 in newer SDKs."""
    found: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


STREAM_ERRORS = (*RETRYABLE, *_transport_errors())


@dataclass
class ChatModel:
    """An endpoint plus model name and request options; ``complete`` is one assistant turn.

    ``thinking`` None sends nothing (the server's default, thinking for K2.5); True/False sends
    both the Moonshot form (``thinking: {type}``) and the vLLM/SGLang form
    (``chat_template_kwargs.thinking``) unless ``thinking_style`` names one.
    """

    model: str = "kimi-k2.5"
    base_url: str | None = None
    api_key: str | None = None
    thinking: bool | None = None
    thinking_style: str = "both"  # moonshot | vllm | both
    # Stream replies (SSE): the agent then starts each tool as soon as its call has streamed in.
    stream: bool = False
    max_retries: int = 4
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    timeout: float = 600.0
    max_completion_tokens: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_options: dict[str, Any] = field(default_factory=dict)
    on_rate_limit: Callable[[], None] | None = None
    _client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url or env_first(ENV_BASE_URL)
        self.api_key = self.api_key or env_first(ENV_API_KEY)
        if not self.base_url:
            raise ModelError(
                "no endpoint: pass base_url (--base-url) or set K25_BASE_URL / OPENAI_BASE_URL"
            )

    def clone(self, **changes: Any) -> ChatModel:
        """The same endpoint with some options changed (sub-agents share the HTTP client)."""
        kw = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "_client"}
        kw.update(changes)
        out = ChatModel(**kw)
        out._client = self._client
        return out

    @property
    def client(self) -> openai.AsyncOpenAI:
        """One SDK client per event loop (its connection pool cannot outlive the loop that made it)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            # Retries are ours (they must be visible to the swarm's rate-limit logic), not the SDK's.
            self._client = (loop, openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self.api_key or "EMPTY", max_retries=0, timeout=self.timeout
            ))
        return self._client[1]

    def _body(self) -> dict[str, Any]:
        body = dict(self.extra_body)
        if self.thinking is not None:
            if self.thinking_style in ("moonshot", "both"):
                body.setdefault("thinking", {"type": "enabled" if self.thinking else "disabled"})
            if self.thinking_style in ("vllm", "both"):
                body.setdefault("chat_template_kwargs", {})["thinking"] = self.thinking
        return body

    def _delay(self, attempt: int, error: Exception) -> float:
        retry_after = None
        response = getattr(error, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after"))
            except (TypeError, ValueError):
                retry_after = None
        base = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay = base * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        on_tool_call: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> ModelReply:
        """One assistant turn for ``messages``; retried on transport errors, 429 and 5xx.

        When streaming, ``on_tool_call`` gets each tool call (with its final id) as soon as it has
        streamed in completely; a stream that breaks after that is not retried (a tool has started).
        """
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, **self.request_options, **options}
        if self.stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
        if tools:
            kwargs["tools"] = tools
        if self.max_completion_tokens:
            kwargs["max_completion_tokens"] = self.max_completion_tokens
        body = self._body()
        if body:
            kwargs["extra_body"] = body
        attempt = 0
        while True:
            acc = _StreamedReply(messages, on_tool_call) if self.stream else None
            try:
                resp = await self.client.chat.completions.create(**kwargs)
                if acc is not None:
                    async for chunk in resp:
                        acc.feed(chunk)
                break
            except STREAM_ERRORS as e:
                if acc is not None and acc.emitted:
                    raise ModelError(f"{self.base_url}: the stream broke after tools had started: {e}") from e
                if isinstance(e, openai.RateLimitError) and self.on_rate_limit:
                    self.on_rate_limit()
                if attempt >= self.max_retries:
                    what = "rate-limited (429)" if isinstance(e, openai.RateLimitError) else type(e).__name__
                    msg = f"{self.base_url}: {what} after {attempt + 1} attempts: {e}"
                    raise (RateLimited(msg) if isinstance(e, openai.RateLimitError) else ModelError(msg)) from e
                await asyncio.sleep(self._delay(attempt, e))
                attempt += 1
            except openai.APIStatusError as e:
                raise ModelError(f"{self.base_url} answered {e.status_code}: {e.message}") from e
            except openai.APIError as e:  # e.g. an error event in the middle of a stream
                raise ModelError(f"{self.base_url}: {e}") from e
        if acc is not None:
            message, finish = acc.finish()
            return ModelReply(message, Usage.from_api(acc.usage), finish, attempt + 1)
        if not resp.choices:
            raise ModelError(f"{self.base_url} returned no choices (an empty response)")
        choice = resp.choices[0]
        message = assistant_message(choice.message, messages)
        return ModelReply(message, Usage.from_api(resp.usage), choice.finish_reason, attempt + 1)


class _CallIds:
    """Final tool-call ids: the server's, unless missing or already used in the conversation."""

    def __init__(self, history: list[dict[str, Any]]) -> None:
        self.first = next_tool_call_index(history)
        self.used = {c.get("id") for m in history for c in m.get("tool_calls") or []}

    def fix(self, call_id: str | None, name: str, position: int) -> str:
        if not call_id or call_id in self.used:  # results are matched by id: it must be unique
            call_id = make_tool_call_id(name, self.first + position)
            while call_id in self.used:
                call_id += "_"
        self.used.add(call_id)
        return call_id


def _complete_json_object(text: str) -> bool:
    s = text.strip()
    if not (s.startswith("{") and s.endswith("}")):
        return False
    try:
        return isinstance(json.loads(s), dict)
    except ValueError:
        return False


class _StreamedReply:
    """Assembles a streamed reply; hands out each tool call the moment the next one begins."""

    def __init__(self, history: list[dict[str, Any]], on_tool_call: Callable[[dict[str, Any]], None] | None):
        self.ids = _CallIds(history)
        self.on_tool_call = on_tool_call
        self.content: list[str] = []
        self.reasoning: list[str] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.done: list[dict[str, Any]] = []
        self.emitted = False
        self.finish_reason: str | None = None
        self.usage: Any = None

    def feed(self, chunk: Any) -> None:
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage
        for choice in chunk.choices or []:
            if getattr(choice, "usage", None):  # Moonshot may put usage on the choice
                self.usage = choice.usage
            delta = choice.delta
            if delta is None:
                continue
            extra = delta.model_extra or {}
            reasoning = extra.get("reasoning_content", extra.get("reasoning"))
            if reasoning is not None:
                self.reasoning = [*(self.reasoning or []), reasoning]
            if delta.content:
                self.content.append(delta.content)
            for tc in delta.tool_calls or []:
                if tc.index not in self.calls:
                    for index in sorted(i for i in self.calls if i < tc.index and "final" not in self.calls[i]):
                        self._complete(index)
                    self.calls[tc.index] = {"id": None, "name": "", "arguments": ""}
                slot = self.calls[tc.index]
                slot["id"] = slot["id"] or tc.id
                if tc.function is not None and "final" not in slot:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
                    if _complete_json_object(slot["arguments"]):  # nothing can follow a closed object
                        self._complete(tc.index)
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason

    def _complete(self, index: int) -> None:
        slot = self.calls[index]
        call = {"id": self.ids.fix(slot["id"], slot["name"], len(self.done)), "type": "function",
                "function": {"name": slot["name"], "arguments": slot["arguments"]}}
        slot["final"] = call
        self.done.append(call)
        if self.on_tool_call is not None:
            self.emitted = True
            self.on_tool_call(call)

    def finish(self) -> tuple[dict[str, Any], str | None]:
        for index in sorted(self.calls):
            if "final" not in self.calls[index]:
                self._complete(index)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning is not None or self.done:
            message["reasoning_content"] = "".join(self.reasoning or [])
        if self.done:
            message["tool_calls"] = self.done
        return message, self.finish_reason


def assistant_message(msg: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The SDK's message -> a history dict that keeps ``reasoning_content`` (K2.5 needs it back).

    vLLM's newer field name ``reasoning`` is read too. Missing or repeated tool-call ids (some
    servers number calls per response) get the Kimi ``functions.NAME:IDX`` form, numbered across
    the conversation as vLLM does.
    """
    data = msg.model_dump(exclude_none=True) if hasattr(msg, "model_dump") else dict(msg)
    out: dict[str, Any] = {"role": "assistant", "content": data.get("content")}
    reasoning = data.get("reasoning_content")
    if reasoning is None:
        reasoning = data.get("reasoning")
    calls = data.get("tool_calls") or []
    if reasoning is not None or calls:
        # Preserved-thinking backends want reasoning_content on every tool-call turn, even empty.
        out["reasoning_content"] = reasoning or ""
    if calls:
        ids = _CallIds(history)
        fixed = []
        for i, c in enumerate(calls):
            fn = c.get("function") or {}
            name = fn.get("name") or ""
            fixed.append({"id": ids.fix(c.get("id"), name, i), "type": "function",
                          "function": {"name": name, "arguments": fn.get("arguments") or ""}})
        out["tool_calls"] = fixed
    return out
