"""Media in the engine: vision embeddings replace the placeholders, and prefix caching keys on them."""

from __future__ import annotations

import pytest
import torch

import k25
from k25.engine.engine import EngineConfig, LLMEngine
from k25.engine.sampling import SamplingParams
from k25.testing import tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(initializer_range=0.1)
    model = k25.build_model(cfg, dtype=torch.float32, seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        media = [model.encode_media(torch.randn(16, 3, 14, 14, generator=gen), [[1, 4, 4]])[0] for _ in range(2)]
    pad = cfg.media_placeholder_token_id
    prompt = list(range(1, 20)) + [pad] * 4 + list(range(40, 48))  # the image after 19 text tokens
    return cfg, model, media, pad, prompt


@torch.no_grad()
def reference(model, prompt, embeds, n):
    """Greedy by full forwards of the multimodal model (placeholders filled, generated ids embedded)."""
    lm = model.language_model
    x = model.embed(torch.tensor([prompt]), [embeds])
    out = []
    for _ in range(n):
        tok = int(lm(inputs_embeds=x)[0, -1].argmax())
        out.append(tok)
        x = torch.cat([x, lm.model.embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out


def drain(engine: LLMEngine) -> dict:
    """Step until every request is finished; their final outputs by request id."""
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def test_engine_with_an_image_equals_full_forwards(setup):
    cfg, model, media, pad, prompt = setup
    engine = LLMEngine(model.language_model, EngineConfig(cache_tokens=1024, block_size=8, max_num_batched_tokens=12))
    rid = engine.add_request(prompt, GREEDY, media_embeds=media[0], media_token_id=pad)  # chunked: 31 = 12+12+7
    text_only = engine.add_request(prompt[:19], GREEDY)  # batched with a text request
    outs = drain(engine)
    assert outs[rid].output_ids == reference(model, prompt, media[0], 6)
    assert outs[text_only].output_ids == reference_text(model, prompt[:19], 6)


@torch.no_grad()
def reference_text(model, prompt, n):
    return k25.generate(model.language_model, torch.tensor([prompt]), n)[0].tolist()


def test_prefix_cache_keys_include_the_image(setup):
    cfg, model, media, pad, prompt = setup
    engine = LLMEngine(model.language_model, EngineConfig(cache_tokens=1024, block_size=8))

    def run(embeds):
        rid = engine.add_request(prompt, GREEDY, media_embeds=embeds, media_token_id=pad)
        return drain(engine)[rid]

    first = run(media[0])
    again = run(media[0])
    other = run(media[1])
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 24  # three full blocks of 8, image included
    assert other.num_cached_tokens == 16  # only the blocks before the image's block
    assert again.output_ids == first.output_ids
    assert other.output_ids == reference(model, prompt, media[1], 6)


def test_media_errors(setup):
    cfg, model, media, pad, prompt = setup
    engine = LLMEngine(model.language_model, EngineConfig(cache_tokens=256))
    with pytest.raises(ValueError, match="holds 4 media placeholder tokens .* has 2 rows"):
        engine.add_request(prompt, GREEDY, media_embeds=media[0][:2], media_token_id=pad)
    with pytest.raises(ValueError, match="need media_token_id"):
        engine.add_request(prompt, GREEDY, media_embeds=media[0])
