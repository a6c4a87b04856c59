import math

import pytest
import torch
from trieserve.kernels import eviction_scores, eviction_scores_reference, eviction_scores_triton, set_backend

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.float16: dict(atol=1e-5, rtol=1e-3)}

# (B, Hq, Hkv, W, S, D)
CASES = [
    (1, 4, 1, 1, 2, 16),
    (2, 9, 3, 4, 17, 32),
    (1, 9, 3, 8, 63, 64),
    (2, 4, 2, 5, 130, 16),
    (1, 4, 1, 3, 3, 16),  # no prefix at all: S == W
]


def make_inputs(case, dtype, device, seed=0):
    B, Hq, Hkv, W, S, D = case
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, Hq, W, D, generator=gen)).to(device, dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(device, dtype)
    return q, k


def naive_scores(q, k, scaling, aggregation, pool_kernel):
    """Element by element, straight from the definition."""
    B, Hq, W, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, P, r = Hq // Hkv, S - W, pool_kernel // 2
    out = torch.zeros(B, Hkv, P, dtype=torch.float64)
    for b in range(B):
        for hk in range(Hkv):
            rows = []
            for g in range(G):
                for w in range(W):
                    logits = [
                        float(q[b, hk * G + g, w].double() @ k[b, hk, s].double()) * scaling for s in range(P + w + 1)
                    ]
                    top = max(logits)
                    z = sum(math.exp(x - top) for x in logits)
                    probs = [math.exp(x - top) / z for x in logits[:P]]
                    pooled = [
                        sum(probs[j] for j in range(i - r, i + r + 1) if 0 <= j < P) / pool_kernel for i in range(P)
                    ]
                    rows.append(pooled)
            rows = torch.tensor(rows, dtype=torch.float64)  # [G * W, P]
            if aggregation == "mean":
                out[b, hk] = rows.mean(0)
            else:
                m = rows.amax(0)
                out[b, hk] = torch.maximum(m, m.mean())
    return out.float()


@pytest.mark.parametrize("aggregation", ["mean", "defensive"])
@pytest.mark.parametrize("pool_kernel", [1, 5])
def test_reference_matches_naive(aggregation, pool_kernel):
    q, k = make_inputs((2, 4, 2, 3, 11, 8), torch.float32, "cpu")
    expected = naive_scores(q, k, 0.35, aggregation, pool_kernel)
    torch.testing.assert_close(eviction_scores_reference(q, k, 0.35, aggregation, pool_kernel), expected)


def test_defensive_floor_property():
    q, k = make_inputs((2, 9, 3, 4, 40, 16), torch.float32, "cpu", seed=1)
    mean = eviction_scores_reference(q, k, 0.25, "mean")
    defensive = eviction_scores_reference(q, k, 0.25, "defensive")
    assert defensive.shape == mean.shape == (2, 3, 36)
    floor = defensive.amin(-1, keepdim=True)
    # the floor is the per-head mean of the maxima: scores below it were raised to exactly it
    assert torch.all(defensive >= floor)
    assert torch.all((defensive == floor).sum(-1) >= 1)
    assert torch.all(defensive >= mean - 1e-7)  # a max over (G, W) is never below the mean


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype, device):
    q, k = make_inputs(case, dtype, device, seed=case[3])
    scale = case[-1] ** -0.5
    for aggregation, pool_kernel in (("mean", 5), ("defensive", 3)):
        expected = eviction_scores_reference(q, k, scale, aggregation, pool_kernel)
        out = eviction_scores_triton(q, k, scale, aggregation, pool_kernel)
        assert out.shape == (case[0], case[2], case[4] - case[3]) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_dispatch(backend, device):
    q, k = make_inputs((1, 9, 3, 4, 33, 32), torch.float16, device)
    set_backend(backend)
    out = eviction_scores(q, k, 0.2, "defensive")
    torch.testing.assert_close(out, eviction_scores_reference(q, k, 0.2, "defensive"), **TOL[torch.float16])


def test_rejects_bad_arguments():
    q, k = make_inputs((1, 4, 2, 3, 10, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="aggregation"):
        eviction_scores_reference(q, k, 1.0, "max")
    with pytest.raises(ValueError, match="pool_kernel"):
        eviction_scores_reference(q, k, 1.0, "mean", pool_kernel=4)
    with pytest.raises(ValueError, match="window"):
        eviction_scores_reference(q, k[:, :, :2], 1.0, "mean")


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("aggregation", ["mean", "defensive"])
def test_kernel_realistic_sizes_on_gpu(aggregation):
    q, k = make_inputs((1, 9, 3, 32, 4096, 64), torch.bfloat16, "cuda")
    out = eviction_scores_triton(q, k, 0.125, aggregation)
    expected = eviction_scores_reference(q, k, 0.125, aggregation)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=2e-2)
