"""Eviction again during decoding (`kv_regrow`) on the real default model (fp32): the window's
rows are recomputed where they were, memory returns to the budget of everything seen, and greedy
lookahead stays token-identical to plain greedy across the compactions."""

import copy
import pydoc_data.topics

import pytest
import torch
from trieserve.cache.eviction import DECODE_HEADROOM, Eviction, eviction_for
from trieserve.cache.policies import HEAD_CAP, make_policy
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.engine import Engine, EngineConfig
from trieserve.server.sequence import GenerationRequest

from tests.model.engine_io import full_budget_engine, repeat_prompt, run_request

W = 32
PROMPT = 192
GROWN = 96  # tokens run after the prompt before the second eviction


@pytest.fixture(scope="module")
def grown(runner, tokenizer):
    """A cache evicted at prefill (defensive, 50 %), then GROWN more tokens of the same text
    decoded into it, and those tokens."""
    ids = tokenizer(pydoc_data.topics.topics["with"])["input_ids"][: PROMPT + GROWN]
    assert len(ids) == PROMPT + GROWN
    cache = runner.new_cache()
    runner.prefill(cache, ids[:PROMPT], eviction=eviction_for("defensive", 0.5, W))
    for i in range(PROMPT, PROMPT + GROWN, 8):  # decode-sized forwards after the prefill
        runner.forward(cache, torch.tensor(ids[i : i + 8]), torch.arange(i, i + 8))
    return cache, ids


def test_the_window_is_recomputed_where_it_was(runner, grown):
    cache, ids = grown
    cache = copy.deepcopy(cache)
    before = [(layer.keys[:, :, -W:].clone(), layer.values[:, :, -W:].clone()) for layer in cache.layers]
    length = len(ids)
    assert runner.evict_again(cache, ids[-W:], length, eviction_for("defensive", 0.25, W)) == (runner.num_layers, True)
    for layer, (keys, values) in zip(cache.layers, before, strict=True):  # recomputed, kept, last
        torch.testing.assert_close(layer.keys[:, :, -W:], keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.values[:, :, -W:], values, atol=1e-4, rtol=1e-4)
    # at positions one off they would differ (RoPE): the check above can fail
    shifted = copy.deepcopy(grown[0])
    shifted.truncate_new(W, 0)
    runner.forward(shifted, torch.tensor(ids[-W:]), torch.arange(length - W + 1, length + 1))
    assert not torch.allclose(shifted.layers[0].keys[:, :, -W:], before[0][0], atol=1e-4)


def test_nothing_over_the_budget_means_no_forward_and_no_change(runner, grown):
    cache, ids = grown
    cache = copy.deepcopy(cache)
    lengths, nbytes = cache.lengths(), cache.nbytes()
    keys = cache.layers[3].keys.clone()
    # a token budget above everything seen so far: no layer is over it
    assert runner.evict_again(cache, ids[-W:], len(ids), eviction_for("defensive", 10_000.0, W)) == (0, False)
    assert cache.lengths() == lengths and cache.nbytes() == nbytes
    assert torch.equal(cache.layers[3].keys, keys)


@pytest.mark.parametrize("name", ["defensive", "layer_defensive", "streaming"])
def test_evicting_again_returns_to_the_budget_of_everything_seen(runner, grown, name):
    cache, ids = grown
    cache = copy.deepcopy(cache)
    length = len(ids)
    eviction = eviction_for(name, 0.25, W)
    keep = eviction.keep(length)
    held = cache.nbytes()
    last_window = [layer.keys[:, :, -W:].clone() for layer in cache.layers]
    compacted, forward = runner.evict_again(cache, ids[-W:], length, eviction)
    assert compacted > 0 and forward == (name != "streaming")  # streaming needs no queries
    assert cache.mean_length() == pytest.approx(keep)  # real entries per layer and head, window included
    row = 2 * cache.layers[0].keys.shape[1] * cache.layers[0].keys.shape[3] * 4
    assert cache.nbytes() < held
    if name != "layer_defensive":  # per-layer budgets: every layer within its padding cap
        assert max(cache.lengths()) <= HEAD_CAP * keep + 1
    # what is allocated: the budget (padding within HEAD_CAP), plus room reserved to decode into
    assert cache.nbytes() <= runner.num_layers * (HEAD_CAP * keep + 1 + DECODE_HEADROOM) * row
    for layer, window in zip(cache.layers, last_window, strict=True):  # the window always stays, last
        torch.testing.assert_close(layer.keys[:, :, -W:], window, atol=1e-4, rtol=1e-4)
    # decoding continues at logical positions on the compacted cache
    logits = runner.forward(cache, torch.tensor([ids[-1]]), torch.tensor([length]))
    assert torch.isfinite(logits).all()


def test_evict_again_refuses_a_short_tail(runner, grown):
    cache, ids = grown
    with pytest.raises(ValueError, match="last 32 tokens"):
        runner.evict_again(copy.deepcopy(cache), ids[-W + 1 :], len(ids), eviction_for("defensive", 0.25, W))


def generate(engine, ids, max_tokens, lookahead, regrow):
    request = GenerationRequest(
        ids, max_tokens, SamplingParams(temperature=0), lookahead=lookahead, ignore_eos=True, kv_regrow=regrow
    )
    tokens, finish = run_request(engine, request)
    return tokens, finish.stats


def test_greedy_lookahead_matches_plain_greedy_across_evictions(runner, tokenizer):
    # the full draft budget every step (no adaptive sizing): trees of up to 16 nodes keep trying
    # to carry the sequence past its next eviction, which the step must stop exactly at
    config = EngineConfig(kv_policy="defensive", kv_budget=0.5, kv_window=W, kv_regrow=48)
    engine = full_budget_engine(runner, tokenizer, config, branch_length=8)
    engine.start()
    try:
        ids = repeat_prompt(tokenizer, pydoc_data.topics.topics["with"][:700])
        plain, plain_stats = generate(engine, ids, 120, lookahead=False, regrow=None)
        fast, fast_stats = generate(engine, ids, 120, lookahead=True, regrow=None)
        once, once_stats = generate(engine, ids, 120, lookahead=False, regrow=0)
    finally:
        engine.stop()
    assert fast == plain
    assert fast_stats["draft_tokens"] > 0 and fast_stats["accepted_tokens"] > 0
    # 120 tokens: the cache holds prompt + 119; evicted at prefill and at +48 and +96
    for stats in (plain_stats, fast_stats):
        assert stats["kv_evictions"] == 3
        assert stats["kv_tokens_total"] == len(ids) + 96
        assert stats["kv_tokens_kept"] == Eviction(make_policy("defensive"), 0.5, W).keep(len(ids) + 96)
    assert once_stats["kv_evictions"] == 1 and once_stats["kv_tokens_total"] == len(ids)
    assert plain_stats["forward_passes"] == once_stats["forward_passes"] + 2  # the two window forwards
    assert len(once) == len(plain) == 120


def test_regrow_below_the_window_is_refused_before_queueing(runner, tokenizer):
    engine = Engine(runner, tokenizer, EngineConfig(kv_policy="snapkv", kv_budget=0.5, kv_window=W))
    request = GenerationRequest([1, 2, 3], 4, SamplingParams(temperature=0), kv_regrow=W - 1)
    with pytest.raises(ValueError, match="at least the observation window"):
        engine.submit(request, lambda _: None)
    assert engine.queue_length == 0
