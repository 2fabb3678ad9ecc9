"""Generation. `generate.py` is the plain reference loop; the batching engine builds beside it.

`LLM` (llm.py) is the Python API; `LLMEngine` (engine.py) the continuous-batching engine over
the paged latent cache (kv_cache.py) and scheduler (scheduler.py); `SamplingParams`
(sampling.py) the per-request sampling; experts.py the serving kernels for routed experts.
"""

from .generate import generate

__all__ = ["generate", "LLM", "LLMEngine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name in ("LLMEngine", "EngineConfig"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'k25.engine' has no attribute {name!r}")
