"""KV eviction policies: which cached rows each KV head keeps.

Shapes: B batch, Hq query heads, Hkv KV heads, W observation window (the last W rows of a
layer, always kept), S rows a layer holds, P = S - W scored prefix rows, K kept rows.

A policy does two things:

- `score(q_win, keys, scaling, window, valid)`: one fp32 score per prefix row [B, Hkv, P] (higher
  = keep; -inf for padding rows, see below). Attention-based policies call
  `trieserve.kernels.eviction_scores` with their aggregation.
- `plan(scores, keep, window)`: per layer, the index [B, Hkv, K] of rows every KV head keeps
  (the window's W rows last). The base class keeps a uniform `keep` rows per layer (window
  included), each KV head choosing its own top rows; a policy can override `layer_budgets` to
  spread the total differently across layers.

Per-head budgets (`head_budgets`, AdaKV: "Ada-KV: Optimizing KV Cache Eviction by Adaptive
Budget Allocation", Feng et al., 2024): one top-k over all KV heads' scores of a layer, so a head
whose attention is spread keeps more rows than one that reads a few. The cache stores a layer as
[B, Hkv, K, D], so heads that keep fewer rows are padded to the layer's largest count (index -1,
a padding row that attention skips; see trieserve.cache.kv). Padding is memory, so a head keeps
at most HEAD_CAP times the layer's mean: the padded layer holds at most HEAD_CAP x its budget.

Adding a policy is one small class and one line in `POLICIES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from trieserve.cache.criticality import critical_scores
from trieserve.kernels.eviction_scores import eviction_scores

# A head keeps at most this many times the layer's mean rows (window included) under per-head
# budgets: the cap on padding, so memory stays within 1.25x the budget.
HEAD_CAP = 1.25


def top_rows(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores per (batch, head), ascending. scores fp32 [B, H, P] ->
    int64 [B, H, n]. Ties go to the later (more recent) row, so the choice is deterministic."""
    P = scores.shape[-1]
    order = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :n]
    return (P - 1 - order).sort(dim=-1).values


def top_rows_per_head(scores: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Per-head budgets: the `total` highest scores over all heads of each batch row, at most
    `cap` from one head. scores fp32 [B, H, P] -> int64 [B, H, n] (n = the largest head's count),
    each head's rows ascending after -1 padding. Ties go to the later row (then the lower head),
    so the choice is deterministic on every device."""
    B, H, P = scores.shape
    cap = min(cap, P)
    ranked = top_rows(scores, cap)  # each head's `cap` best rows
    picked = scores.gather(-1, ranked).reshape(B, -1)  # their scores
    # later rows first, then a stable sort by score: among equal scores the later row wins
    recent = ranked.reshape(B, -1).argsort(dim=-1, descending=True, stable=True)
    by_score = picked.gather(-1, recent).argsort(dim=-1, descending=True, stable=True)
    best = recent.gather(-1, by_score)[:, : min(total, H * cap)]
    chosen = torch.zeros(B, H * cap, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, best, True)
    chosen = chosen.view(B, H, cap)
    n = int(chosen.sum(-1).max())
    # chosen rows keep their ascending order; the others sort first and become -1
    order = chosen.to(torch.int8).argsort(dim=-1, stable=True)[..., cap - n :]
    index = ranked.gather(-1, order)
    return index.masked_fill(~chosen.gather(-1, order), -1)


def with_window(prefix_index: torch.Tensor, prefix_len: int, window: int) -> torch.Tensor:
    """Append the window rows P..P+W-1 to every head's kept prefix rows [B, H, n]."""
    B, H, _ = prefix_index.shape
    win = torch.arange(prefix_len, prefix_len + window, device=prefix_index.device)
    return torch.cat([prefix_index, win.expand(B, H, window)], dim=-1)


def _drop_padding(index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Chosen rows whose score is -inf (padding rows of an earlier compaction) become -1."""
    if not bool(torch.isinf(scores).any()):
        return index
    return index.masked_fill(torch.isneginf(scores.gather(-1, index.clamp(min=0))), -1)


class EvictionPolicy:
    """Base class: per-KV-head top-k of `score` plus the window, `keep` rows per layer."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True  # False: the cache is left exactly as prefill wrote it
    needs_queries: ClassVar[bool] = True  # scores need the window's queries
    global_budget: ClassVar[bool] = False  # budgets depend on every layer's scores at once
    head_budgets: ClassVar[bool] = False  # one top-k over a layer's heads (AdaKV), not per head

    def score(
        self,
        q_win: torch.Tensor | None,
        keys: torch.Tensor,
        scaling: float,
        window: int,
        valid: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        out_proj: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q_win [B, Hq, W, D] (None when `needs_queries` is False), keys and values
        [B, Hkv, S, D] whose last W = `window` rows are the window's, valid bool [B, Hkv, S]
        (None: every row is real), out_proj the layer's output projection weight [M, Hq * D]
        (value-aware policies; None skips that part) -> fp32 [B, Hkv, S - W], -inf at padding."""
        raise NotImplementedError

    def layer_budgets(self, scores: dict[int, torch.Tensor], keep: int, window: int) -> dict[int, int]:
        """Rows (window included) each scored layer keeps; uniform by default."""
        return {layer: min(keep, s.shape[-1] + window) for layer, s in scores.items()}

    def plan(self, scores: dict[int, torch.Tensor], keep: int, window: int) -> dict[int, torch.Tensor]:
        """scores: layer -> fp32 [B, Hkv, P_l]; keep: rows per layer (window included) on average.
        Returns layer -> int64 [B, Hkv, K_l] for the layers that shrink (K_l < P_l + W)."""
        if keep < window:
            raise ValueError(f"keep={keep} must be at least the window ({window})")
        out = {}
        for layer, k in self.layer_budgets(scores, keep, window).items():
            s = scores[layer]
            if k < s.shape[-1] + window:
                if self.head_budgets:
                    H = s.shape[1]
                    prefix = top_rows_per_head(s, H * (k - window), math.floor(HEAD_CAP * k) - window)
                else:
                    prefix = top_rows(s, k - window)
                out[layer] = with_window(_drop_padding(prefix, s), s.shape[-1], window)
        return out


@dataclass
class FullCache(EvictionPolicy):
    """No eviction: every prompt row stays (the reference the others are measured against)."""

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False

    def score(self, q_win, keys, scaling, window, valid=None, values=None, out_proj=None):
        return torch.ones(*keys.shape[:2], keys.shape[2] - window, device=keys.device)

    def plan(self, scores, keep, window):
        return {}


@dataclass
class StreamingPolicy(EvictionPolicy):
    """StreamingLLM ("Efficient Streaming Language Models with Attention Sinks", Xiao et al.,
    2023): keep the first `sinks` rows and the most recent ones; no attention needed."""

    name: ClassVar[str] = "streaming"
    needs_queries: ClassVar[bool] = False
    sinks: int = 4

    def score(self, q_win, keys, scaling, window, valid=None, values=None, out_proj=None):
        B, H, S = keys.shape[:3]
        P = S - window
        pos = torch.arange(P, dtype=torch.float32, device=keys.device)
        pos[: self.sinks] = float("inf")
        pos = pos.expand(B, H, P)
        return pos if valid is None else pos.masked_fill(~valid[..., :P], float("-inf"))


@dataclass
class SnapKVPolicy(EvictionPolicy):
    """SnapKV ("SnapKV: LLM Knows What You are Looking for Before Generation", Li et al., 2024):
    pooled window attention averaged over window queries and GQA group heads."""

    name: ClassVar[str] = "snapkv"
    aggregation: ClassVar[str] = "mean"
    pool_kernel: int = 5

    def score(self, q_win, keys, scaling, window, valid=None, values=None, out_proj=None):
        if q_win is None or q_win.shape[2] != window:
            raise ValueError(f"{self.name} needs the window's {window} queries")
        return eviction_scores(q_win, keys, scaling, self.aggregation, self.pool_kernel, valid=valid)


@dataclass
class AdaKVPolicy(SnapKVPolicy):
    """AdaKV ("Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", Feng et
    al., 2024) on SnapKV's scores: mean aggregation, per-head budgets from one top-k over the
    layer's heads (capped at HEAD_CAP, see the module docstring)."""

    name: ClassVar[str] = "adakv"
    head_budgets: ClassVar[bool] = True


@dataclass
class DefensivePolicy(SnapKVPolicy):
    """DefensiveKV ("Taming the Fragility of KV Cache Eviction in LLM Inference", Feng et al.,
    2025): max over window queries and group heads, floored at the head's mean (worst-case
    instead of average importance), then, as the published method does, CriticalKV's
    value-aware two-stage scores (trieserve.cache.criticality; `value_weighting=False` turns
    them off) and AdaKV's per-head budgets (one top-k over the layer's heads, each head capped
    at HEAD_CAP x the layer's mean)."""

    name: ClassVar[str] = "defensive"
    aggregation: ClassVar[str] = "defensive"
    head_budgets: ClassVar[bool] = True
    value_weighting: bool = True
    # how the value norms are normalised (trieserve.cache.criticality): over each head's rows,
    # or over the heads at each row as the published code does. Defaults from bench/eviction.py
    # (docs/benchmarks.md): rows scored better for this policy, heads for Layer-DefensiveKV.
    value_norms: str = "rows"

    def score(self, q_win, keys, scaling, window, valid=None, values=None, out_proj=None):
        scores = super().score(q_win, keys, scaling, window, valid)
        if not self.value_weighting or values is None or out_proj is None:
            return scores
        return critical_scores(scores, q_win, keys, values, out_proj, scaling, valid, norm_over=self.value_norms)


@dataclass
class LayerDefensivePolicy(DefensivePolicy):
    """Layer-DefensiveKV (same paper): defensive scores, and one top-k over all layers' scores
    sets each layer's budget (layers that spread attention keep more); then per-layer selection
    with per-head budgets as in DefensiveKV."""

    name: ClassVar[str] = "layer_defensive"
    global_budget: ClassVar[bool] = True
    value_norms: str = "heads"

    def layer_budgets(self, scores, keep, window):
        layers = sorted(scores)
        if not layers:
            return {}
        B, H = scores[layers[0]].shape[:2]
        flat = torch.cat([scores[layer].reshape(-1) for layer in layers])
        sizes = [scores[layer].shape[-1] for layer in layers]
        total = min(len(layers) * (keep - window) * B * H, int(torch.isfinite(flat).sum()))  # padding: -inf
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[flat.topk(total).indices] = True
        counts = torch.stack([c.sum() for c in chosen.split([n * B * H for n in sizes])]).double() / (B * H)
        return {layer: window + k for layer, k in zip(layers, _round_preserving_sum(counts, sizes), strict=True)}


def _round_preserving_sum(values: torch.Tensor, caps: list[int]) -> list[int]:
    """Round per-layer mean counts to integers (each <= its cap) keeping the total (largest
    remainders first): the kept rows over all layers equal the global budget."""
    floor = values.floor()
    out = floor.long().tolist()
    short = int(round(float(values.sum() - floor.sum())))
    for i in (values - floor).argsort(descending=True).tolist():
        if short <= 0:
            break
        if out[i] < caps[i]:
            out[i] += 1
            short -= 1
    return out


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (FullCache, StreamingPolicy, SnapKVPolicy, AdaKVPolicy, DefensivePolicy, LayerDefensivePolicy)
}


def make_policy(name: str, **options) -> EvictionPolicy:
    """The policy registered as `name` (the CLI / request name)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](**options)
