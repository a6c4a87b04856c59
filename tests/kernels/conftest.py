"""Kernel tests: Triton kernels run on CUDA when present, else in Triton's CPU interpreter.

The interpreter must be switched on before any kernel is defined, i.e. before the test
modules import trieserve.kernels; this conftest is imported first.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from trieserve.kernels import HAS_TRITON, set_backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernels_runnable() -> tuple[bool, str]:
    if not HAS_TRITON:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, ""
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module("trieserve.kernels.tree_attention")
    if not isinstance(module._tree_attention_kernel, InterpretedFunction):
        return False, "no GPU and the kernels were defined before TRITON_INTERPRET=1 was set"
    return True, ""


TRITON_OK, TRITON_WHY = _kernels_runnable()


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs a Triton kernel (CUDA, or the CPU interpreter)")


@pytest.fixture(autouse=True)
def _kernel_environment(request):
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.node.get_closest_marker("triton") and not TRITON_OK:
        pytest.skip(TRITON_WHY)
    yield
    set_backend("auto")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def random_parents(n: int, gen: torch.Generator, branchiness: float = 0.5) -> list[int]:
    """A packed tree of n rows (parent before child): with probability `branchiness` a row
    hangs off a random earlier row, else it extends the previous row (long chains)."""
    parents = [-1]
    for r in range(1, n):
        branch = torch.rand(1, generator=gen).item() < branchiness
        parents.append(int(torch.randint(r, (1,), generator=gen)) if branch else r - 1)
    return parents


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """bool [T, T]: row i sees row j iff j is i or one of its ancestors."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


@pytest.fixture
def tree_helpers():
    """(random_parents, ancestor_mask), shared by the tree-attention and verify tests."""
    return random_parents, ancestor_mask
