"""k25.eval: ``k25 eval``, a model on the held-out split of the synthetic curriculum.

Per family: answer accuracy, tool-call validity (the call parses, names a declared tool, its
arguments fit the schema), generated and reasoning tokens, thinking vs instant, and for the swarm
the critical steps against the single-agent form; the prose families get a teacher-forced loss.
The conversations run through the agents runtime with the tools the data was made with; the
model is anything with ``generate(prompts) -> [Completion]`` (``EngineGenerator`` is ``k25.LLM``).

    from k25.eval import EngineGenerator, evaluate, markdown
    report = evaluate(EngineGenerator("ckpt/"), "data/", families=["tool_calc"], limit=50)
    print(markdown(report))
"""

from .harness import RecordResult, Settings, evaluate, load_records, run_chat_records, run_text_records
from .metrics import summarize
from .model import (
    INVALID_KINDS,
    Batcher,
    Completion,
    EngineGenerator,
    EvalChatModel,
    EvalError,
    Generator,
    check_turn,
)
from .replay import ReplayModel, injected_outage
from .report import markdown, print_report
from .tools import ToolKit, data_style_report

__all__ = [
    "INVALID_KINDS",
    "Batcher",
    "Completion",
    "EngineGenerator",
    "EvalChatModel",
    "EvalError",
    "Generator",
    "RecordResult",
    "ReplayModel",
    "Settings",
    "ToolKit",
    "check_turn",
    "data_style_report",
    "evaluate",
    "injected_outage",
    "load_records",
    "markdown",
    "print_report",
    "run_chat_records",
    "run_text_records",
    "summarize",
]
