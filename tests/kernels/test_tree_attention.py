import pytest
import torch
import torch.nn.functional as F
from trieserve.kernels import (
    attention_forward,
    pack_ancestor_mask,
    set_backend,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
    unpack_ancestor_mask,
)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=1e-2)}

# (B, Hq, Hkv, T, prefix length per sequence, S, D); S - prefix - T rows are padding
CASES = [
    (1, 4, 1, 1, [0], 1, 16),
    (2, 9, 3, 3, [14, 5], 17, 32),
    (2, 9, 3, 15, [48, 20], 63, 64),
    (1, 4, 1, 33, [97], 130, 16),
    (2, 4, 2, 33, [0, 30], 63, 32),
    (1, 2, 2, 130, [3], 140, 16),  # longer than a tree: a chain-masked prefill chunk also fits
]


def make_inputs(case, dtype, device, tree_helpers, seed=0, branchiness=0.5):
    random_parents, ancestor_mask = tree_helpers
    B, Hq, Hkv, T, prefix, S, D = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(device, dtype)
    masks = torch.stack([ancestor_mask(random_parents(T, gen, branchiness)) for _ in range(B)])
    kv_dtype = torch.int32 if seed % 2 else torch.int64
    kv_len = torch.tensor([p + T for p in prefix], dtype=kv_dtype, device=device)
    return q, k, v, masks.to(device), kv_len


@pytest.mark.parametrize("T", [1, 3, 15, 31, 32, 33, 64, 100, 128])
def test_pack_roundtrip(T):
    mask = torch.rand(2, T, T, generator=torch.Generator().manual_seed(T)) < 0.5
    bits = pack_ancestor_mask(mask)
    assert bits.shape == (2, T, (T + 31) // 32) and bits.dtype == torch.int32
    assert torch.equal(unpack_ancestor_mask(bits), mask)


def test_pack_bit_layout():
    mask = torch.zeros(1, 33, 33, dtype=torch.bool)
    mask[0, 32, [0, 31, 32]] = True
    bits = pack_ancestor_mask(mask)
    assert bits[0, 32].tolist() == [1 - 2**31, 1]  # bits 0 and 31 of word 0 (sign bit), bit 0 of word 1


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_sdpa_with_dense_mask(case, tree_helpers):
    q, k, v, masks, kv_len = make_inputs(case, torch.float32, "cpu", tree_helpers)
    B, Hq, Hkv, T, prefix, S, D = case
    out = tree_attention_reference(q, k, v, pack_ancestor_mask(masks), kv_len, 0.3)
    for b in range(B):
        n = prefix[b] + T
        dense = torch.ones(T, n, dtype=torch.bool)
        dense[:, prefix[b] :] = masks[b]
        kb = k[b : b + 1, :, :n].repeat_interleave(Hq // Hkv, dim=1)
        vb = v[b : b + 1, :, :n].repeat_interleave(Hq // Hkv, dim=1)
        expected = F.scaled_dot_product_attention(q[b : b + 1], kb, vb, attn_mask=dense, scale=0.3)
        torch.testing.assert_close(out[b], expected[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype, device, tree_helpers):
    q, k, v, masks, kv_len = make_inputs(case, dtype, device, tree_helpers, seed=len(case[4]) + case[3])
    bits = pack_ancestor_mask(masks)
    scale = case[-1] ** -0.5
    expected = tree_attention_reference(q, k, v, bits, kv_len, scale)
    out = tree_attention_triton(q, k, v, bits, kv_len, scale)
    assert out.shape == (case[0], case[3], case[1], case[-1]) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("num_splits", [2, 5])
def test_kernel_split_prefix(num_splits, device, tree_helpers):
    # the prefix split over several programs, merged by the combine kernel; B=2 with
    # different prefixes, so some splits of the shorter sequence see no key at all
    case = (2, 4, 1, 15, [300, 5], 330, 32)
    q, k, v, masks, kv_len = make_inputs(case, torch.float32, device, tree_helpers, seed=5)
    bits = pack_ancestor_mask(masks)
    expected = tree_attention_reference(q, k, v, bits, kv_len, 0.2)
    out = tree_attention_triton(q, k, v, bits, kv_len, 0.2, num_splits=num_splits)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.triton
def test_kernel_strided_query_and_empty_rows(device, tree_helpers):
    # q as transformers hands it over (a transposed projection), and one query that sees
    # nothing at all (no prefix, empty mask row): both paths give zeros there.
    case = (2, 9, 3, 15, [0, 120], 150, 32)  # long enough for two splits of 128 keys
    q, k, v, masks, kv_len = make_inputs(case, torch.float32, device, tree_helpers, seed=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    masks[0, 4] = False
    bits = pack_ancestor_mask(masks)
    expected = tree_attention_reference(q, k, v, bits, kv_len, 0.2)
    assert torch.all(expected[0, 4] == 0)
    for num_splits in (1, 2):
        out = tree_attention_triton(q, k, v, bits, kv_len, 0.2, num_splits=num_splits)
        torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_dispatch(backend, device, tree_helpers):
    case = (2, 4, 1, 15, [7, 2], 30, 16)
    q, k, v, masks, kv_len = make_inputs(case, torch.float16, device, tree_helpers)
    bits = pack_ancestor_mask(masks)
    set_backend(backend)
    out = tree_attention(q, k, v, bits, kv_len, 0.25)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, bits, kv_len, 0.25), **TOL[torch.float16])


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend"):
        set_backend("cuda")


def test_attention_forward_chain_equals_causal_sdpa(tree_helpers):
    # A causal chunk is the chain mask: the tree path with a lower-triangular mask must agree
    # with the plain SDPA fallback (no anc_bits) on a cached prefix.
    case = (1, 9, 3, 15, [20], 35, 32)
    q, k, v, _, kv_len = make_inputs(case, torch.float32, "cpu", tree_helpers)
    chain = pack_ancestor_mask(torch.ones(1, 15, 15, dtype=torch.bool).tril())
    module = torch.nn.Module()
    tree_out, weights = attention_forward(module, q, k, v, None, scaling=0.2, anc_bits=chain, kv_len=kv_len)
    plain_out, _ = attention_forward(module, q, k, v, None, scaling=0.2)
    assert weights is None and tree_out.shape == (1, 15, 9, 32)
    torch.testing.assert_close(tree_out, plain_out, atol=1e-5, rtol=1e-5)
    default_len, _ = attention_forward(module, q, k, v, None, scaling=0.2, anc_bits=chain)
    torch.testing.assert_close(default_len, tree_out)


def test_rejects_bad_shapes():
    q = torch.zeros(1, 4, 3, 16)
    k = torch.zeros(1, 3, 8, 16)
    bits = torch.zeros(1, 3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="does not match"):
        tree_attention_reference(q, k, k, bits, torch.tensor([8]), 1.0)
    with pytest.raises(ValueError, match="anc_bits"):
        tree_attention_reference(q, k[:, :2], k[:, :2], bits.long(), torch.tensor([8]), 1.0)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_realistic_sizes_on_gpu(dtype, tree_helpers):
    # SmolLM2-135M attention: 9 query heads, 3 KV heads, head_dim 64
    case = (2, 9, 3, 128, [1500, 3000], 3200, 64)
    q, k, v, masks, kv_len = make_inputs(case, dtype, "cuda", tree_helpers)
    bits = pack_ancestor_mask(masks)
    out = tree_attention_triton(q, k, v, bits, kv_len, 0.125)
    expected = tree_attention_reference(q, k, v, bits, kv_len, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=2e-2)


def test_attention_forward_refuses_what_it_cannot_honour():
    q, k = torch.zeros(1, 2, 3, 8), torch.zeros(1, 1, 10, 8)
    bits = pack_ancestor_mask(torch.ones(1, 3, 3, dtype=torch.bool).tril())
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="softcap"):
        attention_forward(module, q, k, k, None, softcap=30.0, anc_bits=bits)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        attention_forward(module, q, k, k, None, sliding_window=4, anc_bits=bits)
    out, _ = attention_forward(module, q, k, k, None, sliding_window=16, anc_bits=bits)
    assert out.shape == (1, 3, 2, 8)
