"""Images through the API: data URLs and allowed local files, placeholders expanded, pixels to the engine."""

from __future__ import annotations

import base64
import io

import httpx2 as httpx
import openai
import pytest
import torch
from PIL import Image

import k25
from k25.chat.template import render
from k25.chat.tokenizer import KimiTokenizer
from k25.engine.engine import EngineConfig, LLMEngine
from k25.media import image_token_count, pack_media, preprocess_image
from k25.server.app import create_app
from k25.server.engine_backend import EngineBackend
from k25.testing import ScriptedBackend, ServerThread, byte_tokenizer, tiny_config, write_random_checkpoint

INSTANT = {"thinking": {"type": "disabled"}}


def png(w: int, h: int, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture
def scripted(tmp_path):
    backend = ScriptedBackend(byte_tokenizer(tmp_path / "tok"))
    (tmp_path / "media").mkdir()
    with ServerThread(create_app(backend, allowed_local_media_path=tmp_path / "media")) as srv:
        yield srv, backend, tmp_path


def test_image_placeholders_are_expanded(scripted):
    srv, backend, tmp = scripted
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    backend.outputs = ["A picture.<|im_end|>"]
    r = client.chat.completions.create(model="k25-test", messages=ask(data_url(png(60, 40))), extra_body=INSTANT)
    assert r.choices[0].message.content == "A picture."
    n = image_token_count(60, 40)
    pad = backend.tokenizer.token_to_id("<|media_pad|>")
    assert backend.prompts[0].count("<|media_pad|>") == n
    assert "<|media_begin|>image<|media_content|>" in backend.prompts[0]
    pixels, grids = backend.media
    assert grids.tolist() == [[1, 4, 6]] and pixels.shape == (24, 3, 14, 14) and n == 6 and pad is not None
    assert r.usage.prompt_tokens == len(backend.tokenizer.encode(backend.prompts[0]))
    # a local file under the allowed directory works too
    (tmp / "media" / "cat.png").write_bytes(png(30, 30))
    backend.outputs = ["Ok.<|im_end|>"]
    client.chat.completions.create(model="k25-test", messages=ask(str(tmp / "media" / "cat.png")), extra_body=INSTANT)
    assert backend.media[1].tolist() == [[1, 4, 4]]  # 30x30 padded to 56x56


@pytest.mark.parametrize(("url", "message"), [
    ("https://example.com/cat.png", "remote URLs are not fetched"),
    ("/etc/passwd", "outside the allowed media directory"),
    ("data:image/png;base64,AAAA", "not a readable image"),
])
def test_bad_media_are_400s_naming_the_part(scripted, url, message):
    srv, _, _ = scripted
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": ask(url)})
    assert r.status_code == 400
    assert "messages[0].content[1]" in r.json()["error"]["message"] and message in r.json()["error"]["message"]


def test_text_only_backend_refuses_images(tmp_path):
    backend = ScriptedBackend(byte_tokenizer(tmp_path))
    backend.supports_media = False
    with ServerThread(create_app(backend)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": ask(data_url(png(20, 20)))})
        assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"]


def test_image_through_the_real_engine_equals_full_forwards(tmp_path):
    """Pixels → vision tower (on the engine thread) → scattered into the prompt → greedy tokens, compared
    with the multimodal model's own full forwards on the same prompt."""
    write_random_checkpoint(tmp_path, tiny_config(initializer_range=0.1), seed=4,
                            tokenizer=byte_tokenizer(tmp_path / "tok"))
    tokenizer = KimiTokenizer.from_pretrained(tmp_path)
    model = k25.load(tmp_path, dtype=torch.float32)
    engine = LLMEngine(model.language_model, EngineConfig(cache_tokens=2048), tokenizer=tokenizer)
    backend = EngineBackend(engine, tokenizer, "tiny-vl", max_model_len=2048, vision_model=model)
    image = png(56, 42, seed=3)
    messages = ask(data_url(image))
    with ServerThread(create_app(backend)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="tiny-vl", messages=messages, temperature=0, max_tokens=8,
                                           extra_body={**INSTANT, "ignore_eos": True})
    backend.close()
    item = preprocess_image(image)
    text = render(messages, thinking=False, add_generation_prompt=True)
    pad = tokenizer.token_to_id("<|media_pad|>")
    ids = []
    for t in tokenizer.encode(text):
        ids.extend([pad] * item.num_tokens if t == pad else [t])
    with torch.no_grad():
        embeds = model.encode_media(*pack_media([item]))
        x = model.embed(torch.tensor([ids]), embeds)
        out = []
        for _ in range(8):
            tok = int(model.language_model(inputs_embeds=x)[0, -1].argmax())
            out.append(tok)
            x = torch.cat([x, model.language_model.model.embed_tokens(torch.tensor([[tok]]))], dim=1)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 8
    expected = tokenizer.decode(out)
    got = r.choices[0].message.content or ""
    assert got == expected.replace("<|im_end|>", "") or got == expected
