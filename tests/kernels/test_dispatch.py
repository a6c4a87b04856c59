import subprocess
import sys

import pytest
import torch
from trieserve.kernels import get_backend, set_backend
from trieserve.kernels.dispatch import use_triton

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError, as on macOS / aarch64
import torch
import trieserve.kernels as K

assert not K.HAS_TRITON
q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 7, 8)
bits = K.pack_ancestor_mask(torch.ones(1, 3, 3, dtype=torch.bool).tril())
assert K.tree_attention(q, k, k, bits, torch.tensor([7]), 0.3).shape == (1, 3, 2, 8)
assert K.eviction_scores(q, k, 0.3, "defensive").shape == (1, 1, 4)
try:
    K.set_backend("triton")
except ValueError:
    pass
else:
    raise AssertionError("set_backend('triton') must fail without triton")
try:
    K.tree_attention_triton(q, k, k, bits, torch.tensor([7]), 0.3)
except RuntimeError:
    pass
else:
    raise AssertionError("tree_attention_triton must fail without triton")
"""


def test_import_and_references_without_triton(tmp_path):
    # cwd away from the checkout: `-c` puts the working directory first on sys.path
    subprocess.run([sys.executable, "-c", WITHOUT_TRITON], check=True, timeout=120, cwd=tmp_path)


def test_auto_backend_sends_only_cuda_tensors_to_triton():
    assert get_backend() == "auto"
    assert not use_triton(torch.zeros(1))
    set_backend("reference")
    assert not use_triton(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.triton
def test_auto_backend_uses_triton_on_cuda():
    assert use_triton(torch.zeros(1, device="cuda"))
