"""Triton kernels for the hot paths, each with a plain PyTorch reference.

Each op `<op>()` dispatches: CUDA tensors run `<op>_triton`, anything else `<op>_reference`
(override with `set_backend`). Without triton installed only the references exist and the
dispatchers always use them.
"""

if __name__ == "kernels":  # found as a top-level package: the checkout's root is on sys.path
    raise ImportError(
        f"the top-level name 'kernels' resolved to trieserve's source folder {__path__[0]} "
        "(trieserve.kernels), because the checkout's root is on sys.path (`python -m` or `python -c` "
        "run from it). transformers imports the PyPI `kernels` package under that name: start the "
        "server with the `trieserve` command, or run Python from another directory."
    )

from .compact_kv import compact_kv, compact_kv_reference, compact_kv_triton
from .dispatch import HAS_TRITON, get_backend, set_backend
from .eviction_scores import eviction_scores, eviction_scores_reference, eviction_scores_triton
from .tree_attention import (
    attention_forward,
    pack_ancestor_mask,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
    tree_kv_mask,
    unpack_ancestor_mask,
)
from .verify import (
    verify_greedy,
    verify_greedy_reference,
    verify_greedy_triton,
    verify_sampling,
    verify_sampling_reference,
    verify_sampling_triton,
)

__all__ = [
    "HAS_TRITON",
    "attention_forward",
    "compact_kv",
    "compact_kv_reference",
    "compact_kv_triton",
    "eviction_scores",
    "eviction_scores_reference",
    "eviction_scores_triton",
    "get_backend",
    "pack_ancestor_mask",
    "set_backend",
    "tree_attention",
    "tree_attention_reference",
    "tree_attention_triton",
    "tree_kv_mask",
    "unpack_ancestor_mask",
    "verify_greedy",
    "verify_greedy_reference",
    "verify_greedy_triton",
    "verify_sampling",
    "verify_sampling_reference",
    "verify_sampling_triton",
]
