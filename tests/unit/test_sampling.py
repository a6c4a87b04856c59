import pytest
import torch
from trieserve.decoding.sampling import (
    SamplingParams,
    apply_penalties,
    choose_token,
    make_generator,
    next_token_distribution,
    warp,
)


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert choose_token(logits, SamplingParams(temperature=0), [], [], None) == 1


def test_top_k_and_top_p_remove_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = warp(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [True, True, False, False]
    kept = warp(logits, SamplingParams(temperature=1.0, top_p=0.7)).isfinite()
    assert kept.tolist() == [True, True, False, False]
    kept = warp(logits, SamplingParams(temperature=1.0, top_p=0.01)).isfinite()
    assert kept.tolist() == [True, False, False, False]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [0], [1])
    assert out.tolist() == [1.0, -4.0, 1.0]
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [2], [0, 0])
    assert out.tolist() == [2.0 - 0.5 - 0.5, -2.0, 1.0]


def test_logit_bias_adds_to_the_named_tokens_and_steers_greedy():
    logits = torch.tensor([2.0, -2.0, 1.0])
    params = SamplingParams(temperature=0, logit_bias=((1, 5.0), (0, -1.5)))
    assert params.has_penalties  # greedy must then take the adjusted argmax
    assert apply_penalties(logits, params, [], []).tolist() == [0.5, 3.0, 1.0]
    assert choose_token(logits, params, [], [], None) == 1
    # with a repetition penalty too: penalties first, then the bias (as OpenAI's bias is last)
    both = SamplingParams(repetition_penalty=2.0, logit_bias=((0, 1.0),))
    assert apply_penalties(logits, both, [0], []).tolist() == [2.0, -2.0, 1.0]


def test_min_tokens_bans_the_end_tokens_until_enough_are_out():
    logits = torch.tensor([5.0, 1.0, 0.5])  # token 0 ends the sequence and is the likeliest
    params = SamplingParams(temperature=0, min_tokens=2, end_ids=frozenset({0}))
    assert params.has_penalties
    assert choose_token(logits, params, [], [], None) == 1
    assert choose_token(logits, params, [], [7], None) == 1
    assert choose_token(logits, params, [], [7, 7], None) == 0  # two out: it may end now
    sampled = next_token_distribution(logits, SamplingParams(min_tokens=1, end_ids=frozenset({0})), [], [])
    assert sampled[0] == 0 and sampled.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def test_min_p_drops_tokens_below_a_share_of_the_most_likely():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = warp(torch.log(probs), SamplingParams(temperature=1.0, min_p=0.25)).isfinite()
    assert kept.tolist() == [True, True, True, False]  # 0.05 < 0.25 * 0.5 <= 0.15
    kept = warp(torch.log(probs), SamplingParams(temperature=1.0, min_p=1.0)).isfinite()
    assert kept.tolist() == [True, False, False, False]
    # after temperature: at T=2 the shares flatten, so min_p 0.25 keeps every token
    assert warp(torch.log(probs), SamplingParams(temperature=2.0, min_p=0.25)).isfinite().all()
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_seeded_draws_reproduce_and_follow_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    params = SamplingParams(temperature=1.0, seed=7)
    a = [choose_token(logits, params, [], [], g) for g in [make_generator(7)] for _ in range(50)]
    b = [choose_token(logits, params, [], [], g) for g in [make_generator(7)] for _ in range(50)]
    assert a == b
    gen = make_generator(0)
    draws = torch.tensor([choose_token(logits, params, [], [], gen) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    probs = next_token_distribution(logits, params, [], [])
    assert torch.allclose(probs, torch.tensor([0.6, 0.3, 0.1]), atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}])
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_extreme_penalties_and_temperatures_give_a_valid_distribution():
    """Values the API accepts must never produce inf/NaN probabilities (a 500 before this fix)."""
    logits = torch.tensor([3.0, -2.0, 0.5, 7.0, -40.0])
    prompt, output = [0, 3, 4], [3, 3, 2]
    for params in (
        SamplingParams(repetition_penalty=5e-324),
        SamplingParams(repetition_penalty=100.0, presence_penalty=2.0, frequency_penalty=2.0),
        SamplingParams(temperature=2e-5, repetition_penalty=1e-30),
        SamplingParams(temperature=100.0, top_p=5e-324, top_k=1_000_000),
    ):
        probs = next_token_distribution(logits, params, prompt, output)
        assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-5, params
        token = choose_token(logits, params, prompt, output, make_generator(0))
        assert probs[token] > 0


def test_temperature_below_epsilon_is_greedy():
    logits = torch.tensor([3.0, -2.0, 0.5, 7.0])
    params = SamplingParams(temperature=1e-300)
    assert params.greedy
    assert choose_token(logits, params, [], [], make_generator(0)) == 3
