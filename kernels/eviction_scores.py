"""Eviction scores: how much the observation window attends to each earlier prompt token.

Shapes: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv), W window queries
(the last W prompt tokens), S prompt keys (the window's own keys are the last W),
P = S - W prefix positions that get a score, D head dim.

Per window query row (window query w sits at position P + w and attends causally to keys
0..P+w): fp32 softmax over the whole causal row, keep the prefix columns 0..P-1, 1-D average
pool along tokens (kernel `pool_kernel`, stride 1, zero padding pool_kernel // 2,
count_include_pad=True, i.e. F.avg_pool1d's default as SnapKV uses it: the first and last
pool_kernel // 2 positions average over fewer real tokens), then aggregate over the W
window queries and the G query heads of each KV head:

- "mean" (SnapKV): mean over (G, W).
- "defensive" (DefensiveKV, "Taming the Fragility of KV Cache Eviction in LLM Inference",
  2025): m_i = max over (G, W); s_i = max(m_i, mean_j m_j), the mean over the P prefix
  positions of that (batch, KV head): every score is floored at its head's mean.

`valid` (bool [B, Hkv, S], optional) marks padding rows of a cache compacted with per-head
budgets: no query attends to them, they are not in a head's mean, and their score is -inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import require_triton, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # references only
    triton = None

AGGREGATIONS = ("mean", "defensive")


def _check(q_win: torch.Tensor, k: torch.Tensor, aggregation: str, pool_kernel: int) -> None:
    if q_win.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q_win [B,Hq,W,D], k [B,Hkv,S,D]; got {tuple(q_win.shape)}, {tuple(k.shape)}")
    B, Hq, W, D = q_win.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"q_win {tuple(q_win.shape)} does not match k {tuple(k.shape)}")
    if not 1 <= W <= k.shape[2]:
        raise ValueError(f"window W={W} must be in [1, S={k.shape[2]}]")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd number, got {pool_kernel}")


def _defensive_floor(m: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """m: [B, Hkv, P] per-token maxima -> max(m_i, mean_j m_j) per (batch, KV head), the mean
    over real rows (valid bool [B, Hkv, P]). Pooling spreads a neighbour's attention into a
    padding row, so padding is left out of the mean explicitly (and masked by the caller)."""
    if valid is None:
        return torch.maximum(m, m.mean(-1, keepdim=True))
    mean = m.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(valid, torch.maximum(m, mean), m)


def window_probs(
    q_win: torch.Tensor, k: torch.Tensor, scaling: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The window queries' softmax rows over every key, fp32 [B, Hq, W, S]: window query w sees
    keys 0..P+w (causal within the window), and no query sees a padding row (valid False)."""
    W, S = q_win.shape[2], k.shape[2]
    G = q_win.shape[1] // k.shape[1]
    logits = (q_win.float() @ k.float().repeat_interleave(G, dim=1).transpose(-1, -2)) * scaling
    visible = torch.ones(W, S, dtype=torch.bool, device=k.device).tril(S - W)
    if valid is not None:
        visible = visible & valid.repeat_interleave(G, dim=1)[:, :, None, :]
    return logits.masked_fill(~visible, float("-inf")).softmax(-1)


def eviction_scores_reference(
    q_win: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    aggregation: str,
    pool_kernel: int = 5,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain fp32 PyTorch. q_win [B,Hq,W,D], k [B,Hkv,S,D], valid bool [B,Hkv,S] or None ->
    scores fp32 [B,Hkv,S-W]."""
    _check(q_win, k, aggregation, pool_kernel)
    B, Hq, W, _ = q_win.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, P = Hq // Hkv, S - W
    if P == 0:
        return torch.empty(B, Hkv, 0, dtype=torch.float32, device=k.device)
    probs = window_probs(q_win, k, scaling, valid)[..., :P]
    pooled = F.avg_pool1d(
        probs.reshape(-1, 1, P), pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=True
    ).view(B, Hkv, G * W, P)
    if aggregation == "mean":
        scores = pooled.mean(2)
    else:
        scores = _defensive_floor(pooled.amax(2), None if valid is None else valid[..., :P])
    return scores if valid is None else scores.masked_fill(~valid[..., :P], float("-inf"))


if triton is not None:

    @triton.jit
    def _window_lse_kernel(
        q_ptr, k_ptr, lse_ptr,
        sqb, sqh, sqw, sqd,
        skb, skh, sks, skd,
        qk_scale, Hkv, G, W, P, D,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        # Pass 1: log2-sum-exp2 of every window query's full causal row.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < G * W
        h = hkv * G + rows // W
        w = rows % W
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_ptrs = q_ptr + b * sqb + h[:, None] * sqh + w[:, None] * sqw + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b * skb + hkv * skh + offs_d[None, :] * skd
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, P + W, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + cols[:, None] * sks, mask=(cols < P + W)[:, None] & d_ok[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            qk = tl.where(cols[None, :] <= P + w[:, None], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # key 0 is always visible: m_new is finite
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(qk - m_new[:, None]), 1)
            m_i = m_new
        tl.store(lse_ptr + pid_bh * G * W + rows, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _pooled_scores_kernel(
        q_ptr, k_ptr, lse_ptr, out_ptr,
        sqb, sqh, sqw, sqd,
        skb, skh, sks, skd,
        qk_scale, Hkv, G, W, P, D,
        POOL: tl.constexpr, MEAN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        # Pass 2: BLOCK_N prefix columns of one (batch, kv head). Pooling is a sum of POOL
        # shifted probability rows, so each shift recomputes its block of q.k (cheap: D is
        # small) instead of exchanging halo columns between programs.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        k_base = k_ptr + b * skb + hkv * skh + offs_d[None, :] * skd
        agg = tl.zeros([BLOCK_N], dtype=tl.float32)  # probabilities are >= 0: 0 is a safe max identity
        for row0 in range(0, G * W, BLOCK_M):
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < G * W
            h = hkv * G + rows // W
            w = rows % W
            q_ptrs = q_ptr + b * sqb + h[:, None] * sqh + w[:, None] * sqw + offs_d[None, :] * sqd
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + pid_bh * G * W + rows, mask=row_ok, other=0.0)
            pooled = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for t in tl.static_range(POOL):
                src = cols + (t - POOL // 2)
                src_ok = (src >= 0) & (src < P)
                k = tl.load(k_base + src[:, None] * sks, mask=src_ok[:, None] & d_ok[None, :], other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                pooled += tl.where(src_ok[None, :], tl.exp2(qk - lse[:, None]), 0.0)
            pooled = tl.where(row_ok[:, None], pooled / POOL, 0.0)
            if MEAN:
                agg += tl.sum(pooled, 0)
            else:
                agg = tl.maximum(agg, tl.max(pooled, 0))
        if MEAN:
            agg = agg / (G * W)
        tl.store(out_ptr + pid_bh * P + cols, agg, mask=cols < P)


def eviction_scores_triton(
    q_win: torch.Tensor, k: torch.Tensor, scaling: float, aggregation: str, pool_kernel: int = 5
) -> torch.Tensor:
    """Triton kernels (row log-sum-exp, then pooled scores); same contract as the reference."""
    require_triton()
    _check(q_win, k, aggregation, pool_kernel)
    B, Hq, W, D = q_win.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, P = Hq // Hkv, S - W
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=k.device)
    if P == 0:
        return out
    lse = torch.empty(B, Hq, W, dtype=torch.float32, device=k.device)
    block_m = min(64, max(16, triton.next_power_of_2(G * W)))
    block_d = max(16, triton.next_power_of_2(D))
    common = dict(
        qk_scale=scaling * math.log2(math.e), Hkv=Hkv, G=G, W=W, P=P, D=D,
        BLOCK_M=block_m, BLOCK_D=block_d, PRECISION="ieee" if q_win.dtype == torch.float32 else None,
    )  # fmt: skip
    _window_lse_kernel[(triton.cdiv(G * W, block_m), B * Hkv)](
        q_win, k, lse, *q_win.stride(), *k.stride(), BLOCK_N=64, **common
    )
    _pooled_scores_kernel[(triton.cdiv(P, 64), B * Hkv)](
        q_win, k, lse, out, *q_win.stride(), *k.stride(),
        POOL=pool_kernel, MEAN=aggregation == "mean", BLOCK_N=64, **common,
    )  # fmt: skip
    return out if aggregation == "mean" else _defensive_floor(out)


def eviction_scores(
    q_win: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    aggregation: str,
    pool_kernel: int = 5,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """One eviction score per (KV head, prefix token).

    q_win: [B, Hq, W, D] queries of the last W prompt tokens; k: [B, Hkv, S, D] all prompt
    keys; scaling: softmax scale; aggregation: "mean" (SnapKV) or "defensive" (DefensiveKV);
    pool_kernel: odd average-pool width (1 = no pooling); valid: bool [B, Hkv, S] padding
    mask of a cache with per-head budgets (None: every row is real).
    Returns fp32 [B, Hkv, S - W]. CUDA tensors run the Triton kernels, others the reference;
    a padded cache (rescored during a chunked prefill) takes the reference.
    """
    if valid is None and use_triton(q_win, k):
        return eviction_scores_triton(q_win, k, scaling, aggregation, pool_kernel)
    return eviction_scores_reference(q_win, k, scaling, aggregation, pool_kernel, valid)
