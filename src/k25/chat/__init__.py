"""Kimi K2.5 chat format: tokenizer, chat template, tool-call and reasoning parsers.

Vocabulary training lives in :mod:`k25.chat.vocab` (imported on demand: it needs ``tokenizers``).
"""

from .parsers import ParsedOutput, StreamingParser, ToolCall, parse_ids, parse_output
from .template import render, render_assistant_output, render_template, write_chat_template
from .tokenizer import KimiTokenizer, TokenizerError

__all__ = [
    "KimiTokenizer",
    "ParsedOutput",
    "StreamingParser",
    "ToolCall",
    "TokenizerError",
    "parse_ids",
    "parse_output",
    "render",
    "render_assistant_output",
    "render_template",
    "write_chat_template",
]
