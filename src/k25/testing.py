"""Helpers for tests and benchmarks: tiny configs, random checkpoints, transformers peers.

Kept in the package (not in tests/) so every test directory and benchmark script shares one
way of building models and of mapping our configs onto the transformers reference classes.
transformers is imported lazily; it is a test-only dependency.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .checkpoint import build_model, save_model
from .config import K25Config, preset
from .server.local import AppThread


def tiny_config(text_only: bool = False, **text_overrides: Any) -> K25Config:
    """The `tiny` preset with text_config fields overridden; K2 layout when `text_only`."""
    cfg = preset("tiny")
    for key, value in text_overrides.items():
        if not hasattr(cfg.text_config, key):
            raise KeyError(f"text_config has no field {key!r}")
        setattr(cfg.text_config, key, value)
    if text_only:
        cfg.vision_config = None
        cfg.text_only = True
        # transformers maps the fused-expert layout only for model_type deepseek_v3
        cfg.text_config.model_type = "deepseek_v3"
    cfg.validate()
    return cfg


def randomize_router_bias(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Non-zero correction biases, so selection and weighting differ as in a trained model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * std)


def write_random_checkpoint(
    path: str | Path, config: K25Config, seed: int = 0, dtype: torch.dtype = torch.float32, **save_kwargs: Any
) -> torch.nn.Module:
    """Build a random model for `config` (router biases non-zero), save it at `path`, return it."""
    model = build_model(config, seed=seed, dtype=dtype)
    randomize_router_bias(model, seed=seed)
    save_model(model, config, path, **save_kwargs)
    return model


def hf_text_config(config: K25Config):
    """A transformers DeepseekV3Config with the same text fields."""
    from transformers import DeepseekV3Config

    d = copy.deepcopy(config.text_config.to_dict())
    d["model_type"] = "deepseek_v3"
    for key in ("quantization_config", "auto_map", "architectures", "dtype"):
        d.pop(key, None)
    return DeepseekV3Config(**d)


def hf_k25_config(path: str | Path):
    """transformers' Kimi_K25Config for a checkpoint dir we wrote, with the vision sizes mapped.

    transformers names the vision fields differently (`hidden_size` for `vt_hidden_size`, ...)
    and silently falls back to the released sizes for ours, so they are mapped explicitly.
    """
    from transformers import Kimi_K25Config

    ours = K25Config.from_json_file(path)
    hf = Kimi_K25Config.from_pretrained(str(path))
    v = ours.vision_config
    if v is not None:
        for name, value in {
            "hidden_size": v.vt_hidden_size,
            "num_hidden_layers": v.vt_num_hidden_layers,
            "num_attention_heads": v.vt_num_attention_heads,
            "intermediate_size": v.vt_intermediate_size,
            "pos_emb_height": v.init_pos_emb_height,
            "pos_emb_width": v.init_pos_emb_width,
            "pos_emb_time": v.init_pos_emb_time,
            "patch_size": v.patch_size,
            "merge_kernel_size": list(v.merge_kernel_size),
        }.items():
            setattr(hf.vision_config, name, value)
        hf.projection_hidden_size = v.mm_hidden_size
        hf.projection_layer_norm_eps = v.projector_ln_eps
    hf.image_token_id = ours.media_placeholder_token_id
    return hf


def byte_tokenizer(directory: str | Path):
    """A KimiTokenizer over the 256 single bytes (vocab 256 + 256 Kimi specials = 512 = `tiny`'s)."""
    from .chat.tokenizer import KimiTokenizer, write_tiktoken_ranks

    path = Path(directory) / "tiktoken.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiktoken_ranks({bytes([b]): b for b in range(256)}, path)
    return KimiTokenizer(path)


class ServerThread(AppThread):
    """Run an ASGI app with uvicorn on a free localhost port in a thread (tests, demos): the server's own
    :class:`~k25.server.local.AppThread`, under the name the tests use."""


class ScriptedBackend:
    """A server Backend that replays queued output texts one token per step (no model).

    Records prompts, sampling params and aborts, so HTTP-level tests can assert on exactly what
    the server sent and did with known output. `full=True` makes it refuse with QueueFullError.
    """

    model_name = "k25-test"
    max_model_len = 4096

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.outputs: list[str] = []
        self.prompts: list[str] = []
        self.sampling: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.full = False
        self.delay = 0.0

    supports_media = True

    def stream(self, request_id, prompt_ids, sampling, max_tokens, media=None):
        from .server.backend import QueueFullError

        self.media = media
        if self.full:
            raise QueueFullError(retry_after=3)
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        self.sampling.append(sampling)
        ids = self.tokenizer.encode(self.outputs.pop(0))
        return self._steps(request_id, prompt_ids, ids, sampling, max_tokens)

    async def _steps(self, rid, prompt_ids, ids, sampling, max_tokens):
        import asyncio

        from .server.backend import StepOutput

        stops = set(sampling.get("stop_token_ids") or []) | {self.tokenizer.im_end_id}
        for n, t in enumerate(ids):
            await asyncio.sleep(self.delay)
            if n + 1 >= max_tokens and t not in stops:
                yield StepOutput([t], "length", len(prompt_ids), 3)
                return
            done = t in stops
            lp = (-0.5, [(t, -0.5), (65, -1.5)]) if sampling.get("logprobs") is not None else None
            yield StepOutput([t], "stop" if done else None, len(prompt_ids), 3, logprobs=[lp] if lp else None)
            if done:
                return
        yield StepOutput([], "stop", len(prompt_ids), 3)

    def abort(self, request_id):
        self.aborted.append(request_id)

    def stats(self):
        return {"queue_depth": 0, "running": 0}
