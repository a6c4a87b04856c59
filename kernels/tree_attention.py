"""Tree attention: the packed draft tree attends to the cached prefix and to its own ancestors.

Shapes: B batch, Hq query heads, Hkv key/value heads (GQA group G = Hq // Hkv), T packed
tree tokens (sized for trees, T <= 128, but any T is correct: a chain-masked prefill chunk
works too), S key slots (cached prefix, then the T tree tokens, then padding),
D head dim, W = ceil(T / 32) mask words.

The tree part of the mask is bit-packed: bit j % 32 of word j // 32 of anc_bits[b, i] says
query i may see tree key j (usually its ancestors and itself). Every query sees the whole
prefix; keys at or beyond kv_len[b] are padding and never seen. A causal chunk is the chain
mask (lower triangular), so plain prefill/decode fits the same kernel.
"""

from __future__ import annotations

import math

import torch

from .dispatch import require_triton, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # references only
    triton = None


def pack_ancestor_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, T, T] (mask[b, i, j]: query i sees tree key j) -> int32 [B, T, ceil(T/32)]."""
    if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
        raise ValueError(f"mask must be [B, T, T], got {tuple(mask.shape)}")
    B, T, _ = mask.shape
    W = (T + 31) // 32
    padded = torch.zeros(B, T, W * 32, dtype=torch.int64, device=mask.device)
    padded[:, :, :T] = mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    words = (padded.view(B, T, W, 32) * weights).sum(-1)
    # bit 31 set means a negative int32: wrap explicitly rather than rely on cast overflow
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_ancestor_mask(anc_bits: torch.Tensor) -> torch.Tensor:
    """int32 [B, T, W] -> bool [B, T, T]; inverse of `pack_ancestor_mask`."""
    B, T, W = anc_bits.shape
    shifts = torch.arange(32, device=anc_bits.device)
    bits = (anc_bits.to(torch.int64)[..., None] >> shifts) & 1  # [B, T, W, 32]
    return bits.view(B, T, W * 32)[:, :, :T].bool()


def tree_kv_mask(anc_bits: torch.Tensor, kv_len: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Dense visibility: bool [B, T, S] with S = num_keys (prefix, tree, padding)."""
    B, T, _ = anc_bits.shape
    anc = unpack_ancestor_mask(anc_bits)  # [B, T, T]
    cols = torch.arange(num_keys, device=anc_bits.device)
    tree_col = cols[None, :] - (kv_len.to(torch.int64) - T)[:, None]  # [B, S]; < 0 in the prefix
    in_prefix = (tree_col < 0)[:, None, :]
    in_tree = ((tree_col >= 0) & (tree_col < T))[:, None, :]
    gathered = anc.gather(2, tree_col.clamp(0, T - 1)[:, None, :].expand(B, T, num_keys))
    return in_prefix | (in_tree & gathered)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, anc_bits: torch.Tensor, kv_len: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Hq,T,D], k/v [B,Hkv,S,D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} does not match k/v {tuple(k.shape)}")
    if T > k.shape[2]:
        raise ValueError(f"tree length T={T} must be <= S={k.shape[2]}")
    if anc_bits.shape != (B, T, (T + 31) // 32) or anc_bits.dtype != torch.int32:
        raise ValueError(f"anc_bits must be int32 [B, T, ceil(T/32)], got {anc_bits.dtype} {tuple(anc_bits.shape)}")
    if kv_len.shape != (B,):
        raise ValueError(f"kv_len must be [B], got {tuple(kv_len.shape)}")


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anc_bits: torch.Tensor,
    kv_len: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Plain fp32 PyTorch. q [B,Hq,T,D], k/v [B,Hkv,S,D], anc_bits int32 [B,T,W], kv_len [B]
    (T <= kv_len[b] <= S) -> out [B,T,Hq,D] in q's dtype. A query that sees no key gets zeros."""
    _check(q, k, v, anc_bits, kv_len)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    mask = tree_kv_mask(anc_bits, kv_len, k.shape[2])  # [B, T, S]
    q_grouped = q.float().reshape(B, Hkv, G * T, D)  # the G query heads of a KV head share its keys
    scores = (q_grouped @ k.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*T, S]
    scores = scores.view(B, Hkv, G, T, -1).masked_fill(~mask[:, None, None], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a row with no visible key: NaN -> zeros
    out = probs.view(B, Hkv, G * T, -1) @ v.float()  # [B, Hkv, G*T, D]
    return out.view(B, Hq, T, D).transpose(1, 2).to(q.dtype).contiguous()


if triton is not None:

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, qk, v, PRECISION: tl.constexpr):
        # qk is already in log2 units; masked entries are -inf. A row that has seen only
        # masked keys keeps m = -inf, so exponentiate against 0 instead (exp2(-inf) = 0, no NaN).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, anc_ptr, kv_len_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        sqb, sqh, sqt, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sab, sat,
        sob, sot, soh,
        qk_scale, Hkv, G, T, D, split_size,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M of the G*T (group head, tree token) rows of one (batch, kv head),
        # so each K/V block is loaded once for the whole GQA group, over one split of the
        # prefix (split 0 also takes the tree keys). With SPLIT, programs write unnormalised
        # partials (acc, m, l) that _combine_splits_kernel merges: a small tree over a long
        # prefix has few row blocks, and splitting the keys is what fills the GPU.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < G * T
        g = rows // T
        i = rows % T
        h = hkv * G + g
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_ptrs = q_ptr + b * sqb + h[:, None] * sqh + i[:, None] * sqt + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        kv_len = tl.load(kv_len_ptr + b).to(tl.int32)
        prefix_len = kv_len - T
        k_base = k_ptr + b * skb + hkv * skh + offs_d[None, :] * skd
        v_base = v_ptr + b * svb + hkv * svh + offs_d[None, :] * svd
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        # this split's share of the prefix: every query sees every key
        lo = pid_s * split_size
        hi = tl.minimum(lo + split_size, prefix_len)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * sks, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svs, mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, PRECISION)

        # the tree (split 0 only): query i sees tree key j iff bit j of anc_bits[b, i] is set
        tree_end = tl.where(pid_s == 0, kv_len, prefix_len)
        for start in range(prefix_len, tree_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < kv_len
            j = cols - prefix_len
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * sks, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svs, mask=kv_mask, other=0.0)
            word_mask = row_ok[:, None] & col_ok[None, :]
            words = tl.load(anc_ptr + b * sab + i[:, None] * sat + (j // 32)[None, :], mask=word_mask, other=0)
            seen = ((words >> (j % 32)[None, :]) & 1) != 0
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            qk = tl.where(seen & word_mask, qk, float("-inf"))
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, PRECISION)

        if SPLIT:
            # partials: acc [splits, B*Hkv, G*T, D], (m, l) [splits, B*Hkv, G*T, 2], all fp32
            part_row = (pid_s * tl.num_programs(1) + pid_bh) * G * T + rows
            acc_ptrs = part_acc_ptr + part_row[:, None] * D + offs_d[None, :]
            tl.store(acc_ptrs, acc, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(part_ml_ptr + part_row * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + part_row * 2 + 1, l_i, mask=row_ok)
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw nothing stays 0
            o_ptrs = out_ptr + b * sob + i[:, None] * sot + h[:, None] * soh + offs_d[None, :]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_splits_kernel(
        part_acc_ptr, part_ml_ptr, out_ptr, sob, sot, soh, n_splits, BH, Hkv, G, T, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # BLOCK_M rows of one (batch, kv head): rescale every split to the common row max.
        pid_bh = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < G * T
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d < D)[None, :]
        m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(0, n_splits):
            m_s = tl.load(part_ml_ptr + ((s * BH + pid_bh) * G * T + rows) * 2, mask=row_ok, other=0.0)
            m_max = tl.maximum(m_max, m_s)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)  # rows that saw no key anywhere
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s in range(0, n_splits):
            part_row = (s * BH + pid_bh) * G * T + rows
            m_s = tl.load(part_ml_ptr + part_row * 2, mask=row_ok, other=0.0)
            l_s = tl.load(part_ml_ptr + part_row * 2 + 1, mask=row_ok, other=0.0)
            scale = tl.exp2(m_s - m_use)
            total += l_s * scale
            acc += (
                tl.load(part_acc_ptr + part_row[:, None] * D + offs_d[None, :], mask=mask, other=0.0) * scale[:, None]
            )
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        b = pid_bh // Hkv
        h = (pid_bh % Hkv) * G + rows // T
        o_ptrs = out_ptr + b * sob + (rows % T)[:, None] * sot + h[:, None] * soh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _default_splits(q: torch.Tensor, row_programs: int, prefix_bound: int) -> int:
    """Key splits so that about two programs run per SM; none on CPU (the interpreter)."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(2 * sms // max(row_programs, 1), triton.cdiv(prefix_bound, 256), 64))


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anc_bits: torch.Tensor,
    kv_len: torch.Tensor,
    scaling: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton kernel; same contract as `tree_attention_reference`. fp32 accumulation, online
    softmax over key blocks, the prefix split over `num_splits` programs (default: enough to
    fill the GPU) whose partials a second kernel merges. No host sync: kv_len is read on the
    device and the split size comes from S, the padded key count."""
    require_triton()
    _check(q, k, v, anc_bits, kv_len)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    anc_bits = anc_bits.contiguous()
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    block_m = min(64, max(16, triton.next_power_of_2(G * T)))
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 64 if block_d <= 64 else 32
    m_blocks = triton.cdiv(G * T, block_m)
    if num_splits is None:
        num_splits = _default_splits(q, m_blocks * B * Hkv, S - T)
    split_size = triton.cdiv(triton.cdiv(max(S - T, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(S - T, split_size))  # no split left without keys
    part_acc = part_ml = out  # unused placeholders when not splitting
    if num_splits > 1:
        part_acc = torch.empty(num_splits, B * Hkv, G * T, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_splits, B * Hkv, G * T, 2, dtype=torch.float32, device=q.device)
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3); fp16/bf16: the backend default
    precision = "ieee" if q.dtype == torch.float32 else None
    _tree_attention_kernel[(m_blocks, B * Hkv, num_splits)](
        q, k, v, anc_bits, kv_len, out, part_acc, part_ml,
        *q.stride(), *k.stride(), *v.stride(),
        anc_bits.stride(0), anc_bits.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        scaling * math.log2(math.e), Hkv, G, T, D, split_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, SPLIT=num_splits > 1,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _combine_splits_kernel[(B * Hkv, m_blocks)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), out.stride(2),
            num_splits, B * Hkv, Hkv, G, T, D, BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anc_bits: torch.Tensor,
    kv_len: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of T packed tree tokens over a cached prefix plus the tree.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (prefix, then the T tree keys, then padding);
    anc_bits: int32 [B, T, ceil(T/32)] from `pack_ancestor_mask`; kv_len: int [B], the real
    key count per sequence (prefix_len = kv_len - T); scaling: softmax scale.
    Returns [B, T, Hq, D] in q's dtype (the layout transformers' attention functions return).
    CUDA tensors run the Triton kernel, others the reference (see `dispatch.set_backend`).
    """
    fn = tree_attention_triton if use_triton(q, k, v) else tree_attention_reference
    return fn(q, k, v, anc_bits, kv_len, scaling)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (register with `transformers.AttentionInterface`).

    With `anc_bits` (int32 [B, T, W]) and optionally `kv_len` ([B], default: all S keys) in
    kwargs, runs `tree_attention` and ignores `attention_mask`. Without `anc_bits` (e.g. a
    prefill the runner did not annotate) it is plain SDPA with the mask transformers built.
    Inference only: `dropout` is ignored; softcapping, and a sliding window shorter than the
    keys on the tree path, raise. Returns (attn_output [B, T, Hq, D], None).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("trieserve attention does not support attention logit softcapping")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    anc_bits = kwargs.get("anc_bits")
    if anc_bits is None:
        return _sdpa_forward(query, key, value, attention_mask, scaling), None
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        # the tree mask has no notion of a window; silently attending past it would be wrong
        raise NotImplementedError(f"tree attention with sliding_window={window} over {key.shape[2]} keys")
    kv_len = kwargs.get("kv_len")
    if kv_len is None:
        kv_len = torch.full((query.shape[0],), key.shape[2], dtype=torch.int64, device=query.device)
    return tree_attention(query, key, value, anc_bits, kv_len, scaling), None


def _sdpa_forward(query, key, value, attention_mask, scaling) -> torch.Tensor:
    G = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(G, dim=1)
    value = value.repeat_interleave(G, dim=1)
    T, S = query.shape[2], key.shape[2]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :S]
    is_causal = attention_mask is None and T > 1
    if is_causal and S > T:  # causal with a cached prefix: build the bottom-right aligned mask
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
        is_causal = False
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=is_causal
    )
    return out.transpose(1, 2).contiguous()
