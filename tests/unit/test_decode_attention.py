"""The C++ decode-attention kernel (server/stream_linear.cpp): one query row per sequence against
its own cache, all sequences in one call, equal to SDPA and the same in any batch."""

import pytest
import torch
import torch.nn.functional as F


def cache_view(heads: int, rows: int, dim: int, spare: int = 7) -> torch.Tensor:
    """[1, heads, rows, dim] as the KV layers hold it: the live rows of a larger buffer."""
    return torch.randn(1, heads, rows + spare, dim)[:, :, :rows]


def reference(q, keys, values, scale):
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[b : b + 1, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]
            for b, (k, v) in enumerate(zip(keys, values, strict=True))
        ]
    )


@pytest.mark.parametrize(
    ("hq", "hkv", "dim", "lengths"),
    [
        (9, 3, 64, [340]),  # the default model's heads, one sequence
        (9, 3, 64, [1, 255, 256, 257, 513, 2000, 40, 3]),  # around the 256-key blocks
        (4, 4, 64, [100, 7]),  # no grouping
        (8, 2, 48, [300, 31]),  # a head size that is not a whole number of vectors
        (16, 1, 32, [5, 600]),  # 16 query heads on one KV head
    ],
)
def test_equals_sdpa(stream_kernel, hq, hkv, dim, lengths):
    torch.manual_seed(len(lengths) + dim)
    q = torch.randn(len(lengths), hq, dim)
    keys = [cache_view(hkv, n, dim) for n in lengths]
    values = [cache_view(hkv, n, dim) for n in lengths]
    out = stream_kernel.decode_attention(q, keys, values, dim**-0.5)
    torch.testing.assert_close(out, reference(q, keys, values, dim**-0.5), atol=2e-6, rtol=1e-5)


def test_large_scores_do_not_overflow(stream_kernel):
    q = torch.full((1, 3, 64), 30.0)
    keys, values = [cache_view(3, 300, 64) * 10], [cache_view(3, 300, 64)]
    out = stream_kernel.decode_attention(q, keys, values, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, keys, values, 1.0), atol=1e-5, rtol=1e-4)


def test_a_sequence_gets_the_same_bits_in_any_batch(stream_kernel):
    torch.manual_seed(3)
    lengths = [340, 17, 1024, 300]
    q = torch.randn(len(lengths), 9, 64)
    keys = [cache_view(3, n, 64) for n in lengths]
    values = [cache_view(3, n, 64) for n in lengths]
    together = stream_kernel.decode_attention(q, keys, values, 0.125)
    for b in range(len(lengths)):
        alone = stream_kernel.decode_attention(q[b : b + 1], keys[b : b + 1], values[b : b + 1], 0.125)
        assert torch.equal(alone, together[b : b + 1])
    flipped = stream_kernel.decode_attention(q.flip(0), keys[::-1], values[::-1], 0.125)
    assert torch.equal(flipped, together.flip(0))


@pytest.mark.parametrize(
    ("q", "keys", "message"),
    [
        (torch.randn(2, 9, 64), [torch.randn(1, 3, 5, 64)], "one cache per query row"),
        (torch.randn(1, 9, 64), [torch.randn(1, 2, 5, 64)], "head grouping"),
        (torch.randn(1, 9, 64), [torch.randn(1, 3, 5, 32)], "shapes do not match"),
        (torch.randn(1, 9, 64), [torch.randn(1, 3, 64, 5).transpose(2, 3)], "contiguous"),
        (torch.randn(1, 9, 64), [torch.randn(1, 3, 0, 64)], "empty cache"),
        (torch.randn(1, 9, 64).double(), [torch.randn(1, 3, 5, 64)], "fp32"),
    ],
)
def test_bad_inputs_are_refused(stream_kernel, q, keys, message):
    with pytest.raises(RuntimeError, match=message):
        stream_kernel.decode_attention(q, keys, [k.clone() for k in keys], 0.125)


def filled_cache(layers: int, rows: int, seed: int):
    from trieserve.cache.kv import KVCache

    torch.manual_seed(seed)
    cache = KVCache(layers)
    for layer in cache.layers:
        layer.update(torch.randn(1, 3, rows, 64), torch.randn(1, 3, rows, 64))
    return cache


def test_append_rows_writes_each_sequence_s_row_after_its_live_rows(stream_kernel):
    import copy

    from trieserve.server.batch import BatchCache

    caches = [filled_cache(2, n, n) for n in (5, 16, 40)]  # 16: a full buffer (MIN_CAPACITY): the slow path
    qkv = torch.randn(1, 3 + 3 + 9, 3, 64).transpose(1, 2).transpose(1, 2)  # a view, as the forward makes
    new_k, new_v = qkv[:, 9:12], qkv[:, 12:15]
    plain = [copy.deepcopy(c) for c in caches]
    fast = BatchCache(caches, [1, 1, 1], [0, 1, 2], stream_kernel.append_rows)
    slow = BatchCache(plain, [1, 1, 1], [0, 1, 2])
    for layer in range(2):
        got, want = fast.update(new_k, new_v, layer), slow.update(new_k, new_v, layer)
        for g, w in zip(got[0] + got[1], want[0] + want[1], strict=True):
            assert torch.equal(g, w)
    for c, p in zip(caches, plain, strict=True):
        assert c.lengths() == p.lengths()
        for a, b in zip(c.layers, p.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # room everywhere: the kernel writes the rows itself
    roomy = [filled_cache(1, n, n) for n in (5, 40)]
    for c in roomy:
        c.layers[0].reserve(64)
    calls = []
    batch = BatchCache(roomy, [1, 1], [0, 1], lambda *a: calls.append(a) or stream_kernel.append_rows(*a))
    k, v = torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64)
    keys, values = batch.update(k, v, 0)
    assert len(calls) == 1 and [t.shape[2] for t in keys] == [6, 41]
    assert torch.equal(keys[0][:, :, -1], k[:, :, 0]) and torch.equal(values[1][:, :, -1], v[:, :, 1])
    # in a step with a tree, the one-row parts take the kernel and the tree the tensor ops
    calls.clear()
    k, v = torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64)
    batch = BatchCache(roomy, [3, 1], [0, 3], lambda *a: calls.append(a) or stream_kernel.append_rows(*a))
    keys, values = batch.update(k, v, 0)
    assert [t.shape[2] for t in keys] == [9, 42] and len(calls) == 1 and calls[0][-1] == [3]
    assert torch.equal(keys[0][:, :, -3:], k[:, :, :3]) and torch.equal(keys[1][:, :, -1], k[:, :, 3])
    assert torch.equal(values[0][:, :, -3:], v[:, :, :3]) and torch.equal(values[1][:, :, -1], v[:, :, 3])


def test_append_rows_refuses_a_full_buffer(stream_kernel):
    k = torch.zeros(1, 3, 4, 64)
    with pytest.raises(RuntimeError, match="no room"):
        stream_kernel.append_rows(torch.ones(1, 3, 1, 64), torch.ones(1, 3, 1, 64), [k], [k.clone()], [4], [0])
    with pytest.raises(RuntimeError, match="no source row"):
        stream_kernel.append_rows(torch.ones(1, 3, 1, 64), torch.ones(1, 3, 1, 64), [k], [k.clone()], [0], [1])


def test_a_nan_score_anywhere_gives_nan_as_sdpa_does(stream_kernel):
    """A broken model's NaN is not hidden: a NaN key in the middle of a block reaches the output."""
    keys, values = [cache_view(3, 300, 64)], [cache_view(3, 300, 64)]
    keys[0][0, 1, 5] = float("nan")
    out = stream_kernel.decode_attention(torch.randn(1, 9, 64), keys, values, 0.125)
    assert torch.isnan(out[0, 3:6]).all() and torch.isfinite(out[0, :3]).all() and torch.isfinite(out[0, 6:]).all()


def test_models_beyond_the_kernel_s_head_grouping_keep_sdpa(tmp_path):
    """An MQA model with 32 query heads on one KV head: `auto` leaves it on SDPA (no build is
    even tried), `kernel` says why it cannot."""
    from types import SimpleNamespace

    from trieserve.server.builder import decode_kernels
    from trieserve.server.settings import Settings

    config = SimpleNamespace(num_attention_heads=32, num_key_value_heads=1)
    runner = SimpleNamespace(model=SimpleNamespace(config=config), device=torch.device("cpu"))
    assert decode_kernels(Settings(cache_dir=tmp_path), runner) is None
    with pytest.raises(RuntimeError, match="16 query heads per KV head"):
        decode_kernels(Settings(cache_dir=tmp_path, decode_attention="kernel"), runner)
