"""The prefix cache (cache/prefix.py) on the real model's caches."""

from __future__ import annotations

import pytest
import torch
from trieserve.cache.prefix import PrefixCache, block_keys

PROMPT = [(7 * i + 11) % 5000 + 100 for i in range(100)]


def test_block_keys_chain_the_whole_prefix():
    a = block_keys(PROMPT, 32)
    assert len(a) == 3  # 96 of 100 tokens in full blocks
    assert block_keys(PROMPT[:70] + [1, 2, 3], 32)[:2] == a[:2]
    changed = [PROMPT[0] + 1, *PROMPT[1:]]
    assert all(x != y for x, y in zip(block_keys(changed, 32), a, strict=True))  # block 0 changes every key
    assert block_keys(PROMPT, 32, limit=63) == a[:1]


def test_a_hit_loads_the_same_rows_and_the_rest_prefills_to_the_same_logits(runner):
    store = PrefixCache(capacity_bytes=64 * 2**20)
    first = runner.new_cache()
    runner.prefill(first, PROMPT)
    assert store.load(runner.new_cache(), PROMPT) == 0  # nothing stored yet
    assert store.store(first, PROMPT) == 3
    other = PROMPT[:70] + [42, 43, 44, 45, 46]
    cache = runner.new_cache()
    hit = store.load(cache, other)
    assert hit == 64 and cache.lengths() == [64] * runner.num_layers
    # room for the whole prompt: the rest of the prefill appends without moving the loaded rows
    buffers = [layer._k.data_ptr() for layer in cache.layers]
    assert all(layer.capacity >= len(other) for layer in cache.layers)
    for mine, theirs in zip(cache.layers, first.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys[:, :, :64]) and torch.equal(mine.values, theirs.values[:, :, :64])
    logits = runner.prefill(cache, other, start=hit)
    assert [layer._k.data_ptr() for layer in cache.layers] == buffers
    reference = runner.prefill(runner.new_cache(), other)
    assert torch.allclose(logits, reference, atol=1e-4), (logits - reference).abs().max()
    assert int(logits.argmax()) == int(reference.argmax())
    assert store.hit_tokens == 64 and store.queried_tokens == 100 + len(other)


def test_a_lookup_leaves_a_token_to_compute(runner):
    store = PrefixCache(capacity_bytes=64 * 2**20)
    cache = runner.new_cache()
    runner.prefill(cache, PROMPT[:64])
    store.store(cache, PROMPT[:64])
    assert len(store) == 2
    assert store.load(runner.new_cache(), PROMPT[:64]) == 32  # the first token's logits need a row
    assert store.load(runner.new_cache(), PROMPT[:65]) == 64


def test_the_store_stays_within_its_bytes_and_keeps_reachable_prefixes(runner):
    cache = runner.new_cache()
    runner.prefill(cache, PROMPT)
    block_bytes = cache.nbytes() // cache.layers[0].capacity * 32  # one block of rows, all layers
    store = PrefixCache(capacity_bytes=2 * block_bytes)
    assert store.store(cache, PROMPT) == 2  # a prompt longer than the budget keeps its leading blocks
    assert len(store) == 2 and store.nbytes == 2 * block_bytes
    assert store.load(runner.new_cache(), PROMPT) == 64
    # another prompt makes room by evicting the older chain's deepest block, not its head
    other = [t + 1 for t in PROMPT[:40]]
    cache2 = runner.new_cache()
    runner.prefill(cache2, other)
    assert store.store(cache2, other) == 1 and store.nbytes == 2 * block_bytes
    assert store.load(runner.new_cache(), PROMPT) == 32
    assert store.load(runner.new_cache(), other) == 32
    tiny = PrefixCache(capacity_bytes=block_bytes // 2)  # not even one block fits: nothing is kept
    assert tiny.store(cache, PROMPT) == 0 and tiny.nbytes == 0


def test_only_a_cache_of_exactly_the_prompt_is_stored_and_a_hit_needs_an_empty_cache(runner):
    store = PrefixCache(capacity_bytes=64 * 2**20)
    cache = runner.new_cache()
    runner.prefill(cache, PROMPT)
    with pytest.raises(ValueError, match="exactly the prompt"):
        store.store(cache, PROMPT[:90])  # decoding appended rows since, or the prompt differs
    with pytest.raises(ValueError, match="empty cache"):
        store.load(cache, PROMPT)
