"""Value-aware scores (CriticalKV: "Identify Critical KV Cache in LLM Inference from an Output
Perturbation Perspective", Feng et al., 2025), as the published DefensiveKV applies them.

An entry's effect on a layer's output is its attention weight times what its value adds after
the output projection, so attention alone misjudges rows whose values are large or near zero.
Two stages, per (batch, KV head):

1. Protection: the fewest prefix rows that, with the window (always kept), carry `coverage` of
   the window's mean attention are kept first, in order of attention.
2. The rest are ranked by score x ||v_i W_o||_1 (averaged over the KV head's query heads),
   the norms normalised either over the head's rows (`norm_over="rows"`: every head's weights
   sum to one, so the ranking within a head is the raw norms') or, as the published code does,
   over the KV heads at each row (`norm_over="heads"`: a row's weights sum to one across heads,
   so a head's rows are also weighed against the other heads' values at the same position).

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv), W window, S keys (the last W
are the window's), P = S - W prefix rows, D head dim, M model width. One detail of the published
code differs here on purpose: the window's share of attention is measured on the window's own keys
(not the last W prefix keys, which the published slicing reads).
"""

from __future__ import annotations

import torch
from trieserve.kernels.eviction_scores import window_probs


def window_attention(
    q_win: torch.Tensor, keys: torch.Tensor, scaling: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean softmax attention of the window's queries (over them and each KV head's query
    heads), fp32 [B, Hkv, S]; causal within the window, padding rows (valid False) get 0."""
    B, Hq, W, _ = q_win.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    return window_probs(q_win, keys, scaling, valid).view(B, Hkv, Hq // Hkv, W, S).mean((2, 3))


def value_norms(values: torch.Tensor, out_proj: torch.Tensor, q_heads: int) -> torch.Tensor:
    """||v_i W_o^(q)||_1 averaged over each KV head's query heads q. values [B, Hkv, P, D];
    out_proj [M, Hq * D] (the layer's o_proj weight) -> fp32 [B, Hkv, P]."""
    B, Hkv, P, D = values.shape
    G = q_heads // Hkv
    w = out_proj.float().view(out_proj.shape[0], q_heads, D)
    norms = torch.zeros(B, Hkv, P, dtype=torch.float32, device=values.device)
    for q in range(q_heads):  # one query head at a time: [B, P, M], not [B, Hq, P, M]
        norms[:, q // G] += (values[:, q // G].float() @ w[:, q].T).abs().sum(-1)
    return norms / G


def critical_scores(
    scores: torch.Tensor,
    q_win: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    out_proj: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    coverage: float = 0.9,
    norm_over: str = "rows",
) -> torch.Tensor:
    """scores fp32 [B, Hkv, P] (any attention-based aggregation, >= 0; -inf at padding rows) ->
    the two-stage scores, fp32 [B, Hkv, P]: protected rows at the layer's best weighted score x
    (1 + their attention), so above every other row of the layer; the rest scores x normalised
    value norms."""
    W = q_win.shape[2]
    P = keys.shape[2] - W
    attn = window_attention(q_win, keys, scaling, valid)
    prefix, window_mass = attn[..., :P], attn[..., P:].sum(-1, keepdim=True)
    norms = value_norms(values[:, :, :P], out_proj, q_win.shape[1])
    if valid is not None:
        norms = norms.masked_fill(~valid[..., :P], 0.0)
    if norm_over not in ("rows", "heads"):
        raise ValueError(f"norm_over must be 'rows' or 'heads', not {norm_over!r}")
    weights = norms / norms.sum(-1 if norm_over == "rows" else 1, keepdim=True).clamp(min=1e-12)
    padding = torch.isneginf(scores)
    weighted = torch.where(padding, scores, scores * weights)  # -inf x 0 would be nan
    # stage 1: rows in order of attention until, with the window's share, `coverage` is reached
    ranked, order = prefix.sort(-1, descending=True)
    before = ranked.cumsum(-1) - ranked  # attention of the rows ranked above each row
    needed = (coverage - window_mass).clamp(min=0.0)
    protected = torch.zeros_like(prefix, dtype=torch.bool).scatter_(-1, order, before < needed)
    # protected rows score the layer's best weighted score, scaled up by their
    # attention so they rank among themselves: above every unprotected row of this layer, yet
    # comparable with other layers' scores when one top-k spans all layers (Layer-DefensiveKV)
    top = weighted.masked_fill(padding, 0.0).flatten(1).amax(-1).view(-1, 1, 1)
    out = torch.where(protected & ~padding, top * (1.0 + prefix), weighted)
    return out if valid is None else out.masked_fill(~valid[..., :P], float("-inf"))
