"""Compact a KV cache: keep the rows `index` names, per (batch, head), packed to the front.

Shapes: B batch, H heads, S cached rows, K kept rows, D head dim.

In place (out_k / out_v sharing storage with k / v, e.g. out_k = k[:, :, :K]): the Triton
kernel runs one program per (batch, head) that moves rows in ascending blocks, loading a
whole block into registers, then a barrier, then storing it. A store to row r can only
clobber a row some later block still needs to read if that block's source lies before its
destination, so in place is correct when every kept row moves toward the front or stays:
index[b, h, r] >= r (plus the view's offset when out_k starts later than k). Any ascending
index of distinct positions satisfies this, which is what sorted top-k keep-sets and
accepted tree paths are. Other in-place permutations are not supported by the kernel; give
separate outputs for those. The reference gathers into a fresh tensor and then copies, so
it is correct for any aliasing.
"""

from __future__ import annotations

import torch

from .dispatch import require_triton, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # references only
    triton = None


def _check(k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, out_k, out_v) -> None:
    if k.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected k [B,H,S,Dk], v [B,H,S,Dv]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if index.dim() != 3 or index.shape[:2] != k.shape[:2]:
        raise ValueError(f"index must be [B, H, K] for k {tuple(k.shape)}, got {tuple(index.shape)}")
    K = index.shape[2]
    for name, out, src in (("out_k", out_k, k), ("out_v", out_v, v)):
        if out is not None and (out.shape != (*src.shape[:2], K, src.shape[3]) or out.dtype != src.dtype):
            raise ValueError(f"{name} must be {src.dtype} [B, H, K, D], got {out.dtype} {tuple(out.shape)}")


def compact_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch; same contract as `compact_kv`, correct under any aliasing (gather first)."""
    _check(k, v, index, out_k, out_v)
    kept_k = k.gather(2, index[..., None].expand(-1, -1, -1, k.shape[3]))
    kept_v = v.gather(2, index[..., None].expand(-1, -1, -1, v.shape[3]))
    if out_k is not None:
        kept_k = out_k.copy_(kept_k)
    if out_v is not None:
        kept_v = out_v.copy_(kept_v)
    return kept_k, kept_v


if triton is not None:

    @triton.jit
    def _compact_rows_kernel(
        src_ptr, dst_ptr, index_ptr, H, K, D,
        ssb, ssh, sss, ssd,
        sdb, sdh, sdk, sdd,
        sib, sih, sik,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (pid_k, b*H + h) copies blocks pid_k, pid_k + nk, ... of K rows; launched with
        # nk = 1 for in-place compaction, so one program walks its (b, h) front to back.
        pid_k = tl.program_id(0)
        nk = tl.num_programs(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        for start in range(pid_k * BLOCK_K, K, nk * BLOCK_K):
            r = start + tl.arange(0, BLOCK_K)
            r_ok = r < K
            src_row = tl.load(index_ptr + b * sib + h * sih + r * sik, mask=r_ok, other=0)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                m = r_ok[:, None] & (d < D)[None, :]
                rows = tl.load(src_ptr + b * ssb + h * ssh + src_row[:, None] * sss + d[None, :] * ssd, mask=m)
                tl.debug_barrier()  # every read of this block lands before any write of it
                tl.store(dst_ptr + b * sdb + h * sdh + r[:, None] * sdk + d[None, :] * sdd, rows, mask=m)
            tl.debug_barrier()  # and this block's writes land before the next block's reads


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _compact_one(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    B, H, _, D = src.shape
    K = index.shape[2]
    in_place = out is not None and _shares_storage(out, src)
    if out is None:
        out = torch.empty(B, H, K, D, dtype=src.dtype, device=src.device)
    if K == 0 or B * H == 0:
        return out
    block_k = 32
    grid = (1 if in_place else triton.cdiv(K, block_k), B * H)
    _compact_rows_kernel[grid](
        src, out, index, H, K, D, *src.stride(), *out.stride(), *index.stride(),
        BLOCK_K=block_k, BLOCK_D=min(128, max(16, triton.next_power_of_2(D))),
    )  # fmt: skip
    return out


def compact_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton row gather; same contract as `compact_kv` (see the module docstring on aliasing)."""
    require_triton()
    _check(k, v, index, out_k, out_v)
    return _compact_one(k, index, out_k), _compact_one(v, index, out_v)


def compact_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept rows of a KV cache.

    k, v: [B, H, S, D]; index: int64 [B, H, K], the source row of each kept row.
    Returns (k2, v2) [B, H, K, D] with k2[b, h, r] = k[b, h, index[b, h, r]], written into
    out_k / out_v when given. out_* may alias the front of k / v (out_k = k[:, :, :K]) when
    index is ascending per (batch, head), as sorted keep-sets are; see the module docstring.
    CUDA tensors run the Triton kernel, others the reference.
    """
    fn = compact_kv_triton if use_triton(k, v, index) else compact_kv_reference
    return fn(k, v, index, out_k, out_v)
