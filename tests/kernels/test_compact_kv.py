import pytest
import torch
from trieserve.kernels import compact_kv, compact_kv_reference, compact_kv_triton, set_backend

# (B, H, S, K, Dk, Dv)
CASES = [
    (1, 1, 1, 1, 16, 16),
    (2, 3, 17, 5, 64, 64),
    (1, 3, 63, 40, 40, 24),
    (2, 1, 130, 70, 200, 16),  # D above one column block
    (2, 3, 9, 0, 16, 16),
]
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


def make_inputs(case, dtype, device, seed=0, ascending=True):
    B, H, S, K, Dk, Dv = case
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, S, Dk, generator=gen).to(device, dtype)
    v = torch.randn(B, H, S, Dv, generator=gen).to(device, dtype)
    index = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * H)]).view(B, H, K)
    if ascending:
        index = index.sort(-1).values
    return k, v, index.to(device)


def fancy(x, index):
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    h = torch.arange(x.shape[1], device=x.device)[None, :, None]
    return x[b, h, index]


def fn_for(impl):
    return compact_kv_reference if impl == "reference" else compact_kv_triton


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_matches_fancy_indexing(case, dtype, impl, device):
    k, v, index = make_inputs(case, dtype, device, ascending=False)
    k2, v2 = fn_for(impl)(k, v, index)
    assert k2.shape == (*index.shape, case[4]) and v2.shape == (*index.shape, case[5])
    assert torch.equal(k2, fancy(k, index)) and torch.equal(v2, fancy(v, index))


@pytest.mark.parametrize("impl", IMPLS)
def test_into_given_outputs(impl, device):
    k, v, index = make_inputs((2, 3, 40, 12, 32, 32), torch.float16, device, ascending=False)
    out_k = torch.empty(2, 3, 12, 32, dtype=k.dtype, device=device)
    out_v = torch.empty(2, 3, 12, 32, dtype=v.dtype, device=device).transpose(0, 1).contiguous().transpose(0, 1)
    k2, v2 = fn_for(impl)(k, v, index, out_k, out_v)
    assert k2.data_ptr() == out_k.data_ptr() and v2.data_ptr() == out_v.data_ptr()
    assert torch.equal(out_k, fancy(k, index)) and torch.equal(out_v, fancy(v, index))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [(2, 3, 130, 70, 32, 32), (1, 2, 63, 63, 16, 16)])
def test_in_place_at_the_front(case, impl, device):
    # out is a view of k's own storage: an ascending keep-set compacted toward the front
    k, v, index = make_inputs(case, torch.float32, device, seed=1)
    expected_k, expected_v = fancy(k, index), fancy(v, index)
    K = index.shape[-1]
    k2, v2 = fn_for(impl)(k, v, index, k[:, :, :K], v[:, :, :K])
    assert k2.data_ptr() == k.data_ptr()
    assert torch.equal(k[:, :, :K], expected_k) and torch.equal(v[:, :, :K], expected_v)


def test_reference_in_place_any_order(device):
    k, v, index = make_inputs((2, 3, 20, 10, 16, 16), torch.float32, device, ascending=False)
    expected_k = fancy(k, index)
    compact_kv_reference(k, v, index, k[:, :, :10], v[:, :, :10])
    assert torch.equal(k[:, :, :10], expected_k)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_dispatch(backend, device):
    k, v, index = make_inputs((2, 3, 33, 9, 64, 64), torch.float16, device)
    set_backend(backend)
    k2, v2 = compact_kv(k, v, index)
    assert torch.equal(k2, fancy(k, index)) and torch.equal(v2, fancy(v, index))


def test_rejects_bad_outputs():
    k, v, index = make_inputs((1, 2, 10, 4, 8, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="out_k"):
        compact_kv_reference(k, v, index, out_k=torch.empty(1, 2, 5, 8))
    with pytest.raises(ValueError, match="index"):
        compact_kv_reference(k, v, index[0])
