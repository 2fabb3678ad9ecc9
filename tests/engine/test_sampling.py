"""The sampler: greedy, filters, seeds, penalties and logprobs, each row with its own parameters."""

from __future__ import annotations

import pytest
import torch

from k25.engine.sampling import SampleRow, SamplingParams, apply_penalties, filter_logits, make_generator, sample


def _logits(b: int = 3, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _rows(params: list[SamplingParams], prompts=None, outputs=None) -> list[SampleRow]:
    return [SampleRow(p, (prompts or [[]] * len(params))[i], (outputs or [[]] * len(params))[i],
                      make_generator(p.seed)) for i, p in enumerate(params)]


def test_greedy_is_argmax_and_rows_keep_their_own_params():
    logits = _logits()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0)]
    tokens, _ = sample(logits, _rows(params))
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_at_their_limit_reduce_to_greedy(kw):
    logits = _logits(4)
    tokens, _ = sample(logits, _rows([SamplingParams(temperature=1.5, seed=i, **kw) for i in range(4)]))
    assert tokens == logits.argmax(-1).tolist()


def test_seed_reproducible_and_independent_of_batch_mates():
    logits = _logits(1, 1000, seed=3).expand(3, -1).clone()
    p = SamplingParams(temperature=1.0, seed=123)
    alone = [sample(logits[:1], _rows([p]))[0][0] for _ in range(1)]
    gen = _rows([p])[0].generator
    seq_alone = [sample(logits[:1], [SampleRow(p, [], [], gen)])[0][0] for _ in range(20)]
    gen2 = make_generator(123)
    other = SamplingParams(temperature=1.0)
    seq_batched = [
        sample(logits, [SampleRow(other, [], []), SampleRow(p, [], [], gen2), SampleRow(other, [], [])])[0][1]
        for _ in range(20)
    ]
    assert seq_alone == seq_batched and seq_alone[0] == alone[0]
    different = [sample(logits[:1], _rows([SamplingParams(temperature=1.0, seed=7)]))[0][0] for _ in range(1)]
    gen3 = make_generator(7)
    seq_other = [sample(logits[:1], [SampleRow(p, [], [], gen3)])[0][0] for _ in range(20)]
    assert different[0] == seq_other[0] and seq_other != seq_alone


def test_top_k_and_top_p_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    k = filter_logits(logits, top_k=3, top_p=1.0, min_p=0.0)
    assert torch.isfinite(k).tolist() == [True, True, True, False, False, False]
    probs = logits.softmax(-1)  # 0.636, 0.234, 0.086, ...
    p = filter_logits(logits, top_k=0, top_p=0.8, min_p=0.0)  # 0.636 < 0.8 -> needs the second
    assert torch.isfinite(p).tolist() == [True, True, False, False, False, False]
    m = filter_logits(logits, top_k=0, top_p=1.0, min_p=float(probs[2] / probs[0]) - 1e-6)
    assert torch.isfinite(m).tolist() == [True, True, True, False, False, False]
    gen = torch.Generator().manual_seed(0)
    row = SampleRow(SamplingParams(temperature=1.0, top_k=2), [], [], gen)
    seen = {sample(logits[None], [row])[0][0] for _ in range(200)}
    assert seen == {0, 1}


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    row = SampleRow(SamplingParams(temperature=0.5), [], [], gen)
    counts = torch.bincount(torch.tensor([sample(logits, [row])[0][0] for _ in range(3000)]), minlength=3)
    expected = (logits[0] / 0.5).softmax(-1)
    assert torch.allclose(counts / 3000, expected, atol=0.03)


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits, _rows([SamplingParams(repetition_penalty=2.0)], [[0]], [[1]]))
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    pf = apply_penalties(logits, _rows([params], [[3]], [[2, 2, 0]]))
    assert pf.tolist() == [[2.0 - 0.75, -2.0, 1.0 - 1.0, 0.5]]  # the prompt token (3) is not penalised
    # a strong presence penalty steers greedy away from what was already said
    tokens, _ = sample(logits, _rows([SamplingParams(temperature=0, presence_penalty=2.0)], [[]], [[0]]))
    assert tokens == [2]


def test_logprobs_are_the_model_distribution():
    logits = _logits(2)
    params = [SamplingParams(temperature=0, logprobs=3, presence_penalty=1.0), SamplingParams(temperature=0)]
    tokens, lps = sample(logits, _rows(params, outputs=[[5], []]))
    ref = logits[0].log_softmax(-1)
    assert lps[1] is None
    assert lps[0].token_id == tokens[0] and lps[0].logprob == pytest.approx(float(ref[tokens[0]]), abs=1e-6)
    top = ref.topk(3)
    assert [t for t, _ in lps[0].top] == top.indices.tolist()
    assert [lp for _, lp in lps[0].top] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_banned_ids_are_never_sampled():
    logits = _logits(1)
    best = int(logits[0].argmax())
    tokens, _ = sample(logits, _rows([SamplingParams(temperature=0)]), banned=[[best]])
    assert tokens[0] != best


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"max_tokens": -1},
                                {"repetition_penalty": 0}, {"presence_penalty": 3}, {"logprobs": -1}, {"stop": [""]}])
def test_invalid_params_fail_clearly(kw):
    with pytest.raises(ValueError, match=next(iter(kw)).split("_")[0]):
        SamplingParams(**kw)


def test_stop_string_normalised_to_list():
    assert SamplingParams(stop="END").stop_list == ["END"]
    assert SamplingParams().stop_list == []
