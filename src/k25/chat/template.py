"""The Kimi K2.5 chat format: conversations -> prompt text, byte-identical to the release (spec §5).

Two layers:

* :func:`render_template` is a plain-Python evaluation of the released ``chat_template.jinja``
  with the same inputs (``messages``, ``tools``, ``tools_ts_str``, ``thinking``,
  ``add_generation_prompt``); it is what the tests compare against jinja.
* :func:`render` is what the release's tokenizer does around the template (``apply_chat_template``):
  tools are key-sorted and turned into the TypeScript declaration, with the compact-JSON
  fallback when that fails, and reasoning given under ``reasoning``/``thinking`` is aliased to
  ``reasoning_content`` as transformers does.

Our own jinja template with the same behaviour ships as ``chat_template.jinja`` in this package;
:func:`write_chat_template` puts it next to a checkpoint so transformers and vLLM render it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .toolspec import deep_sort, tools_to_typescript

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
IMAGE_PLACEHOLDER = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>\n"
ROLE_TOKENS = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}
SYSTEM_TOKEN = "<|im_system|>"
GENERATION_PROMPT_THINKING = "<|im_assistant|>assistant<|im_middle|><think>"
GENERATION_PROMPT_INSTANT = "<|im_assistant|>assistant<|im_middle|><think></think>"


class TemplateError(ValueError):
    """A conversation cannot be rendered; the message names the JSON path of the problem."""


_MISSING = object()


def _text(value: Any) -> str:
    """What jinja's ``{{ value }}`` prints: nothing for an undefined value, else ``str(value)``."""
    return "" if value is _MISSING else str(value)


def _get(obj: Any, key: str) -> Any:
    """Jinja's ``obj[key]`` for the plain JSON data chat templates see (undefined -> _MISSING)."""
    if isinstance(obj, Mapping):
        return obj.get(key, _MISSING)
    return _MISSING


def render_content(content: Any, path: str) -> str:
    """A message's content: a string as is; a list of parts with text joined and media placeholders."""
    if content is _MISSING or content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (Mapping, Sequence)) and not isinstance(content, (bytes, bytearray)):
        out = []
        for part in content:
            kind = _get(part, "type")
            if kind in ("image", "image_url"):
                out.append(IMAGE_PLACEHOLDER)
            elif kind in ("video", "video_url"):
                out.append(VIDEO_PLACEHOLDER)
            else:
                out.append(_text(_get(part, "text")))
        return "".join(out)
    raise TemplateError(f"{path}: content must be a string, a list of parts or null, got {type(content).__name__}")


def _role_header(message: Mapping[str, Any], role: Any) -> str:
    name = message.get("name") or role
    return ROLE_TOKENS.get(role, SYSTEM_TOKEN) + _text(name) + "<|im_middle|>"


def render_tool_calls(tool_calls: Any, path: str) -> str:
    """``<|tool_calls_section_begin|>`` + one block per call + ``<|tool_calls_section_end|>``."""
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
        raise TemplateError(f"{path}: tool_calls must be a list")
    out = ["<|tool_calls_section_begin|>"]
    for i, call in enumerate(tool_calls):
        where = f"{path}[{i}]"
        fn = _get(call, "function")
        if not isinstance(fn, Mapping):
            raise TemplateError(f"{where}.function: missing or not an object")
        args = _get(fn, "arguments")
        if args is _MISSING:
            raise TemplateError(f"{where}.function.arguments: missing")
        if not isinstance(args, str):
            try:
                args = json.dumps(args, ensure_ascii=False)
            except (TypeError, ValueError) as e:
                raise TemplateError(f"{where}.function.arguments: not JSON-serialisable ({e})") from None
        out.append(f"<|tool_call_begin|>{_text(_get(call, 'id'))}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
    out.append("<|tool_calls_section_end|>")
    return "".join(out)


def last_final_answer_index(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last assistant message without tool calls (-1 if none).

    Messages up to it are history (reasoning dropped); later ones are the current tool-use chain.
    """
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") == "assistant" and not m.get("tool_calls"):
            return i
    return -1


def render_template(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tools_ts_str: str | None = None,
    thinking: bool | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """Evaluate the released K2.5 template exactly (``thinking=None`` means the variable is undefined)."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"messages[{i}]: must be an object, got {type(m).__name__}")
        if "role" not in m:
            raise TemplateError(f"messages[{i}]: missing 'role'")
    instant = thinking is False
    split = last_final_answer_index(messages)
    out: list[str] = []
    if tools:
        if tools_ts_str:
            decl = tools_ts_str
        else:
            try:
                decl = json.dumps(list(tools), ensure_ascii=False, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                raise TemplateError(f"tools: not JSON-serialisable ({e})") from None
        out.append(f"<|im_system|>tool_declare<|im_middle|>{decl}<|im_end|>")
    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        role = m["role"]
        out.append(_role_header(m, role))
        if role == "assistant":
            if i > split and not instant:
                out.append(f"<think>{_text(m.get('reasoning_content', ''))}</think>")
            else:
                out.append("<think></think>")
            out.append(render_content(m.get("content"), f"{path}.content"))
            if m.get("tool_calls"):
                out.append(render_tool_calls(m["tool_calls"], f"{path}.tool_calls"))
        elif role == "tool":
            out.append(f"## Return of {_text(_get(m, 'tool_call_id'))}\n")
            out.append(render_content(m.get("content"), f"{path}.content"))
        else:
            out.append(render_content(m.get("content"), f"{path}.content"))
        out.append("<|im_end|>")
    if add_generation_prompt:
        out.append(GENERATION_PROMPT_INSTANT if instant else GENERATION_PROMPT_THINKING)
    return "".join(out)


def missing_reasoning(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of current-chain assistant tool-call messages without ``reasoning_content``.

    In thinking mode those turns are rendered with their reasoning; the official API rejects a
    request that drops it ("thinking is enabled but reasoning_content is missing in assistant
    tool call message at index N"), so a server can warn or refuse with these indices.
    """
    split = last_final_answer_index(messages)
    return [
        i
        for i, m in enumerate(messages)
        if i > split
        and m.get("role") == "assistant"
        and m.get("tool_calls")
        and not any(m.get(k) for k in ("reasoning_content", "thinking", "reasoning"))
    ]


def render_assistant_output(message: Mapping[str, Any], thinking: bool = True) -> str:
    """What the model generates for ``message`` after the generation prompt (``<|im_end|>`` excluded).

    Thinking: ``{reasoning_content}</think>{content}{tool calls}``; instant: ``{content}{tool calls}``.
    ``render_template(chat + [message]) == render_template(chat, add_generation_prompt=True) +
    render_assistant_output(message) + "<|im_end|>"`` whenever ``message`` is in the current chain.
    """
    out = []
    if thinking:
        out.append(f"{_text(message.get('reasoning_content', ''))}</think>")
    out.append(render_content(message.get("content"), "message.content"))
    if message.get("tool_calls"):
        out.append(render_tool_calls(message["tool_calls"], "message.tool_calls"))
    return "".join(out)


def alias_reasoning(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Give ``reasoning_content`` the first non-null of reasoning_content/thinking/reasoning.

    transformers does this before rendering any chat template, so clients that send
    ``reasoning`` (vLLM's field name) still get their chain of thought rendered.
    """
    out: list[Mapping[str, Any]] = []
    for m in messages:
        if isinstance(m, Mapping):
            value = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
            if value is not None:
                m = {"thinking": value, **m, "reasoning_content": value}
        out.append(m)
    return out


def tool_declaration(tools: Sequence[Mapping[str, Any]] | None, tool_format: str = "typescript") -> str | None:
    """``tools_ts_str`` for key-sorted tools, or None where the template should use compact JSON."""
    if not tools or tool_format == "json":
        return None
    if tool_format != "typescript":
        raise ValueError(f"tool_format must be 'typescript' or 'json', got {tool_format!r}")
    try:
        return tools_to_typescript(list(tools))  # type: ignore[arg-type]
    except Exception as e:  # the release falls back to JSON on any conversion failure
        logger.warning("tools could not be written as TypeScript (%s); using compact JSON", e)
        return None


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
    *,
    tool_format: str = "typescript",
) -> str:
    """Prompt text for a conversation, as the release's ``apply_chat_template`` produces it.

    ``thinking=False`` is Instant mode (``<think></think>`` prefilled, chain reasoning dropped).
    ``tool_format="json"`` gives the compact-JSON declaration that engines rendering the bare
    template without ``tools_ts_str`` produce.
    """
    sorted_tools = deep_sort(list(tools)) if tools is not None else None
    return render_template(
        alias_reasoning(messages),
        tools=sorted_tools,
        tools_ts_str=tool_declaration(sorted_tools, tool_format),
        thinking=thinking,
        add_generation_prompt=add_generation_prompt,
    )


def chat_template_text() -> str:
    """Our ``chat_template.jinja`` (same behaviour as the release's), shipped as package data."""
    return resources.files("k25.chat").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")


def write_chat_template(directory: str | os.PathLike[str]) -> Path:
    """Write ``chat_template.jinja`` into a checkpoint directory so transformers/vLLM render our format."""
    path = Path(directory) / TEMPLATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(chat_template_text(), encoding="utf-8")
    return path


def hf_jinja_environment() -> Any:
    """A jinja2 environment configured as transformers renders chat templates.

    ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a sandbox, and transformers' ``tojson``
    (no HTML escaping, keys in insertion order, ``ensure_ascii=False``).
    """
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


@functools.lru_cache(maxsize=8)
def _compiled(template_text: str) -> Any:
    return hf_jinja_environment().from_string(template_text)


def render_jinja(template_text: str, messages: Sequence[Mapping[str, Any]], **context: Any) -> str:
    """Render a chat template with jinja2 in the transformers environment (None kwargs left undefined)."""
    ctx = {k: v for k, v in context.items() if v is not None}
    return _compiled(template_text).render(messages=list(messages), **ctx)
