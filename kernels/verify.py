"""Tree verification on the device: pick each node's next token, then walk the accepted path.

Shapes: B batch, T packed rows per tree (row 0 = the last committed token, rows 1.. = draft
tokens, rows >= n_rows[b] are padding), V vocabulary.

Both verifiers return (accept_len, accepted_rows, bonus):
- accept_len: int64 [B], the number of accepted draft rows (0..T-1);
- accepted_rows: int64 [B, T], the accepted path root first: accepted_rows[b, 0] = 0 (the root,
  whose KV entry is also new in this pass), then the accepted draft rows in root-to-leaf order,
  so accepted_rows[b, :accept_len[b] + 1] are the rows whose KV entries to keep; -1 after that;
- bonus: int64 [B], the model's token after the last accepted row.

No host sync: the walk is one Triton program per sequence (or a fixed-length vectorised torch
loop in the reference), and its results stay on the device until the caller reads them.
"""

from __future__ import annotations

import torch

from .dispatch import require_triton, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # references only
    triton = None


def _check(
    dist: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    n_rows: torch.Tensor,
    uniforms: torch.Tensor | None = None,
) -> None:
    if dist.dim() != 3 or tokens.shape != dist.shape[:2] or parents.shape != tokens.shape:
        raise ValueError(
            f"expected logits/probs [B,T,V], tokens and parents [B,T]; got {tuple(dist.shape)}, "
            f"{tuple(tokens.shape)}, {tuple(parents.shape)}"
        )
    if n_rows.shape != tokens.shape[:1]:
        raise ValueError(f"n_rows must be [B], got {tuple(n_rows.shape)}")
    if uniforms is not None and uniforms.shape != tokens.shape:
        raise ValueError(f"uniforms must be [B, T] like tokens, got {tuple(uniforms.shape)}")


def _walk_reference(
    pred: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, n_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred [B, T]: the model's token at each row. Descend from row 0 while some child's token
    equals pred at the current row (children of one node have distinct tokens)."""
    B, T = tokens.shape
    idx = torch.arange(T, device=tokens.device)
    real = (idx > 0) & (idx < n_rows[:, None])  # [B, T]; the root is nobody's child
    node = torch.zeros(B, dtype=torch.int64, device=tokens.device)
    accept_len = torch.zeros_like(node)
    rows = torch.full((B, T), -1, dtype=torch.int64, device=tokens.device)
    rows[:, 0] = 0
    for _ in range(T - 1):  # fixed length: once a walk stops, it stays stopped
        want = pred.gather(1, node[:, None])
        match = real & (parents == node[:, None]) & (tokens == want)
        found = match.any(1)
        node = torch.where(found, torch.where(match, idx, T).amin(1), node)
        accept_len += found
        rows.scatter_(1, accept_len[:, None], node[:, None])
    return accept_len, rows, pred.gather(1, node[:, None]).squeeze(1)


def _inverse_cdf_reference(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [B, T, V] (need not be normalised), uniforms [B, T] in [0, 1) -> int64 [B, T]: the
    first token whose cumulative mass exceeds u * total, never a zero-probability token."""
    cdf = probs.float().cumsum(-1)
    threshold = uniforms.float() * cdf[..., -1]
    below = (cdf <= threshold[..., None]).sum(-1)
    vocab = torch.arange(probs.shape[-1], device=probs.device)
    last_possible = torch.where(probs > 0, vocab, 0).amax(-1)  # u * total may round up to total
    return torch.minimum(below, last_possible)


def verify_greedy_reference(
    logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, n_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised torch; same contract as `verify_greedy`."""
    _check(logits, tokens, parents, n_rows)
    return _walk_reference(logits.argmax(-1), tokens, parents, n_rows)


def verify_sampling_reference(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    n_rows: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised torch; same contract as `verify_sampling`."""
    _check(probs, tokens, parents, n_rows, uniforms)
    return _walk_reference(_inverse_cdf_reference(probs, uniforms), tokens, parents, n_rows)


if triton is not None:

    @triton.jit
    def _matching_child(parents, tokens, idx, node, want, BLOCK_T: tl.constexpr):
        # lowest row whose parent is `node` and whose token is `want`; BLOCK_T when none
        return tl.min(tl.where((parents == node) & (tokens == want), idx, BLOCK_T), 0)

    @triton.jit
    def _walk_kernel(
        pred_ptr, tokens_ptr, parents_ptr, n_rows_ptr, accept_len_ptr, rows_ptr, bonus_ptr, T,
        BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # One program per sequence; the tree's parents and tokens stay in registers and the
        # walk stops at the first node without a matching child (typically a few steps).
        b = tl.program_id(0)
        idx = tl.arange(0, BLOCK_T)
        n = tl.load(n_rows_ptr + b).to(tl.int32)
        real = (idx > 0) & (idx < n) & (idx < T)
        parents = tl.load(parents_ptr + b * T + idx, mask=real, other=-1).to(tl.int32)
        tokens = tl.load(tokens_ptr + b * T + idx, mask=real, other=-1)
        path = tl.where(idx == 0, 0, -1)
        node = tl.zeros([], dtype=tl.int32)
        depth = tl.zeros([], dtype=tl.int32)
        nxt = _matching_child(parents, tokens, idx, node, tl.load(pred_ptr + b * T), BLOCK_T)
        while (nxt < BLOCK_T) & (depth < T - 1):  # depth bound: a malformed tree cannot spin
            node = nxt
            depth += 1
            path = tl.where(idx == depth, node, path)
            nxt = _matching_child(parents, tokens, idx, node, tl.load(pred_ptr + b * T + node), BLOCK_T)
        tl.store(rows_ptr + b * T + idx, path.to(tl.int64), mask=idx < T)
        tl.store(accept_len_ptr + b, depth.to(tl.int64))
        tl.store(bonus_ptr + b, tl.load(pred_ptr + b * T + node).to(tl.int64))

    @triton.jit
    def _inverse_cdf_kernel(probs_ptr, u_ptr, out_ptr, T, V, spb, spt, sub, sut, BLOCK_V: tl.constexpr):
        # One program per (sequence, row): total mass, then the first index whose running
        # cdf exceeds u * total. The running cdf is carried as the previous block's last value
        # (its max) so it stays monotone across blocks.
        pid = tl.program_id(0)
        bb = pid // T
        tt = pid % T
        row = probs_ptr + bb * spb + tt * spt
        total = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            total += tl.sum(tl.load(row + offs, mask=offs < V, other=0.0).to(tl.float32), 0)
        threshold = tl.load(u_ptr + bb * sub + tt * sut).to(tl.float32) * total
        running = tl.zeros([], dtype=tl.float32)
        below = tl.zeros([], dtype=tl.int32)
        last_possible = tl.zeros([], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            p = tl.load(row + offs, mask=offs < V, other=0.0).to(tl.float32)
            cdf = running + tl.cumsum(p, 0)
            below += tl.sum(((cdf <= threshold) & (offs < V)).to(tl.int32), 0)
            last_possible = tl.maximum(last_possible, tl.max(tl.where(p > 0, offs, 0), 0))
            running = tl.max(cdf, 0)
        tl.store(out_ptr + pid, tl.minimum(below, last_possible).to(tl.int64))


def _walk_triton(
    pred: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, n_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_triton()
    B, T = tokens.shape
    accept_len = torch.empty(B, dtype=torch.int64, device=tokens.device)
    rows = torch.empty(B, T, dtype=torch.int64, device=tokens.device)
    bonus = torch.empty(B, dtype=torch.int64, device=tokens.device)
    _walk_kernel[(B,)](
        pred.contiguous(), tokens.contiguous(), parents.contiguous(), n_rows, accept_len, rows, bonus, T,
        BLOCK_T=max(16, triton.next_power_of_2(T)),
    )  # fmt: skip
    return accept_len, rows, bonus


def verify_greedy_triton(
    logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, n_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.argmax over V, then the Triton walk; same contract as `verify_greedy`."""
    _check(logits, tokens, parents, n_rows)
    return _walk_triton(logits.argmax(-1), tokens, parents, n_rows)


def verify_sampling_triton(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    n_rows: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton inverse-CDF draw for every row, then the Triton walk; same contract as `verify_sampling`."""
    require_triton()
    _check(probs, tokens, parents, n_rows, uniforms)
    B, T, V = probs.shape
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    draws = torch.empty(B, T, dtype=torch.int64, device=probs.device)
    _inverse_cdf_kernel[(B * T,)](
        probs, uniforms, draws, T, V, probs.stride(0), probs.stride(1), uniforms.stride(0), uniforms.stride(1),
        BLOCK_V=min(4096, triton.next_power_of_2(V)),
    )  # fmt: skip
    return _walk_triton(draws, tokens, parents, n_rows)


def verify_greedy(
    logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, n_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance: descend from row 0 while a child's token equals the argmax of the
    current row's logits.

    logits: [B, T, V] (row r: next-token logits after row r's prefix); tokens: int64 [B, T];
    parents: int64 [B, T] (packed parent row, -1 for row 0); n_rows: int [B] real rows.
    Returns (accept_len [B], accepted_rows [B, T], bonus [B]), all int64 (see module docstring).
    """
    use = use_triton(logits, tokens, parents, n_rows)
    return (verify_greedy_triton if use else verify_greedy_reference)(logits, tokens, parents, n_rows)


def verify_sampling(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    n_rows: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampling acceptance, exact in distribution: at the current row draw a token from that
    row's distribution by inverse CDF with the row's uniform; descend if a child carries it,
    else it is the bonus.

    probs: [B, T, V] already-warped next-token distributions (any float dtype);
    uniforms: [B, T] in [0, 1), one per row; other arguments as in `verify_greedy`.
    """
    use = use_triton(probs, tokens, parents, n_rows, uniforms)
    fn = verify_sampling_triton if use else verify_sampling_reference
    return fn(probs, tokens, parents, n_rows, uniforms)
