"""The engine against the reference: greedy equals `generate` and full forwards, batching,
chunked prefill, prefix caching, preemption, cancellation, stop conditions, cache size."""

from __future__ import annotations

import pytest
import torch

from k25.chat.tokenizer import KimiTokenizer, write_tiktoken_ranks
from k25.checkpoint import build_model
from k25.config import preset
from k25.engine.engine import EngineConfig, LLMEngine
from k25.engine.generate import generate
from k25.engine.kv_cache import BlockManager, LatentPool, PagedLatentView
from k25.engine.sampling import SamplingParams
from k25.model.cache import DynamicLatentCache
from k25.testing import randomize_router_bias, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_config(initializer_range=0.1), dtype=torch.float32, vision=False, seed=3).eval()
    randomize_router_bias(m)
    return m


def _prompts(lengths, seed=0, vocab=500) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine(model, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 128)
    return LLMEngine(model, EngineConfig(**kw))


@pytest.fixture(scope="module")
def references(model):
    prompts = _prompts([1, 5, 9, 16, 23, 40])
    return prompts, [generate(model, torch.tensor([p]), GREEDY.max_tokens)[0].tolist() for p in prompts]


def test_greedy_equals_reference_generate_batched_and_alone(model, references):
    prompts, refs = references
    batched = _engine(model, max_num_batched_tokens=64).run(prompts, GREEDY)
    alone = [_engine(model, max_num_seqs=1).run([p], GREEDY)[0] for p in prompts]
    assert [o.output_ids for o in batched] == refs
    assert [o.output_ids for o in alone] == refs


@torch.no_grad()
def test_greedy_equals_argmax_of_full_forwards(model):
    prompt = _prompts([12], seed=5)[0]
    out = _engine(model).run([prompt], GREEDY)[0].output_ids
    ids = list(prompt)
    for _ in range(GREEDY.max_tokens):
        model.set_impl(attention="naive")
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_chunked_prefill_and_tiny_budgets(model, references):
    prompts, refs = references
    for budget in (3, 7):
        eng = _engine(model, max_num_batched_tokens=budget)
        assert [o.output_ids for o in eng.run(prompts, GREEDY)] == refs
        assert eng.stats["forwards"] > len(prompts)


def test_naive_and_absorbed_decode_agree(model, references):
    prompts, refs = references
    naive = _engine(model, decode_attention="naive").run(prompts, GREEDY)
    absorbed_prefill = _engine(model, prefill_attention="absorbed").run(prompts, GREEDY)
    assert [o.output_ids for o in naive] == refs
    assert [o.output_ids for o in absorbed_prefill] == refs


@torch.no_grad()
def test_paged_view_logits_match_contiguous_cache(model):
    """Decode logits through the paged pool (padded batch of unequal contexts) vs DynamicLatentCache."""
    cfg = model.config
    prompts = _prompts([7, 3], seed=9)
    pool = LatentPool(cfg.num_hidden_layers, 8, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    tables = [[0, 1], [2]]
    for impl in ("naive", "absorbed"):
        logits_paged = []
        for p, table in zip(prompts, tables, strict=True):
            slots = torch.tensor([table[i // 4] * 4 + i % 4 for i in range(len(p) + 1)])
            model.set_impl(attention="naive")
            model(torch.tensor([p]), cache=PagedLatentView(pool, slots[None, :0], slots[None, : len(p)]))
        past = 7
        past_slots = torch.zeros(2, past, dtype=torch.long)
        past_slots[0] = torch.tensor([0, 1, 2, 3, 4, 5, 6])
        past_slots[1, 4:] = torch.tensor([8, 9, 10])
        new_slots = torch.tensor([[7], [11]])
        mask = torch.ones(2, past + 1, dtype=torch.long)
        mask[1, :4] = 0
        model.set_impl(attention=impl)
        out = model(torch.tensor([[11], [12]]), position_ids=torch.tensor([[7], [3]]), attention_mask=mask,
                    cache=PagedLatentView(pool, past_slots, new_slots))
        logits_paged = out[:, -1]
        for row, (p, tok) in enumerate(zip(prompts, (11, 12), strict=True)):
            cache = DynamicLatentCache(cfg.num_hidden_layers)
            model.set_impl(attention="naive")
            model(torch.tensor([p]), cache=cache)
            model.set_impl(attention=impl)
            ref = model(torch.tensor([[tok]]), cache=cache)[0, -1]
            assert (logits_paged[row] - ref).abs().max() < 1e-5
    model.set_impl(attention="naive")


def test_prefix_cache_reports_cached_tokens_and_keeps_outputs(model):
    base = _prompts([21], seed=11)[0]
    other = base[:13] + _prompts([6], seed=12)[0]
    eng = _engine(model, block_size=4)
    first = eng.run([base], GREEDY)[0]
    assert first.num_cached_tokens == 0
    again, branch = eng.run([base, other], GREEDY)
    assert again.num_cached_tokens == 20  # full blocks, leaving the last token to compute
    assert branch.num_cached_tokens == 12  # the shared full blocks only
    assert again.output_ids == first.output_ids
    fresh = _engine(model, block_size=4).run([other], GREEDY)[0]
    assert branch.output_ids == fresh.output_ids
    off = _engine(model, enable_prefix_caching=False)
    off.run([base], GREEDY)
    assert off.run([base], GREEDY)[0].num_cached_tokens == 0


def test_preemption_when_cache_is_full(model, references):
    prompts, refs = references
    eng = _engine(model, num_blocks=16, block_size=4, max_num_batched_tokens=64)
    outs = eng.run(prompts, GREEDY)
    assert [o.output_ids for o in outs] == refs
    assert eng.scheduler.num_preemptions > 0 and sum(o.num_preemptions for o in outs) > 0
    assert eng.blocks.num_free == 16


def test_requests_join_and_leave_between_steps_and_cancel(model, references):
    prompts, refs = references
    eng = _engine(model, max_num_batched_tokens=16)
    a = eng.add_request(prompts[3], GREEDY)
    victim = eng.add_request(prompts[5], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        eng.step()
    b = eng.add_request(prompts[4], GREEDY)  # joins a running batch
    eng.step()
    assert eng.abort(victim)
    assert not eng.abort(victim)
    assert eng.output(victim).finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.output(a).output_ids == refs[3] and eng.output(b).output_ids == refs[4]
    assert eng.blocks.num_free == eng.blocks.blocks.__len__()


def test_stop_ids_eos_min_and_max_tokens(model, references):
    prompts, refs = references
    ref = refs[2]
    eng = _engine(model)
    out = eng.run([prompts[2]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ref[3]]))[0]
    assert out.output_ids == ref[: ref.index(ref[3]) + 1] and out.finish_reason == "stop"
    assert out.stop_reason == ref[3]
    model.config.eos_token_id, saved = ref[1], model.config.eos_token_id
    try:
        eng = _engine(model)
        out = eng.run([prompts[2]], SamplingParams(temperature=0, max_tokens=10))[0]
        assert out.output_ids == ref[: ref.index(ref[1]) + 1] and out.finish_reason == "stop"
        out = eng.run([prompts[2]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
        assert out.output_ids == ref and out.finish_reason == "length"
        out = eng.run([prompts[2]], SamplingParams(temperature=0, max_tokens=10, min_tokens=4))[0]
        assert ref[1] not in out.output_ids[:4]
    finally:
        model.config.eos_token_id = saved
    assert _engine(model).run([prompts[2]], SamplingParams(max_tokens=0))[0].output_ids == []


def test_seeded_sampling_reproducible_across_batches(model):
    prompts = _prompts([6, 9, 4], seed=21)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=8, ignore_eos=True, logprobs=2)
    alone = _engine(model).run([prompts[1]], params)[0]
    batched = _engine(model).run(prompts, [SamplingParams(temperature=1.0, max_tokens=8), params,
                                          SamplingParams(temperature=0.7, max_tokens=5)])[1]
    assert alone.output_ids == batched.output_ids
    assert len(alone.logprobs) == 8 and all(len(lp.top) == 2 for lp in alone.logprobs)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level Kimi tokenizer: 256 base tokens + 256 reserved = the tiny model's 512 ids."""
    d = tmp_path_factory.mktemp("bytes_vocab")
    write_tiktoken_ranks({bytes([b]): b for b in range(256)}, d / "tiktoken.model")
    return KimiTokenizer(d / "tiktoken.model")


def test_stop_strings_and_im_end(model, byte_tokenizer):
    prompt = _prompts([8], seed=4, vocab=256)[0]
    free = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64), tokenizer=byte_tokenizer)
    out = free.run([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    text = byte_tokenizer.decode(out.output_ids)
    assert out.text == text
    stop = text[3:5]
    eng = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64), tokenizer=byte_tokenizer)
    cut = eng.run([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = eng.run([prompt], SamplingParams(temperature=0, max_tokens=12, stop=stop, include_stop_str_in_output=True,
                                            ignore_eos=True))[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert byte_tokenizer.im_end_id in eng.eos_ids
    with pytest.raises(ValueError, match="tokenizer"):
        _engine(model).add_request([1, 2], SamplingParams(stop=["x"]))


def test_request_errors_name_the_problem(model):
    eng = _engine(model, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 10_000])
    with pytest.raises(ValueError, match="cache blocks"):
        eng.add_request(list(range(20)), SamplingParams(max_tokens=10))
    rid = eng.add_request([1, 2, 3], SamplingParams(max_tokens=4), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], request_id=rid)


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_per_token_formula(model, dtype, size):
    cfg = model.config
    eng = LLMEngine(model, EngineConfig(block_size=4, num_blocks=8, cache_dtype=dtype))
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size * cfg.num_hidden_layers
    assert eng.pool.bytes_per_token == per_token
    assert eng.pool.nbytes() == per_token * (8 * 4 + 1)  # blocks plus one scratch row
    k25 = preset("kimi-k2.5").text_config
    pool = LatentPool(k25.num_hidden_layers, 1, 1, k25.kv_lora_rank, k25.qk_rope_head_dim, dtype=torch.bfloat16)
    assert pool.bytes_per_token == 70_272  # 61 x (512 + 64) x 2 B


def test_block_manager_chained_hashes_and_reuse():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = bm.allocate(3)
    prev = None
    for bid, toks in zip(a, ([1, 2], [3, 4], [5, 6]), strict=True):
        prev = bm.register_full(bid, prev, toks)
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7], 7) == a
    assert bm.match_prefix([1, 2, 3, 4, 5, 6], 5) == a[:2]  # capped to full blocks within max_tokens
    assert bm.match_prefix([9, 9, 3, 4], 4) == []  # same second block after a different first: no hit
    bm.release(a)
    assert bm.num_free == 6
    hits = bm.match_prefix([1, 2, 3, 4], 4)
    assert hits == a[:2]
    bm.acquire(hits)
    assert bm.num_free == 4
    fresh = bm.allocate(4)  # reuses never-used blocks first, then the least recently freed (a[2])
    assert set(fresh) == set(range(6)) - set(a[:2])
    assert bm.match_prefix([1, 2, 3, 4, 5, 6], 6) == a[:2]  # a[2] was overwritten, so it no longer matches


def test_prompt_chunks_of_several_requests_share_one_forward(model, references):
    prompts, refs = references
    eng = _engine(model, max_num_batched_tokens=64)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    eng.step()
    assert eng.stats["prompt_tokens"] + eng.stats["decode_tokens"] == 64  # the whole budget, 6 requests
    assert eng.stats["forwards"] <= 3  # padded into a few forwards, not one per request
    while eng.has_unfinished():
        eng.step()
    assert [eng.output(i).output_ids for i in ids] == refs
