"""K25ForConditionalGeneration: MoonViT-3D + projector feeding the text model.

Module names are the checkpoint's: `language_model.` (the text model, `model.` + `lm_head`),
`vision_tower.`, `mm_projector.`. Media enter the token stream the way vLLM does it: the
prompt holds one `<|media_pad|>` id per merged vision token, and the projector outputs are
scattered into those embedding slots. Positions stay plain 1-D (no M-RoPE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import K25Config
from .cache import LatentCache
from .transformer import K25ForCausalLM
from .vision import MoonViT3d, PatchMergerMLP, encode_media


class K25ForConditionalGeneration(nn.Module):
    def __init__(self, config: K25Config) -> None:
        super().__init__()
        if config.vision_config is None:
            raise ValueError("K25ForConditionalGeneration needs a vision_config; use K25ForCausalLM for text only")
        self.k25_config = config
        self.config = config.text_config
        self.language_model = K25ForCausalLM(config.text_config)
        self.vision_tower = MoonViT3d(config.vision_config)
        self.mm_projector = PatchMergerMLP(config.vision_config)

    def encode_media(
        self, pixel_values: torch.Tensor, grid_thws: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Per-item text-space embeddings [(h/2)(w/2), hidden] (the engine caches these per request)."""
        dtype = self.mm_projector.pre_norm.weight.dtype
        return encode_media(self.vision_tower, self.mm_projector, pixel_values.to(dtype), grid_thws)

    def embed(
        self, input_ids: torch.Tensor, media_embeds: Sequence[torch.Tensor] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the media placeholders replaced by `media_embeds`, in order."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        slots = input_ids == self.k25_config.media_placeholder_token_id
        n_slots = int(slots.sum())
        if media_embeds is None or (not isinstance(media_embeds, torch.Tensor) and len(media_embeds) == 0):
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} media placeholder tokens but no media were given")
            return embeds
        feats = media_embeds if isinstance(media_embeds, torch.Tensor) else torch.cat(list(media_embeds))
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} media placeholder tokens "
                f"(id {self.k25_config.media_placeholder_token_id}) but the media give {feats.shape[0]} embeddings"
            )
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        grid_thws: torch.Tensor | Sequence[Sequence[int]] | None = None,
        media_embeds: Sequence[torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]. Give `pixel_values` + `grid_thws`, or precomputed `media_embeds`."""
        if pixel_values is not None:
            if media_embeds is not None:
                raise ValueError("pass pixel_values or media_embeds, not both")
            if grid_thws is None:
                raise ValueError("pixel_values need grid_thws")
            media_embeds = self.encode_media(pixel_values, grid_thws)
        return self.language_model(
            inputs_embeds=self.embed(input_ids, media_embeds),
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            logits_to_keep=logits_to_keep,
        )
