"""Checkpoints in the official Kimi K2.5 layout (see io.py) and the INT4 codec (int4.py)."""

from .io import CheckpointError, ShardedReader, official_names, save_tensors
from .model_io import build_model, load_model, save_model

__all__ = [
    "CheckpointError", "ShardedReader", "official_names", "save_tensors",
    "build_model", "load_model", "save_model",
]
