"""KV eviction on the real default model (fp32): memory really drops, decoding continues at
logical positions, the full policy changes nothing, lookahead is lossless on an evicted cache."""

import copy
import pydoc_data.topics

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from trieserve.cache.eviction import Eviction, PrefillTrace, WindowCapture, compress, eviction_for
from trieserve.cache.policies import HEAD_CAP, make_policy
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.engine import EngineConfig
from trieserve.server.runner import ATTENTION_NAME
from trieserve.server.sequence import GenerationRequest
from trieserve.server.settings import Settings

from tests.model.engine_io import full_budget_engine, repeat_prompt, run_request

W = 32
N = 224  # 3 prefill chunks of 64 (the runner fixture's) + one window: prefill splits it the same way
CONT = 16
EVICTING = ["streaming", "snapkv", "adakv", "defensive", "layer_defensive"]


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    ids = tokenizer(pydoc_data.topics.topics["with"])["input_ids"]
    assert len(ids) >= N + CONT
    return ids[:N], ids[N : N + CONT]


@pytest.fixture(scope="module")
def full(runner, text_ids):
    """The full cache of the prompt, the window's captured queries, and reference logits."""
    ids, cont = text_ids
    cache = runner.new_cache()
    runner.prefill(cache, ids[:-W])
    capture = WindowCapture(W)
    last = runner.forward(cache, torch.tensor(ids[-W:]), torch.arange(N - W, N), last_only=True, window_capture=capture)
    ref = runner.forward(copy.deepcopy(cache), torch.tensor(cont), torch.arange(N, N + CONT))
    return cache, capture, last[-1], ref


def row_bytes(cache) -> int:
    """Bytes of one cached row of one layer: K and V, all KV heads."""
    _, H, _, D = cache.layers[0].keys.shape
    return 2 * H * D * cache.layers[0].keys.element_size()


def nll(logits, cont):
    return F.cross_entropy(logits[:-1], torch.tensor(cont[1:])).item()


def test_full_policy_is_exactly_no_eviction(runner, text_ids, full):
    cache, _, last, _ = full
    other = runner.new_cache()
    logits = runner.prefill(other, text_ids[0], eviction=Eviction(make_policy("full"), 0.3, W))
    assert torch.equal(logits, last)
    assert other.lengths() == cache.lengths() == [N] * runner.num_layers
    assert all(
        torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        for a, b in zip(other.layers, cache.layers, strict=True)
    )


@pytest.mark.parametrize("name", EVICTING)
def test_eviction_frees_memory_and_decoding_continues(runner, text_ids, full, name):
    cache, capture, _, ref = full
    ids, cont = text_ids
    evicted = copy.deepcopy(cache)
    keep = Eviction(make_policy(name), 0.3, W).keep(N)
    plan = compress(evicted, make_policy(name), capture, keep, W, reserve=0)
    assert len(plan) == runner.num_layers
    assert evicted.mean_length() == pytest.approx(keep)  # real entries per layer and KV head
    # buffers of exactly the rows held: the kept ones, plus padding under per-head budgets
    assert evicted.nbytes() == sum(evicted.lengths()) * row_bytes(cache)
    assert evicted.nbytes() <= HEAD_CAP * keep * runner.num_layers * row_bytes(cache)
    assert evicted.nbytes() < 0.4 * N * runner.num_layers * row_bytes(cache)
    logits = runner.forward(evicted, torch.tensor(cont), torch.arange(N, N + CONT))
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.5, f"{name}: top-1 agreement with the full cache {agree:.2f}"
    assert nll(logits, cont) < nll(ref, cont) + 1.0


def masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Full-cache attention that hides, per KV head, the rows eviction dropped (the reference)."""
    keep = kwargs["keep_masks"][module.layer_idx]  # bool [B, Hkv, N]
    B, Hkv, n = keep.shape
    t, s = query.shape[2], key.shape[2]
    visible = torch.ones(B, Hkv, t, s, dtype=torch.bool).tril(s - t)
    visible[..., :n] &= keep[:, :, None, :]
    mask = visible.repeat_interleave(query.shape[1] // Hkv, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("trieserve_test_masked", masked_attention)


def test_evicted_cache_matches_masked_full_cache_at_logical_positions(runner, text_ids, full):
    cache, capture, _, _ = full
    cont = text_ids[1][:4]
    evicted = copy.deepcopy(cache)
    plan = compress(evicted, make_policy("layer_defensive"), capture, 64, W, reserve=0)
    assert len(set(evicted.lengths())) > 1, "layer budgets differ"
    assert any(layer.valid_rows() is not None for layer in evicted.layers), "head budgets differ"
    H = cache.layers[0].keys.shape[1]
    keep_masks = {i: torch.ones(1, H, N, dtype=torch.bool) for i in range(runner.num_layers)}
    for i, index in plan.items():  # -1: a padding slot, which keeps nothing
        real = (index >= 0).to(torch.uint8)
        keep_masks[i] = (
            torch.zeros(1, H, N, dtype=torch.uint8).scatter_reduce_(2, index.clamp(min=0), real, "amax").bool()
        )
    masked = copy.deepcopy(cache)
    got, want = [], []
    runner.model.set_attn_implementation("trieserve_test_masked")
    try:
        for j, tok in enumerate(cont):
            out = runner.model(
                input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[N + j]]), cache=masked,
                use_cache=True, keep_masks=keep_masks,
            )  # fmt: skip
            want.append(out.logits[0, -1].float())
    finally:
        runner.model.set_attn_implementation(ATTENTION_NAME)
    shifted = copy.deepcopy(evicted)
    for j, tok in enumerate(cont):
        got.append(runner.step(evicted, torch.tensor([tok]), torch.tensor([N + j]), None)[0])
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-4, rtol=0)
    # positions are logical: the physical row count would be the wrong position id
    wrong = runner.step(shifted, torch.tensor([cont[0]]), torch.tensor([shifted.get_seq_length()]), None)[0]
    assert not torch.allclose(wrong, want[0], atol=1e-3)


def test_layer_defensive_chunked_prefill_keeps_peak_memory_near_budget(runner, text_ids, full):
    cache, _, _, ref = full
    ids, cont = text_ids
    row = row_bytes(cache)
    ev = eviction_for("layer_defensive", 0.25, W)
    keep, chunk = ev.keep(N), runner.prefill_chunk
    evicted, trace = runner.new_cache(), PrefillTrace()
    runner.prefill(evicted, ids, eviction=ev, trace=trace)
    assert trace.chunks == 4 and trace.compactions > runner.num_layers  # compressed more than once
    assert trace.peak_bytes <= runner.num_layers * (HEAD_CAP * keep + chunk) * row  # padding included
    assert trace.peak_bytes < 0.6 * runner.num_layers * N * row  # vs the whole prompt's rows
    assert evicted.mean_length() == pytest.approx(keep)
    logits = runner.forward(evicted, torch.tensor(cont), torch.arange(N, N + CONT))
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


def generate(engine, ids, max_tokens, lookahead):
    request = GenerationRequest(ids, max_tokens, SamplingParams(temperature=0), lookahead=lookahead, ignore_eos=True)
    return run_request(engine, request)


def test_greedy_lookahead_on_an_evicted_cache_matches_plain_greedy(runner, tokenizer, model_dir):
    # an engine with the server's eviction settings on the session's runner (no second model
    # load); a fixed step cost and the full draft budget every step (no adaptive sizing), so
    # every lookahead step runs a real tree
    settings = Settings(
        kv_policy="defensive", kv_budget=0.5, decoding_length=16, branch_length=6, adaptive_budget=False
    )
    config = EngineConfig(kv_policy=settings.kv_policy, kv_budget=settings.kv_budget, kv_window=settings.kv_window)
    engine = full_budget_engine(runner, tokenizer, config, branch_length=settings.branch_length)
    engine.start()
    try:
        ids = repeat_prompt(tokenizer, pydoc_data.topics.topics["with"][:600])
        plain, fin_plain = generate(engine, ids, 24, lookahead=False)
        fast, fin_fast = generate(engine, ids, 24, lookahead=True)
    finally:
        engine.stop()
    assert fast == plain
    for fin in (fin_plain, fin_fast):
        assert fin.stats["kv_tokens_total"] == len(ids)
        assert fin.stats["kv_tokens_kept"] == Eviction(make_policy("defensive"), 0.5, W).keep(len(ids))
    assert fin_fast.stats["draft_tokens"] > 0 and fin_plain.stats["draft_tokens"] == 0


def test_defensive_scores_reach_the_values_through_the_window_capture(runner, full):
    cache, capture, _, _ = full
    assert sorted(capture.out_proj) == list(range(runner.num_layers))  # each layer's o_proj weight
    plans = {}
    for weighting in (True, False):
        policy = make_policy("defensive", value_weighting=weighting)
        plans[weighting] = compress(copy.deepcopy(cache), policy, capture, 64, W, reserve=0)
    assert any(not torch.equal(plans[True][i], plans[False][i]) for i in plans[True])
