"""The C++ attention kernels (server/stream_linear.cpp): decode rows (one query row per sequence)
and lookahead trees against each sequence's own cache, all sequences in one call, equal to SDPA
and the same in any batch; and the KV append for every part of a step."""

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
    # a step with a tree: every part with room takes the kernel, its rows in one run each
    calls.clear()
    k, v = torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64)
    batch = BatchCache(roomy, [3, 1], [0, 3], lambda *a: calls.append(a) or stream_kernel.append_rows(*a))
    keys, values = batch.update(k, v, 0)
    assert [t.shape[2] for t in keys] == [9, 42] and len(calls) == 1 and calls[0][-2:] == ([0, 3], [3, 1])
    assert torch.equal(keys[0][:, :, -3:], k[:, :, :3]) and torch.equal(keys[1][:, :, -1], k[:, :, 3])
    assert torch.equal(values[0][:, :, -3:], v[:, :, :3]) and torch.equal(values[1][:, :, -1], v[:, :, 3])
    # a part without the room grows its buffer through the tensor ops; the others keep the kernel
    calls.clear()
    k, v = torch.randn(1, 3, 60, 64), torch.randn(1, 3, 60, 64)
    batch = BatchCache(roomy, [59, 1], [0, 59], lambda *a: calls.append(a) or stream_kernel.append_rows(*a))
    keys, values = batch.update(k, v, 0)
    assert [t.shape[2] for t in keys] == [68, 43] and len(calls) == 1 and calls[0][-2:] == ([59], [1])
    assert torch.equal(keys[0][:, :, -59:], k[:, :, :59]) and torch.equal(values[1][:, :, -1], v[:, :, 59])


def test_append_rows_refuses_a_full_buffer(stream_kernel):
    k = torch.zeros(1, 3, 4, 64)
    new = torch.ones(1, 3, 2, 64)
    with pytest.raises(RuntimeError, match="no room"):
        stream_kernel.append_rows(new, new, [k], [k.clone()], [4], [0], [1])
    with pytest.raises(RuntimeError, match="no room"):
        stream_kernel.append_rows(new, new, [k], [k.clone()], [3], [0], [2])  # the second row would not fit
    with pytest.raises(RuntimeError, match="no source row"):
        stream_kernel.append_rows(new, new, [k], [k.clone()], [0], [1], [2])
    assert torch.equal(k, torch.zeros(1, 3, 4, 64))  # nothing written by a refused call


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


# ---- tree attention -------------------------------------------------------------------------


def tree_inputs(prefixes, masks, hq=9, hkv=3, dim=64, seed=0):
    """Parts with `prefixes[p]` cached rows before their new rows and `masks[p]` (bool [T, T])
    over them: the kernel's arguments and SDPA's answer."""
    torch.manual_seed(seed)
    counts = [m.shape[0] for m in masks]
    keys = [cache_view(hkv, p + t, dim) for p, t in zip(prefixes, counts, strict=True)]
    values = [cache_view(hkv, p + t, dim) for p, t in zip(prefixes, counts, strict=True)]
    q = torch.randn(sum(counts), hq, dim)
    row_part = torch.repeat_interleave(torch.arange(len(masks)), torch.tensor(counts))
    visible = torch.zeros(sum(counts), max(counts), dtype=torch.bool)
    expected, at = [], 0
    for p, m, k, v in zip(prefixes, masks, keys, values, strict=True):
        t = m.shape[0]
        visible[at : at + t, :t] = m
        full = torch.ones(t, p + t, dtype=torch.bool)
        full[:, p:] = m
        o = F.scaled_dot_product_attention(
            q[at : at + t].transpose(0, 1)[None], k, v, attn_mask=full, scale=dim**-0.5, enable_gqa=True
        )
        expected.append(o[0].transpose(0, 1))
        at += t
    return q, keys, values, row_part, visible, torch.cat(expected)


def chain(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril_()


BRANCHING = torch.tensor(
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool
)


@pytest.mark.parametrize(
    ("prefixes", "masks"),
    [
        ([340], [BRANCHING]),  # one tree
        ([340, 17, 500, 1], [chain(1), BRANCHING, chain(3), chain(1)]),  # decode rows, trees, a chain
        ([250], [chain(20)]),  # new rows straddling the 256-key blocks
        ([0], [chain(4)]),  # nothing cached before the new rows
        ([300], [chain(64)]),  # a big tree: 192 query vectors in a work item
    ],
)
def test_tree_attention_equals_sdpa_with_the_tree_mask(stream_kernel, prefixes, masks):
    q, keys, values, row_part, visible, expected = tree_inputs(prefixes, masks)
    out = stream_kernel.tree_attention(q, keys, values, row_part, visible, 0.125)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_a_row_that_sees_nothing_of_a_block_takes_nothing_from_it(stream_kernel):
    """New rows 250..269 straddle the blocks: a row that sees only itself and the first new row
    sees no key of the block [256, 270), which must add nothing (not a NaN, not a share)."""
    mask = torch.eye(20, dtype=torch.bool)
    mask[:, 0] = True
    q, keys, values, row_part, visible, expected = tree_inputs([250], [mask], seed=4)
    out = stream_kernel.tree_attention(q, keys, values, row_part, visible, 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_a_one_row_part_gets_the_decode_kernel_s_bits_in_any_batch(stream_kernel):
    """A plain decode row is the same whether it shares a call with trees or not: the kernel's
    one-row part is bit for bit the decode kernel's row."""
    q, keys, values, row_part, visible, _ = tree_inputs([340, 17, 1000], [chain(1), BRANCHING, chain(1)], seed=2)
    together = stream_kernel.tree_attention(q, keys, values, row_part, visible, 0.125)
    for row, part in ((0, 0), (6, 2)):
        alone = stream_kernel.decode_attention(q[row : row + 1], keys[part : part + 1], values[part : part + 1], 0.125)
        assert torch.equal(alone, together[row : row + 1])
    tree_alone = stream_kernel.tree_attention(
        q[1:6], keys[1:2], values[1:2], torch.zeros(5, dtype=torch.long), visible[1:6], 0.125
    )
    assert torch.equal(tree_alone, together[1:6])


@pytest.mark.parametrize(
    ("row_part", "visible", "message"),
    [
        (torch.tensor([0, 1]), torch.tensor([[1, 0], [1, 1]]).bool(), "names no part"),
        (torch.tensor([0, 0]), torch.tensor([[1, 1], [1, 1]]).bool(), "sees a later row"),
        (torch.tensor([0, 0]), torch.tensor([[1, 0], [1, 0]]).bool(), "must see itself"),
        (torch.tensor([0, 0]), torch.tensor([[1], [1]]).bool(), "more rows than visible"),
        (torch.tensor([0, 0]), torch.tensor([[1, 0], [1, 1], [1, 1]]).bool(), "visible must be bool"),
        (torch.tensor([0, 0]), torch.tensor([[1, 0], [1, 1]]), "visible must be bool"),
        (torch.tensor([0, 0]).int(), torch.tensor([[1, 0], [1, 1]]).bool(), "row_part must be int64"),
    ],
)
def test_tree_attention_refuses_a_malformed_layout(stream_kernel, row_part, visible, message):
    keys = [cache_view(3, 10, 64)]
    with pytest.raises(RuntimeError, match=message):
        stream_kernel.tree_attention(torch.randn(2, 9, 64), keys, [k.clone() for k in keys], row_part, visible, 0.125)


def test_tree_attention_refuses_parts_out_of_order(stream_kernel):
    keys = [cache_view(3, 10, 64), cache_view(3, 10, 64)]
    with pytest.raises(RuntimeError, match="grouped by part"):
        stream_kernel.tree_attention(
            torch.randn(2, 9, 64), keys, [k.clone() for k in keys], torch.tensor([1, 0]),
            torch.ones(2, 1, dtype=torch.bool), 0.125,
        )  # fmt: skip
