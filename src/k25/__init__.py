"""k25: an open Python implementation of the Kimi K2.5 system.

    >>> import k25
    >>> model = k25.load("path/to/Kimi-K2.5")        # K2.5 or text-only K2 checkpoint directory
    >>> logits = model(input_ids)

Heavy modules (torch) are imported on first use, so `import k25` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "K25Config": ("k25.config", "K25Config"),
    "preset": ("k25.config", "preset"),
    "load": ("k25.checkpoint.model_io", "load_model"),
    "save": ("k25.checkpoint.model_io", "save_model"),
    "build_model": ("k25.checkpoint.model_io", "build_model"),
    "K25ForCausalLM": ("k25.model.transformer", "K25ForCausalLM"),
    "K25ForConditionalGeneration": ("k25.model.multimodal", "K25ForConditionalGeneration"),
    "generate": ("k25.engine.generate", "generate"),
    "LLM": ("k25.engine.llm", "LLM"),
    "SamplingParams": ("k25.engine.sampling", "SamplingParams"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'k25' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
