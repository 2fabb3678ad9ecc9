"""A scripted OpenAI-compatible server on 127.0.0.1, for tests and the offline benchmark.

It speaks ``POST /v1/chat/completions`` (JSON, or SSE chunks with ``stream``) and
``GET /v1/models`` (FastAPI + uvicorn in a background thread), so agents are driven through the
real ``openai`` client and real HTTP. Replies come from a list (one per request, in order) or from
a function of the request body (a policy that reads the conversation, as a model would). Replies
can be tool calls, answers, 429s or 5xx errors, with simulated latency. Tool-call ids follow
vLLM's Kimi numbering, ``functions.NAME:IDX``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from k25.chat.parsers import make_tool_call_id, next_tool_call_index


@dataclass
class Reply:
    """One scripted response: an assistant message, or an HTTP error."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[tuple[str, Any]] = field(default_factory=list)
    status: int = 200
    error: str | None = None
    retry_after: float | None = None
    delay: float = 0.0
    usage: dict[str, int] | None = None
    # Streaming only: seconds between one tool call's chunks and the next call's.
    stream_gap: float = 0.0
    finish_reason: str | None = None  # default: tool_calls or stop; "length" for a reply cut at the token limit


def say(content: str, reasoning: str | None = None, delay: float = 0.0, finish_reason: str | None = None) -> Reply:
    """A final answer (no tool call); ``finish_reason="length"`` sends it as cut at the token limit."""
    return Reply(content=content, reasoning=reasoning, delay=delay, finish_reason=finish_reason)


def call(name: str, arguments: Any = None, reasoning: str | None = None, content: str | None = None,
         delay: float = 0.0) -> Reply:
    """One tool call; ``arguments`` is a dict (sent as JSON) or a raw string (sent as is, even invalid)."""
    return Reply(content=content, reasoning=reasoning, tool_calls=[(name, arguments or {})], delay=delay)


def calls(items: Sequence[tuple[str, Any]], reasoning: str | None = None, delay: float = 0.0,
          stream_gap: float = 0.0) -> Reply:
    """Several tool calls in one turn."""
    return Reply(reasoning=reasoning, tool_calls=list(items), delay=delay, stream_gap=stream_gap)


def rate_limited(retry_after: float | None = None) -> Reply:
    """A 429, the way OpenAI-compatible servers send it."""
    return Reply(status=429, error="rate limit reached, slow down", retry_after=retry_after)


def server_error(status: int = 503) -> Reply:
    return Reply(status=status, error="the server is overloaded")


Script = Sequence[Reply] | Callable[[dict[str, Any]], Any]


class ScriptedServer:
    """Serve ``script`` on 127.0.0.1 at a free port; use as a context manager (it always stops).

    ``requests`` keeps every request body received, so tests can check what the client sent
    (e.g. that ``reasoning_content`` came back). ``latency`` adds a fixed delay to every answer,
    which makes wall-clock comparisons (agent against swarm) meaningful with a scripted model.
    """

    def __init__(self, script: Script, latency: float = 0.0, model: str = "scripted-k25") -> None:
        self.script = script
        self.latency = latency
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self._replies = list(script) if not callable(script) else None
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.active = 0
        self.max_active = 0
        # (what, monotonic time) for every streamed tool call sent: lets tests order events.
        self.sent: list[tuple[str, float]] = []

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the scripted server is not running; use it as a context manager")
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_model(self, **options: Any) -> Any:
        """A :class:`~k25.agents.model.ChatModel` for this server (fast back-off: it is local)."""
        from .model import ChatModel

        options.setdefault("backoff_base", 0.01)
        options.setdefault("backoff_max", 0.05)
        return ChatModel(base_url=self.base_url, model=self.model, api_key="scripted", **options)

    def _next(self, body: dict[str, Any]) -> Any:
        if self._replies is not None:
            with self._lock:
                if not self._replies:
                    return Reply(status=500, error=f"the script is exhausted after {len(self.requests)} requests")
                return self._replies.pop(0)
        return self.script(body)  # type: ignore[operator]

    def _app(self) -> Any:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "k25"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            with self._lock:
                self.requests.append(body)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                reply = self._next(body)
                if inspect.isawaitable(reply):
                    reply = await reply
                await asyncio.sleep(self.latency + reply.delay)
            finally:
                with self._lock:
                    self.active -= 1
            if reply.status != 200:
                headers = {"retry-after": f"{reply.retry_after:g}"} if reply.retry_after is not None else {}
                err = {"error": {"message": reply.error, "type": "rate_limit_error" if reply.status == 429
                                 else "server_error", "code": reply.status}}
                return JSONResponse(err, status_code=reply.status, headers=headers)
            data = completion(body, reply, self.model)
            if body.get("stream"):
                return StreamingResponse(self._sse(data, reply, body), media_type="text/event-stream")
            return data

        return app

    async def _sse(self, data: dict[str, Any], reply: Reply, body: dict[str, Any]) -> Any:
        """The completion as ``chat.completion.chunk`` events: reasoning, content, then each tool
        call (id and name first, arguments in two pieces), finish, usage (if asked), [DONE]."""
        base = {"id": data["id"], "object": "chat.completion.chunk", "created": data["created"], "model": data["model"]}

        def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        message = data["choices"][0]["message"]
        yield event({"role": "assistant", "content": ""})
        if message.get("reasoning_content"):
            yield event({"reasoning_content": message["reasoning_content"]})
        if message.get("content"):
            yield event({"content": message["content"]})
        for i, c in enumerate(message.get("tool_calls") or []):
            if i and reply.stream_gap:
                await asyncio.sleep(reply.stream_gap)
            args = c["function"]["arguments"]
            half = len(args) // 2
            self.sent.append((f"call {i}", time.monotonic()))
            yield event({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                         "function": {"name": c["function"]["name"], "arguments": args[:half]}}]})
            yield event({"tool_calls": [{"index": i, "function": {"arguments": args[half:]}}]})
        yield event({}, data["choices"][0]["finish_reason"])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': data['usage']})}\n\n"
        yield "data: [DONE]\n\n"

    def __enter__(self) -> ScriptedServer:
        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=0, log_level="error", lifespan="off",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="k25-scripted-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.port = None


def completion(body: dict[str, Any], reply: Reply, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object for ``reply``, with usage estimated at ~4 characters a token."""
    messages = body.get("messages") or []
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        first = next_tool_call_index(messages)
        message["tool_calls"] = [
            {"id": make_tool_call_id(name, first + i), "type": "function",
             "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    prompt = len(json.dumps(messages)) // 4 + len(json.dumps(body.get("tools") or [])) // 4
    out_chars = len(reply.content or "") + len(reply.reasoning or "") + len(json.dumps(message.get("tool_calls", [])))
    usage = reply.usage or {"prompt_tokens": prompt, "completion_tokens": max(1, out_chars // 4)}
    usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return {
        "id": f"chatcmpl-{len(messages)}-{int(time.time() * 1000)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")}],
        "usage": usage,
    }
