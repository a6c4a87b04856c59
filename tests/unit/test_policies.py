"""Eviction policies, budgets and compaction on synthetic scores and caches (no model)."""

import math

import pytest
import torch
from trieserve.cache.criticality import critical_scores, value_norms
from trieserve.cache.eviction import (
    DECODE_HEADROOM,
    Eviction,
    WindowCapture,
    chunk_bounds,
    compress,
    eviction_for,
)
from trieserve.cache.kv import KVCache
from trieserve.cache.policies import (
    HEAD_CAP,
    POLICIES,
    LayerDefensivePolicy,
    make_policy,
    top_rows,
    top_rows_per_head,
)
from trieserve.kernels.eviction_scores import eviction_scores_reference

W = 4


def planted_queries(probs: torch.Tensor, scaling: float = 1.0):
    """Queries and one-hot keys whose softmax rows are exactly `probs` [Hq, W, S] (one batch,
    one KV head): key j = e_j, query = log p / scaling, so logit_j = log p_j."""
    Hq, Wq, S = probs.shape
    q = (probs.log() / scaling).unsqueeze(0)  # [1, Hq, W, D=S]
    k = torch.eye(S).expand(1, 1, S, S).contiguous()  # [1, 1, S, D=S]
    return q, k


def planted_case():
    # Two query heads of one KV head, one window query each, three prefix rows + the window row.
    # Row 0: moderate for both heads; row 1: a spike in head 0 only; row 2: nobody looks.
    probs = torch.tensor([[[0.35, 0.55, 0.05, 0.05]], [[0.35, 0.01, 0.05, 0.59]]])
    return planted_queries(probs)


def test_mean_aggregation_hand_computed():
    q, k = planted_case()
    got = make_policy("snapkv", pool_kernel=1).score(q, k, 1.0, window=1)
    expected = torch.tensor([[[0.35, (0.55 + 0.01) / 2, 0.05]]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_defensive_aggregation_hand_computed():
    q, k = planted_case()
    got = make_policy("defensive", pool_kernel=1).score(q, k, 1.0, window=1)
    maxima = torch.tensor([0.35, 0.55, 0.05])
    expected = torch.maximum(maxima, maxima.mean()).view(1, 1, 3)  # floor: (0.35+0.55+0.05)/3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_defensive_and_mean_keep_different_rows_where_one_head_spikes():
    q, k = planted_case()
    keep = 1 + 1  # one prefix row + the window row
    snap = make_policy("snapkv", pool_kernel=1)
    defensive = make_policy("defensive", pool_kernel=1)
    kept_mean = snap.plan({0: snap.score(q, k, 1.0, 1)}, keep, 1)[0]
    kept_def = defensive.plan({0: defensive.score(q, k, 1.0, 1)}, keep, 1)[0]
    assert kept_mean.tolist() == [[[0, 3]]]  # the row everyone reads moderately
    assert kept_def.tolist() == [[[1, 3]]]  # the row one head depends on


def test_defensive_and_mean_agree_when_heads_agree():
    probs = torch.tensor([[[0.1, 0.6, 0.2, 0.1]], [[0.1, 0.6, 0.2, 0.1]]])
    q, k = planted_queries(probs)
    for name in ("snapkv", "defensive"):
        policy = make_policy(name, pool_kernel=1)
        assert policy.plan({0: policy.score(q, k, 1.0, 1)}, 3, 1)[0].tolist() == [[[1, 2, 3]]]


@pytest.mark.parametrize(
    "budget, prompt, keep",
    [
        (0.2, 1000, 200),
        (0.5, 301, 151),
        (1.0, 300, 300),
        (300, 1000, 300),
        (5000, 1000, 1000),
        (0.01, 1000, 32),
        (2.0, 1000, 32),
    ],
)
def test_budget_is_a_fraction_or_a_token_count(budget, prompt, keep):
    assert Eviction(make_policy("snapkv"), budget, window=32).keep(prompt) == keep


def test_short_prompts_and_full_budgets_are_not_evicted():
    ev = Eviction(make_policy("defensive"), 0.5, window=32)
    assert not ev.applies(32 + 3)
    assert ev.applies(200)
    assert not Eviction(make_policy("defensive"), 1.0, window=32).applies(200)
    assert not Eviction(make_policy("full"), 0.5, window=32).applies(200)
    assert eviction_for("full", 0.5, 32) is None
    with pytest.raises(ValueError):
        Eviction(make_policy("snapkv"), 0.0)
    with pytest.raises(ValueError, match="unknown KV policy"):
        make_policy("h2o")


def check_index(index: torch.Tensor, S: int, K: int, window: int) -> None:
    assert index.dtype == torch.int64 and index.shape[-1] == K
    assert (index[..., 1:] > index[..., :-1]).all(), "ascending, no duplicates"
    assert index.min() >= 0 and index.max() < S
    assert (index[..., -window:] == torch.arange(S - window, S)).all(), "the window is kept"


def check_head_index(index: torch.Tensor, S: int, keep: int, window: int) -> None:
    """Per-head budgets: each head's -1 padding first, then ascending distinct rows, the window
    last; the real rows of a layer average `keep` per head (window included) and no head holds
    more than HEAD_CAP x keep."""
    B, H, K = index.shape
    assert K <= int(HEAD_CAP * keep)
    assert (index[..., -window:] == torch.arange(S - window, S)).all(), "the window is kept"
    for head in index.reshape(-1, K):
        real = head[head >= 0]
        assert (head[: K - real.numel()] == -1).all(), "padding first"
        assert (real[1:] > real[:-1]).all() and real.max() < S
    assert (index >= 0).sum().item() == B * H * keep


def random_scores(L=3, B=2, H=3, P=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.rand(B, H, P, generator=gen) for layer in range(L)}


def test_per_head_top_k_keeps_exactly_the_budget_and_the_window():
    scores = random_scores()
    keep = 20
    plan = make_policy("snapkv").plan(scores, keep, W)
    for layer, index in plan.items():
        check_index(index, 60 + W, keep, W)
        expected = scores[layer].topk(keep - W, dim=-1).indices.sort(-1).values
        assert torch.equal(index[..., :-W], expected)
    heads = plan[0][0]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])


def test_ties_go_to_recent_rows():
    scores = torch.tensor([[[5.0, 1.0, 1.0, 1.0, 1.0]]])
    assert top_rows(scores, 3).tolist() == [[[0, 3, 4]]]


def test_streaming_keeps_sinks_and_the_most_recent_rows():
    policy = make_policy("streaming", sinks=4)
    keys = torch.zeros(1, 2, 50, 8)
    index = policy.plan({0: policy.score(None, keys, 1.0, W)}, 16, W)[0]
    assert index[0, 0].tolist() == [0, 1, 2, 3, *range(38, 50)]


def test_layer_defensive_global_budget_sums_to_the_uniform_total():
    scores = random_scores(L=4, P=80)
    scores[2] = scores[2] * 10  # a layer whose rows matter more gets more of the budget
    scores[3] = scores[3] * 0.01
    keep = 30
    policy = LayerDefensivePolicy()
    budgets = policy.layer_budgets(scores, keep, W)
    assert sum(budgets.values()) == 4 * keep
    assert budgets[2] > keep > budgets[3] >= W
    plan = policy.plan(scores, keep, W)
    B, H = scores[0].shape[:2]
    real = sum((plan[layer] >= 0).sum().item() for layer in plan) + sum(
        B * H * (80 + W) for layer in scores if layer not in plan
    )
    assert real == 4 * keep * B * H
    for layer, index in plan.items():
        check_head_index(index, 80 + W, budgets[layer], W)


def test_layer_defensive_never_gives_a_layer_more_than_it_holds():
    scores = {0: torch.full((1, 2, 10), 100.0), 1: torch.rand(1, 2, 200)}
    budgets = LayerDefensivePolicy().layer_budgets(scores, 60, W)
    assert budgets[0] == 10 + W
    assert sum(budgets.values()) == 2 * 60


def filled_cache(L=3, B=1, H=3, S=90, D=8, G=3, seed=0):
    """A KVCache whose key rows encode their own position (row s has keys[..., 0] == s)."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(L)
    for layer in cache.layers:
        k = torch.randn(B, H, S, D, generator=gen)
        k[..., 0] = torch.arange(S, dtype=torch.float32)
        layer.update(k, -k)
    capture = WindowCapture(W)
    for i in range(L):
        capture.record(i, torch.randn(B, H * G, 16, D, generator=gen), D**-0.5)
    return cache, capture


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_compacts_a_cache(name):
    cache, capture = filled_cache()
    before = cache.nbytes()
    policy = make_policy(name)
    keep = 30
    done = compress(cache, policy, capture, keep, W, reserve=0)
    if not policy.evicts:
        assert done == {} and cache.nbytes() == before and cache.lengths() == [90] * 3
        return
    assert sorted(done) == [0, 1, 2]
    assert cache.mean_length() == pytest.approx(keep)  # real entries per layer and head
    assert cache.nbytes() <= before * HEAD_CAP * keep / 90  # padding included
    for layer in cache.layers:
        assert torch.equal(layer.values, -layer.keys)
        assert layer.keys.shape[2] == layer.length and layer.capacity == layer.length
        valid = layer.valid_rows()
        if not policy.head_budgets:
            assert valid is None and layer.length == keep
            check_index(layer.keys[..., 0].long(), 90, keep, W)  # the positions that were kept
            continue
        assert valid is not None, "random scores give the heads different budgets"
        rows = layer.keys[..., 0].long().masked_fill(~valid, -1)
        # a global budget gives each layer its own mean (checked in total above)
        check_head_index(rows, 90, round(layer.kept_rows()) if policy.global_budget else keep, W)


def test_compaction_frees_buffers_and_grows_by_its_reserve():
    cache, capture = filled_cache(L=1)
    layer = cache.layers[0]
    old = layer._k
    compress(cache, make_policy("snapkv"), capture, 20, W, reserve=DECODE_HEADROOM)
    assert layer._k is not old and layer.capacity == 20 + DECODE_HEADROOM
    assert layer.nbytes() == 2 * (20 + DECODE_HEADROOM) * 3 * 8 * 4
    kept = layer.keys.clone()
    layer.update(torch.ones(1, 3, DECODE_HEADROOM + 1, 8), torch.ones(1, 3, DECODE_HEADROOM + 1, 8))
    assert layer.capacity == 20 + DECODE_HEADROOM + 1 + DECODE_HEADROOM  # not doubled
    assert torch.equal(layer.keys[:, :, :20], kept)


def test_per_head_budgets_hand_computed():
    scores = torch.tensor([[[0.9, 0.8, 0.1, 0.7], [0.2, 0.3, 0.05, 0.6]]])
    # the 4 best of both heads: three from head 0, one from head 1
    assert top_rows_per_head(scores, 4, cap=3).tolist() == [[[0, 1, 3], [-1, -1, 3]]]
    # a cap of 2 per head hands head 0's third row to head 1's next best
    assert top_rows_per_head(scores, 4, cap=2).tolist() == [[[0, 1], [1, 3]]]


def test_per_head_budgets_follow_where_attention_is_spread():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 3, 100, generator=gen)
    scores[:, 0] *= 10  # head 0 reads many rows strongly
    scores[:, 2] *= 0.1
    keep = 24
    index = make_policy("adakv").plan({0: scores}, keep, W)[0]
    check_head_index(index, 100 + W, keep, W)
    counts = (index >= 0).sum(-1)[0].tolist()
    cap = int(HEAD_CAP * keep)
    assert counts == [cap, cap, 3 * keep - 2 * cap]  # heads 0 and 1 outrank head 2 everywhere


def test_defensive_floor_and_softmax_skip_padding_rows():
    probs = torch.tensor([[[0.2, 0.1, 0.3, 0.1, 0.3]]])  # one query head, window of one
    q, k = planted_queries(probs)
    valid = torch.tensor([[[True, True, False, True, True]]])
    got = eviction_scores_reference(q, k, 1.0, "defensive", pool_kernel=1, valid=valid)
    kept = torch.tensor([0.2, 0.1, 0.1]) / 0.7  # the softmax over the real rows only
    mean = kept.mean()
    expected = torch.tensor([[[max(kept[0], mean), max(kept[1], mean), float("-inf"), max(kept[2], mean)]]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_defensive_floor_with_pooling_averages_real_rows_only():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 12, 8, generator=gen)
    valid = torch.ones(1, 1, 12, dtype=torch.bool)
    valid[..., [3, 4, 7]] = False
    got = eviction_scores_reference(q, k, 1.0, "defensive", pool_kernel=5, valid=valid)
    probs = (q @ k.transpose(-1, -2)).masked_fill(~valid[:, :, None], float("-inf")).softmax(-1)[..., :11]
    pooled = torch.nn.functional.avg_pool1d(probs.view(1, 1, 11), 5, stride=1, padding=2).view(11)
    real = valid[0, 0, :11]
    mean = pooled[real].mean()
    expected = torch.where(real, torch.maximum(pooled, mean), torch.tensor(float("-inf")))
    assert pooled[~real].gt(0).any(), "pooling spreads attention into padding rows"
    torch.testing.assert_close(got.view(11), expected, atol=1e-6, rtol=0)


def test_per_head_ties_go_to_the_later_row():
    scores = torch.tensor([[[0.5, 0.2, 0.5], [0.5, 0.5, 0.1]]])
    # four rows score 0.5 and three are kept: head 0's row 2, head 1's row 1, then row 0 of the
    # lower head
    assert top_rows_per_head(scores, 3, cap=3).tolist() == [[[0, 2], [-1, 1]]]


def test_compacting_a_padded_cache_again_never_keeps_padding():
    cache, capture = filled_cache(L=1, S=120)
    policy = make_policy("defensive")
    compress(cache, policy, capture, 60, W, reserve=0)
    layer = cache.layers[0]
    first = layer.valid_rows().clone()
    assert not first.all()
    real_before = set(layer.keys[..., 0][first].long().tolist())
    compress(cache, policy, capture, 30, W, reserve=0)
    valid = layer.valid_rows()
    valid = torch.ones_like(layer.keys[..., 0], dtype=torch.bool) if valid is None else valid
    assert valid.sum().item() == 3 * 30
    assert set(layer.keys[..., 0][valid].long().tolist()) <= real_before
    # the two guards fail independently: a plan that must reach into padding marks it -1 ...
    scores = torch.tensor([[[0.9, float("-inf"), 0.5, float("-inf")]]])
    assert sorted(make_policy("snapkv").plan({0: scores}, 3 + W, W)[0][0, 0, :3].tolist()) == [-1, 0, 2]
    # ... and compaction keeps a padding row as padding even when an index names it
    cache, capture = filled_cache(L=1)
    compress(cache, policy, capture, 30, W, reserve=0)
    layer = cache.layers[0]
    pad = (~layer.valid_rows()).nonzero()[0].tolist()  # [b, h, row] of one padding row
    index = torch.arange(layer.length).expand(1, 3, -1).clone()
    layer.compact(index, reserve=0)
    assert not layer.valid_rows()[pad[0], pad[1], pad[2]]


def test_new_rows_are_real_in_every_head_of_a_padded_layer():
    cache, capture = filled_cache(L=1)
    compress(cache, make_policy("defensive"), capture, 30, W, reserve=4)
    layer = cache.layers[0]
    n, real = layer.length, layer.valid_rows().sum().item()
    layer.update(torch.ones(1, 3, 6, 8), torch.ones(1, 3, 6, 8))  # grows past the reserve
    valid = layer.valid_rows()
    assert valid.shape[-1] == n + 6 and valid[..., n:].all() and valid.sum().item() == real + 18
    before = layer.valid_rows()[..., :n].clone()
    cache.keep_path(6, [0, 2])
    assert layer.length == n + 2 and layer.valid_rows()[..., n:].all()
    assert torch.equal(layer.valid_rows()[..., :n], before), "the old padding stays padding"


def test_compress_leaves_layers_within_budget_plus_slack_alone():
    cache, capture = filled_cache()
    assert compress(cache, make_policy("snapkv"), capture, 60, W, slack=30) == {}
    assert len(compress(cache, make_policy("snapkv"), capture, 60, W, slack=29)) == 3


def test_window_capture_needs_a_chunk_holding_the_window():
    capture = WindowCapture(8)
    with pytest.raises(ValueError, match="cannot hold a window"):
        capture.record(0, torch.zeros(1, 3, 5, 4), None)
    capture.record(1, torch.arange(10.0).view(1, 1, 10, 1), None)
    assert capture.queries[1].flatten().tolist() == list(range(2, 10))
    assert math.isclose(capture.scaling[1], 1.0)


@pytest.mark.parametrize(
    "start, end, chunk, min_len, expected",
    [
        (0, 100, 64, 1, [(0, 64), (64, 100)]),
        (0, 70, 64, 32, [(0, 70)]),  # a 6-token tail joins the chunk before it
        (0, 200, 64, 32, [(0, 64), (64, 128), (128, 200)]),
        (0, 100, 16, 32, [(0, 32), (32, 64), (64, 100)]),  # chunks never shorter than the window
        (10, 40, 64, 32, [(10, 40)]),
    ],
)
def test_chunk_bounds(start, end, chunk, min_len, expected):
    assert chunk_bounds(start, end, chunk, min_len) == expected


def test_value_norms_match_the_output_projection_per_query_head():
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(1, 2, 5, 4, generator=gen)  # 2 KV heads, 5 rows, D = 4
    out_proj = torch.randn(6, 4 * 4, generator=gen)  # model width 6, 4 query heads (G = 2)
    got = value_norms(values, out_proj, q_heads=4)
    for h in range(2):
        for i in range(5):
            per_q = [(out_proj[:, q * 4 : (q + 1) * 4] @ values[0, h, i]).abs().sum() for q in (2 * h, 2 * h + 1)]
            assert got[0, h, i].item() == pytest.approx(float(sum(per_q) / 2), rel=1e-5)


def test_critical_scores_protect_the_attention_mass_then_weigh_values():
    # window attention: rows 0..3 of the prefix, then the window row (0.2 of the mass)
    probs = torch.tensor([[[0.5, 0.15, 0.1, 0.05, 0.2]]])
    q, k = planted_queries(probs)
    values = torch.zeros(1, 1, 5, 5)
    values[0, 0, :, 0] = torch.tensor([0.0, 1.0, 1.0, 4.0, 1.0])  # row 0 adds nothing to the output
    out_proj = torch.eye(5)
    scores = torch.tensor([[[0.5, 0.15, 0.1, 0.05]]])
    got = critical_scores(scores, q, k, values, out_proj, 1.0)[0, 0]
    # 0.9 - 0.2 = 0.7 of the mass: rows 0 and 1 (0.5 + 0.15 < 0.7, so row 2 is needed too)
    assert (got[:3] > got[3]).all() and got[0] > got[1] > got[2]  # protected, in attention order
    # unprotected rows: score x norm / the prefix rows' norms (0 + 1 + 1 + 4)
    assert got[3].item() == pytest.approx(0.05 * 4 / 6, rel=1e-5)
    # with less coverage only row 0 is protected, and row 3's value outweighs row 2's attention
    got = critical_scores(scores, q, k, values, out_proj, 1.0, coverage=0.6)[0, 0]
    assert got[0] > got[3] > got[1] > got[2]
    assert got[3].item() == pytest.approx(0.05 * 4 / 6, rel=1e-5)
    assert got[1].item() == pytest.approx(0.15 * 1 / 6, rel=1e-5)


def test_critical_scores_leave_padding_rows_out():
    probs = torch.tensor([[[0.4, 0.1, 0.1, 0.2, 0.2]]])
    q, k = planted_queries(probs)
    values = torch.ones(1, 1, 5, 5)
    valid = torch.tensor([[[True, False, True, True, True]]])
    scores = torch.tensor([[[0.4, float("-inf"), 0.1, 0.2]]])
    got = critical_scores(scores, q, k, values, torch.eye(5), 1.0, valid=valid)[0, 0]
    assert torch.isneginf(got[1]) and torch.isfinite(got[[0, 2, 3]]).all()


def test_critical_scores_normalise_value_norms_over_rows_or_heads():
    # two KV heads (one query head each), three prefix rows + one window row; coverage 0: no row
    # is protected, so every score is attention score x normalised value norm
    probs = torch.tensor([[[0.3, 0.3, 0.2, 0.2]], [[0.1, 0.4, 0.3, 0.2]]])
    q = probs.log().unsqueeze(0)  # [1, 2, 1, 4]
    k = torch.eye(4).expand(1, 2, 4, 4).contiguous()
    values = torch.zeros(1, 2, 4, 4)
    values[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 1.0])
    values[0, 1, :, 0] = torch.tensor([3.0, 2.0, 1.0, 1.0])
    out_proj = torch.eye(8)  # ||v W_o||_1 = ||v||_1
    scores = probs[:, 0, :3].unsqueeze(0).clone()  # [1, 2, 3]
    rows = critical_scores(scores, q, k, values, out_proj, 1.0, coverage=0.0, norm_over="rows")
    heads = critical_scores(scores, q, k, values, out_proj, 1.0, coverage=0.0, norm_over="heads")
    norms = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    torch.testing.assert_close(rows[0], scores[0] * norms / 6, atol=1e-6, rtol=0)
    torch.testing.assert_close(heads[0], scores[0] * norms / 4, atol=1e-6, rtol=0)  # 1+3, 2+2, 3+1
    with pytest.raises(ValueError, match="norm_over"):
        critical_scores(scores, q, k, values, out_proj, 1.0, norm_over="layers")


def test_defensive_policies_pass_their_value_normalisation_through():
    probs = torch.tensor([[[0.3, 0.3, 0.2, 0.2]], [[0.1, 0.4, 0.3, 0.2]]])
    q = probs.log().unsqueeze(0)
    k = torch.eye(4).expand(1, 2, 4, 4).contiguous()
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(1, 2, 4, 4, generator=gen)
    out_proj = torch.rand(5, 8, generator=gen)
    assert make_policy("defensive").value_norms == "rows"
    assert make_policy("layer_defensive").value_norms == "heads"
    a = make_policy("defensive", value_norms="heads").score(q, k, 1.0, 1, values=values, out_proj=out_proj)
    b = make_policy("layer_defensive").score(q, k, 1.0, 1, values=values, out_proj=out_proj)
    c = make_policy("defensive").score(q, k, 1.0, 1, values=values, out_proj=out_proj)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
