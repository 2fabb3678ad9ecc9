"""OpenAI-compatible request schemas and the Kimi mode rules that turn a request into a plan.

Pydantic parses the body; :func:`plan_chat` then applies K2.5's semantics: Thinking by default,
Instant through the official `thinking: {"type": "disabled"}` or vLLM's
`chat_template_kwargs: {"thinking": false}`, per-mode default sampling from the model card
(temperature 1.0 / 0.6, top_p 0.95) unless the checkpoint's `generation_config.json` sets its own
(:class:`SamplingDefaults`), and — with `strict` — the official platform's rules.
Every rejection is an :class:`APIError` carrying the OpenAI error shape and the offending param.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat.template import missing_reasoning

THINKING_TEMPERATURE = 1.0
INSTANT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95


@dataclass(frozen=True)
class SamplingDefaults:
    """What a chat request that names no temperature / top_p gets: K2.5's model card unless the checkpoint says.

    As vLLM does with a model's ``generation_config.json``: its ``temperature`` and ``top_p`` become
    the defaults in both modes, and ``do_sample: false`` means greedy (temperature 0). A request's
    own values always win.
    """

    thinking_temperature: float = THINKING_TEMPERATURE
    instant_temperature: float = INSTANT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P

    @classmethod
    def from_generation_config(cls, path: str | os.PathLike[str]) -> SamplingDefaults:
        """The defaults of a ``generation_config.json`` (K2.5's own when the file is absent or silent)."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

        def number(key: str, low: float, high: float) -> float | None:
            value = cfg.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{path}: {key} must be a number in [{low}, {high}], got {value!r}")
            return float(value)

        temperature, top_p = number("temperature", 0.0, 2.0), number("top_p", 0.0, 1.0)
        do_sample = cfg.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ValueError(f"{path}: do_sample must be true or false, got {do_sample!r}")
        if do_sample is False:
            temperature = 0.0
        out = cls()
        if temperature is not None:
            out = cls(temperature, temperature, out.top_p)
        if top_p is not None:
            out = cls(out.thinking_temperature, out.instant_temperature, top_p)
        return out


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, type: str = "invalid_request_error",
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    # Clients send fields we ignore (user, metadata, store, ...): accept them, as vLLM does.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ThinkingParam(_Lenient):
    type: Literal["enabled", "disabled"] = "enabled"


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class SamplingFields(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    thinking: ThinkingParam | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its JSON path."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(f"{path}: {err['msg']}", param=path) from None


@dataclass
class ChatPlan:
    """What the server will do for one chat request, after the mode rules."""

    thinking: bool
    sampling: dict[str, Any]
    max_tokens: int | None
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any]
    forced_function: str | None = None
    json_schema: dict[str, Any] | None = None  # response_format: the answer must be this JSON
    messages: list[dict[str, Any]] = field(default_factory=list)


ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise APIError("messages: must contain at least one message", param="messages")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"messages[{i}].role: expected one of {list(ROLES)}, got {role!r}",
                           param=f"messages.{i}.role")
        if role == "tool" and not m.get("tool_call_id"):
            raise APIError(f"messages[{i}].tool_call_id: required for a tool message",
                           param=f"messages.{i}.tool_call_id")
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(
                    f"messages[{i}].tool_calls[{j}].function.name: required", param=f"messages.{i}.tool_calls.{j}"
                )


def _check_tools(tools: list[dict[str, Any]]) -> None:
    for i, t in enumerate(tools):
        fn = t.get("function")
        if t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}", param=f"tools.{i}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"tools[{i}].function.name: required", param=f"tools.{i}.function.name")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or "type" not in params):
            raise APIError(
                f"tools[{i}].function.parameters: must be a JSON schema object with a 'type'",
                param=f"tools.{i}.function.parameters",
            )


def _mode(req: ChatCompletionRequest, strict: bool) -> bool:
    """Thinking (True) or Instant (False) from the official field or vLLM's template kwargs."""
    if strict and req.thinking is not None and req.reasoning_effort is not None:
        raise APIError("cannot specify both 'thinking' and 'reasoning_effort'", param="reasoning_effort")
    kwargs = req.chat_template_kwargs or {}
    if "thinking" in kwargs and not isinstance(kwargs["thinking"], bool):
        raise APIError("chat_template_kwargs.thinking: expected true or false", param="chat_template_kwargs.thinking")
    if req.thinking is not None and "thinking" in kwargs and (req.thinking.type == "enabled") != kwargs["thinking"]:
        raise APIError(
            "thinking and chat_template_kwargs.thinking disagree; send one of them", param="chat_template_kwargs"
        )
    if req.thinking is not None:
        return req.thinking.type == "enabled"
    return bool(kwargs.get("thinking", True))


def plan_chat(
    req: ChatCompletionRequest, *, strict: bool = False, defaults: SamplingDefaults | None = None
) -> ChatPlan:
    """Apply the K2.5 rules to a parsed chat request (``defaults``: the checkpoint's sampling defaults)."""
    _check_messages(req.messages)
    if req.tools:
        _check_tools(req.tools)
    thinking = _mode(req, strict)
    if req.n != 1:
        raise APIError("n: only n=1 is supported; send several requests instead", param="n")
    json_schema = _response_schema(req)
    defaults = defaults or SamplingDefaults()
    default_temperature = defaults.thinking_temperature if thinking else defaults.instant_temperature
    default_top_p = defaults.top_p
    if strict:  # the official platform's fixed values, whatever the checkpoint says
        default_temperature = THINKING_TEMPERATURE if thinking else INSTANT_TEMPERATURE
        default_top_p = DEFAULT_TOP_P
        fixed = {"temperature": default_temperature, "top_p": DEFAULT_TOP_P, "presence_penalty": 0.0,
                 "frequency_penalty": 0.0}
        for name, value in fixed.items():
            sent = getattr(req, name)
            if sent is not None and abs(sent - value) > 1e-9:
                raise APIError(
                    f"invalid {name}: only {value} is allowed for this model in "
                    f"{'thinking' if thinking else 'non-thinking'} mode",
                    param=name,
                )
        missing = missing_reasoning(req.messages) if thinking else []
        if missing:
            raise APIError(
                "thinking is enabled but reasoning_content is missing in assistant tool call message "
                f"at index {missing[0]}",
                param=f"messages.{missing[0]}.reasoning_content",
            )
    if req.max_tokens is not None and req.max_completion_tokens is not None and (
        req.max_tokens != req.max_completion_tokens
    ):
        raise APIError("max_tokens and max_completion_tokens disagree; send one", param="max_completion_tokens")
    tool_choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    forced = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") or {}
        forced = fn.get("name")
        names = [t["function"]["name"] for t in req.tools or []]
        if forced not in names:
            raise APIError(f"tool_choice.function.name={forced!r}: not among the tools {names}", param="tool_choice")
    elif tool_choice not in ("auto", "none", "required"):
        raise APIError(f"tool_choice={tool_choice!r}: expected auto, none, required or a function", param="tool_choice")
    elif tool_choice == "required" and not req.tools:
        raise APIError("tool_choice='required' needs tools", param="tool_choice")
    sampling = sampling_fields(req, temperature=default_temperature, top_p=default_top_p,
                               logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    return ChatPlan(
        thinking=thinking,
        sampling=sampling,
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        tools=req.tools,  # still declared under "none" (the model may mention them), but never called
        tool_choice=tool_choice,
        forced_function=forced,
        messages=req.messages,
        json_schema=json_schema,
    )


def sampling_fields(req: SamplingFields, *, temperature: float, top_p: float, logprobs: int | None
                    ) -> dict[str, Any]:
    """The engine's sampling parameters from a request, with the endpoint's defaults filled in."""
    return {
        "temperature": temperature if req.temperature is None else req.temperature,
        "top_p": top_p if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "min_p": req.min_p or 0.0,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": req.repetition_penalty or 1.0,
        "logprobs": logprobs,
        "ignore_eos": req.ignore_eos,
    }


def _response_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for (any object for json_object), or None for text."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if req.tools and req.tool_choice != "none":
        raise APIError("response_format with tools is not supported; send one of them", param="response_format")
    if rf.type == "json_object":
        return {"type": "object"}
    schema = (rf.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError("response_format.json_schema.schema: required, a JSON schema object",
                       param="response_format.json_schema.schema")
    return schema

