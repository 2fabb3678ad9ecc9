"""k25.data: the synthetic curriculum (``k25 data``) for k25-mini, in the K2.5 chat format.

``generate(seed, n_per_family)`` draws every family deterministically; ``write`` puts
``FAMILY/{train,heldout}.jsonl``, the search corpus, ``tools.json`` and ``stats.json`` in a
directory. ``training_segments`` turns a record into loss-masked training text,
``check_record`` validates one through the chat parsers, ``score_answer`` grades a model's answer.
"""

from .corpus import Corpus, Town
from .families import CURRENT_YEAR
from .generate import (
    ALL_FAMILIES,
    FAMILIES,
    FAMILY_DESCRIPTIONS,
    HELDOUT_FRACTION,
    SPLITS,
    Curriculum,
    DataError,
    generate,
    split_of,
    write,
)
from .records import (
    check_record,
    plain_text,
    prompt_messages,
    read_jsonl,
    record_stats,
    score_answer,
    training_segments,
    training_text,
)
from .tools import (
    ORCHESTRATOR_TOOLS,
    PYTHON_TOOL,
    calculate,
    calculator,
    calculator_tool,
    check_tool_call,
    runtime_specs,
    tool_schemas,
)
from .vision import VISION_FAMILIES, check_images, has_images, record_image_paths, resolve_image_urls

__all__ = [
    "ALL_FAMILIES",
    "VISION_FAMILIES",
    "check_images",
    "has_images",
    "record_image_paths",
    "resolve_image_urls",
    "CURRENT_YEAR",
    "FAMILIES",
    "FAMILY_DESCRIPTIONS",
    "HELDOUT_FRACTION",
    "SPLITS",
    "Corpus",
    "Curriculum",
    "DataError",
    "Town",
    "ORCHESTRATOR_TOOLS",
    "PYTHON_TOOL",
    "calculate",
    "calculator",
    "calculator_tool",
    "check_record",
    "check_tool_call",
    "generate",
    "plain_text",
    "prompt_messages",
    "read_jsonl",
    "record_stats",
    "score_answer",
    "runtime_specs",
    "split_of",
    "tool_schemas",
    "training_segments",
    "training_text",
    "write",
]
