"""Constrained decoding: a per-request mask of the tokens that keep the output valid.

`ToolCallConstraint` leaves the output free until the model opens a tool-call section, then
holds it to declared tool names and schema-valid arguments (a lazy grammar, as llama.cpp does).
`JsonConstraint` compiles a JSON schema (or "any JSON object") with llguidance — a well-kept
grammar engine built for this — against the Kimi tokenizer's tiktoken vocabulary. The engine
asks it for the allowed tokens before sampling and feeds it the sampled token after; once the
JSON is complete only the end token (`<|im_end|>`) is allowed, so generation stops there.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np
import torch

from ..chat.parsers import ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END


class TokenConstraint(Protocol):
    """What the engine needs from a constraint (one object per request; it keeps state)."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: the tokens that may come next."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        ...


_TOKENIZERS: dict[int, Any] = {}


def _ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a KimiTokenizer (built once per tokenizer; ~1 s for the full vocab)."""
    key = id(tokenizer)
    if key not in _TOKENIZERS:
        from llguidance.tiktoken import lltokenizer_from_encoding

        _TOKENIZERS[key] = lltokenizer_from_encoding(
            tokenizer.model, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.im_end_id
        )
    return _TOKENIZERS[key]


def _bitmask(matcher: Any, vocab_size: int) -> torch.Tensor:
    """An llguidance matcher's allowed next tokens as a bool mask of ``vocab_size`` (ids past its vocab: no)."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    mask = torch.from_numpy(bits[:vocab_size].astype(bool))
    if mask.numel() < vocab_size:
        mask = torch.cat([mask, torch.zeros(vocab_size - mask.numel(), dtype=torch.bool)])
    return mask


class BannedTokens:
    """Never produce these ids (e.g. the tool-call section tokens under `tool_choice: "none"`)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = sorted(set(token_ids))

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[[t for t in self.token_ids if 0 <= t < vocab_size]] = False
        return mask

    def accept(self, token_id: int) -> None:
        """Stateless: nothing to advance."""


class ConstraintError(ValueError):
    """The schema cannot be compiled; the message says why."""


class JsonConstraint:
    """Output must be one JSON value matching `schema` (None: any JSON object), then `<|im_end|>`."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any] | None = None) -> None:
        from llguidance import LLMatcher

        self.schema = schema if schema is not None else {"type": "object"}
        # Compact separators (no free whitespace between tokens): what models are trained to write.
        spec = {**self.schema, "x-guidance": {"whitespace_flexible": False, **self.schema.get("x-guidance", {})}}
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(spec))
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        self.matcher = LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"invalid JSON schema: {self.matcher.get_error()}")

    def allowed(self, vocab_size: int) -> torch.Tensor:
        return _bitmask(self.matcher, vocab_size)

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(int(token_id))

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


# Kimi's tool-call section (spec: parsers): <|tool_calls_section_begin|> then, per call,
# <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON}<|tool_call_end|>, then
# <|tool_calls_section_end|>. The JSON is written with ", " and ": " as the chat template's tojson does.
INNER_MARKERS = (CALL_BEGIN, ARG_BEGIN, CALL_END, SECTION_END)
TOOL_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _tool_name(tool: Any, i: int) -> tuple[str, dict[str, Any]]:
    """(name, parameters schema) of an OpenAI tool entry; a ConstraintError names the bad entry."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ConstraintError(f"tools[{i}].function.name: expected a non-empty string")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object"}
    if not isinstance(params, dict):
        raise ConstraintError(f"tools[{i}].function.parameters: expected a JSON schema object")
    return name, params


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed_schema(schema: Any) -> Any:
    """``schema`` with every object that lists its ``properties`` closed to other keys.

    JSON Schema lets an object without ``additionalProperties`` carry any other key, but a tool's
    arguments are its declared parameters and nothing else: k25's validator (and OpenAI's strict
    mode, and xgrammar's default) treat an undeclared argument as an error, so the grammar must not
    let the model write one. An explicit ``additionalProperties`` is kept as given.
    """
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_schema(v) for k, v in out[key].items()}
    for key in (*_SUBSCHEMA_LISTS, "items", "additionalProperties", "not"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed_schema(out[key])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def tool_call_grammar(tools: list[dict[str, Any]]) -> str:
    """The Lark grammar (llguidance dialect) of a tool-call section's body for these tools.

    Starts after ``<|tool_calls_section_begin|>``: one or more calls, each naming a declared tool
    and giving arguments that match that tool's parameter schema (closed to undeclared
    arguments, :func:`closed_schema`), then the section end.
    """
    if not tools:
        raise ConstraintError("tools: a tool-call grammar needs at least one tool")
    alternatives, rules = [], []
    for i, tool in enumerate(tools):
        name, params = _tool_name(tool, i)
        schema = {**closed_schema(params), "x-guidance": {**TOOL_JSON_STYLE, **params.get("x-guidance", {})}}
        alternatives.append(f"call_{i}")
        rules.append(f"call_{i}: {json.dumps(name + ':')} IDX {ARG_BEGIN} args_{i}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    return "\n".join([
        f"start: call+ {SECTION_END}",
        f'call: {CALL_BEGIN} "functions." ({" | ".join(alternatives)}) {CALL_END}',
        *rules,
        "IDX: /[0-9]{1,5}/",
    ])


class ToolCallConstraint:
    """Free text until the model opens a tool-call section; inside it, only valid calls to ``tools``.

    The lazy grammar llama.cpp applies to tool calls: the model decides whether to call a tool,
    and once it writes ``<|tool_calls_section_begin|>`` every token must keep the section
    parseable, with a declared tool name and arguments that fit its schema. After the section
    ends the output is free again (the model then ends its turn). Outside a section the markers
    that only belong inside one (``<|tool_call_begin|>`` … ``<|tool_calls_section_end|>``) are
    masked, so no stray marker reaches the parser.
    """

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]]) -> None:
        from llguidance import LLMatcher

        try:
            self.grammar = LLMatcher.grammar_from_lark(tool_call_grammar(tools))
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"tools: cannot build the tool-call grammar: {e}") from None
        self.tokenizer = tokenizer
        self.section_begin = tokenizer.token_to_id(SECTION_BEGIN)
        if self.section_begin is None:
            raise ConstraintError(f"the tokenizer has no {SECTION_BEGIN} token")
        self.matcher: Any = None
        # outside a section the markers that only belong inside one are never valid
        self.inner = [i for i in map(tokenizer.token_to_id, INNER_MARKERS) if i is not None]
        error = LLMatcher.validate_grammar(self.grammar, _ll_tokenizer(tokenizer))
        if error:
            raise ConstraintError(f"tools: invalid tool-call grammar: {error}")
        self.sections = 0  # tool-call sections opened so far
        self._matcher_class = LLMatcher
        self._free: torch.Tensor | None = None  # the mask outside a section (the same every step)

    @property
    def inside(self) -> bool:
        """Whether the output is inside a tool-call section (the grammar applies)."""
        return self.matcher is not None

    def allowed(self, vocab_size: int) -> torch.Tensor:
        if self.matcher is None:
            if self._free is None or self._free.numel() != vocab_size:
                self._free = torch.ones(vocab_size, dtype=torch.bool)
                self._free[[i for i in self.inner if i < vocab_size]] = False
            return self._free
        return _bitmask(self.matcher, vocab_size)

    def accept(self, token_id: int) -> None:
        if self.matcher is None:
            if token_id == self.section_begin:
                self.matcher = self._matcher_class(_ll_tokenizer(self.tokenizer), self.grammar, log_level=0)
                self.sections += 1
            return
        self.matcher.consume_token(int(token_id))
        if self.matcher.is_error():
            raise ConstraintError(f"token {token_id} broke the tool-call grammar: {self.matcher.get_error()}")
        if self.matcher.is_stopped():  # the section is closed
            self.matcher = None
