"""The reference generation loop: one prefill, then one token per step over the latent cache.

Plain and batch-synchronous on purpose: the scheduler/engine must produce the same greedy
tokens, and tests compare against it.
"""

from __future__ import annotations

import torch

from ..model.cache import DynamicLatentCache
from ..model.transformer import K25ForCausalLM


@torch.no_grad()
def generate(
    model: K25ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    decode_attention: str = "absorbed",
) -> torch.Tensor:
    """Continue each row of `input_ids` [B, T] (left-padded when `attention_mask` has zeros).

    Greedy when `temperature` is 0; otherwise samples from softmax(logits / temperature),
    optionally restricted to the `top_k` most likely tokens. Prefill uses the naive (expanded)
    attention, decode the `decode_attention` path. Rows that emit an EOS id stop (later
    positions are filled with that id). Returns only the new tokens [B, ≤max_new_tokens].
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    b, t = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones(b, t, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicLatentCache(model.config.num_hidden_layers)
    was_training = model.training
    model.eval()
    model.set_impl(attention="naive")
    try:
        logits = model(input_ids, position_ids=positions, attention_mask=mask if attention_mask is not None else None,
                       cache=cache, logits_to_keep=1)
        model.set_impl(attention=decode_attention)
        next_pos = positions[:, -1:] + 1
        out: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool)
        for _ in range(max_new_tokens):
            tok = _pick(logits[:, -1].float(), temperature, top_k, gen)
            if out and eos:
                tok = torch.where(done, out[-1], tok)
            out.append(tok)
            if eos:
                done |= torch.isin(tok, torch.tensor(eos))
                if bool(done.all()):
                    break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            logits = model(tok[:, None], position_ids=next_pos, attention_mask=mask, cache=cache)
            next_pos = next_pos + 1
    finally:
        model.set_impl(attention="naive")
        model.train(was_training)
    return torch.stack(out, dim=1) if out else torch.empty(b, 0, dtype=torch.long)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
