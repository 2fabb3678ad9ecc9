"""Generation. `generate.py` is the plain reference loop; the batching engine builds beside it."""

from .generate import generate

__all__ = ["generate"]
