"""Kernel micro-benchmarks: each Triton kernel against its PyTorch reference.

    python bench/triton_kernels.py            # on a CUDA machine: realistic sizes, fp16 and bf16
    python bench/triton_kernels.py --reps 50

Sizes follow Llama-3-8B (32 query heads, 8 KV heads, head_dim 128, vocabulary 128256):
prefixes of 1k-32k keys, trees of 16-128 tokens. tree_attention is also timed against torch
SDPA with a dense boolean mask, which is what a model would run without the kernel.
Without a GPU it says so and times the references (and SDPA) at small sizes only; the
interpreter is far too slow to say anything about the kernels' speed. Exits 0 either way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from trieserve.kernels import (
    HAS_TRITON,
    compact_kv_reference,
    compact_kv_triton,
    eviction_scores_reference,
    eviction_scores_triton,
    pack_ancestor_mask,
    tree_attention_reference,
    tree_attention_triton,
    tree_kv_mask,
    verify_greedy_reference,
    verify_greedy_triton,
    verify_sampling_reference,
    verify_sampling_triton,
)

HQ, HKV, HEAD_DIM, VOCAB = 32, 8, 128, 128256
COLUMNS = ("op", "shape", "dtype", "triton ms", "reference ms", "sdpa ms", "ref/triton")


def time_ms(reps: int, fn: Callable[..., object], *args) -> float:
    """Median wall time of fn(*args) in milliseconds (CUDA events on a GPU)."""
    for _ in range(2):
        fn(*args)
    samples = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*args)
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def sdpa_dense(q, k, v, mask, scale):
    """What a model runs without the kernel: SDPA with a dense bool mask [B, 1, T, S]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def random_tree_mask(T: int, gen: torch.Generator) -> torch.Tensor:
    """bool [T, T]: self plus ancestors of a random packed tree (parent before child)."""
    mask = torch.eye(T, dtype=torch.bool)
    for r in range(1, T):
        parent = int(torch.randint(r, (1,), generator=gen))
        mask[r] |= mask[parent]
    return mask


def bench_tree_attention(sizes, dtype, device, reps, with_triton):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B, prefix, T in sizes:
        S = prefix + T
        q = torch.randn(B, HQ, T, HEAD_DIM, generator=gen).to(device, dtype)
        k = torch.randn(B, HKV, S, HEAD_DIM, generator=gen).to(device, dtype)
        v = torch.randn(B, HKV, S, HEAD_DIM, generator=gen).to(device, dtype)
        bits = pack_ancestor_mask(torch.stack([random_tree_mask(T, gen) for _ in range(B)])).to(device)
        kv_len = torch.full((B,), S, dtype=torch.int32, device=device)
        dense = tree_kv_mask(bits, kv_len, S)[:, None]  # [B, 1, T, S], built once outside the timing
        args = (q, k, v, bits, kv_len, HEAD_DIM**-0.5)
        tri = time_ms(reps, tree_attention_triton, *args) if with_triton else None
        ref = time_ms(reps, tree_attention_reference, *args)
        sdpa = time_ms(reps, sdpa_dense, q, k, v, dense, HEAD_DIM**-0.5)
        rows.append(("tree_attention", f"B={B} prefix={prefix} T={T}", dtype, tri, ref, sdpa))
    return rows


def bench_eviction_scores(sizes, dtype, device, reps, with_triton):
    gen = torch.Generator().manual_seed(1)
    rows = []
    for S, W in sizes:
        q = torch.randn(1, HQ, W, HEAD_DIM, generator=gen).to(device, dtype)
        k = torch.randn(1, HKV, S, HEAD_DIM, generator=gen).to(device, dtype)
        for agg in ("mean", "defensive"):
            args = (q, k, HEAD_DIM**-0.5, agg)
            tri = time_ms(reps, eviction_scores_triton, *args) if with_triton else None
            ref = time_ms(reps, eviction_scores_reference, *args)
            rows.append((f"eviction_scores[{agg}]", f"S={S} W={W}", dtype, tri, ref, None))
    return rows


def bench_verify(sizes, device, reps, with_triton):
    gen = torch.Generator().manual_seed(2)
    rows = []
    for B, T in sizes:
        logits = torch.randn(B, T, VOCAB, generator=gen).to(device)
        probs = logits.softmax(-1)
        parents = torch.tensor([[-1] + [int(torch.randint(r, (1,), generator=gen)) for r in range(1, T)]] * B)
        tokens = torch.randint(VOCAB, (B, T), generator=gen)
        greedy = (logits, tokens.to(device), parents.to(device), torch.full((B,), T, device=device))
        sampling = (probs, *greedy[1:], torch.rand(B, T, generator=gen).to(device))
        for name, tri_fn, ref_fn, args in (
            ("verify_greedy", verify_greedy_triton, verify_greedy_reference, greedy),
            ("verify_sampling", verify_sampling_triton, verify_sampling_reference, sampling),
        ):
            tri = time_ms(reps, tri_fn, *args) if with_triton else None
            ref = time_ms(reps, ref_fn, *args)
            rows.append((name, f"B={B} T={T} V={VOCAB}", torch.float32, tri, ref, None))
    return rows


def bench_compact_kv(sizes, dtype, device, reps, with_triton):
    gen = torch.Generator().manual_seed(3)
    rows = []
    for B, S, K in sizes:
        k = torch.randn(B, HKV, S, HEAD_DIM, generator=gen).to(device, dtype)
        v = torch.randn(B, HKV, S, HEAD_DIM, generator=gen).to(device, dtype)
        index = torch.rand(B, HKV, S, generator=gen).topk(K, -1).indices.sort(-1).values.to(device)
        tri = time_ms(reps, compact_kv_triton, k, v, index) if with_triton else None
        ref = time_ms(reps, compact_kv_reference, k, v, index)
        rows.append(("compact_kv", f"B={B} S={S} K={K}", dtype, tri, ref, None))
    return rows


def print_table(rows) -> None:
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3f}"
        if isinstance(x, torch.dtype):
            return str(x).removeprefix("torch.")
        return str(x)

    table = [COLUMNS]
    for op, shape, dtype, tri, ref, sdpa in rows:
        ratio = f"{ref / tri:.1f}x" if tri else "-"
        table.append(tuple(cell(x) for x in (op, shape, dtype, tri, ref, sdpa)) + (ratio,))
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for n, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    with_triton = on_gpu and HAS_TRITON
    rows = []
    if on_gpu:
        device = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name()}; triton: {'yes' if HAS_TRITON else 'no (references only)'}")
        for dtype in (torch.float16, torch.bfloat16):
            tree_sizes = [(1, p, t) for p in (1024, 8192, 32768) for t in (16, 64, 128)] + [(8, 2048, 64)]
            rows += bench_tree_attention(tree_sizes, dtype, device, args.reps, with_triton)
            rows += bench_eviction_scores([(1024, 32), (8192, 32), (32768, 32)], dtype, device, args.reps, with_triton)
            rows += bench_compact_kv([(1, 8192, 1024), (8, 4096, 512)], dtype, device, args.reps, with_triton)
        rows += bench_verify([(1, 16), (1, 64), (1, 128), (8, 64)], device, args.reps, with_triton)
    else:
        device = torch.device("cpu")
        print("no GPU: timing the PyTorch references only, at small sizes (the Triton kernels need CUDA)")
        reps = min(args.reps, 5)
        rows += bench_tree_attention([(1, 256, 16), (1, 512, 64)], torch.float32, device, reps, False)
        rows += bench_eviction_scores([(256, 32), (512, 32)], torch.float32, device, reps, False)
        rows += bench_compact_kv([(1, 1024, 128)], torch.float32, device, reps, False)
        rows += bench_verify([(1, 16), (1, 64)], device, reps, False)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
