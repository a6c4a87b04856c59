"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

"auto" (the default) sends CUDA tensors to Triton and everything else to the reference.
"reference" forces the reference everywhere (debugging a wrong answer on a GPU).
"triton" forces the kernel everywhere; on CPU tensors that only works under Triton's
interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined), which is how
the tests exercise the kernels on machines without a GPU.

Triton is optional: on machines without it (macOS, aarch64) ``import trieserve.kernels``
still works and "auto" always picks the reference.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = ("auto", "reference", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose how ops dispatch: "auto" | "reference" | "triton"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("backend 'triton' requested but triton is not installed")
    _backend = name


def get_backend() -> str:
    return _backend


def require_triton() -> None:
    """Raise a clear error when a `*_triton` function is called without triton installed."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: only the *_reference ops are available")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when an op called on `tensors` should run its Triton kernel."""
    if _backend == "reference" or not HAS_TRITON:
        return False
    if _backend == "triton":
        return True
    return all(t.is_cuda for t in tensors)
